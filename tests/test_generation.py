"""Generation through the model's own forward: cached == uncached, batched (left-padded) == one by one, mixed
image / text-only batches, prefill hooks whose state lives as long as the KV cache, and the typed context."""

from __future__ import annotations

import pytest
import torch

from helpers import make_run
from vlweave.builder import build_model
from vlweave.context import VlweaveContext
from vlweave.data.collate import pad_batch
from vlweave.eval.vqa import encode_question
from vlweave.modeling import ImageTokenMismatchError
from vlweave.train.trainer import Trainer

QUESTIONS = ["What color?", "What is the color of the thing in this image?", "Describe it.", "Hello there"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    cfg = make_run(tmp_path_factory.mktemp("gen"), vision="clip", language="qwen2", tokenizer="qwen",
                   template="tokenizer")
    torch.manual_seed(0)
    model, tok = build_model(cfg)
    return model.eval(), tok


def _prompts(model, tok, with_image):
    return [encode_question(model, tok, q, img) for q, img in zip(QUESTIONS, with_image)]


def _pixels(model, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = model.facts.image_size
    return torch.randn(n, 3, s, s, generator=g)


def _generate(model, tok, prompts, pixels, **kw):
    batch = pad_batch([{"input_ids": p} for p in prompts], tok.pad_token_id, padding_side="left")
    kwargs = {"pixel_values": pixels} if pixels is not None and len(pixels) else {}
    return model.generate(batch["input_ids"], attention_mask=batch["attention_mask"], max_new_tokens=6,
                          min_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id, **kwargs, **kw)


def test_cached_equals_uncached_greedy(tiny):
    model, tok = tiny
    prompts = _prompts(model, tok, [True, True, True, True])
    pixels = _pixels(model, 4)
    cached = _generate(model, tok, prompts, pixels)
    uncached = _generate(model, tok, prompts, pixels, use_cache=False)
    assert cached.shape == (4, 6)
    assert cached.tolist() == uncached.tolist()


def test_batched_left_padded_equals_one_by_one_with_mixed_text_only_rows(tiny):
    model, tok = tiny
    with_image = [True, False, True, False]
    prompts = _prompts(model, tok, with_image)
    assert len({len(p) for p in prompts}) > 1  # the batch really is padded
    pixels = _pixels(model, 2)
    batched = _generate(model, tok, prompts, pixels)
    k = 0
    for r, (prompt, img) in enumerate(zip(prompts, with_image)):
        alone = _generate(model, tok, [prompt], pixels[k:k + 1] if img else None)
        k += int(img)
        assert alone.tolist()[0] == batched.tolist()[r], r


def test_images_go_to_the_rows_that_have_them(tiny):
    """Swapping which rows carry images must swap which answers see which image (not row k <- image k)."""
    model, tok = tiny
    prompts = _prompts(model, tok, [False, True, False, True])
    pixels = _pixels(model, 2, seed=3)
    out = _generate(model, tok, prompts, pixels)
    first = _generate(model, tok, [prompts[1]], pixels[:1])
    second = _generate(model, tok, [prompts[3]], pixels[1:])
    assert out[1].tolist() == first[0].tolist() and out[3].tolist() == second[0].tolist()


def test_prefill_hook_runs_once_and_its_state_reaches_every_decode_step(tiny, monkeypatch):
    model, tok = tiny
    calls: list[int] = []
    seen_at_decode: list[object] = []

    def hook(m, context, embeds, mask):
        calls.append(embeds.shape[1])
        context.guidance["pooled"] = embeds.mean(1)

    real_lm_forward = model.language_model.forward

    def spy(*args, **kwargs):
        if kwargs.get("cache") is not None and kwargs["cache"].get_seq_length() > 0:
            seen_at_decode.append(ctx.guidance.get("pooled"))
        return real_lm_forward(*args, **kwargs)

    ctx = VlweaveContext.for_batch([True, True])
    monkeypatch.setattr(model, "_prefill_hooks", {})
    model.register_prefill_hook("probe", hook)
    monkeypatch.setattr(model.language_model, "forward", spy)
    prompts = _prompts(model, tok, [True, True])[:2]
    out = _generate(model, tok, prompts, _pixels(model, 2), context=ctx)
    assert out.shape == (2, 6)
    assert len(calls) == 1 and calls[0] == max(len(p) for p in prompts)  # prefill only
    assert len(seen_at_decode) == 5 and all(s is ctx.guidance["pooled"] for s in seen_at_decode)
    with pytest.raises(ValueError, match="registered twice"):
        model.register_prefill_hook("probe", hook)


def test_context_image_rows_must_match_the_image_tokens(tiny):
    model, tok = tiny
    prompts = _prompts(model, tok, [True, False, True, False])
    batch = pad_batch([{"input_ids": p} for p in prompts], tok.pad_token_id, padding_side="left")
    wrong = VlweaveContext.for_batch([True, True, False, False])
    with pytest.raises(ImageTokenMismatchError, match="image_rows"):
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], pixel_values=_pixels(model, 2),
              context=wrong)


