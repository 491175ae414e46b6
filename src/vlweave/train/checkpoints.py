"""Run-folder checkpoints: atomic folder writes, completeness checks, fallback past a damaged one, pruning.

A checkpoint is a folder ``checkpoints/ckpt-s<stage>-<step>`` holding ``trained.safetensors`` (the trained tensors),
``state.pt`` (optimizer, scheduler, RNG states) and ``progress.json`` (where the run is, its metrics, what it
trained on).  Every folder the trainer publishes -- checkpoints and ``final/`` -- is written to ``<name>.tmp`` and
renamed, so a kill or a full disk leaves the previous complete folder in place.  A checkpoint that is nevertheless
damaged (a truncated copy, an empty state file from a full disk on a filesystem that lies) is detected by
:func:`checkpoint_problem` without unpickling anything, and resuming from a run folder skips it, saying so.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path

from vlweave.safe_io import DamagedFileError, disk_full_guard, verify_safetensors

CKPT_NAME = re.compile(r"ckpt-s(\d+)-(\d+)")
CHECKPOINT_FILES = ("trained.safetensors", "state.pt", "progress.json")


class ResumeError(ValueError):
    """A resume that would not continue the run it claims to continue (damaged checkpoints, changed data)."""


def checkpoint_order(path: Path) -> tuple[int, int]:
    m = CKPT_NAME.fullmatch(path.name)
    assert m is not None
    return int(m.group(1)), int(m.group(2))


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """The run's published checkpoints, oldest first by (stage, step) compared numerically (``.tmp``/``.old``
    folders of an interrupted write are never listed)."""
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    found = [c for c in folder.iterdir() if c.is_dir() and CKPT_NAME.fullmatch(c.name)]
    return sorted(found, key=checkpoint_order)


def checkpoint_problem(ckpt: Path) -> str | None:
    """What is wrong with a checkpoint folder, or None when it is complete.  Cheap: the weights file's header and
    length, the state file's zip directory (``torch.save`` writes a zip whose directory is at the end, so any
    truncation destroys it) and the progress JSON."""
    for name in CHECKPOINT_FILES:
        if not (ckpt / name).is_file():
            return f"{name} missing"
    try:
        verify_safetensors(ckpt / "trained.safetensors")
    except DamagedFileError as exc:
        return str(exc).split(": ", 1)[-1].replace("weights file", "trained.safetensors")
    state = ckpt / "state.pt"
    if state.stat().st_size == 0:
        return "state.pt is empty"
    try:
        with zipfile.ZipFile(state) as zf:
            zf.namelist()
    except (zipfile.BadZipFile, OSError) as exc:
        return f"state.pt is damaged ({exc})"
    try:
        prog = json.loads((ckpt / "progress.json").read_text(encoding="utf-8"))
        prog["stage_index"], prog["step"], prog["metrics"]
    except (ValueError, KeyError, TypeError) as exc:
        return f"progress.json is damaged ({type(exc).__name__}: {exc})"
    return None


def latest_checkpoint(path: str | Path) -> Path:
    """The checkpoint to resume from.  ``path`` is a checkpoint folder (used as is, refused when damaged) or a run
    folder: its newest complete checkpoint; damaged newer ones are skipped with a warning that names them."""
    p = Path(path)
    if (p / "progress.json").exists() or CKPT_NAME.fullmatch(p.name):
        problem = checkpoint_problem(p)
        if problem:
            raise ResumeError(f"{p}: checkpoint is damaged ({problem}); resume from the run folder to fall back to "
                              "the previous complete checkpoint")
        return p
    ckpts = list_checkpoints(p)
    if not ckpts:
        raise FileNotFoundError(f"{p}: no checkpoint to resume from")
    damaged: list[str] = []
    for ckpt in reversed(ckpts):
        problem = checkpoint_problem(ckpt)
        if problem is None:
            if damaged:
                warnings.warn(f"{p}: skipped damaged checkpoint(s) {'; '.join(damaged)}; resuming from {ckpt.name}",
                              stacklevel=2)
            return ckpt
        damaged.append(f"{ckpt.name} ({problem})")
    raise ResumeError(f"{p}: every checkpoint is damaged: {'; '.join(damaged)}")


def publish_folder(final: Path, write: Callable[[Path], None], what: str, kept: str | None = None) -> Path:
    """Write a folder atomically: ``write(tmp)`` fills ``<final>.tmp``, which then replaces ``final`` (an existing
    one is moved aside first and removed last, so a complete copy exists at every moment).  A full disk raises
    :class:`DiskFullError` naming the folder, and the temp folder is removed."""
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with disk_full_guard(final, what, kept):
            tmp.mkdir(parents=True)
            write(tmp)
            if final.exists():  # re-saving a name (a resumed run's stage end, a second export)
                old = final.with_name(final.name + ".old")
                shutil.rmtree(old, ignore_errors=True)
                os.replace(final, old)
                os.replace(tmp, final)
                shutil.rmtree(old)
            else:
                os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # give the space back; the previous folder is untouched
        raise
    return final


def prune_checkpoints(run_dir: str | Path, keep: int | None) -> list[Path]:
    """Delete all but the newest ``keep`` checkpoints (``None``: keep every one); returns the deleted folders."""
    if keep is None:
        return []
    ckpts = list_checkpoints(run_dir)
    doomed = ckpts[: max(0, len(ckpts) - keep)]
    for c in doomed:
        shutil.rmtree(c, ignore_errors=True)
    return doomed


def describe_kept(run_dir: str | Path) -> str:
    """'the last good checkpoint is …' for error messages (or that there is none yet)."""
    ckpts = list_checkpoints(run_dir)
    return f"the last good checkpoint is {ckpts[-1]}" if ckpts else "no checkpoint was written yet"


__all__ = ["CHECKPOINT_FILES", "CKPT_NAME", "ResumeError", "checkpoint_order", "checkpoint_problem",
           "describe_kept", "latest_checkpoint", "list_checkpoints", "prune_checkpoints", "publish_folder"]
