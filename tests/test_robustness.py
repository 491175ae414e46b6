"""Runs that never lose or silently corrupt work (issue 12, part 2): non-finite loss stop/skip, resume into a
copied folder, damaged-checkpoint fallback, changed data and --set on resume, keep_checkpoints, atomic final/,
disk full (injected ENOSPC and, where the machine allows mounting one, a real full tmpfs), and the content-keyed
frozen-feature cache (stale images, concurrent writers, damaged cache file).  Tiny random-init models throughout."""

from __future__ import annotations

import errno
import functools
import json
import math
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from helpers import draw_image, finetune_stage, isolated_env, losses, make_run
from vlweave.builder import build_model
from vlweave.cli import main
from vlweave.modeling import VlweaveForConditionalGeneration
from vlweave.processing import load_image, make_transform
from vlweave.train import checkpoints as ckpts
from vlweave.train.trainer import Trainer
from vlweave.vision.cache import FeatureCache, FeatureStore


@pytest.fixture(autouse=True, scope="module")
def _env(tmp_path_factory):
    with isolated_env(tmp_path_factory.mktemp("vlweave-cache")):
        yield


def tensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), "pt") as fh:
        return {k: fh.get_tensor(k) for k in fh.keys()}


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")
            if p.is_file()}


def log_of(run: Path) -> list[dict]:
    return json.loads((run / "train_metrics.json").read_text())["log"]


# ---- non-finite loss ------------------------------------------------------------------------------------------


def test_huge_lr_stops_on_nonfinite_loss_and_keeps_finite_checkpoints(tmp_path, capsys):
    cfg = make_run(tmp_path, stages=[finetune_stage("full", max_steps=5, lr=1e30)])
    cfg.train.save_every = 1
    cfg.save(tmp_path / "nan.yaml")
    rc = main(["train", str(tmp_path / "nan.yaml")])
    err = capsys.readouterr().err
    assert rc == 3 and "Traceback" not in err
    assert "non-finite loss" in err and "stage 0 ('finetune') step" in err and "on_nonfinite=skip" in err
    run = Path(cfg.train.output_dir)
    assert not (run / "final").exists()  # no NaN model is ever exported
    kept = ckpts.list_checkpoints(run)
    assert kept, "the checkpoints before the bad step are kept"
    assert str(kept[-1]) in err  # the message names the checkpoint to go back to
    for c in kept:
        assert all(bool(torch.isfinite(t).all()) for t in tensors(c / "trained.safetensors").values()), c
    metrics = json.loads((run / "train_metrics.json").read_text())
    assert "non-finite loss" in metrics["summary"]["stopped"]
    assert all(math.isfinite(m["loss"]) for m in metrics["log"])  # the log holds the finite steps only


