"""Train one run config and evaluate it: the step ``vlweave demo`` and ``vlweave compare`` share.

:func:`train_and_evaluate` builds the :class:`~vlweave.train.trainer.Trainer`, trains, then evaluates the trained
model (greedy, normalised exact match on given questions, or the embedded multi-domain benchmark with its exact
scorers) and times each part.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlweave.config import RunConfig
from vlweave.data.questions import Question
from vlweave.eval.runner import evaluate
from vlweave.train.trainer import Trainer


@dataclass
class RunResult:
    accuracy: float
    groups: dict[str, float]  # accuracy per question group
    report: dict[str, Any]  # the evaluation's own report (``evaluate`` without the answers, or ``evaluate_suite``)
    setup_seconds: float  # building the trainer (model, data)
    train_seconds: float
    eval_seconds: float
    visual_tokens: int


def group_key(questions: list[Question]) -> str | None:
    """Group results by the questions' own category field when they have one (``type`` for easy-vqa)."""
    for key in ("category", "type", "domain"):
        if all(key in q.meta for q in questions):
            return key
    return None


def train_and_evaluate(cfg: RunConfig, questions: list[Question] | None, run_dir: str | Path, progress: bool,
                       group_by: str | None = None) -> RunResult:
    """Train ``cfg`` into ``run_dir`` and evaluate it: on ``questions`` (exact match, grouped by ``group_by``,
    default :func:`group_key`), or, with ``questions=None``, on the embedded multi-domain benchmark with its exact
    scorers (groups = ``domain/format`` and ``all/format``).  Predictions and metrics are saved in ``run_dir``."""
    cfg.train.output_dir = str(run_dir)
    t0 = time.time()
    trainer = Trainer(cfg, progress=progress)
    t1 = time.time()
    trainer.train()
    t2 = time.time()
    if questions is None:
        from vlweave import assets
        from vlweave.eval.suite import evaluate_suite

        report = evaluate_suite(trainer.model, trainer.tokenizer, assets.pull("synthetic"),
                                limit_per_domain=cfg.eval.limit, batch_size=cfg.eval.batch_size,
                                max_new_tokens=cfg.eval.max_new_tokens, out_dir=run_dir, progress=progress,
                                routing=cfg.eval.routing, routing_seed=cfg.eval.routing_seed)
        groups = {f"{d}/{f}": v for d, by_f in report["scores"].items() for f, v in by_f.items()}
        groups |= {f"all/{f}": v for f, v in report["overall"].items()}
        accuracy = report["mean"]
    else:
        key = group_by or group_key(questions)
        report = evaluate(trainer.model, trainer.tokenizer, questions, out_dir=run_dir,
                          batch_size=cfg.eval.batch_size, max_new_tokens=cfg.eval.max_new_tokens,
                          prompt_suffix=cfg.eval.prompt_suffix, group_key=key, progress=progress,
                          bf16=cfg.train.bf16, processor=trainer.processor, routing=cfg.eval.routing,
                          routing_seed=cfg.eval.routing_seed)
        report.pop("answers")
        groups = {k: v["accuracy"] for k, v in report.get(f"by_{key}", {}).items()} if key else {}
        accuracy = report["accuracy"]
    return RunResult(accuracy=accuracy, groups=groups, report=report, setup_seconds=t1 - t0,
                     train_seconds=t2 - t1, eval_seconds=time.time() - t2,
                     visual_tokens=trainer.model.num_image_tokens)


__all__ = ["RunResult", "group_key", "train_and_evaluate"]
