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

EVAL_FILES = ("predictions.jsonl", "eval_metrics.json", "metrics.json")  # what an evaluation adds to a run folder


@dataclass
class RunResult:
    accuracy: float
    groups: dict[str, float]  # accuracy per question group
    baselines: dict[str, dict[str, float]]  # group (and "accuracy": all questions) -> blind baseline -> accuracy
    report: dict[str, Any]  # the evaluation's own report (``evaluate`` without the answers, or ``evaluate_suite``)
    setup_seconds: float  # building the trainer (model, data)
    train_seconds: float
    eval_seconds: float
    visual_tokens: int


def group_key(questions: list[Question]) -> str | None:
    """Group results by the questions' own category field when they have one (``type`` for easy-vqa)."""
    from vlweave.eval.analysis import group_field

    return group_field(questions)


def training_questions(cfg: RunConfig) -> list[Question] | None:
    """The question/answer pairs the blind baselines learn from: the last non-align stage's data (or
    ``data.train``), every turn pair; None when there is no such file."""
    from vlweave.assets import resolve_data_path
    from vlweave.eval.analysis import train_questions

    spec = next((s.data for s in reversed(cfg.train.stages) if s.name != "align" and s.data), None) or cfg.data.train
    if not spec:
        return None
    try:
        path, _ = resolve_data_path(spec)
    except (FileNotFoundError, KeyError, ValueError):
        return None
    return train_questions(path) if path.is_file() else None


def evaluate_trained(trainer: Trainer, cfg: RunConfig, questions: list[Question] | None, run_dir: str | Path,
                     progress: bool, group_by: str | None = None, train: list[Question] | None = None,
                     template_fn=None, group_fn=None) -> tuple[float, dict[str, float], dict[str, Any],
                                                                dict[str, dict[str, float]]]:
    """Evaluate a trained model as the run config's ``eval`` block says: on ``questions`` (exact match with the
    readable report: groups, blind baselines from ``train`` (default: :func:`training_questions`), confusion,
    consistency), or, with ``questions=None``, on the embedded multi-domain benchmark (blind baselines from
    ``train`` too, scored by its scorers: :func:`vlweave.eval.suite.suite_baselines`).  Writes
    ``predictions.jsonl`` and ``eval_metrics.json`` into ``run_dir``; returns (accuracy, accuracy by group,
    report, blind baselines by group)."""
    train = training_questions(cfg) if train is None else train
    if questions is None:
        from vlweave import assets
        from vlweave.eval.suite import evaluate_suite

        report = evaluate_suite(trainer.model, trainer.tokenizer, assets.pull("synthetic"),
                                limit_per_domain=cfg.eval.limit, batch_size=cfg.eval.batch_size,
                                max_new_tokens=cfg.eval.max_new_tokens, out_dir=run_dir, progress=progress,
                                routing=cfg.eval.routing, routing_seed=cfg.eval.routing_seed, train=train)
        groups = {f"{d}/{f}": v for d, by_f in report["scores"].items() for f, v in by_f.items()}
        groups |= {f"all/{f}": v for f, v in report["overall"].items()}
        return report["mean"], groups, report, report.get("baselines", {})
    key = group_by or group_key(questions)
    report = evaluate(trainer.model, trainer.tokenizer, questions, out_dir=run_dir,
                      batch_size=cfg.eval.batch_size, max_new_tokens=cfg.eval.max_new_tokens,
                      prompt_suffix=cfg.eval.prompt_suffix, group_key=key, progress=progress,
                      bf16=cfg.train.bf16, processor=trainer.processor, train=train, group_by=key,
                      template_fn=template_fn, group_fn=group_fn, routing=cfg.eval.routing,
                      routing_seed=cfg.eval.routing_seed)
    report.pop("answers")
    groups = {g: r["accuracy"] for g, r in report["groups"].items()}
    blind: dict[str, dict[str, float]] = {g: {k: r[k] for k in ("blind_majority", "blind_per_template") if k in r}
                                          for g, r in report["groups"].items()}
    if report.get("baselines"):
        blind["accuracy"] = {"blind_majority": report["baselines"]["majority"],
                             "blind_per_template": report["baselines"]["majority_per_template"]}
    return report["accuracy"], groups, report, {g: b for g, b in blind.items() if b}


def train_and_evaluate(cfg: RunConfig, questions: list[Question] | None, run_dir: str | Path, progress: bool,
                       group_by: str | None = None, train: list[Question] | None = None,
                       template_fn=None, resume: bool = False) -> RunResult:
    """Train ``cfg`` into ``run_dir`` and evaluate it: on ``questions`` (exact match, grouped by ``group_by``,
    default :func:`group_key`), or, with ``questions=None``, on the embedded multi-domain benchmark with its exact
    scorers (groups = ``domain/format`` and ``all/format``).  Predictions and metrics are saved in ``run_dir``.
    ``resume``: continue exactly from the newest checkpoint in ``run_dir`` (the caller vouches that it was written
    with ``cfg``'s training settings)."""
    cfg.train.output_dir = str(run_dir)
    t0 = time.time()
    trainer = Trainer(cfg, progress=progress)
    t1 = time.time()
    trainer.train(resume=run_dir if resume else None)
    t2 = time.time()
    accuracy, groups, report, blind = evaluate_trained(trainer, cfg, questions, run_dir, progress, group_by,
                                                       train=train, template_fn=template_fn)
    return RunResult(accuracy=accuracy, groups=groups, baselines=blind, report=report, setup_seconds=t1 - t0,
                     train_seconds=t2 - t1, eval_seconds=time.time() - t2,
                     visual_tokens=trainer.model.num_image_tokens)


__all__ = ["RunResult", "evaluate_trained", "group_key", "train_and_evaluate", "training_questions"]