def test_skip_policy_drops_the_bad_batch_and_counts_it(tmp_path, capsys, monkeypatch):
    cfg = make_run(tmp_path, stages=[finetune_stage("full", max_steps=4)])
    cfg.train.on_nonfinite = "skip"
    cfg.save(tmp_path / "skip.yaml")
    original = VlweaveForConditionalGeneration.forward
    calls = {"n": 0}

    @functools.wraps(original)  # keeps forward's signature: generate (the eval at the end) validates kwargs by it
    def forward(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        if self.training:
            calls["n"] += 1
            if calls["n"] == 2:  # the second training batch has a NaN loss
                out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(VlweaveForConditionalGeneration, "forward", forward)
    assert main(["train", str(tmp_path / "skip.yaml")]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["nonfinite_skipped"] == 1
    run = Path(cfg.train.output_dir)
    metrics = json.loads((run / "train_metrics.json").read_text())
    assert [s["step"] for s in metrics["nonfinite_skipped"]] == [2]
    log = metrics["log"]
    assert [m["step"] for m in log] == [1, 2, 3, 4]
    assert log[1]["loss"] is None and "loss nan" in log[1]["skipped"]
    assert all(math.isfinite(m["loss"]) for m in log if m["step"] != 2)
    final = tensors(run / "final" / "model.safetensors")
    assert all(bool(torch.isfinite(t).all()) for t in final.values())


# ---- resume: copied folder, damaged checkpoints, changed data, --set --------------------------------------------


@pytest.fixture(scope="module")
def run_a(tmp_path_factory):
    """4 steps, a checkpoint after every step, through the CLI."""
    tmp = tmp_path_factory.mktemp("resume")
    cfg = make_run(tmp, stages=[finetune_stage("full", max_steps=4)])
    cfg.train.save_every = 1
    cfg.save(tmp / "a.yaml")
    assert main(["train", str(tmp / "a.yaml"), "--output", str(tmp / "A")]) == 0
    return tmp, tmp / "A"


def interrupted_copy(run: Path, dest: Path) -> Path:
    """A copy of ``run`` as if it had been killed after step 2: final/ and the last checkpoints gone."""
    shutil.copytree(run, dest)
    shutil.rmtree(dest / "final")
    for name in ("ckpt-s0-000003", "ckpt-s0-000004"):
        shutil.rmtree(dest / "checkpoints" / name)
    (dest / "train_metrics.json").unlink()
    return dest


def test_resume_a_copied_folder_writes_into_the_copy(run_a, tmp_path, capsys):
    tmp, a = run_a
    before = snapshot(a)
    b = interrupted_copy(a, tmp_path / "B")
    capsys.readouterr()
    assert main(["train", str(tmp / "a.yaml"), "--resume", str(b)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["run_dir"] == str(b) and (b / "final" / "model.safetensors").is_file()
    assert snapshot(a) == before  # the original run is untouched
    assert [c.name for c in ckpts.list_checkpoints(b)] == [f"ckpt-s0-00000{i}" for i in range(1, 5)]
    torch.testing.assert_close(torch.tensor(losses(log_of(b))), torch.tensor(losses(log_of(a))), atol=1e-6, rtol=0)
    assert str(b) in (b / "config.yaml").read_text()  # the copy's config records where it now lives


def _flip_in_member(state: Path, suffix: str, at: float = 0.5) -> None:
    """Flip one byte inside the stored bytes of the zip member ending with ``suffix`` (the zip stays readable)."""
    import struct
    import zipfile

    with zipfile.ZipFile(state) as zf:
        info = next(i for i in zf.infolist() if i.filename.endswith(suffix))
    data = bytearray(state.read_bytes())
    name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26 : info.header_offset + 30])
    data[info.header_offset + 30 + name_len + extra_len + int(info.file_size * at)] ^= 0xFF
    state.write_bytes(bytes(data))


def _truncate_pickle_in_valid_zip(state: Path) -> None:
    """A well-formed zip (correct CRCs) whose pickle record is cut in half: only loading it can tell."""
    import zipfile

    with zipfile.ZipFile(state) as zf:
        members = [(i.filename, zf.read(i)) for i in zf.infolist()]
    with zipfile.ZipFile(state, "w", zipfile.ZIP_STORED) as zf:
        for name, data in members:
            zf.writestr(name, data[: len(data) // 2] if name.endswith("data.pkl") else data)


def _damage(latest: Path, damage: str) -> None:
    weights, state = latest / "trained.safetensors", latest / "state.pt"
    if damage == "truncated weights":
        data = weights.read_bytes()
        weights.write_bytes(data[: len(data) // 2])
    elif damage == "empty state file":
        state.write_bytes(b"")
    elif damage == "byte flipped in a state tensor":
        _flip_in_member(state, "data/0")
    elif damage == "byte flipped in the state pickle":
        _flip_in_member(state, "data.pkl", at=0.3)
    elif damage == "pickle truncated in a valid zip":
        _truncate_pickle_in_valid_zip(state)
    elif damage == "byte flipped in the weights' data":  # header and length intact; caught by the recorded CRC
        data = bytearray(weights.read_bytes())
        data[-7] ^= 0xFF
        weights.write_bytes(bytes(data))


LOOKS_COMPLETE = ["byte flipped in a state tensor", "byte flipped in the state pickle",
                  "pickle truncated in a valid zip", "byte flipped in the weights' data"]


@pytest.mark.parametrize("damage", ["truncated weights", "empty state file", *LOOKS_COMPLETE])
def test_damaged_latest_checkpoint_falls_back_to_the_previous_one(run_a, tmp_path, capsys, damage):
    tmp, a = run_a
    c = interrupted_copy(a, tmp_path / "C")
    shutil.copytree(a / "checkpoints" / "ckpt-s0-000003", c / "checkpoints" / "ckpt-s0-000003")
    latest = c / "checkpoints" / "ckpt-s0-000003"
    _damage(latest, damage)
    if damage in LOOKS_COMPLETE:  # the cheap check passes: only loading finds it
        assert ckpts.checkpoint_problem(latest) is None
        with pytest.raises(ckpts.DamagedFileError):
            ckpts.load_resume_point(latest)
    else:
        assert ckpts.checkpoint_problem(latest) is not None
    # Named explicitly, a damaged checkpoint is refused (no silent substitution).
    assert main(["train", str(tmp / "a.yaml"), "--resume", str(latest)]) == 2
    err = capsys.readouterr().err
    assert "checkpoint is damaged" in err and str(latest) in err and "Traceback" not in err
    # From the run folder: the previous complete checkpoint, said out loud; the run still ends as the original.
    with pytest.warns(UserWarning, match=r"skipped damaged checkpoint\(s\) ckpt-s0-000003 .*resuming from "
                                         r"ckpt-s0-000002"):
        assert main(["train", str(tmp / "a.yaml"), "--resume", str(c)]) == 0
    torch.testing.assert_close(torch.tensor(losses(log_of(c))), torch.tensor(losses(log_of(a))), atol=1e-6, rtol=0)
    assert ckpts.checkpoint_problem(latest) is None  # rewritten by the resumed run


def test_interrupted_swap_is_recovered_on_resume(run_a, tmp_path, capsys):
    """A crash between publish_folder's two renames (re-saving a name) leaves ``<ckpt>.old``, maybe a complete
    ``<ckpt>.tmp``, and no ``<ckpt>``: resume puts the published copy back, says so, and continues exactly."""
    tmp, a = run_a
    e = interrupted_copy(a, tmp_path / "E")
    latest = e / "checkpoints" / "ckpt-s0-000002"
    shutil.copytree(latest, latest.with_name(latest.name + ".tmp"))
    os.replace(latest, latest.with_name(latest.name + ".old"))
    assert [c.name for c in ckpts.list_checkpoints(e)] == ["ckpt-s0-000001"]
    # Named explicitly (the folder itself is gone): recovered before the existence check.
    with pytest.warns(UserWarning, match=r"restored .*ckpt-s0-000002 from ckpt-s0-000002.old"):
        assert main(["train", str(tmp / "a.yaml"), "--resume", str(latest)]) == 0
    assert not latest.with_name(latest.name + ".old").exists() and not latest.with_name(latest.name + ".tmp").exists()
    torch.testing.assert_close(torch.tensor(losses(log_of(e))), torch.tensor(losses(log_of(a))), atol=1e-6, rtol=0)


def test_recover_interrupted_writes_cases(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints" / "ckpt-s0-000004").mkdir(parents=True)
    (run / "checkpoints" / "ckpt-s0-000004.old").mkdir()  # crash while removing the replaced copy
    (run / "final.old").mkdir()  # crash between the renames of a re-export
    (run / "final.old" / "config.json").write_text("{}")
    (run / "final.tmp").mkdir()
    (run / "notes.old").mkdir()  # not ours: untouched
    with pytest.warns(UserWarning, match="restored"):
        done = ckpts.recover_interrupted_writes(run)
    assert len(done) == 2
    assert (run / "final" / "config.json").is_file() and not (run / "final.old").exists()
    assert not (run / "final.tmp").exists() and (run / "notes.old").is_dir()
    assert (run / "checkpoints" / "ckpt-s0-000004").is_dir() and not (run / "checkpoints" / "ckpt-s0-000004.old").exists()
    assert ckpts.recover_interrupted_writes(run) == []  # idempotent


def test_resume_refuses_set_and_changed_data(run_a, tmp_path, capsys):
    tmp, a = run_a
    d = interrupted_copy(a, tmp_path / "D")
    assert main(["train", str(tmp / "a.yaml"), "--resume", str(d), "--set", "train.stages.0.lr=1"]) == 2
    assert "--set and --output do not apply with --resume" in capsys.readouterr().err
    # The copy trains on its own copy of the data file; one record more than the checkpoint saw.
    data = tmp / "data" / "train.json"
    changed = data.with_name("train-changed.json")
    records = json.loads(data.read_text())
    changed.write_text(json.dumps(records + [dict(records[0], id="extra")]))
    text = (d / "config.yaml").read_text().replace(str(data), str(changed))
    (d / "config.yaml").write_text(text)
    assert main(["train", str(tmp / "a.yaml"), "--resume", str(d)]) == 2
    err = capsys.readouterr().err
    assert str(changed) in err and "changed since checkpoint" in err and "16 records" in err and "17 records" in err
    assert not (d / "final").exists()


def test_keep_checkpoints_and_atomic_final(tmp_path):
    cfg = make_run(tmp_path, stages=[finetune_stage("full", max_steps=4)])
    cfg.train.save_every = 1
    cfg.train.keep_checkpoints = 2
    trainer = Trainer(cfg, progress=False)
    trainer.train()
    run = trainer.run_dir
    assert [c.name for c in ckpts.list_checkpoints(run)] == ["ckpt-s0-000003", "ckpt-s0-000004"]
    # A second export that fails half-way (disk full) leaves the complete final/ as it was.
    before = snapshot(run / "final")

    def full(tmp: Path) -> None:
        (tmp / "model.safetensors").write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ckpts, "publish_folder", _publish_with(full))
        from vlweave.safe_io import DiskFullError

        with pytest.raises(DiskFullError, match=r"final: no space left on device while writing the final model"):
            trainer.export()
    assert snapshot(run / "final") == before
    assert not (run / "final.tmp").exists()


def _publish_with(write_instead):
    original = ckpts.publish_folder

    def publish(final, write, what, kept=None):
        return original(final, write_instead, what, kept)

    return publish


def test_disk_full_injected_keeps_the_last_good_checkpoint(tmp_path, capsys, monkeypatch):
    cfg = make_run(tmp_path, stages=[finetune_stage("full", max_steps=4)])
    cfg.train.save_every = 1
    cfg.save(tmp_path / "full.yaml")
    import vlweave.train.trainer as trainer_module

    real = trainer_module.save_file
    calls = {"n": 0}

    def save_file(state, path, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device", path)
        return real(state, path, *args, **kwargs)

    monkeypatch.setattr(trainer_module, "save_file", save_file)
    assert main(["train", str(tmp_path / "full.yaml")]) == 2
    err = capsys.readouterr().err
    run = Path(cfg.train.output_dir)
    assert "Traceback" not in err and "no space left on device" in err
    assert str(run / "checkpoints" / "ckpt-s0-000002") in err
    assert f"the last good checkpoint is {run / 'checkpoints' / 'ckpt-s0-000001'}" in err
    assert [c.name for c in ckpts.list_checkpoints(run)] == ["ckpt-s0-000001"]
    assert ckpts.checkpoint_problem(run / "checkpoints" / "ckpt-s0-000001") is None
    assert not list((run / "checkpoints").glob("*.tmp"))


@pytest.fixture
def small_tmpfs(tmp_path):
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mnt)], check=True,
                       capture_output=True, timeout=10)
    except (OSError, subprocess.SubprocessError) as exc:
        pytest.skip(f"cannot mount a tmpfs here (needs root / CAP_SYS_ADMIN): {exc}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True, timeout=10)


def test_disk_full_on_a_real_tmpfs(tmp_path, small_tmpfs, capsys, monkeypatch):
    cfg = make_run(tmp_path, stages=[finetune_stage("full", max_steps=4)])
    cfg.train.save_every = 1
    cfg.train.output_dir = str(small_tmpfs / "run")
    cfg.save(tmp_path / "tmpfs.yaml")
    real_save = Trainer.save_state

    def save_then_fill(self, *args, **kwargs):
        out = real_save(self, *args, **kwargs)
        if not (small_tmpfs / "filler").exists():  # after the first checkpoint, another process fills the disk
            with open(small_tmpfs / "filler", "wb") as fh:
                try:
                    while True:
                        fh.write(b"\0" * 65536)
                        fh.flush()
                except OSError:
                    pass
        return out

    monkeypatch.setattr(Trainer, "save_state", save_then_fill)
    assert main(["train", str(tmp_path / "tmpfs.yaml")]) == 2
    err = capsys.readouterr().err
    run = small_tmpfs / "run"
    assert "Traceback" not in err and "no space left on device" in err and str(run) in err
    assert [c.name for c in ckpts.list_checkpoints(run)] == ["ckpt-s0-000001"]
    assert ckpts.checkpoint_problem(run / "checkpoints" / "ckpt-s0-000001") is None
    assert not list((run / "checkpoints").glob("*.tmp"))


# ---- frozen-feature cache -------------------------------------------------------------------------------------


@pytest.fixture
def tower_model(tmp_path, monkeypatch):
    monkeypatch.setenv("VLWEAVE_CACHE", str(tmp_path / "cache"))
    cfg = make_run(tmp_path, vision="clip")
    torch.manual_seed(0)
    model, _ = build_model(cfg)
    images = sorted(str(p) for p in (Path(cfg.data.train).parent / "images").glob("*.png"))
    return cfg, model, images


def tower_output(model, path: str) -> torch.Tensor:
    with torch.no_grad():
        return model.vision_features(make_transform(model)(load_image(path)).unsqueeze(0))[0][0]


def test_cache_detects_an_image_replaced_on_disk(tower_model):
    cfg, model, images = tower_model
    target = images[0]
    FeatureCache(model).ensure(images[:3], progress=False)
    old = tower_output(model, target)
    draw_image("green", "circle", size=48).save(target)  # same path, other content (and size)
    new = tower_output(model, target)
    assert not torch.allclose(old, new)
    # A later run (a fresh cache over the same file) and the same store both serve the new content's features.
    fresh = FeatureCache(model)
    torch.testing.assert_close(fresh.batch([target])["base"][0][0], new, atol=1e-6, rtol=0)
    store = fresh.stores["base"]
    draw_image("blue", "square", size=40).save(target)
    newest = tower_output(model, target)
    assert target not in store  # the content changed again: not served from the cache
    torch.testing.assert_close(store.batch([target])[0][0], newest, atol=1e-6, rtol=0)
    # Two paths with the same bytes share one entry.
    twin = str(Path(target).with_name("twin.png"))
    shutil.copyfile(target, twin)
    assert twin in store


def test_cache_file_is_self_indexed_and_concurrent_writers_merge(tower_model):
    cfg, model, images = tower_model
    a, b = FeatureCache(model).stores["base"], FeatureCache(model).stores["base"]  # two runs, same cache
    a.ensure(images[:4], progress=False)
    b.ensure(images[4:8], progress=False)  # b never saw a's entries, yet must not drop them
    assert a.path == b.path and not a.path.with_suffix(".json").exists()
    names = set(tensors(a.path))
    assert len(names) == 8  # one tensor per image (one prepared layer), keyed by content digest
    third = FeatureCache(model).stores["base"]
    assert all(p in third for p in images[:8])
    # A save waits for the file lock another writer holds.
    from filelock import FileLock

    lock = FileLock(str(a.path) + ".lock")
    lock.acquire()
    c = FeatureCache(model).stores["base"]
    t = threading.Thread(target=c.ensure, args=(images[8:10],), kwargs={"progress": False})
    t.start()
    time.sleep(0.5)
    assert t.is_alive() and len(tensors(a.path)) == 8  # blocked: nothing written under the other writer's lock
    lock.release()
    t.join(timeout=30)
    assert len(tensors(a.path)) == 10


def test_cache_write_is_atomic_and_a_damaged_file_is_rebuilt(tower_model):
    cfg, model, images = tower_model
    store = FeatureCache(model).stores["base"]
    store.ensure(images[:2], progress=False)
    good = store.path.read_bytes()

    def killed(src, dst):
        raise RuntimeError("killed")  # a kill between writing the temp file and the rename

    other = FeatureCache(model).stores["base"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(os, "replace", killed)
        with pytest.raises(RuntimeError, match="killed"):
            other.ensure(images[2:4], progress=False)
    assert store.path.read_bytes() == good and not list(store.path.parent.glob("*.tmp"))
    store.path.write_bytes(good[: len(good) // 2])  # truncated (a full disk on a lying filesystem, a bad copy)
    with pytest.warns(UserWarning, match="feature cache file unreadable"):
        rebuilt = FeatureStore(model, make_transform(model))
    assert images[0] not in rebuilt
    torch.testing.assert_close(rebuilt.batch([images[0]])[0][0], tower_output(model, images[0]), atol=1e-6, rtol=0)


def test_cache_prune_removes_only_files_no_current_run_reads(tower_model, capsys):
    from filelock import FileLock
    from safetensors.torch import save_file

    from vlweave.vision.cache import prune_cache

    cfg, model, images = tower_model
    store = FeatureCache(model).stores["base"]
    store.ensure(images[:2], progress=False)
    folder = store.path.parent
    save_file({"0.0": torch.zeros(4, 8)}, str(folder / "0123456789abcdef.safetensors"))  # format 1: path-keyed
    (folder / "0123456789abcdef.json").write_text(json.dumps({"paths": [images[0]], "num_layers": 1}))
    (folder / "fedcba9876543210.safetensors").write_bytes(store.path.read_bytes()[:100])  # damaged
    stale_tmp = folder / f"{store.path.name}.99999.tmp"  # a writer killed before its rename
    stale_tmp.write_bytes(b"partial")
    kept = store.path.read_bytes()
    assert main(["cache", "prune", "--dry-run"]) == 0
    out = capsys.readouterr()
    assert out.out.count("would remove") == 4 and "earlier cache format (path-keyed)" in out.out
    assert "would remove 4 file(s)" in out.err and (folder / "0123456789abcdef.json").exists()
    # A store whose lock a saving run holds keeps its temp file.
    lock = FileLock(str(store.path) + ".lock")
    with lock:
        result: list = []
        t = threading.Thread(target=lambda: result.append(prune_cache(folder)))
        t.start()
        t.join(timeout=30)
    removed = {p.name for p, _ in result[0][0]}
    assert stale_tmp.exists() and stale_tmp.name not in removed and len(removed) == 3
    assert main(["cache", "prune"]) == 0
    assert "removed 1 file(s)" in capsys.readouterr().err and not stale_tmp.exists()
    assert sorted(p.name for p in folder.glob("*.safetensors")) == [store.path.name]
    assert store.path.read_bytes() == kept and all(p in FeatureCache(model).stores["base"] for p in images[:2])
