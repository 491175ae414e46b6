"""Run-folder checkpoints: atomic folder writes, completeness checks, fallback past a damaged one, pruning.

A checkpoint is a folder ``checkpoints/ckpt-s<stage>-<step>`` holding ``trained.safetensors`` (the trained tensors),
``state.pt`` (optimizer, scheduler, RNG states) and ``progress.json`` (where the run is, its metrics, what it
trained on).  Every folder the trainer publishes -- checkpoints and ``final/`` -- is written to ``<name>.tmp`` and
renamed, so a kill or a full disk leaves the previous complete folder in place.  A checkpoint that is nevertheless
damaged (a truncated copy, an empty state file from a full disk on a filesystem that lies) is detected by
:func:`checkpoint_problem` without unpickling anything; damage inside files that look complete (flipped bytes, a
pickle cut short inside a valid zip) is caught when :func:`load_resume_checkpoint` actually loads them (zip CRCs of
``state.pt``, the CRC-32 of ``trained.safetensors`` recorded in ``progress.json``, finite tensors).  Resuming from a
run folder skips a damaged checkpoint, saying so, and tries the next older one.  A crash between the two renames of
a re-save leaves ``<name>.old`` and no ``<name>``: :func:`recover_interrupted_writes` puts it back before a resume.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import warnings
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


def file_crc32(path: str | Path) -> str:
    """CRC-32 of a file's bytes as 8 hex digits (zlib's: fast enough to run on every checkpoint; it guards against
    accidental damage, not against tampering)."""
    crc = 0
    with open(path, "rb") as fh:
        while block := fh.read(1 << 24):
            crc = zlib.crc32(block, crc)
    return f"{crc:08x}"


def checksums(folder: Path) -> dict[str, str]:
    """What ``progress.json`` records to detect later damage inside ``trained.safetensors`` (safetensors has no
    checksum of its own; ``state.pt`` is a zip whose members carry their CRC-32 already)."""
    return {"trained.safetensors": file_crc32(folder / "trained.safetensors")}


def _zip_crc_problem(path: Path) -> str | None:
    """A member of ``torch.save``'s zip whose bytes do not match their CRC-32 (``torch.load`` never checks them:
    a flipped byte in a tensor loads silently, one in the pickle may too)."""
    try:
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                if info.CRC == 0 and info.file_size > 0:
                    continue  # written with torch's compute_crc32 off: nothing to compare with
                with zf.open(info) as fh:
                    while fh.read(1 << 24):
                        pass
    except (zipfile.BadZipFile, OSError, EOFError, zlib.error) as exc:
        return f"state.pt is damaged ({exc})"
    return None


@dataclass
class ResumePoint:
    """A checkpoint loaded for resuming: where it is, its progress, the trained tensors and the optimizer /
    scheduler / RNG state (``state.pt``), all read and checked before the trainer touches any of it."""

    path: Path
    progress: dict[str, Any]
    trained: dict[str, Any]
    state: dict[str, Any]


def load_resume_point(ckpt: Path) -> ResumePoint:
    """Load a checkpoint completely, or raise :class:`DamagedFileError` saying what is damaged.  Beyond
    :func:`checkpoint_problem`: the zip CRCs of ``state.pt`` and its unpickling, ``trained.safetensors`` against
    the CRC-32 in ``progress.json`` (checkpoints written before it have none), its loading and its tensors being
    finite (the trainer never writes a non-finite checkpoint, so one on disk is damage)."""
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    problem = checkpoint_problem(ckpt)
    if problem:
        raise DamagedFileError(problem)
    progress = json.loads((ckpt / "progress.json").read_text(encoding="utf-8"))
    expected = (progress.get("checksums") or {}).get("trained.safetensors")
    if expected is not None and file_crc32(ckpt / "trained.safetensors") != expected:
        raise DamagedFileError(f"trained.safetensors is damaged (CRC-32 {file_crc32(ckpt / 'trained.safetensors')}, "
                               f"progress.json recorded {expected})")
    try:
        trained = load_file(str(ckpt / "trained.safetensors"))
    except (SafetensorError, OSError, ValueError) as exc:
        raise DamagedFileError(f"trained.safetensors does not load ({exc})") from None
    bad = [n for n, t in trained.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise DamagedFileError(f"trained.safetensors holds non-finite values (in {', '.join(sorted(bad)[:3])})")
    problem = _zip_crc_problem(ckpt / "state.pt")
    if problem:
        raise DamagedFileError(problem)
    try:
        state = torch.load(ckpt / "state.pt", weights_only=False)
        state["rng"]
        if not (ckpt / "engine").is_dir():  # sharded engines (FSDP/DeepSpeed) keep these in engine/ instead
            state["optimizer"], state["scheduler"]
    except Exception as exc:  # a damaged pickle raises anything: UnpicklingError, EOFError, RuntimeError, ...
        raise DamagedFileError(f"state.pt does not load ({type(exc).__name__}: {exc})") from None
    return ResumePoint(ckpt, progress, trained, state)


def _is_checkpoint_path(p: Path) -> bool:
    return (p / "progress.json").exists() or bool(CKPT_NAME.fullmatch(p.name))


def _pick(path: str | Path, load: bool) -> tuple[Path, ResumePoint | None]:
    p = Path(path)
    recover_interrupted_writes(p.parent.parent if _is_checkpoint_path(p) and p.parent.name == "checkpoints" else p)

    def problem_of(ckpt: Path) -> tuple[str | None, ResumePoint | None]:
        if not load:
            return checkpoint_problem(ckpt), None
        try:
            return None, load_resume_point(ckpt)
        except DamagedFileError as exc:
            return str(exc), None

    if _is_checkpoint_path(p):
        problem, point = problem_of(p)
        if problem:
            raise ResumeError(f"{p}: checkpoint is damaged ({problem}); resume from the run folder to fall back to "
                              "the previous complete checkpoint")
        return p, point
    ckpts = list_checkpoints(p)
    if not ckpts:
        raise FileNotFoundError(f"{p}: no checkpoint to resume from")
    damaged: list[str] = []
    for ckpt in reversed(ckpts):
        problem, point = problem_of(ckpt)
        if problem is None:
            if damaged:
                warnings.warn(f"{p}: skipped damaged checkpoint(s) {'; '.join(damaged)}; resuming from {ckpt.name}",
                              stacklevel=3)
            return ckpt, point
        damaged.append(f"{ckpt.name} ({problem})")
    raise ResumeError(f"{p}: every checkpoint is damaged: {'; '.join(damaged)}")


def latest_checkpoint(path: str | Path) -> Path:
    """The checkpoint to resume from, by the cheap checks of :func:`checkpoint_problem` (nothing is loaded).
    ``path`` is a checkpoint folder (used as is, refused when damaged) or a run folder: its newest complete
    checkpoint; damaged newer ones are skipped with a warning that names them."""
    return _pick(path, load=False)[0]


def load_resume_checkpoint(path: str | Path) -> ResumePoint:
    """Like :func:`latest_checkpoint`, but each candidate is loaded completely (:func:`load_resume_point`), so a
    checkpoint that only looks complete is skipped too -- with a warning naming it and what is damaged -- and the
    next older one is tried.  A checkpoint named explicitly is never substituted: damaged, it is refused."""
    point = _pick(path, load=True)[1]
    assert point is not None
    return point


def recover_interrupted_writes(run_dir: str | Path) -> list[str]:
    """Undo what a crash inside :func:`publish_folder`'s swap leaves behind, in ``run_dir`` (``final``) and its
    ``checkpoints/``; returns (and warns) what was done.

    * ``<name>.old`` and no ``<name>``: the crash came between moving the published folder aside and renaming the
      new one in.  ``<name>.old`` is the complete folder that was published; it is renamed back (the new copy,
      ``<name>.tmp``, is removed: the run rewrites it when it gets there again).
    * ``<name>.old`` beside ``<name>``: the crash came during the last step, removing the old copy; it is removed.
    """
    run = Path(run_dir)
    done: list[str] = []
    for folder in (run, run / "checkpoints"):
        if not folder.is_dir():
            continue
        for old in sorted(folder.glob("*.old")):
            target = old.with_name(old.name[: -len(".old")])
            if not old.is_dir() or not (target.name == "final" or CKPT_NAME.fullmatch(target.name)):
                continue
            if target.exists():
                shutil.rmtree(old, ignore_errors=True)
                done.append(f"removed {old} (left over from replacing {target.name})")
            else:
                os.replace(old, target)
                shutil.rmtree(target.with_name(target.name + ".tmp"), ignore_errors=True)
                done.append(f"restored {target} from {old.name} (a write of {target.name} was interrupted between "
                            "its two renames)")
    if done:
        warnings.warn(f"{run}: " + "; ".join(done), stacklevel=3)
    return done


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


__all__ = ["CHECKPOINT_FILES", "CKPT_NAME", "ResumeError", "ResumePoint", "checkpoint_order", "checkpoint_problem",
           "checksums", "describe_kept", "file_crc32", "latest_checkpoint", "list_checkpoints",
           "load_resume_checkpoint", "load_resume_point", "prune_checkpoints", "publish_folder",
           "recover_interrupted_writes"]
