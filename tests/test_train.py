"""The trainer: exact resume (any stage, any checkpoint), atomic checkpoints, tune policies, LoRA merge on export
and the run folder's contents.  Tiny random-init models (``helpers.make_run``), a few steps each."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from helpers import align_stage, finetune_stage, isolated_env, losses, make_batch, make_run
from vlweave.builder import build_model, load_checkpoint
from vlweave.config import LoraConfig, RunConfig, StageConfig
from vlweave.train.policy import apply_tune_policy, has_lora, merge_lora
from vlweave.train.trainer import Trainer, plan_batches


@pytest.fixture(autouse=True, scope="module")
def _env(tmp_path_factory):
    with isolated_env(tmp_path_factory.mktemp("vlweave-cache")):
        yield


def two_stage_cfg(tmp_path: Path, out: str):
    """align (connector only, plain template) 4 steps, then finetune (connector + LoRA) 6 steps; save every 2."""
    cfg = make_run(tmp_path, vision="clip", language="llama", tokenizer="llama", template="vicuna_v1",
                   cache_features=True, out=out,
                   stages=[align_stage(template="plain", max_steps=4, epochs=10.0),
                           finetune_stage("lora", max_steps=6, epochs=10.0, lr=2e-3, warmup_ratio=0.2)])
    cfg.train.save_every = 2
    return cfg


@pytest.fixture(scope="module")
def run_a(tmp_path_factory) -> Trainer:
    tmp = tmp_path_factory.mktemp("resume")
    trainer = Trainer(two_stage_cfg(tmp, "A"), progress=False)
    trainer.train()
    return trainer


def final_state(run_dir: Path) -> dict[str, torch.Tensor]:
    out = {}
    with safe_open(str(run_dir / "final" / "model.safetensors"), "pt") as fh:
        for key in fh.keys():
            out[key] = fh.get_tensor(key)
    return out


# ---- resume -----------------------------------------------------------------------------------------------


def test_uninterrupted_run_checkpoints(run_a):
    ckpts = sorted(p.name for p in (run_a.run_dir / "checkpoints").iterdir())
    assert ckpts == ["ckpt-s0-000002", "ckpt-s0-000004", "ckpt-s1-000002", "ckpt-s1-000004", "ckpt-s1-000006"]
    assert [(m["stage_index"], m["step"]) for m in run_a.metrics] == [(0, s) for s in range(1, 5)] + [
        (1, s) for s in range(1, 7)]


@pytest.mark.parametrize("ckpt", ["ckpt-s1-000002", "ckpt-s0-000002", "ckpt-s0-000004"])
def test_resume_reproduces_the_uninterrupted_run(run_a, tmp_path, ckpt):
    cfg = two_stage_cfg(Path(run_a.cfg.train.output_dir).parent, "unused")
    cfg.train.output_dir = str(tmp_path / "B")
    resumed = Trainer(cfg, progress=False)
    resumed.train(resume=run_a.run_dir / "checkpoints" / ckpt)
    prog = json.loads((run_a.run_dir / "checkpoints" / ckpt / "progress.json").read_text())
    n_before = len(prog["metrics"])
    assert n_before == {"ckpt-s1-000002": 6, "ckpt-s0-000002": 2, "ckpt-s0-000004": 4}[ckpt]
    a, b = losses(run_a.metrics), losses(resumed.metrics)
    assert len(b) == len(a) == 10
    assert b[:n_before] == a[:n_before]  # carried over from the checkpoint
    torch.testing.assert_close(torch.tensor(b[n_before:]), torch.tensor(a[n_before:]), atol=1e-6, rtol=0)
    assert [m["lr"] for m in resumed.metrics] == pytest.approx([m["lr"] for m in run_a.metrics], abs=1e-12)
    sa, sb = final_state(run_a.run_dir), final_state(resumed.run_dir)
    assert set(sa) == set(sb)
    for key in sa:
        torch.testing.assert_close(sb[key], sa[key], atol=1e-6, rtol=0, msg=key)


def test_resume_from_run_folder_picks_the_latest_checkpoint(run_a, tmp_path):
    # A crashed save leaves a .tmp folder; it must never be picked.
    leftover = run_a.run_dir / "checkpoints" / "ckpt-s1-000008.tmp"
    leftover.mkdir()
    try:
        assert Trainer.latest_checkpoint(run_a.run_dir).name == "ckpt-s1-000006"
    finally:
        leftover.rmdir()
    ckpt = run_a.run_dir / "checkpoints" / "ckpt-s0-000002"
    assert Trainer.latest_checkpoint(ckpt) == ckpt
    with pytest.raises(FileNotFoundError, match="no checkpoint to resume from"):
        Trainer.latest_checkpoint(tmp_path)


# ---- checkpoints --------------------------------------------------------------------------------------------


def test_checkpoint_contents_and_atomic_writes(run_a, monkeypatch):
    ckdir = run_a.run_dir / "checkpoints"
    assert not [p for p in ckdir.iterdir() if p.name.endswith(".tmp")]
    last = ckdir / "ckpt-s1-000006"
    assert sorted(p.name for p in last.iterdir()) == ["progress.json", "state.pt", "trained.safetensors"]
    prog = json.loads((last / "progress.json").read_text())
    assert prog["stage_index"] == 1 and prog["step"] == 6
    assert len(prog["metrics"]) == 10
    assert prog["metrics"] == json.loads(json.dumps(run_a.metrics))
    trained = set(prog["trained"])
    assert any(n.startswith("connector.") for n in trained)
    assert any("lora_" in n for n in trained)
    assert all(n.startswith("connector.") or ("lora_" in n and n.startswith("language_model.")) for n in trained)
    with safe_open(str(last / "trained.safetensors"), "pt") as fh:
        assert set(fh.keys()) == trained
    first = json.loads((ckdir / "ckpt-s0-000002" / "progress.json").read_text())
    assert (first["stage_index"], first["step"], len(first["metrics"])) == (0, 2, 2)
    assert all(n.startswith("connector.") for n in first["trained"])

    # A save that fails half-way leaves the previous checkpoint of that name untouched.
    before = {p.name: p.read_bytes() for p in last.iterdir()}

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    with pytest.raises(OSError, match="disk full"):
        run_a.save_state(1, 6, opt, sched)
    assert {p.name: p.read_bytes() for p in last.iterdir()} == before
    assert Trainer.latest_checkpoint(run_a.run_dir) == last
    shutil.rmtree(ckdir / "ckpt-s1-000006.tmp", ignore_errors=True)


def test_plan_batches_deterministic_and_capped():
    stage = StageConfig(batch_size=4, epochs=2.0, max_steps=None)
    total, mbs = plan_batches(10, stage, seed=0, index=0)
    assert total == 5 and len(mbs) == 5 and all(len(mb) == 4 for mb in mbs)
    flat = [i for mb in mbs for i in mb]
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:]) == list(range(10))  # two permutations
    assert flat[:10] != flat[10:]  # reshuffled per epoch
    assert plan_batches(10, stage, 0, 0) == (total, mbs)
    assert plan_batches(10, stage, 1, 0)[1] != mbs and plan_batches(10, stage, 0, 1)[1] != mbs
    stage.max_steps = 2
    assert plan_batches(10, stage, 0, 0) == (2, mbs[:2])


# ---- tune policies ------------------------------------------------------------------------------------------


def snapshot(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def changed(before: dict[str, torch.Tensor], module) -> list[str]:
    after = module.state_dict()
    return [k for k, v in before.items() if not torch.equal(v, after[k])]


def test_align_trains_only_the_connector(tmp_path):
    cfg = make_run(tmp_path, vision="dinov2", language="llama", tokenizer="chatml", template="tokenizer",
                   stages=[align_stage(max_steps=3)])
    trainer = Trainer(cfg, progress=False)
    lm, tower, conn = (snapshot(getattr(trainer.model, a)) for a in ("language_model", "vision_tower", "connector"))
    trainer.train()
    assert changed(lm, trainer.model.language_model) == []
    assert changed(tower, trainer.model.vision_tower) == []
    assert set(changed(conn, trainer.model.connector)) == set(conn)  # every connector tensor moved
    assert all(n.startswith("connector.") for n in trainer.trained_names)


def test_lora_only_on_language_model_modules(tmp_path):
    """DINOv2 and CLIP attention use q_proj/k_proj/v_proj too; LoRA must stay in the LM."""
    for vision in ("dinov2", "clip"):
        torch.manual_seed(0)
        model, _ = build_model(make_run(tmp_path, vision=vision))
        tower_names = [n for n, _ in model.vision_tower.named_modules()]
        assert any(re.search(r"\.(q_proj|k_proj|v_proj)$", n) for n in tower_names)
        trainable = apply_tune_policy(model, finetune_stage("lora"), LoraConfig(r=4, alpha=8))
        lora = [n for n, _ in model.named_parameters() if "lora_" in n]
        assert lora and all(n.startswith("language_model.") for n in lora)
        # 2 layers x 7 projections (q, k, v, o, gate, up, down) x (lora_A, lora_B)
        assert len(lora) == 2 * 7 * 2
        assert not any("lora_" in n for n, _ in model.vision_tower.named_parameters())
        assert set(trainable) == set(lora) | {n for n, _ in model.connector.named_parameters(prefix="connector")}
        assert not any(p.requires_grad for p in model.vision_tower.parameters())
        # Applying a later stage does not inject a second adapter.
        apply_tune_policy(model, finetune_stage("lora"), LoraConfig(r=4, alpha=8))
        assert len([n for n, _ in model.named_parameters() if "lora_" in n]) == len(lora)


def test_lora_on_the_top_layers_only(tmp_path):
    torch.manual_seed(0)
    model, _ = build_model(make_run(tmp_path, vision="dinov2"))  # tiny LM: 2 decoder layers
    stage = StageConfig(name="ft", tune={"vision": "frozen", "connector": "frozen", "language": "lora"})
    trainable = apply_tune_policy(model, stage, LoraConfig(r=4, alpha=8, top_layers=1))
    assert trainable and all(".layers.1." in n and "lora_" in n for n in trainable)
    assert len(trainable) == 7 * 2
    with pytest.raises(ValueError, match="top_layers=0"):
        apply_tune_policy(build_model(make_run(tmp_path, vision="dinov2"))[0], stage, LoraConfig(top_layers=0))


def test_full_policy_trains_lm_weights(tmp_path):
    cfg = make_run(tmp_path, vision="siglip", language="qwen2", tokenizer="qwen", template="tokenizer",
                   stages=[finetune_stage("full", max_steps=2)])
    trainer = Trainer(cfg, progress=False)
    lm, tower = snapshot(trainer.model.language_model), snapshot(trainer.model.vision_tower)
    trainer.train()
    moved = changed(lm, trainer.model.language_model)
    assert any("q_proj.weight" in k for k in moved) and any("embed_tokens" in k for k in moved)
    assert changed(tower, trainer.model.vision_tower) == []
    assert not has_lora(trainer.model)


def test_bad_policies(tmp_path):
    torch.manual_seed(0)
    model, _ = build_model(make_run(tmp_path))
    lora = LoraConfig()
    with pytest.raises(ValueError, match=r"tune.language = 'lorra'; known: \['frozen', 'full', 'lora'\]"):
        apply_tune_policy(model, StageConfig(name="x", tune={"language": "lorra"}), lora)
    with pytest.raises(ValueError, match=r"unknown component\(s\) \['projector'\]"):
        apply_tune_policy(model, StageConfig(name="x", tune={"projector": "full"}), lora)
    with pytest.raises(ValueError, match="LoRA on the connector is not supported"):
        apply_tune_policy(model, StageConfig(name="x", tune={"connector": "lora"}), lora)
    with pytest.raises(ValueError, match="matches no module"):
        apply_tune_policy(model, StageConfig(name="x", tune={"vision": "lora"}), lora)
    cfg = make_run(tmp_path, stages=[StageConfig(name="idle", tune={"vision": "frozen", "connector": "frozen",
                                                                    "language": "frozen"}, max_steps=1)],
                   out="idle")
    with pytest.raises(ValueError, match="trains nothing"):
        Trainer(cfg, progress=False).train()


# ---- LoRA merge on export -----------------------------------------------------------------------------------


def test_lora_merge_on_export_keeps_logits(tmp_path):
    cfg = make_run(tmp_path, vision="dinov2", language="llama", tokenizer="chatml", template="tokenizer",
                   stages=[finetune_stage("lora", max_steps=4, lr=5e-3)])
    trainer = Trainer(cfg, progress=False)
    batch = make_batch(trainer.model, trainer.tokenizer, cfg, 3)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")}
    seen = {}
    export = trainer.export

    def capture_then_export():
        model = trainer.model
        assert has_lora(model)
        b_norm = sum(float(p.detach().abs().sum()) for n, p in model.named_parameters() if "lora_B" in n)
        assert b_norm > 0, "LoRA B is still zero: the merge would be trivially exact"
        model.eval()
        with torch.no_grad():
            seen["unmerged"] = model(**inputs).logits
        return export()

    trainer.export = capture_then_export
    trainer.train()
    assert not has_lora(trainer.model)
    final = trainer.run_dir / "final"
    assert not [k for k in final_state(trainer.run_dir) if "lora" in k]
    merged, _ = load_checkpoint(final)
    assert not has_lora(merged)
    with torch.no_grad():
        torch.testing.assert_close(merged(**inputs).logits, seen["unmerged"], atol=1e-5, rtol=0)
        torch.testing.assert_close(trainer.model(**inputs).logits, seen["unmerged"], atol=1e-5, rtol=0)


def test_merge_lora_without_adapters_is_a_no_op(tmp_path):
    torch.manual_seed(0)
    model, _ = build_model(make_run(tmp_path))
    before = snapshot(model)
    merge_lora(model)
    assert changed(before, model) == [] and set(model.state_dict()) == set(before)


# ---- the run folder -----------------------------------------------------------------------------------------


def test_run_folder_contents(run_a):
    d = run_a.run_dir
    reloaded = RunConfig.load(d / "config.yaml")
    assert reloaded.to_dict() == run_a.cfg.to_dict()
    assert (d / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    metrics = json.loads((d / "train_metrics.json").read_text())
    assert metrics["summary"]["steps"] == 10 and len(metrics["log"]) == 10
    assert [m["loss"] for m in metrics["log"]] == losses(run_a.metrics)
    assert {"stage", "stage_index", "step", "loss", "lr", "tokens", "seconds"} <= set(metrics["log"][0])
    final = d / "final"
    names = {p.name for p in final.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
    assert json.loads((final / "config.json").read_text())["model_type"] == "vlweave"
    assert not [k for k in final_state(d) if "lora" in k]
