"""Export and interop: ``vlweave export --format llava`` (HF ``LlavaForConditionalGeneration`` with no missing or
new weights, same logits and greedy tokens), refusals for connectors llava cannot express, the native checkpoint
through transformers' Auto classes after ``import vlweave``, model cards, LoRA adapter export + merge, and the
QLoRA option's errors without CUDA/bitsandbytes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor, LlavaForConditionalGeneration

from helpers import align_stage, draw_image, finetune_stage, isolated_env, make_run
from vlweave.builder import build_model, load_checkpoint, load_processor, save_checkpoint
from vlweave.cli import main
from vlweave.export.llava import ExportRefused, build_llava, example_prompt
from vlweave.modeling import VlweaveForConditionalGeneration
from vlweave.processor import VlweaveProcessor

SRC = Path(__file__).resolve().parents[1] / "src"


@pytest.fixture(autouse=True, scope="module")
def _env(tmp_path_factory):
    with isolated_env(tmp_path_factory.mktemp("vlweave-cache")):
        yield


def tiny(tmp: Path, vision: str, connector: str, options=None, strategy="default", select_layer=-2, wide=False,
         layers=None):
    cfg = make_run(tmp, vision=vision, language="qwen2", tokenizer="qwen", template="tokenizer", connector=connector,
                   options=options)
    cfg.vision.select_strategy = strategy
    cfg.vision.select_layer = select_layer
    if wide:  # identity needs the tower as wide as the LM
        cfg.vision.config_overrides.update(hidden_size=64, intermediate_size=128)
    if layers:
        cfg.vision.config_overrides.update(num_hidden_layers=layers)
    return build_model(cfg)


LLAVA_CASES = {
    "clip-mlp2x_gelu": dict(vision="clip", connector="mlp2x_gelu"),
    "siglip-linear-full-layerlist": dict(vision="siglip", connector="linear", strategy="full", select_layer=[-3, -1]),
    "clip-identity": dict(vision="clip", connector="identity", wide=True),
    "dinov2-dense_sci": dict(vision="dinov2", connector="dense_sci", layers=6,
                             options={"layers": [2, 4], "final_first": False}),
    "clip-linear-standardize": dict(vision="clip", connector="linear", options={"standardize": True}),
}


@pytest.mark.parametrize("case", list(LLAVA_CASES))
def test_llava_export_same_logits_and_tokens(tmp_path, case):
    model, tok = tiny(tmp_path, **LLAVA_CASES[case])
    torch.manual_seed(1)
    with torch.no_grad():  # a random (not zero-initialised) connector and LM, so differences would show
        for p in model.connector.parameters():
            p.normal_(0, 0.2)
        if getattr(model.connector, "standardize", False):  # measured statistics, not the identity defaults
            model.connector.feature_mean.normal_(0, 1)
            model.connector.feature_std.uniform_(0.5, 2.0)
    ckpt = save_checkpoint(model, tok, tmp_path / "ckpt")
    out = tmp_path / "llava"
    assert main(["export", str(ckpt), "--format", "llava", str(out)]) == 0
    hf, info = AutoModelForImageTextToText.from_pretrained(out, output_loading_info=True)
    assert isinstance(hf, LlavaForConditionalGeneration)
    assert info["missing_keys"] == set() or not info["missing_keys"], info
    assert not info["unexpected_keys"] and not info["mismatched_keys"], info
    hf.eval()
    vl, vtok = load_checkpoint(ckpt)
    processor = load_processor(ckpt, vtok)
    image = draw_image("green", "circle", size=40)  # square: the HF image processor gives identical pixels
    question = "What color is this?"
    ids = processor.encode_question(question, True)
    pixels = processor.pixel_values([image])["base"]
    # The exported processor: same ids from the documented prompt string, same pixels.
    hp = AutoProcessor.from_pretrained(out)
    enc = hp(images=image, text=example_prompt(processor, question), return_tensors="pt")
    assert enc["input_ids"][0].tolist() == ids
    assert torch.allclose(enc["pixel_values"], pixels, atol=1e-5)
    input_ids = torch.tensor([ids])
    with torch.no_grad():
        a = vl(input_ids=input_ids, pixel_values=pixels).logits
        b = hf(input_ids=input_ids, pixel_values=pixels).logits
    assert a.shape == b.shape and float((a - b).abs().max()) < 1e-4 and float(a.std()) > 1e-3
    gen_a = vl.generate(input_ids, pixel_values=pixels, max_new_tokens=6, do_sample=False, min_new_tokens=6)
    gen_b = hf.generate(input_ids=input_ids, pixel_values=pixels, max_new_tokens=6, do_sample=False,
                        min_new_tokens=6)[:, input_ids.shape[1]:]
    assert gen_a.tolist() == gen_b.tolist()
    card = (out / "README.md").read_text()
    assert "HF llava" in card and LLAVA_CASES[case]["connector"] in card


REFUSED = {
    "dense_dci": (dict(vision="clip", connector="dense_dci", layers=6, options={"groups": 2}), "averages groups"),
    "dense_sti": (dict(vision="clip", connector="dense_sti", layers=6), "pooled tokens"),
    "pool": (dict(vision="clip", connector="mlp2x_gelu", options={"pool": 2}), "pool=2"),
    "input_norm": (dict(vision="clip", connector="mlp2x_gelu", options={"input_norm": True}), "input_norm"),
    "mlp3x": (dict(vision="clip", connector="mlp3x_gelu"), "3-layer projector"),
    "siglip-default": (dict(vision="siglip", connector="mlp2x_gelu"), "drops 0 prefix"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_llava_export_refuses_with_the_reason(tmp_path, case):
    kw, reason = REFUSED[case]
    model, _ = tiny(tmp_path, **kw)
    with pytest.raises(ExportRefused) as err:
        build_llava(model)
    assert reason in str(err.value) and "native vlweave checkpoint" in str(err.value)


def test_llava_export_refusal_from_the_cli(tmp_path, capsys):
    model, tok = tiny(tmp_path, vision="clip", connector="dense_dci", layers=6, options={"groups": 2})
    ckpt = save_checkpoint(model, tok, tmp_path / "ckpt")
    assert main(["export", str(ckpt), "--format", "llava", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "cannot be written as HF llava" in err and "DCI" in err and "Traceback" not in err
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_native_checkpoint_loads_through_auto_classes_after_import_vlweave(tmp_path):
    model, tok = tiny(tmp_path, vision="clip", connector="dense_dci", layers=6, options={"groups": 2})
    ckpt = save_checkpoint(model, tok, tmp_path / "ckpt")
    card = (ckpt / "README.md").read_text()
    for fact in ("clip_vision_model", "dense_dci", "qwen2", "## Training", "## Evaluation"):
        assert fact in card, fact
    image = tmp_path / "im.png"
    draw_image("red", "square").save(image)
    with torch.no_grad():
        processor = load_processor(ckpt)
        batch = processor(text=["What color?"], images=[str(image)])
        expected = model.eval()(**batch).logits[0, -1]
    # A fresh interpreter that imports nothing of vlweave but the package itself.
    script = (
        "import sys, torch, vlweave\n"
        "from transformers import AutoModelForImageTextToText, AutoProcessor\n"
        f"m = AutoModelForImageTextToText.from_pretrained({str(ckpt)!r}).eval()\n"
        f"p = AutoProcessor.from_pretrained({str(ckpt)!r})\n"
        f"b = p(text=['What color?'], images=[{str(image)!r}])\n"
        "with torch.no_grad():\n"
        "    out = m(**b).logits[0, -1]\n"
        "print(type(m).__name__, type(p).__name__, repr(out.tolist()))\n"
    )
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                         env={"PYTHONPATH": str(SRC), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin",
                              "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-2000:]
    kind, proc, values = res.stdout.strip().split(" ", 2)
    assert (kind, proc) == ("VlweaveForConditionalGeneration", "VlweaveProcessor")
    assert torch.allclose(torch.tensor(eval(values)), expected, atol=1e-5)


def test_lora_adapter_export_and_merge_equal_the_merged_run(tmp_path, capsys):
    from vlweave.train.trainer import Trainer

    cfg = make_run(tmp_path, vision="clip", language="qwen2", tokenizer="qwen", template="tokenizer",
                   options={"standardize": True},
                   stages=[align_stage(max_steps=2), finetune_stage("lora", max_steps=3)])
    trainer = Trainer(cfg, progress=False)
    trainer.train()
    run = trainer.run_dir
    adapter = tmp_path / "adapter"
    assert main(["export", str(run), "--format", "adapter", str(adapter)]) == 0
    files = {p.name for p in adapter.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "vlweave_adapter.json", "README.md"} <= files
    from safetensors import safe_open

    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert any("lora_A" in k for k in keys) and any(".connector." in k for k in keys)
    assert any("feature_mean" in k for k in keys)  # calibrated buffers travel with the connector
    assert not any("embed_tokens" in k or "vision_tower" in k for k in keys)  # no frozen base weight
    peft_cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert peft_cfg["peft_type"] == "LORA" and peft_cfg["r"] == cfg.train.lora.r
    merged = tmp_path / "merged"
    assert main(["export", str(adapter), "--merge", str(merged)]) == 0
    a, tok = load_checkpoint(run / "final")
    b, _ = load_checkpoint(merged)
    processor = load_processor(merged)
    image = sorted((Path(cfg.data.train).parent / "images").glob("*.png"))[0]
    batch = processor(text=["What color?"], images=[str(image)])
    with torch.no_grad():
        la, lb = a(**batch).logits, b(**batch).logits
    assert float((la - lb).abs().max()) < 1e-5
    assert not any("lora_" in n for n, _ in b.named_parameters())
    card = (run / "final" / "README.md").read_text()
    assert "- steps: 5" in card and "clip_vision_model" in card and "lora" in card
    # `vlweave eval` into the checkpoint folder puts its accuracy on the card.
    assert main(["eval", str(run / "final"), "--data", cfg.eval.data, "--limit", "2", "--max-new-tokens", "2"]) == 0
    report = json.loads((run / "final" / "eval" / "eval_metrics.json").read_text())
    assert f"accuracy {report['accuracy']:.4f}" in (run / "final" / "README.md").read_text()
    # The align stage's checkpoint (connector only, before LoRA was injected) has no adapter to export.
    assert main(["export", str(run / "checkpoints" / "ckpt-s0-000002"), "--format", "adapter",
                 str(tmp_path / "a2")]) == 2
    assert "trained no LoRA" in capsys.readouterr().err


def test_qlora_needs_cuda_and_bitsandbytes(tmp_path):
    cfg = make_run(tmp_path, vision="clip", stages=[finetune_stage("lora")])
    cfg.language.load_in_4bit = True
    with pytest.raises(ValueError) as err:
        build_model(cfg)
    msg = str(err.value)
    assert "language.load_in_4bit" in msg and ("CUDA" in msg or "bitsandbytes" in msg)
    from vlweave.builder import check_quantization

    with pytest.raises(ValueError, match="random_init"):
        check_quantization(cfg, cuda=True, bnb=True)
    cfg.language.random_init = False
    check_quantization(cfg, cuda=True, bnb=True)  # a LoRA-only stage on a pretrained LM is what QLoRA is
    cfg.train.stages = [finetune_stage("full")]
    with pytest.raises(ValueError, match="LoRA only"):
        check_quantization(cfg, cuda=True, bnb=True)


def test_vlweave_processor_round_trip_unchanged(tmp_path):
    """The card written by save_checkpoint does not disturb the processor/model round trip."""
    model, tok = tiny(tmp_path, vision="clip", connector="mlp2x_gelu")
    ckpt = save_checkpoint(model, tok, tmp_path / "ckpt")
    assert isinstance(VlweaveProcessor.from_pretrained(ckpt), VlweaveProcessor)
    assert isinstance(VlweaveForConditionalGeneration.from_pretrained(ckpt), VlweaveForConditionalGeneration)
    # `vlweave export` (native) re-saves an equal model with a card.
    out = tmp_path / "native"
    assert main(["export", str(ckpt), str(out)]) == 0
    a, b = load_checkpoint(ckpt)[0], load_checkpoint(out)[0]
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert (out / "README.md").is_file()
    assert main(["export", str(ckpt), str(out)]) == 2  # a non-empty OUT needs --overwrite
