"""Real-asset smoke test: the embedded default (DINOv2-S + SmolLM2-135M-Instruct) builds, runs forward and
backward, and its gradients reach the trainable parts only. Prepares the offline assets on first use."""

from __future__ import annotations

import pytest
import torch

from vlweave.config import RunConfig
from vlweave.presets import preset_path

pytestmark = pytest.mark.slow


def test_demo_model_forward_backward(tmp_path):
    from PIL import Image

    from vlweave.builder import build_model
    from vlweave.data.collate import pad_batch
    from vlweave.processing import ImageTransform, encode_conversation
    from vlweave.train.policy import apply_tune_policy

    cfg = RunConfig.load(preset_path("demo"), [f"train.output_dir={tmp_path}"])
    model, tok = build_model(cfg)
    assert model.facts.hidden_size == 384 and model.facts.num_layers == 12 and model.facts.grid == 8
    assert model.config.text_config.hidden_size == 576 and model.num_image_tokens == 4
    apply_tune_policy(model, cfg.train.stages[-1], cfg.train.lora)

    t = ImageTransform(model.facts.image_size, model.config.image_mean, model.config.image_std)
    images = [Image.new("RGB", (64, 64), c) for c in ("red", "blue")]
    feats = []
    for q, a in (("what color is the shape?", "red"), ("is there a blue shape?", "yes")):
        enc = encode_conversation([{"from": "human", "value": "<image>\n" + q}, {"from": "gpt", "value": a}], tok,
                                  "tokenizer", image_token_id=model.config.image_token_id,
                                  num_image_tokens=model.num_image_tokens, system_prompt="")
        feats.append(enc)
    batch = pad_batch(feats, tok.pad_token_id)
    batch["pixel_values"] = torch.stack([t(im) for im in images])
    model.train()
    out = model(**batch)
    assert torch.isfinite(out.loss) and out.loss.item() > 0
    out.loss.backward()
    conn_grad = sum(p.grad.abs().sum() for p in model.connector.parameters() if p.grad is not None)
    lora_grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n]
    assert conn_grad > 0 and lora_grads and all(g is not None for g in lora_grads)
    assert all(p.grad is None for p in model.vision_tower.parameters())  # frozen tower: no gradient at all
    base = model.language_model.get_input_embeddings().weight
    assert base.grad is None  # LoRA stage: the LM's own weights stay frozen
