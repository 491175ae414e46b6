"""What the trainer refuses and what it counts: train-config checks, non-finite loss/gradient handling, counted
data warnings, and the training-data fingerprint a resume is checked against.

Kept out of ``trainer.py`` so the loop stays readable and so that each rule lives in one place (and is listed in
``docs/robustness.md``).
"""

from __future__ import annotations

import hashlib
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from vlweave.config import ConfigError, RunConfig
from vlweave.train.attention import ATTN_CHOICES
from vlweave.train.checkpoints import ResumeError

NONFINITE_POLICIES = ("stop", "skip")


class NonFiniteLossError(RuntimeError):
    """Training stopped on a NaN/inf loss or gradient; the message names the stage, step and the checkpoint kept."""


# ---- config ------------------------------------------------------------------------------------------------


def _finite_positive(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def validate_train_config(cfg: RunConfig) -> None:
    """Refuse train settings that would run nothing, divide by zero or train on garbage, naming the key."""
    t = cfg.train
    problems: list[str] = []
    if not t.stages:
        problems.append("train.stages is empty: nothing to train")
    for i, s in enumerate(t.stages):
        key = f"train.stages.{i}"
        if not _finite_positive(s.lr):
            problems.append(f"{key}.lr = {s.lr!r}: must be a finite positive number")
        if s.connector_lr is not None and not _finite_positive(s.connector_lr):
            problems.append(f"{key}.connector_lr = {s.connector_lr!r}: must be a finite positive number")
        for comp, lr in s.component_lr.items():
            if not _finite_positive(lr):
                problems.append(f"{key}.component_lr.{comp} = {lr!r}: must be a finite positive number")
        if s.max_steps is not None and s.max_steps <= 0:
            problems.append(f"{key}.max_steps = {s.max_steps}: must be at least 1 (or null for epochs)")
        if s.batch_size < 1:
            problems.append(f"{key}.batch_size = {s.batch_size}: must be at least 1")
        if s.grad_accum < 1:
            problems.append(f"{key}.grad_accum = {s.grad_accum}: must be at least 1")
        if not (math.isfinite(s.epochs) and s.epochs > 0):
            problems.append(f"{key}.epochs = {s.epochs}: must be a finite positive number")
        if not (0.0 <= s.warmup_ratio <= 1.0):
            problems.append(f"{key}.warmup_ratio = {s.warmup_ratio}: must be in [0, 1]")
        if not (math.isfinite(s.max_grad_norm) and s.max_grad_norm >= 0):
            problems.append(f"{key}.max_grad_norm = {s.max_grad_norm}: must be >= 0 (0: no clipping)")
        if not (math.isfinite(s.word_tie) and s.word_tie >= 0):
            problems.append(f"{key}.word_tie = {s.word_tie}: must be a finite number >= 0 (0: off)")
        if not (math.isfinite(s.weight_decay) and s.weight_decay >= 0):
            problems.append(f"{key}.weight_decay = {s.weight_decay}: must be a finite number >= 0")
    if t.save_every < 0:
        problems.append(f"train.save_every = {t.save_every}: must be >= 0 (0: only at stage ends)")
    if t.keep_checkpoints is not None and t.keep_checkpoints < 1:
        problems.append(f"train.keep_checkpoints = {t.keep_checkpoints}: must be at least 1 (or null: keep all)")
    if t.on_nonfinite not in NONFINITE_POLICIES:
        problems.append(f"train.on_nonfinite = {t.on_nonfinite!r}: expected one of {', '.join(NONFINITE_POLICIES)}")
    if t.attn_implementation not in ATTN_CHOICES:
        problems.append(f"train.attn_implementation = {t.attn_implementation!r}: expected one of "
                        f"{', '.join(ATTN_CHOICES)}")
    if cfg.language.max_length is not None and cfg.language.max_length < 1:
        problems.append(f"language.max_length = {cfg.language.max_length}: must be at least 1")
    if cfg.data.max_samples is not None and cfg.data.max_samples < 1:
        problems.append(f"data.max_samples = {cfg.data.max_samples}: must be at least 1 (or null: all)")
    if problems:
        raise ConfigError("invalid train config:\n  " + "\n  ".join(problems))


# ---- non-finite loss / gradients --------------------------------------------------------------------------


def total_grad_norm(params: list[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
    """Clip to ``max_norm`` (0: no clipping) and return the total norm before clipping (NaN/inf when a gradient is)."""
    if max_norm:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    grads = [p.grad for p in params if p.grad is not None]
    return torch.nn.utils.get_total_norm(grads) if grads else torch.tensor(0.0)


@dataclass
class NonFiniteGuard:
    """Decides what happens to a step whose loss or gradient norm is not finite: ``stop`` raises
    :class:`NonFiniteLossError` before the optimizer applies it (so every checkpoint written so far is finite),
    ``skip`` drops the step's update and counts it."""

    policy: str = "stop"
    skipped: list[dict[str, Any]] = field(default_factory=list)

    def step_ok(self, stage_name: str, stage_index: int, step: int, losses: list[float], grad_norm: float | None,
                kept: Callable[[], str]) -> bool:
        """True when the step may be applied; False to skip it (``skip``); raises (``stop``).  ``kept()`` says
        which checkpoint survives, for the message."""
        bad_loss = [x for x in losses if not math.isfinite(x)]
        bad_grad = grad_norm is not None and not math.isfinite(grad_norm)
        if not bad_loss and not bad_grad:
            return True
        what = f"loss {bad_loss[0]}" if bad_loss else f"gradient norm {grad_norm}"
        where = f"stage {stage_index} ({stage_name!r}) step {step}"
        if self.policy == "skip":
            self.skipped.append({"stage_index": stage_index, "step": step, "reason": what})
            return False
        raise NonFiniteLossError(
            f"{where}: non-finite {what}; training stopped before applying it ({kept()}). Lower the learning rate "
            "(or set max_grad_norm), or set train.on_nonfinite=skip to drop such batches and count them")


def assert_finite_tensors(state: dict[str, torch.Tensor], where: str) -> None:
    """Never publish NaN weights: refuse a checkpoint whose trained tensors are not all finite."""
    bad = [n for n, t in state.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise NonFiniteLossError(f"{where}: trained tensors are not finite ({', '.join(bad[:3])}"
                                 f"{' ...' if len(bad) > 3 else ''}); not saved")


# ---- counted data warnings ----------------------------------------------------------------------------------


@dataclass
class DataWarnings:
    """Problems a run tolerates but never hides: counted per kind (with the first ids) in ``train_metrics.json``
    under ``warnings`` and announced once per kind."""

    counts: dict[str, dict[str, Any]] = field(default_factory=dict)

    def add(self, kind: str, record_id: str, message: str) -> None:
        entry = self.counts.setdefault(kind, {"count": 0, "examples": [], "message": message})
        entry["count"] += 1
        if len(entry["examples"]) < 10:
            entry["examples"].append(record_id)

    def announce(self) -> None:
        for kind, entry in self.counts.items():
            ids = ", ".join(repr(i) for i in entry["examples"][:5])
            warnings.warn(f"{entry['count']} record(s) {entry['message']} ({ids}{' ...' if entry['count'] > 5 else ''})"
                          f"; counted in train_metrics.json warnings.{kind}", stacklevel=2)

    def as_dict(self) -> dict[str, Any]:
        return {k: {"count": v["count"], "examples": v["examples"], "message": v["message"]}
                for k, v in self.counts.items()}


# ---- what a resume is checked against ---------------------------------------------------------------------


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def data_fingerprint(path: str | Path, records: int) -> dict[str, Any]:
    """A stage's training data as a resume checks it: the file's content hash and its record count."""
    return {"path": str(path), "records": records, "sha256": file_sha256(path)}


def check_same_data(saved: dict[str, Any] | None, now: dict[str, Any], stage: str, ckpt: Path) -> None:
    """Refuse a resume whose stage data differs from what the checkpoint trained on (the batches would differ,
    and the run folder's config would claim data it never saw)."""
    if not saved:
        return  # a checkpoint written before fingerprints: nothing to compare
    if saved["records"] != now["records"] or saved["sha256"] != now["sha256"]:
        raise ResumeError(
            f"{now['path']}: training data of stage {stage} changed since checkpoint {ckpt} "
            f"({saved['records']} records, sha256 {saved['sha256'][:12]} then; {now['records']} records, sha256 "
            f"{now['sha256'][:12]} now); a resume would not reproduce the run: restore the data or start a new run")


__all__ = ["DataWarnings", "NONFINITE_POLICIES", "NonFiniteGuard", "NonFiniteLossError", "assert_finite_tensors",
           "check_same_data", "data_fingerprint", "file_sha256", "total_grad_norm", "validate_train_config"]
