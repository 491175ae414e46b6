"""The embedded-default demo: real DINOv2-S + SmolLM2-135M-Instruct, trained on easy-vqa, on a laptop CPU.

prepare assets -> caption data for ``align`` -> train (align, finetune) -> greedy eval on a fixed held-out subset
-> table beside the blind baselines -> run folder (config, checkpoints, metrics JSON, loss PNG, predictions).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from vlweave import assets
from vlweave.config import RunConfig
from vlweave.data.easyvqa import add_question_types, question_template
from vlweave.data.questions import read_questions
from vlweave.eval.analysis import print_details
from vlweave.eval.runner import load_eval_questions
from vlweave.eval.vqa import majority_baselines
from vlweave.export.card import refresh_model_card
from vlweave.presets import preset_path
from vlweave.runs import train_and_evaluate

console = Console(stderr=True)


def run_demo(overrides: list[str] | None = None, output_dir: str | None = None, progress: bool = True,
             config: str = "demo") -> dict[str, Any]:
    """``config``: the ``demo`` preset or a variant of it (e.g. ``demo-dense-dci``), by name or YAML path."""
    t0 = time.time()
    cfg = RunConfig.load(preset_path(config), overrides or [])
    if output_dir:
        cfg.train.output_dir = output_dir
    run_dir = Path(cfg.train.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    for name in ("dinov2-small", "smollm2-135m-instruct", "easy-vqa"):
        console.print(f"[bold]asset[/bold] {name}: {assets.pull(name)}")
    t_assets = time.time() - t0
    questions = load_eval_questions(cfg.eval.data, cfg.eval.image_folder, cfg.eval.limit, cfg.eval.subset_seed)
    add_question_types(questions)
    train_q = read_questions(assets.pull("easy-vqa") / "train_qa.jsonl", assets.pull("easy-vqa"), check_images=False)
    run = train_and_evaluate(cfg, questions, run_dir, progress, group_by="type", train=train_q,
                             template_fn=question_template)
    baselines = majority_baselines(train_q, questions, question_template, group_fn=lambda q: q.meta["type"])
    result = {
        "accuracy": run.accuracy,
        "n_questions": run.report["n"],
        "by_type": run.report["by_type"],
        "baselines": baselines,
        "groups": run.report["groups"],  # by type, with counts and both blind baselines (vlweave.eval.analysis)
        "confusion": run.report["confusion"],
        "consistency": run.report["consistency"],
        "seconds": {"assets": t_assets, "train": run.train_seconds, "eval": run.eval_seconds,
                    "total": time.time() - t0},
        "run_dir": str(run_dir),
        "config": config,
        "connector": cfg.connector.type,
        "visual_tokens": run.visual_tokens,
    }
    (run_dir / "metrics.json").write_text(json.dumps(result, indent=2))
    refresh_model_card(run_dir / "final")  # the card of final/ now lists the held-out accuracy
    print_table(result)
    return result


def print_table(result: dict[str, Any]) -> None:
    table = Table(title=f"easy-vqa held-out ({result['n_questions']} questions, greedy, normalised exact match)")
    table.add_column("model")
    table.add_column("accuracy", justify="right")
    for name, acc in (("majority answer (blind)", result["baselines"]["majority"]),
                      ("majority per template (blind)", result["baselines"]["majority_per_template"])):
        table.add_row(name, f"{acc:.3f}")
    table.add_row(f"[bold]vlweave {result.get('config', 'demo')}[/bold]", f"[bold]{result['accuracy']:.3f}[/bold]")
    blind = result["baselines"].get("majority_per_template_by_group", {})
    for qtype, r in result["by_type"].items():
        b = f" (blind {blind[qtype]:.3f})" if qtype in blind else ""
        table.add_row(f"  {qtype} questions ({r['n']}){b}", f"{r['accuracy']:.3f}")
    Console().print(table)
    print_details(result, Console())
    s = result["seconds"]
    Console().print(f"time: assets {s['assets']:.0f}s, train {s['train']:.0f}s, eval {s['eval']:.0f}s, "
                    f"total {s['total']:.0f}s; run folder: {result['run_dir']}")
