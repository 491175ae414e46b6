"""Components by name: ``model.components()`` (a tower each, connector, language, LM-side modules), tune keys per
tower, per-component learning rates, and an LM-side module (``block_adapter``) end to end: trained by the tune
policy, checkpointed, resumed exactly, exported unmerged beside the merged LoRA, reloaded by ``from_pretrained``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from helpers import align_stage, finetune_stage, isolated_env, losses, make_batch, make_run
from vlweave.builder import build_model, load_checkpoint
from vlweave.config import ConfigError, LMModuleConfig, LoraConfig, RunConfig, StageConfig, VisionConfig
from vlweave.language.modules import known_lm_modules
from vlweave.modeling import VlweaveConfig, VlweaveForConditionalGeneration
from vlweave.train.policy import apply_tune_policy, has_lora, parameter_owners, resolve_tune
from vlweave.train.trainer import Trainer

# A second tiny tower (CLIP at 32 px, 4-px patches: an 8x8 grid) beside the tiny DINOv2 base.
CLIP_32 = VisionConfig(name="clip_vision_model", image_size=32, random_init=True, select_layer=-2,
                       config_overrides={"hidden_size": 24, "intermediate_size": 48, "num_hidden_layers": 2,
                                         "num_attention_heads": 2, "patch_size": 4, "image_size": 32})
ADAPTER = LMModuleConfig(type="block_adapter", options={"layers": [0, -1], "bottleneck": 8})


@pytest.fixture(autouse=True, scope="module")
def _env(tmp_path_factory):
    with isolated_env(tmp_path_factory.mktemp("vlweave-cache")):
        yield


def two_towers(tmp_path: Path, stages=None, out: str = "run"):
    cfg = make_run(tmp_path, vision="dinov2", connector="tower_concat", stages=stages, out=out)
    cfg.towers = {"clip": CLIP_32}
    return cfg


def snapshot(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def changed(before: dict[str, torch.Tensor], module) -> list[str]:
    after = module.state_dict()
    return [k for k, v in before.items() if not torch.equal(v, after[k])]


# ---- declared components and tune keys ------------------------------------------------------------------------


def test_components_are_declared_by_the_model(tmp_path):
    cfg = two_towers(tmp_path)
    cfg.language.modules = [ADAPTER]
    model, _ = build_model(cfg)
    comps = model.components()
    assert list(comps) == ["vision.base", "vision.clip", "connector", "language", "block_adapter"]
    assert comps["vision.clip"] is model.vision_towers["clip"] and comps["language"] is model.language_model
    assert comps["block_adapter"] is model.lm_modules["block_adapter"]
    owners = parameter_owners(model)
    assert set(owners) == {n for n, _ in model.named_parameters()}  # every parameter has exactly one owner
    prefix = {"vision.base": "vision_towers.base.", "vision.clip": "vision_towers.clip.", "connector": "connector.",
              "language": "language_model.", "block_adapter": "lm_modules.block_adapter."}
    assert all(n.startswith(prefix[c]) for n, c in owners.items())
    assert set(owners.values()) == set(prefix)


def test_vision_key_applies_to_every_tower_unless_a_tower_is_named(tmp_path):
    model, _ = build_model(two_towers(tmp_path))
    comps = list(model.components())

    def policies(tune):
        return resolve_tune(StageConfig(name="s", tune=tune), comps)

    assert policies({"vision": "full"}) == {"vision.base": "full", "vision.clip": "full", "connector": "frozen",
                                            "language": "frozen"}
    assert policies({"vision": "full", "vision.clip": "frozen"})["vision.clip"] == "frozen"
    assert policies({"vision.base": "full"}) == {"vision.base": "full", "vision.clip": "frozen",
                                                 "connector": "frozen", "language": "frozen"}
    lora = LoraConfig(r=4, alpha=8)
    trainable = apply_tune_policy(model, StageConfig(name="s", tune={"vision": "frozen", "vision.base": "full"}), lora)
    assert trainable and set(trainable) == {n for n, _ in model.vision_towers["base"].named_parameters(
        prefix="vision_towers.base")}


def test_unknown_components_fail_listing_the_known_ones(tmp_path):
    model, _ = build_model(two_towers(tmp_path))
    lora = LoraConfig()
    known = r"known: \['vision', 'vision.base', 'vision.clip', 'connector', 'language'\]"
    with pytest.raises(ValueError, match=r"unknown component\(s\) \['vision.siglip'\]; " + known):
        apply_tune_policy(model, StageConfig(name="x", tune={"vision.siglip": "full"}), lora)
    with pytest.raises(ValueError, match=r"unknown component\(s\) \['block_adapter'\]; " + known):
        apply_tune_policy(model, StageConfig(name="x", tune={"block_adapter": "full"}), lora)
    with pytest.raises(ValueError, match=r"component_lr: unknown component\(s\) \['projector'\]"):
        apply_tune_policy(model, StageConfig(name="x", tune={"connector": "full"}, component_lr={"projector": 1e-3}),
                          lora)
    with pytest.raises(ValueError, match=r"tune.vision.clip = 'half'"):
        apply_tune_policy(model, StageConfig(name="x", tune={"vision.clip": "half"}), lora)


def test_vision_base_full_trains_only_that_tower(tmp_path):
    stage = StageConfig(name="tower", tune={"vision": "frozen", "vision.base": "full", "connector": "frozen",
                                            "language": "frozen"}, max_steps=2, batch_size=4, lr=1e-3,
                        warmup_ratio=0.0)
    trainer = Trainer(two_towers(tmp_path, stages=[stage]), progress=False)
    assert trainer.store is None  # a trained tower is never cached
    m = trainer.model
    before = {c: snapshot(mod) for c, mod in m.components().items()}
    trainer.train()
    moved = {c: changed(before[c], mod) for c, mod in m.components().items()}
    assert moved["vision.base"] and {c for c, v in moved.items() if v} == {"vision.base"}
    assert trainer.trained == {"vision.base": {"full"}}  # (tower_concat measures no statistics)
    assert trainer.trained_names and all(n.startswith("vision_towers.base.") for n in trainer.trained_names)


def test_optimizer_groups_per_component_with_their_lr(tmp_path):
    cfg = make_run(tmp_path, vision="dinov2")
    cfg.language.modules = [ADAPTER]
    trainer = Trainer(cfg, progress=False)
    tune = {"vision": "frozen", "connector": "full", "language": "full", "block_adapter": "full"}

    def groups(**kw):
        stage = StageConfig(name="s", tune=tune, lr=1e-4, **kw)
        apply_tune_policy(trainer.model, stage, cfg.train.lora)
        return [(g["name"], g["lr"], len(g["params"])) for g in trainer._optimizer(stage).param_groups]

    sizes = {c: len(list(mod.parameters())) for c, mod in trainer.model.components().items()}
    assert groups() == [("connector", 1e-4, sizes["connector"]), ("language", 1e-4, sizes["language"]),
                        ("block_adapter", 1e-4, sizes["block_adapter"])]
    assert [g[:2] for g in groups(connector_lr=1e-3)] == [("connector", 1e-3), ("language", 1e-4),
                                                         ("block_adapter", 1e-4)]
    assert [g[:2] for g in groups(connector_lr=1e-3, component_lr={"connector": 5e-3, "block_adapter": 2e-3})] == [
        ("connector", 5e-3), ("language", 1e-4), ("block_adapter", 2e-3)]


def test_run_config_declares_lm_modules_and_component_lr(tmp_path):
    cfg = RunConfig.from_dict({
        "language": {"modules": [{"type": "block_adapter", "options": {"layers": [-1], "bottleneck": 4}}]},
        "train": {"stages": [{"name": "s", "tune": {"block_adapter": "full"},
                              "component_lr": {"block_adapter": "1e-3"}}]},
    })
    assert cfg.language.modules == [LMModuleConfig(type="block_adapter", options={"layers": [-1], "bottleneck": 4})]
    assert cfg.train.stages[0].component_lr == {"block_adapter": 1e-3}  # YAML's "1e-3" string read as a float
    cfg.save(tmp_path / "c.yaml")
    assert RunConfig.load(tmp_path / "c.yaml").to_dict() == cfg.to_dict()
    # --set with a dotted component name: tune.vision.base is one key, not a nested mapping.
    over = RunConfig.load(tmp_path / "c.yaml", ["train.stages.0.tune.vision.base=full",
                                                "train.stages.0.component_lr.vision.base=2e-4"])
    assert over.train.stages[0].tune == {"block_adapter": "full", "vision.base": "full"}
    assert over.train.stages[0].component_lr == {"block_adapter": 1e-3, "vision.base": 2e-4}
    with pytest.raises(ConfigError, match=r"train.stages.0.tune.vision.base` must be str"):
        RunConfig.load(tmp_path / "c.yaml", ["train.stages.0.tune.vision.base=[full]"])


def test_lm_module_declarations_are_checked(tmp_path):
    assert "block_adapter" in known_lm_modules()
    base = make_run(tmp_path, vision="dinov2")

    def build(*modules):
        cfg = make_run(tmp_path, vision="dinov2")
        cfg.language.modules = list(modules)
        return build_model(cfg)[0]

    with pytest.raises(ValueError, match=r"unknown LM-side module type 'no_such_module'; known: \[.*'block_adapter'"):
        build(LMModuleConfig(type="no_such_module"))
    with pytest.raises(ValueError, match=r"name 'block_adapter' used twice"):
        build(ADAPTER, ADAPTER)
    with pytest.raises(ValueError, match=r"name 'language' must be an identifier other than"):
        build(LMModuleConfig(type="block_adapter", name="language"))
    with pytest.raises(ValueError, match=r"lm module 'block_adapter': option 'layers' = \[5\]: needs decoder layer "
                                         r"indices in \[-2, 2\)"):
        build(LMModuleConfig(type="block_adapter", options={"layers": [5]}))
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['width'\]"):
        build(LMModuleConfig(type="block_adapter", options={"width": 4}))
    model = build(ADAPTER, LMModuleConfig(type="block_adapter", name="top", options={"layers": [1]}))
    assert list(model.lm_modules) == ["block_adapter", "top"]
    with pytest.raises(ValueError, match="LoRA on the LM-side module 'top' is not supported"):
        apply_tune_policy(model, StageConfig(name="x", tune={"top": "lora"}), base.train.lora)


def test_a_fresh_block_adapter_leaves_the_lm_unchanged_and_generates_with_the_cache(tmp_path):
    cfg = make_run(tmp_path, vision="dinov2", language="llama", tokenizer="chatml", template="tokenizer")
    torch.manual_seed(0)
    plain, tok = build_model(cfg)
    cfg.language.modules = [ADAPTER]
    torch.manual_seed(0)
    adapted, _ = build_model(cfg)
    batch = make_batch(plain, tok, cfg, 2)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")}
    plain.eval()
    adapted.eval()
    with torch.no_grad():
        torch.testing.assert_close(adapted(**inputs).logits, plain(**inputs).logits, atol=0, rtol=0)  # zero init
        for p in adapted.lm_modules.parameters():
            p.normal_(std=0.5)
        assert not torch.allclose(adapted(**inputs).logits, plain(**inputs).logits, atol=1e-3)
        ids = batch["input_ids"][:1, : int(batch["attention_mask"][0].sum())]
        kw = dict(pixel_values=batch["pixel_values"][:1], max_new_tokens=4, min_new_tokens=4, do_sample=False)
        cached = adapted.generate(ids, **kw)
        uncached = adapted.generate(ids, use_cache=False, **kw)
    assert cached.tolist() == uncached.tolist()


# ---- a block adapter end to end: train, checkpoint, resume, export, reload -------------------------------------


def adapter_cfg(tmp_path: Path, out: str):
    """align (connector) 2 steps, then finetune (connector + LM LoRA + block adapter) 4 steps; save every 2."""
    cfg = make_run(tmp_path, vision="dinov2", language="llama", tokenizer="chatml", template="tokenizer",
                   cache_features=True, out=out,
                   stages=[align_stage(max_steps=2, epochs=10.0),
                           finetune_stage("lora", max_steps=4, epochs=10.0, lr=2e-3,
                                          tune={"vision": "frozen", "connector": "full", "language": "lora",
                                                "block_adapter": "full"},
                                          component_lr={"block_adapter": 5e-3})])
    cfg.language.modules = [ADAPTER]
    cfg.train.save_every = 2
    return cfg


@pytest.fixture(scope="module")
def adapter_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("adapter")
    trainer = Trainer(adapter_cfg(tmp, "A"), progress=False)
    m = trainer.model
    seen = {"init": {c: snapshot(mod) for c, mod in m.components().items()}}
    export = trainer.export

    def capture_then_export():
        # The trained, unmerged model: what the export must reproduce.
        batch = make_batch(m, trainer.tokenizer, trainer.cfg, 3)
        seen["inputs"] = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")}
        seen["trained"] = {c: snapshot(mod) for c, mod in m.components().items()}
        assert has_lora(m)
        m.eval()
        with torch.no_grad():
            seen["logits"] = m(**seen["inputs"]).logits
        return export()

    trainer.export = capture_then_export
    trainer.train()
    return trainer, seen


def test_block_adapter_is_trained_by_the_tune_policy(adapter_run):
    trainer, seen = adapter_run
    init, trained = seen["init"], seen["trained"]
    moved = {c: [k for k, v in init[c].items() if k in trained[c] and not torch.equal(v, trained[c][k])]
             for c in init}
    assert set(moved["block_adapter"]) == set(init["block_adapter"])  # down and up of both layers moved
    assert moved["vision.base"] == []
    assert moved["language"] == []  # the LM's own weights are frozen under LoRA ...
    assert set(trained["language"]) - set(init["language"])  # ... and the LoRA tensors are new
    assert set(moved["connector"]) == set(init["connector"])
    assert trainer.trained == {"connector": {"full", "buffers"}, "language": {"lora"}, "block_adapter": {"full"}}


def test_block_adapter_checkpoints(adapter_run):
    trainer, _ = adapter_run
    ckdir = trainer.run_dir / "checkpoints"
    assert sorted(p.name for p in ckdir.iterdir()) == ["ckpt-s0-000002", "ckpt-s1-000002", "ckpt-s1-000004"]
    first = json.loads((ckdir / "ckpt-s0-000002" / "progress.json").read_text())
    assert first["components"] == {"connector": ["buffers", "full"]}
    last = json.loads((ckdir / "ckpt-s1-000004" / "progress.json").read_text())
    assert last["components"] == {"connector": ["buffers", "full"], "language": ["lora"], "block_adapter": ["full"]}
    trained = set(last["trained"])
    adapter = {n for n, _ in trainer.model.lm_modules.named_parameters(prefix="lm_modules")}
    assert adapter <= trained
    assert all(n.startswith(("connector.", "lm_modules.block_adapter.")) or
               ("lora_" in n and n.startswith("language_model.")) for n in trained)
    with safe_open(str(ckdir / "ckpt-s1-000004" / "trained.safetensors"), "pt") as fh:
        assert set(fh.keys()) == trained


def test_block_adapter_export_reloads_with_identical_logits(adapter_run):
    trainer, seen = adapter_run
    final = trainer.run_dir / "final"
    with safe_open(str(final / "model.safetensors"), "pt") as fh:
        keys = set(fh.keys())
    assert not [k for k in keys if "lora" in k]  # LoRA merged into the LM ...
    assert {k for k in keys if k.startswith("lm_modules.")} == {  # ... the adapter kept as its own weights
        f"lm_modules.block_adapter.{k}" for k in seen["trained"]["block_adapter"]}
    assert json.loads((final / "config.json").read_text())["lm_modules"] == [
        {"type": "block_adapter", "name": "block_adapter", "options": {"layers": [0, -1], "bottleneck": 8}}]
    reloaded = VlweaveForConditionalGeneration.from_pretrained(final)
    reloaded.eval()
    assert list(reloaded.lm_modules) == ["block_adapter"] and not has_lora(reloaded)
    for k, v in seen["trained"]["block_adapter"].items():
        torch.testing.assert_close(reloaded.lm_modules["block_adapter"].state_dict()[k], v, atol=0, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**seen["inputs"]).logits, seen["logits"], atol=1e-5, rtol=0)
        torch.testing.assert_close(trainer.model(**seen["inputs"]).logits, seen["logits"], atol=1e-5, rtol=0)
        # The adapter matters: without its hooks the reloaded model answers differently.
        reloaded.lm_modules["block_adapter"].detach()
        assert not torch.allclose(reloaded(**seen["inputs"]).logits, seen["logits"], atol=1e-4)
    model, _ = load_checkpoint(final)
    assert list(model.lm_modules) == ["block_adapter"]


@pytest.mark.parametrize("ckpt", ["ckpt-s1-000002", "ckpt-s0-000002", "legacy:ckpt-s1-000002"])
def test_block_adapter_run_resumes_exactly(adapter_run, tmp_path, ckpt):
    trainer, _ = adapter_run
    source = trainer.run_dir / "checkpoints" / ckpt.removeprefix("legacy:")
    if ckpt.startswith("legacy:"):  # a checkpoint saved before components: only tensor names in progress.json
        source = shutil.copytree(source, tmp_path / "legacy")
        prog = json.loads((source / "progress.json").read_text())
        del prog["components"]
        (source / "progress.json").write_text(json.dumps(prog))
    cfg = adapter_cfg(Path(trainer.cfg.train.output_dir).parent, "unused")
    cfg.train.output_dir = str(tmp_path / "B")
    resumed = Trainer(cfg, progress=False)
    resumed.train(resume=source)
    a, b = losses(trainer.metrics), losses(resumed.metrics)
    assert len(a) == len(b) == 6
    torch.testing.assert_close(torch.tensor(b), torch.tensor(a), atol=1e-6, rtol=0)
    assert [m["lr"] for m in resumed.metrics] == pytest.approx([m["lr"] for m in trainer.metrics], abs=1e-12)
    sa, sb = (load_checkpoint(t.run_dir / "final")[0].state_dict() for t in (trainer, resumed))
    assert set(sa) == set(sb)
    for key in sa:
        torch.testing.assert_close(sb[key], sa[key], atol=1e-6, rtol=0, msg=key)


def test_config_without_lm_modules_is_unchanged():
    cfg = VlweaveConfig()
    assert cfg.lm_modules == [] and "lm_modules" in cfg.to_dict()