def test_collator_builds_the_context_for_mixed_batches(tmp_path):
    cfg = make_run(tmp_path, vision="clip")
    trainer = Trainer(cfg, progress=False)
    samples = trainer.stage_samples(0, cfg.train.stages[0])[:3]
    examples = list(trainer.encode_used(cfg.train.stages[0], samples, {0, 1, 2}).values())
    examples[1] = {**examples[1], "image": None,  # a text-only sample in the middle
                   "input_ids": [t for t in examples[1]["input_ids"] if t != trainer.model.config.image_token_id],
                   "labels": [lab for t, lab in zip(examples[1]["input_ids"], examples[1]["labels"])
                              if t != trainer.model.config.image_token_id]}
    examples[2] = {**examples[2], "routing": ["clip"]}
    batch = trainer.collate(examples)
    ctx = batch["context"]
    assert ctx.image_rows.tolist() == [0, 2] and ctx.routing == [None, ["clip"]]
    assert ctx.texts[0] == ["What color is this?"]
    assert batch["pixel_values"]["base"].shape[0] == 2
    out = trainer.model(**batch)  # the context is checked against the image tokens
    assert torch.isfinite(out.loss)


def test_context_validation_messages():
    with pytest.raises(ValueError, match="2 routing entries for a batch of 3"):
        VlweaveContext.for_batch([True, False, True], routing=[None, None])
    ctx = VlweaveContext.for_batch([True, False])
    with pytest.raises(ValueError, match="lists 1 image"):
        ctx.check(batch_size=2, num_images=2)


def test_routing_field_is_read_and_checked(tmp_path):
    import json

    from vlweave.data.llava_json import DataError, load_llava_data

    img = tmp_path / "a.png"
    from PIL import Image

    Image.new("RGB", (8, 8)).save(img)
    good = {"id": "r1", "image": "a.png", "routing": ["dino", "clip"],
            "conversations": [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}]}
    bad = {**good, "id": "r2", "routing": "clip"}
    (tmp_path / "d.json").write_text(json.dumps([good]))
    assert load_llava_data(tmp_path / "d.json")[0].routing == ["dino", "clip"]
    (tmp_path / "e.json").write_text(json.dumps([good, bad]))
    with pytest.raises(DataError, match="r2.*routing"):
        load_llava_data(tmp_path / "e.json")


def test_a_connector_that_declares_a_text_encoder_gets_token_ids(tmp_path, monkeypatch):
    cfg = make_run(tmp_path, vision="clip")
    trainer = Trainer(cfg, progress=False)
    samples = trainer.stage_samples(0, cfg.train.stages[0])[:2]
    examples = list(trainer.encode_used(cfg.train.stages[0], samples, {0, 1}).values())
    assert trainer.collate(examples)["context"].text_input_ids is None  # plain projectors read no text
    monkeypatch.setattr(type(trainer.model.connector), "text_encoder", "language")
    ids = trainer.collate(examples)["context"].text_input_ids
    assert ids == [trainer.tokenizer("What color is this?", add_special_tokens=False)["input_ids"]] * 2
