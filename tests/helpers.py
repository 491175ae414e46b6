"""Tiny, fully offline run setups for model/train/CLI tests.

``make_run(tmp_path, ...)`` writes into ``tmp_path``:

* ``tokenizer/`` -- one of the in-process test tokenizers (``conftest.py``) saved with ``save_pretrained``;
* ``data/images/*.png`` -- small generated images (a coloured square or circle on white);
* ``data/train.json`` -- LLaVA-format records whose answer is the image's colour (or shape);
* ``data/questions.jsonl`` -- eval questions ``{"question_id", "image", "text", "answer"}`` of different lengths;

and returns a :class:`vlweave.config.RunConfig` with ``random_init`` tiny towers/LMs (hidden 32 / 64, 2 layers)
whose vocabulary is the tokenizer's, ``bf16: false`` and ``train.output_dir`` under ``tmp_path``.
"""

from __future__ import annotations

import contextlib
import copy
import json
from pathlib import Path
from typing import Any

import pytest
from PIL import Image, ImageDraw

from conftest import QWEN2_TEMPLATE, make_chatml_tokenizer, make_unigram_tokenizer
from vlweave.config import LoraConfig, RunConfig, StageConfig

COLORS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 20)}
SHAPES = ("square", "circle")

# Tiny tower configs (AutoConfig.for_model(name, **overrides)); every one gives a 4x4 patch grid.
VISION = {
    "clip": {"name": "clip_vision_model", "image_size": 32,
             "config_overrides": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                                  "num_attention_heads": 2, "patch_size": 8, "image_size": 32}},
    "siglip": {"name": "siglip_vision_model", "image_size": 32,
               "config_overrides": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                                    "num_attention_heads": 2, "patch_size": 8, "image_size": 32}},
    "dinov2": {"name": "dinov2", "image_size": 56,
               "config_overrides": {"hidden_size": 32, "mlp_ratio": 2, "num_hidden_layers": 2,
                                    "num_attention_heads": 2, "patch_size": 14, "image_size": 56}},
}


def make_tokenizer(kind: str):
    """``llama`` (SentencePiece-like, no chat template), ``chatml`` (SmolLM2 template) or ``qwen`` (Qwen2 template)."""
    if kind == "llama":
        return make_unigram_tokenizer()
    if kind == "chatml":
        return make_chatml_tokenizer()
    if kind == "qwen":
        return make_chatml_tokenizer(QWEN2_TEMPLATE)
    raise ValueError(kind)


