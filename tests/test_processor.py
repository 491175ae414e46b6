"""``VlweaveProcessor``: the same ids as ``encode_conversation``/``encode_prompt``, per-tower pixels, mixed batches,
save -> ``AutoProcessor`` round trip from a folder alone (no model), legacy checkpoints, checkpoints save it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoProcessor

from helpers import isolated_env, make_run, write_dataset
from vlweave.builder import build_model, load_checkpoint, load_processor, save_checkpoint
from vlweave.config import VisionConfig
from vlweave.data.collate import pad_batch
from vlweave.data.llava_json import load_llava_data
from vlweave.eval.vqa import encode_question
from vlweave.processing import encode_conversation, encode_prompt, load_image, tower_pixels, tower_transform
from vlweave.processor import VlweaveBatch, VlweaveProcessor

LEGACY = Path(__file__).parent / "fixtures" / "legacy-v0"

# (vision, language, tokenizer, template)
SETUPS = {
    "clip-llama-vicuna": ("clip", "llama", "llama", "vicuna_v1"),
    "siglip-qwen2-chatml": ("siglip", "qwen2", "qwen", "tokenizer"),
    "dinov2-llama-chatml": ("dinov2", "llama", "chatml", "tokenizer"),
    "clip-llama-plain": ("clip", "llama", "llama", "plain"),
}
CLIP_32 = VisionConfig(name="clip_vision_model", image_size=32, random_init=True, select_layer=-2,
                       image_mean=[0.48145466, 0.4578275, 0.40821073], image_std=[0.26862954, 0.26130258, 0.27577711],
                       config_overrides={"hidden_size": 24, "intermediate_size": 48, "num_hidden_layers": 2,
                                         "num_attention_heads": 2, "patch_size": 4, "image_size": 32})


@pytest.fixture(autouse=True, scope="module")
def _env(tmp_path_factory):
    with isolated_env(tmp_path_factory.mktemp("vlweave-cache")):
        yield


def _setup(tmp_path: Path, key: str, **kw):
    vision, language, tok, template = SETUPS[key]
    cfg = make_run(tmp_path, vision=vision, language=language, tokenizer=tok, template=template, **kw)
    model, tokenizer = build_model(cfg)
    return cfg, model.eval(), tokenizer


def _same_batch(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for key in ("input_ids", "attention_mask", "labels"):
        if key in a:
            assert torch.equal(a[key], b[key]), key
    if "pixel_values" in a:
        assert set(a["pixel_values"]) == set(b["pixel_values"])
        for name in a["pixel_values"]:
            assert torch.equal(a["pixel_values"][name], b["pixel_values"][name]), name
    assert torch.equal(a["context"].image_rows, b["context"].image_rows)
    assert a["context"].texts == b["context"].texts


@pytest.mark.parametrize("key", list(SETUPS))
def test_processor_ids_equal_the_encoders(tmp_path, key):
    cfg, model, tok = _setup(tmp_path, key)
    proc = VlweaveProcessor.from_model(model, tok)
    assert proc.num_image_tokens == model.num_image_tokens and proc.image_token_id == model.config.image_token_id
    assert proc.chat_template_name == cfg.language.template and proc.system_prompt == cfg.language.system_prompt
    template = cfg.language.template
    facts = dict(image_token_id=model.config.image_token_id, num_image_tokens=model.num_image_tokens,
                 system_prompt=cfg.language.system_prompt)
    samples = load_llava_data(cfg.data.train)[:4]
    for s in samples:
        want = encode_conversation(s.conversations, tok, template, sample_id=s.id, **facts)
        assert proc.encode_conversation(s.conversations, has_image=True, sample_id=s.id) == want
        # The generation prompt of the same user turn.
        turns = s.conversations[:1]
        want_prompt = encode_prompt(turns, tok, template, sample_id=s.id, **facts)
        assert proc.encode_prompt(turns, has_image=True) == want_prompt
    # Training batch through __call__: encode + right padding, labels, pixels of each row.
    batch = proc(text=[s.conversations for s in samples], images=[s.image for s in samples], pad_to_multiple_of=8)
    want = pad_batch([encode_conversation(s.conversations, tok, template, sample_id=s.id, **facts) for s in samples],
                     tok.pad_token_id, padding_side="right", pad_to_multiple_of=8)
    assert isinstance(batch, VlweaveBatch)
    for k in ("input_ids", "attention_mask", "labels"):
        assert torch.equal(batch[k], want[k]), k
    # Questions: == vqa.encode_question (the eval path) == encode_prompt (what it did before the processor).
    for text, has_image in [("What color is this?", True), ("Describe the image.", True), ("Say hello.", False)]:
        conv = [{"from": "human", "value": ("<image>\n" + text) if has_image else text}]
        base = encode_prompt(conv, tok, template, image_token_id=facts["image_token_id"] if has_image else None,
                             num_image_tokens=facts["num_image_tokens"], system_prompt=facts["system_prompt"])
        assert proc.encode_question(text, has_image) == base
        assert encode_question(model, tok, text, has_image) == base
        assert encode_question(model, tok, text, has_image, processor=proc) == base
    # Overrides: template and system prompt.
    if template == "tokenizer":
        conv = [{"from": "human", "value": "<image>\nWhat?"}]
        assert proc.encode_prompt(conv, has_image=True, system_prompt="Be brief.") == encode_prompt(
            conv, tok, template, image_token_id=facts["image_token_id"], num_image_tokens=facts["num_image_tokens"],
            system_prompt="Be brief.")


def test_generation_batch_is_left_padded_and_generates_like_the_model_path(tmp_path):
    cfg, model, tok = _setup(tmp_path, "clip-llama-vicuna")
    proc = VlweaveProcessor.from_model(model, tok)
    image = load_llava_data(cfg.data.train)[0].image
    texts = ["What color?", "What is the color of the thing in this image?"]
    batch = proc(text=texts, images=[image, image])
    assert "labels" not in batch and bool((batch["attention_mask"][:, -1] == 1).all())
    rows = [proc.encode_question(t, True) for t in texts]
    assert torch.equal(batch["input_ids"], pad_batch([{"input_ids": r} for r in rows], tok.pad_token_id,
                                                     padding_side="left")["input_ids"])
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=3, min_new_tokens=3, do_sample=False,
                             pad_token_id=tok.pad_token_id)
        single = model.generate(torch.tensor([rows[0]]), pixel_values=tower_pixels(model, [image]), max_new_tokens=3,
                                min_new_tokens=3, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out[0].tolist() == single[0].tolist()


def test_mixed_image_and_text_only_batch_maps_images_to_rows(tmp_path):
    cfg, model, tok = _setup(tmp_path, "clip-llama-vicuna")
    proc = VlweaveProcessor.from_model(model, tok)
    samples = load_llava_data(cfg.data.train)[:3]
    text_only = [{"from": "human", "value": "Say hi."}, {"from": "gpt", "value": "hi"}]
    convs = [text_only, samples[1].conversations, samples[2].conversations]
    batch = proc(text=convs, images=[None, samples[1].image, samples[2].image])
    assert batch["context"].image_rows.tolist() == [1, 2]
    assert batch["pixel_values"]["base"].shape[0] == 2
    expect = torch.stack([tower_transform(model.tower_specs["base"])(load_image(s.image)) for s in samples[1:]])
    assert torch.equal(batch["pixel_values"]["base"], expect)
    has_slots = (batch["input_ids"] == proc.image_token_id).any(dim=1).tolist()
    assert has_slots == [False, True, True]
    assert batch["context"].texts == [["Say hi."], ["What color is this?"], ["What color is this?"]]
    with torch.no_grad():
        assert torch.isfinite(model(**batch).loss)  # the model's own image-row check passes
    # Generation prompts too, and an image without an <image> tag gets one in front (as the loader does).
    gen = proc(text=["Say hi.", "What color?"], images=[None, samples[0].image])
    assert gen["context"].image_rows.tolist() == [1]
    assert int((gen["input_ids"][1] == proc.image_token_id).sum()) == proc.num_image_tokens
    with torch.no_grad():
        model.generate(**gen, max_new_tokens=2, do_sample=False, pad_token_id=tok.pad_token_id)
    with pytest.raises(ValueError, match="one per row"):
        proc(text=["a", "b"], images=[samples[0].image])
    with pytest.raises(ValueError, match="mixes"):
        proc(text=[text_only, "What?"])


def test_pixel_values_are_keyed_by_the_towers_the_connector_needs(tmp_path):
    cfg = make_run(tmp_path, vision="dinov2", connector="tower_concat")
    cfg.towers = {"clip": CLIP_32}
    model, tok = build_model(cfg)
    proc = VlweaveProcessor.from_model(model, tok)
    assert proc.needed_towers == ["base", "clip"] == model.needed_towers()
    images = [s.image for s in load_llava_data(cfg.data.train)[:3]]
    pixels = proc.pixel_values(images)
    assert {k: tuple(v.shape) for k, v in pixels.items()} == {"base": (3, 3, 56, 56), "clip": (3, 3, 32, 32)}
    for name in ("base", "clip"):
        t = tower_transform(model.tower_specs[name])
        assert torch.equal(pixels[name], torch.stack([t(load_image(p)) for p in images])), name
    reference = tower_pixels(model, images)
    assert all(torch.equal(pixels[n], reference[n]) for n in reference)
    # The same facts from the config alone (connector built on the meta device), and after a save.
    from_cfg = VlweaveProcessor.from_config(model.config, tok)
    assert from_cfg.to_dict() == proc.to_dict()
    proc.save_pretrained(tmp_path / "proc")
    again = AutoProcessor.from_pretrained(tmp_path / "proc")
    assert all(torch.equal(again.pixel_values(images)[n], pixels[n]) for n in pixels)

    # A tower the connector does not read gets no pixels.
    cfg2 = make_run(tmp_path, vision="dinov2", connector="mlp2x_gelu", out="run2")
    cfg2.towers = {"clip": CLIP_32}
    model2, tok2 = build_model(cfg2)
    proc2 = VlweaveProcessor.from_model(model2, tok2)
    assert proc2.needed_towers == ["base"] and list(proc2.pixel_values(images[:1])) == ["base"]
    assert VlweaveProcessor.from_config(model2.config, tok2).to_dict() == proc2.to_dict()


@pytest.mark.parametrize("key", ["clip-llama-vicuna", "siglip-qwen2-chatml"])
def test_save_then_auto_processor_from_the_folder_alone(tmp_path, key):
    cfg, model, tok = _setup(tmp_path, key)
    proc = VlweaveProcessor.from_model(model, tok)
    samples = load_llava_data(cfg.data.train)[:3]
    convs = [s.conversations for s in samples]
    images = [samples[0].image, None, samples[2].image]
    convs[1] = [{"from": "human", "value": "Say hi."}, {"from": "gpt", "value": "hi"}]
    questions = ["What color?", "Say hi.", "What color is it? Be brief."]
    before = (proc(text=convs, images=images), proc(text=questions, images=images))
    folder = tmp_path / "processor"
    proc.save_pretrained(folder)
    assert not (folder / "config.json").exists() and not list(folder.glob("*.safetensors"))
    saved = json.loads((folder / "processor_config.json").read_text())
    assert saved["processor_class"] == "VlweaveProcessor" and saved["num_image_tokens"] == model.num_image_tokens
    assert saved["needed_towers"] == ["base"] and set(saved["tower_transforms"]) == {"base"}
    del model  # nothing below can reach a model

    loaded = AutoProcessor.from_pretrained(folder)
    direct = VlweaveProcessor.from_pretrained(folder)
    for other in (loaded, direct):
        assert isinstance(other, VlweaveProcessor) and other.to_dict() == proc.to_dict()
        after = (other(text=convs, images=images), other(text=questions, images=images))
        for a, b in zip(before, after):
            _same_batch(a, b)
        assert other.encode_question("What?", True) == proc.encode_question("What?", True)


def test_checkpoints_save_the_processor_and_load_processor_reads_it(tmp_path):
    cfg, model, tok = _setup(tmp_path, "dinov2-llama-chatml")
    ckpt = save_checkpoint(model, tok, tmp_path / "ckpt")
    assert (ckpt / "processor_config.json").exists() and (ckpt / "tokenizer.json").exists()
    m2, t2 = load_checkpoint(ckpt)  # still (model, tokenizer)
    proc = load_processor(ckpt)
    shared = load_processor(ckpt, t2)
    assert shared.tokenizer is t2
    want = VlweaveProcessor.from_model(m2, t2).to_dict()
    assert proc.to_dict() == want == shared.to_dict() == AutoProcessor.from_pretrained(ckpt).to_dict()
    assert proc.encode_question("What?", True) == encode_question(m2, t2, "What?", True)


def test_legacy_checkpoint_gets_a_processor_that_reproduces_its_inputs(tmp_path):
    assert not (LEGACY / "processor_config.json").exists()
    golden = json.loads((LEGACY / "golden.json").read_text())
    inputs = torch.load(LEGACY / "golden_inputs.pt")
    proc = load_processor(LEGACY)
    assert proc.num_image_tokens == golden["num_image_tokens"] and proc.needed_towers == ["base"]
    assert proc.chat_template_name == "vicuna_v1" and proc.system_prompt == ""
    assert AutoProcessor.from_pretrained(LEGACY).to_dict() == proc.to_dict()
    # The fixture's golden batch was made from make_run's first two records (tests/fixtures/make_legacy_checkpoint.py).
    write_dataset(tmp_path / "data")
    samples = load_llava_data(tmp_path / "data" / "train.json")[:2]
    batch = proc(text=[s.conversations for s in samples], images=[s.image for s in samples], pad_to_multiple_of=8)
    assert torch.equal(batch["input_ids"], inputs["input_ids"])
    assert torch.equal(batch["attention_mask"], inputs["attention_mask"])
    torch.testing.assert_close(batch["pixel_values"]["base"], inputs["pixel_values"], atol=0, rtol=0)
    model, tok = load_checkpoint(LEGACY)
    assert proc.to_dict() == VlweaveProcessor.from_model(model, tok).to_dict()
