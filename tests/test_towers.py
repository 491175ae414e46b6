"""Named towers: legacy checkpoints, tower facts (ViT and CNN), two-tower models end to end (train, cache per
tower, exact resume, save -> reload, generate, `vlweave chat`), towers a connector does not need are never run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import isolated_env, losses, make_run
from vlweave.builder import build_model, load_checkpoint
from vlweave.cli import main
from vlweave.config import StageConfig, VisionConfig
from vlweave.modeling import VlweaveForConditionalGeneration
from vlweave.processing import tower_pixels
from vlweave.train.trainer import Trainer
from vlweave.vision.cache import FeatureCache
from vlweave.vision.efficientnet_lite import EfficientNetLiteConfig, EfficientNetLiteVisionModel
from vlweave.vision.towers import tower_facts

LEGACY = Path(__file__).parent / "fixtures" / "legacy-v0"

# A tiny CLIP at 32 px with 4-px patches: an 8x8 grid, which tower_concat pools onto DINOv2's 4x4 base grid.
CLIP_32 = VisionConfig(name="clip_vision_model", image_size=32, random_init=True, select_layer=-2,
                       image_mean=[0.48145466, 0.4578275, 0.40821073], image_std=[0.26862954, 0.26130258, 0.27577711],
                       config_overrides={"hidden_size": 24, "intermediate_size": 48, "num_hidden_layers": 2,
                                         "num_attention_heads": 2, "patch_size": 4, "image_size": 32})
# A tiny EfficientNet-Lite (random init) at 128 px: total stride 32 -> a 4x4 final map of 32 channels.
TINY_LITE_STAGES = [[1, 3, 1, 1, 8], [1, 3, 2, 2, 16], [1, 3, 2, 2, 16], [1, 3, 2, 2, 24], [1, 3, 2, 2, 24]]
CNN_128 = VisionConfig(name="vlweave_efficientnet_lite", image_size=128, random_init=True, select_layer=-1,
                       aspect="square",
                       config_overrides={"image_size": 128, "stem_channels": 8, "hidden_size": 32,
                                         "stages": TINY_LITE_STAGES})
SECOND = {"clip": CLIP_32, "cnn": CNN_128}


def two_tower_run(tmp_path: Path, second: str, *, cache: bool = True, stages=None, out: str = "run"):
    cfg = make_run(tmp_path, vision="dinov2", connector="tower_concat", cache_features=cache, out=out,
                   stages=stages)
    cfg.towers = {second: SECOND[second]}
    return cfg


# ---- checkpoints saved before named towers -------------------------------------------------------------------


def test_legacy_single_tower_checkpoint_loads_unchanged(tmp_path):
    golden = json.loads((LEGACY / "golden.json").read_text())
    inputs = torch.load(LEGACY / "golden_inputs.pt")
    model, tok = load_checkpoint(LEGACY)
    assert list(model.vision_towers) == ["base"] and model.num_image_tokens == golden["num_image_tokens"]
    with torch.no_grad():
        logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                       pixel_values=inputs["pixel_values"]).logits
        gen = model.generate(inputs["input_ids"][:1, :golden["prompt_len"]], pixel_values=inputs["pixel_values"][:1],
                             max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
    assert float(logits.double().sum()) == pytest.approx(golden["logits_sum"], abs=1e-4)
    torch.testing.assert_close(logits[:, -1, :8], torch.tensor(golden["logits_last"]), atol=1e-5, rtol=0)
    assert gen.tolist() == golden["generated"]  # new tokens only, as before
    # Re-saved, the base tower keeps HF llava's key names (what older code and LLaVA exporters read).
    model.save_pretrained(tmp_path / "resaved")
    keys = set(load_file(str(tmp_path / "resaved" / "model.safetensors")))
    assert any(k.startswith("vision_tower.") for k in keys) and not any(k.startswith("vision_towers.") for k in keys)
    again = VlweaveForConditionalGeneration.from_pretrained(tmp_path / "resaved").eval()
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                                         pixel_values=inputs["pixel_values"]).logits, logits, atol=0, rtol=0)


# ---- facts ------------------------------------------------------------------------------------------------------


def test_cnn_tower_facts_state_every_hidden_state_shape():
    cfg = EfficientNetLiteConfig(image_size=128, stem_channels=8, hidden_size=32, stages=TINY_LITE_STAGES)
    facts = tower_facts(cfg, 100)  # not a multiple of the stride: "SAME" padding rounds up
    model = EfficientNetLiteVisionModel(cfg).eval()
    with torch.no_grad():
        hs = model(pixel_values=torch.zeros(1, 3, 100, 100), output_hidden_states=True).hidden_states
    assert len(hs) == facts.num_layers + 1
    for i, h in enumerate(hs):
        c, gh, gw = facts.layer_shape(i)
        assert tuple(h.shape[1:]) == (gh * gw, c), i
    assert facts.layer_shape(0) == (8, 50, 50) and facts.hidden_size == 32 and facts.num_prefix_tokens == 0


def test_vit_facts_are_uniform():
    from transformers import CLIPVisionConfig

    facts = tower_facts(CLIPVisionConfig(hidden_size=24, patch_size=4, image_size=32, num_hidden_layers=2))
    assert facts.grid == 8 and facts.layer_shape(1) == (24, 8, 8) and facts.num_prefix_tokens == 1


# ---- two towers end to end --------------------------------------------------------------------------------------


@pytest.mark.parametrize("second", ["clip", "cnn"])
def test_two_tower_model_trains_caches_resumes_saves_generates(tmp_path, second):
    stages = [StageConfig(name="finetune", tune={"vision": "frozen", "connector": "full", "language": "full"},
                          epochs=2, max_steps=6, batch_size=4, lr=3e-3, warmup_ratio=0.0)]
    with isolated_env(tmp_path / "cache"):
        cfg = two_tower_run(tmp_path, second, stages=stages, out="full")
        cfg.train.save_every = 3
        full = Trainer(cfg, progress=False)
        model = full.model
        assert list(model.vision_towers) == ["base", second] and model.needed_towers() == ["base", second]
        assert model.num_image_tokens == 16
        # One store per tower, each with its own key, each holding that tower's aligned [16, C] map.
        assert set(full.store.stores) == {"base", second}
        assert full.store.stores["base"].key != full.store.stores[second].key
        full.train()
        curve = losses(full.metrics)
        assert len(curve) == 6 and curve[-1] < curve[0]
        widths = {"base": 32, "clip": 24, "cnn": 32}
        for name, store in full.store.stores.items():
            feats = store.batch([next(iter(store._feats))])
            assert [f.shape for f in feats] == [torch.Size([1, 16, widths[name]])], name
            assert store.path is not None and store.path.is_file()

        # The same run without the cache: the same losses (the cache is exact).
        uncached = Trainer(two_tower_run(tmp_path, second, cache=False, stages=stages, out="nocache"),
                           progress=False)
        assert uncached.store is None
        uncached.train()
        torch.testing.assert_close(torch.tensor(losses(uncached.metrics)), torch.tensor(curve), atol=1e-5, rtol=0)

        # Resume from the middle checkpoint: the uninterrupted curve exactly.
        resumed = Trainer(two_tower_run(tmp_path, second, stages=stages, out="resumed"), progress=False)
        resumed.train(resume=full.run_dir / "checkpoints" / "ckpt-s0-000003")
        assert losses(resumed.metrics) == pytest.approx(curve, abs=1e-6)

        # Save -> reload: identical logits, identical greedy tokens.
        reloaded, tok = load_checkpoint(full.run_dir / "final")
        assert list(reloaded.vision_towers) == ["base", second]
        image = sorted((Path(cfg.data.train).parent / "images").glob("*.png"))[0]
        pixels = tower_pixels(reloaded, [str(image)])
        assert {k: tuple(v.shape) for k, v in pixels.items()} == {
            "base": (1, 3, 56, 56), second: (1, 3, SECOND[second].image_size, SECOND[second].image_size)}
        ids = torch.tensor([[tok.bos_token_id or 1] + [reloaded.config.image_token_id] * 16 + [5, 6, 7]])
        full.model.eval()
        with torch.no_grad():
            a = full.model(input_ids=ids, pixel_values=pixels).logits
            b = reloaded(input_ids=ids, pixel_values=pixels).logits
            torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
            g1 = full.model.generate(ids, pixel_values=pixels, max_new_tokens=4, min_new_tokens=4, do_sample=False)
            g2 = reloaded.generate(ids, pixel_values=pixels, max_new_tokens=4, min_new_tokens=4, do_sample=False)
        assert g1.tolist() == g2.tolist() and g1.shape == (1, 4)

        # Served by `vlweave chat`.
        assert main(["chat", str(full.run_dir / "final"), "--image", str(image), "--prompt", "What color?",
                     "--max-new-tokens", "3"]) == 0


def test_a_tower_the_connector_does_not_need_is_never_run(tmp_path, monkeypatch):
    with isolated_env(tmp_path / "cache"):
        cfg = make_run(tmp_path, vision="dinov2", connector="mlp2x_gelu", cache_features=True)
        cfg.towers = {"clip": CLIP_32}
        trainer = Trainer(cfg, progress=False)
        assert list(trainer.model.vision_towers) == ["base", "clip"] and trainer.model.needed_towers() == ["base"]
        assert list(trainer.store.stores) == ["base"]

        def refuse(*args, **kwargs):
            raise AssertionError("the clip tower ran although the connector does not read it")

        monkeypatch.setattr(trainer.model.vision_towers["clip"], "forward", refuse)
        trainer.train()
        assert len(trainer.metrics) == 4


def test_bad_tower_configs_fail_clearly(tmp_path):
    cfg = make_run(tmp_path, vision="dinov2", connector="tower_concat")
    cfg.towers = {"base": CLIP_32}
    with pytest.raises(ValueError, match="the base tower is `vision`"):
        build_model(cfg)
    cfg.towers = {"clip": CLIP_32}
    cfg.connector.options = {"towers": ["base", "siglip"]}
    with pytest.raises(ValueError, match="siglip"):
        build_model(cfg)
    cfg.connector.options = {"resize": "nearest"}
    with pytest.raises(ValueError, match="resize"):
        build_model(cfg)
