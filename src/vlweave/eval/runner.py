"""Evaluate a checkpoint on a question file: load, generate, score, save predictions and metrics."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Any

from vlweave.data.questions import Question, read_questions
from vlweave.eval.vqa import (
    PartialPredictions,
    exact_match_report,
    generate_answers,
    prediction_row,
    save_predictions,
)
from vlweave.safe_io import atomic_write_text
from vlweave.assets import resolve_data_path
from vlweave.language.routing import routing_report
from vlweave.vision.cache import FeatureCache


def select_questions(questions: list[Question], limit: int | None, subset_seed: int | None) -> list[Question]:
    """A fixed subset: the first ``limit`` questions, or a seeded random sample of ``limit`` (same for every model)."""
    if limit is not None and limit < 1:
        raise ValueError(f"--limit must be at least 1, got {limit}")
    if limit is None or limit >= len(questions):
        return list(questions)
    if subset_seed is None:
        return list(questions[:limit])
    idx = sorted(random.Random(subset_seed).sample(range(len(questions)), limit))
    return [questions[i] for i in idx]


def load_eval_questions(data: str, image_folder: str | None = None, limit: int | None = None,
                        subset_seed: int | None = None) -> list[Question]:
    """Questions to score by exact match: every record needs a string ``answer``; the selected questions' images
    are decoded here (in parallel, cached by content), before any model is loaded."""
    from vlweave.data.images import verify_images

    path, root = resolve_data_path(data)
    if limit is not None and limit < 1:
        raise ValueError(f"--limit must be at least 1, got {limit}")
    questions = read_questions(path, image_folder or root, require_answer=True)
    selected = select_questions(questions, limit, subset_seed)
    verify_images([(f"question_id {q.question_id!r}", q.image) for q in selected if isinstance(q.image, str)],
                  Path(path).expanduser().resolve())
    return selected


def evaluate(model, tokenizer, questions: list[Question], *, out_dir: str | Path | None = None,
             batch_size: int = 32, max_new_tokens: int = 8, prompt_suffix: str = "", use_cache: bool = True,
             group_key: str | None = None, progress: bool = True, bf16: bool = False,
             processor: Any = None, template: str | None = None, train: list[Question] | None = None,
             group_by: str | None = None, template_fn: Any = None, group_fn: Any = None,
             routing: str | None = None, routing_seed: int = 0) -> dict[str, Any]:
    """Greedy answers, normalised exact match, and the readable report of :func:`vlweave.eval.analysis.analyse`
    (``groups`` with counts and blind baselines learned from ``train``, ``baselines``, ``confusion``,
    ``consistency``); ``group_key`` also keeps the older ``by_<key>`` accuracies.  ``template``: a chat template
    instead of the checkpoint's own.  Saves ``predictions.jsonl`` and ``eval_metrics.json`` in ``out_dir``.
    ``routing``: for a routed connector (MoVA), ``model`` (the LM routes each question first) or a fixed mode
    (``all``/``none``/``random``/``A,C``); each answer's routing goes to predictions.jsonl and the counts
    (unparseable answers, expert use) to the metrics."""
    from vlweave.eval.analysis import analyse

    store = None
    if use_cache and FeatureCache.usable(model):
        store = FeatureCache(model)
    t0 = time.time()
    decisions: list | None = [] if routing is not None else None
    partial = None if out_dir is None else PartialPredictions(
        Path(out_dir) / "predictions.partial.jsonl", lambda i, a: prediction_row(questions[i], a))
    done = False
    try:
        answers = generate_answers(model, tokenizer, questions, batch_size=batch_size, max_new_tokens=max_new_tokens,
                                   prompt_suffix=prompt_suffix, store=store, progress=progress, bf16=bf16,
                                   processor=processor, template=template, on_batch=partial,
                                   routing=routing,
                                   routing_seed=routing_seed, decisions=decisions)
        done = True
    finally:
        if partial is not None:
            partial.close(interrupted=not done)  # removed below, once the complete file is written
    seconds = time.time() - t0
    report = exact_match_report(questions, answers, group_key=group_key)
    analysis = analyse(questions, answers, train, group_by=group_by, template_fn=template_fn, group_fn=group_fn)
    report.update({k: v for k, v in analysis.items() if k not in report})
    report.update({"eval_seconds": seconds, "prompt_suffix": prompt_suffix, "max_new_tokens": max_new_tokens,
                   "scorer": "normalised exact match", "decoding": "greedy"})
    if decisions is not None:
        report["routing"] = routing_report(routing, routing_seed, decisions)
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        save_predictions(out / "predictions.jsonl", questions, answers, decisions)
        atomic_write_text(out / "eval_metrics.json", json.dumps(report, indent=2), "eval metrics")
        assert partial is not None
        partial.path.unlink(missing_ok=True)
    report["answers"] = answers
    return report
