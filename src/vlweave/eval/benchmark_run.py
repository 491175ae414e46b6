"""Run a checkpoint on a released benchmark: greedy answers for :func:`load_benchmark`'s prompts, scored with the
registered scorer; predictions JSONL + a metrics JSON that says how every number was made.

The metrics JSON is :func:`registry.score_benchmark`'s record (benchmark, split, prompt suffix, parser, headline,
metrics) plus the model (checkpoint + its config), the generation settings and the files read.  Images go through
the tower batch by batch (no feature cache: most benchmark images are seen once, and caching tens of thousands of
images' features would not fit in memory).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from vlweave import __version__
from vlweave.eval.benchmarks.inputs import BenchmarkInputs
from vlweave.eval.benchmarks.registry import get_benchmark, parse_benchmark, score_benchmark
from vlweave.eval.vqa import PartialPredictions, generate_answers
from vlweave.language.routing import routing_report
from vlweave.processor import VlweaveProcessor
from vlweave.safe_io import atomic_write_text

# LLaVA's model_vqa_loader.py / model_vqa_mmbench.py default (methods.md §0.8).
DEFAULT_MAX_NEW_TOKENS = 128


def _jsonable(value: Any) -> Any:
    return value if isinstance(value, (str, int, float, bool, type(None), list, dict)) else str(value)


def write_predictions(path: str | Path, inputs: BenchmarkInputs, answers: list[str],
                      parsed: list[Any] | None = None, decisions: list[Any] | None = None) -> None:
    """One JSON line per question: ``question_id`` (MMBench: the row index), ``prompt``, ``prediction``,
    ``parsed`` (what the scorer's parser made of the prediction -- see :func:`registry.parse_benchmark`; written
    when given), ``gold`` and ``image`` (the path; ``null`` for images decoded in memory)."""
    lines = []
    for position, (item, answer) in enumerate(zip(inputs.items, answers)):
        row = {"question_id": item.question_id, "prompt": item.text, "prediction": answer}
        if parsed is not None:
            row["parsed"] = _jsonable(parsed[position])
        row.update({"gold": _jsonable(item.answer),
                    "image": item.image if isinstance(item.image, str) else None})
        if decisions is not None:  # a routed (MoVA) model: how this answer was routed
            row["routing"] = None if decisions[position] is None else decisions[position].to_json()
        lines.append(json.dumps(row, ensure_ascii=False) + "\n")
    atomic_write_text(path, "".join(lines), "predictions")


def read_predictions(path: str | Path) -> dict[str, str]:
    """``{str(question_id): prediction}`` from a predictions JSONL written by :func:`write_predictions`."""
    out: dict[str, str] = {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            out[str(row["question_id"])] = row["prediction"]
    return out


def run_benchmark(model, tokenizer, inputs: BenchmarkInputs, *, out_dir: str | Path, parser: str | None = None,
                  checkpoint: str | None = None, batch_size: int = 32,
                  max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, progress: bool = True,
                  bf16: bool = False, processor: VlweaveProcessor | None = None, routing: str | None = None,
                  routing_seed: int = 0) -> dict[str, Any]:
    """Generate, score and write ``predictions.jsonl`` and ``metrics.json`` under ``out_dir``; returns the metrics
    record.  Without ground truth (``inputs.unscored_reason``) the record has ``scored: false`` and no metrics.
    ``routing``: a routed (MoVA) model's routing mode (see :func:`vlweave.eval.vqa.generate_answers`)."""
    spec = get_benchmark(inputs.benchmark)
    described = spec.describe(split=inputs.split, parser=parser)  # validates the parser before generating
    processor = processor if processor is not None else VlweaveProcessor.from_model(model, tokenizer)
    t0 = time.time()
    decisions: list | None = [] if routing is not None else None
    out = Path(out_dir)
    items = inputs.items
    partial = PartialPredictions(out / "predictions.partial.jsonl",
                                 lambda i, a: {"question_id": items[i].question_id, "prompt": items[i].text,
                                               "prediction": a})
    done = False
    try:
        answers = generate_answers(model, tokenizer, inputs.items, batch_size=batch_size,
                                   max_new_tokens=max_new_tokens, progress=progress, bf16=bf16, processor=processor,
                                   on_batch=partial, routing=routing, routing_seed=routing_seed,
                                   decisions=decisions)
        done = True
    finally:
        partial.close(interrupted=not done)  # removed once predictions.jsonl is complete
    seconds = time.time() - t0
    # The parse needs no ground truth (MMBench reads only the options), so test splits get it too.
    parsed = parse_benchmark(inputs.benchmark, answers, inputs.records, parser=described["parser"])
    write_predictions(out / "predictions.jsonl", inputs, answers, parsed, decisions)
    partial.path.unlink(missing_ok=True)

    if inputs.unscored_reason is None:
        report = score_benchmark(inputs.benchmark, answers, inputs.records, split=inputs.split,
                                 parser=described["parser"])
        report["scored"] = True
    else:
        report = {**described, "headline_metric": spec.headline, "headline": None, "metrics": None,
                  "scored": False, "unscored_reason": inputs.unscored_reason}
    cfg = model.config
    report.update({
        "n": len(answers),
        "data": inputs.sources,
        "generation": {"decoding": "greedy", "temperature": 0, "max_new_tokens": max_new_tokens,
                       "batch_size": batch_size, "padding": "left", "template": processor.chat_template_name,
                       "system_prompt": processor.system_prompt, "image_placeholder": "<image>\\n before the question",
                       "bf16": bf16},
        "eval_seconds": seconds,
        **({"routing": routing_report(routing, routing_seed, decisions)} if decisions is not None else {}),
        "model": {"checkpoint": checkpoint, "config": json.loads(cfg.to_json_string(use_diff=False))},
        "vlweave_version": __version__,
    })
    atomic_write_text(out / "metrics.json", json.dumps(report, indent=2, default=str), "benchmark metrics")
    return report