def draw_image(color: str, shape: str, size: int = 40) -> Image.Image:
    im = Image.new("RGB", (size, size), (255, 255, 255))
    d = ImageDraw.Draw(im)
    box = (size // 5, size // 5, size - size // 5, size - size // 5)
    (d.rectangle if shape == "square" else d.ellipse)(box, fill=COLORS[color])
    return im


def write_dataset(folder: Path, n: int = 16) -> dict[str, Path]:
    """Images + LLaVA train JSON + question JSONL under ``folder``; answers depend on the image."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "images").mkdir(exist_ok=True)
    colors = list(COLORS)
    records, questions = [], []
    for i in range(n):
        color, shape = colors[i % len(colors)], SHAPES[(i // len(colors)) % 2]
        rel = f"images/{i:02d}_{color}_{shape}.png"
        draw_image(color, shape, size=32 + 8 * (i % 3)).save(folder / rel)
        records.append({
            "id": f"s{i:02d}",
            "image": rel,
            "conversations": [{"from": "human", "value": "<image>\nWhat color is this?"},
                              {"from": "gpt", "value": color}],
        })
    texts = ["What color?", "What is this?", "What color is this?", "Describe the image.",
             "What is the color of the thing in this image?", "What color is it? Be brief."]
    for i, text in enumerate(texts):
        color, shape = colors[i % len(colors)], SHAPES[i % 2]
        questions.append({"question_id": f"q{i}", "image": f"images/{i:02d}_{color}_{SHAPES[(i // 4) % 2]}.png",
                          "text": text, "answer": color})
    train = folder / "train.json"
    train.write_text(json.dumps(records))
    qfile = folder / "questions.jsonl"
    qfile.write_text("".join(json.dumps(q) + "\n" for q in questions))
    return {"train": train, "questions": qfile, "images": folder / "images"}


def make_run(
    tmp_path: Path,
    *,
    vision: str = "clip",
    language: str = "llama",
    tokenizer: str = "llama",
    template: str = "vicuna_v1",
    connector: str = "mlp2x_gelu",
    options: dict[str, Any] | None = None,
    stages: list[StageConfig] | None = None,
    cache_features: bool = False,
    tie_word_embeddings: bool = False,
    n_records: int = 16,
    out: str = "run",
    seed: int = 0,
) -> RunConfig:
    """A tiny offline RunConfig (see the module docstring)."""
    tmp_path = Path(tmp_path)
    tok_dir = tmp_path / f"tokenizer-{tokenizer}"
    if not (tok_dir / "tokenizer.json").exists():
        make_tokenizer(tokenizer).save_pretrained(tok_dir)
    data = tmp_path / "data"
    if not (data / "train.json").exists():
        write_dataset(data, n_records)
    # Vocabulary = tokenizer size + 1 (the <image> token the builder adds), so no resize happens.
    vocab = len(make_tokenizer(tokenizer)) + 1
    lm_overrides: dict[str, Any] = {
        "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": vocab, "max_position_embeddings": 512,
        "tie_word_embeddings": tie_word_embeddings,
    }
    v = copy.deepcopy(VISION[vision])
    cfg = RunConfig.from_dict({
        "vision": {"name": v["name"], "image_size": v["image_size"], "random_init": True,
                   "config_overrides": v["config_overrides"], "select_layer": -2},
        "connector": {"type": connector, "options": dict(options or {})},
        "language": {"name": language, "random_init": True, "tokenizer": str(tok_dir), "template": template,
                     "system_prompt": "", "max_length": 256, "config_overrides": lm_overrides},
        "data": {"train": str(data / "train.json"), "pad_to_multiple_of": 8},
        "eval": {"data": str(data / "questions.jsonl"), "batch_size": 4, "max_new_tokens": 4},
    })
    cfg.train.stages = stages if stages is not None else [
        StageConfig(name="finetune", tune={"vision": "frozen", "connector": "full", "language": "full"},
                    max_steps=4, batch_size=4, lr=1e-3, warmup_ratio=0.0)
    ]
    cfg.train.lora = LoraConfig(r=4, alpha=8)
    cfg.train.bf16 = False
    cfg.train.cache_features = cache_features
    cfg.train.seed = seed
    cfg.train.log_every = 1
    cfg.train.output_dir = str(tmp_path / out)
    return cfg


def align_stage(**kw: Any) -> StageConfig:
    base = dict(name="align", tune={"vision": "frozen", "connector": "full", "language": "frozen"},
                max_steps=4, batch_size=4, lr=1e-3, warmup_ratio=0.0)
    base.update(kw)
    return StageConfig(**base)


def finetune_stage(language: str = "lora", **kw: Any) -> StageConfig:
    base = dict(name="finetune", tune={"vision": "frozen", "connector": "full", "language": language},
                max_steps=6, batch_size=4, lr=1e-3, warmup_ratio=0.0)
    base.update(kw)
    return StageConfig(**base)


def losses(metrics: list[dict[str, Any]], stage_index: int | None = None) -> list[float]:
    return [m["loss"] for m in metrics if stage_index is None or m["stage_index"] == stage_index]


@contextlib.contextmanager
def isolated_env(cache_dir: Path):
    """A throwaway vlweave cache, no hub, and one torch thread (tiny models on a shared 2-core machine run
    tens of times slower with two threads competing against another process)."""
    import torch

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VLWEAVE_CACHE", str(cache_dir))
        mp.setenv("HF_HUB_OFFLINE", "1")
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(threads)


def make_batch(model, tokenizer, cfg: RunConfig, n: int = 3, template: str | None = None) -> dict[str, Any]:
    """A right-padded training batch (input_ids, attention_mask, labels, pixel_values) of the first ``n`` records,
    built from the public pieces (loader, encoder, collate, image transform), not from Trainer internals."""
    import torch

    from vlweave.data.collate import pad_batch
    from vlweave.data.llava_json import load_llava_data
    from vlweave.processing import ImageTransform, encode_conversation
    from vlweave.vision.cache import load_image

    samples = load_llava_data(cfg.data.train)[:n]
    feats = [encode_conversation(s.conversations, tokenizer, template or cfg.language.template,
                                 image_token_id=model.config.image_token_id, num_image_tokens=model.num_image_tokens,
                                 system_prompt=cfg.language.system_prompt, sample_id=s.id) for s in samples]
    batch = pad_batch(feats, tokenizer.pad_token_id, padding_side="right", pad_to_multiple_of=8)
    c = model.config
    transform = ImageTransform(model.facts.image_size, c.image_mean, c.image_std, aspect=c.image_aspect)
    batch["pixel_values"] = torch.stack([transform(load_image(s.image)) for s in samples])
    return batch
