"""The assembled model: build/train/save/reload for three tower+LM combos, the image-token contract, feature
selection and connectors, batched generation, the supervised-positions-only loss and the frozen-feature cache.

All models are tiny random-init ones (``helpers.make_run``); nothing touches the hub.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForImageTextToText

from helpers import isolated_env, losses, make_batch, make_run
from vlweave.builder import build_model, load_checkpoint
from vlweave.connectors import ConnectorSpec, build_connector, known_connectors
from vlweave.connectors.base import pool_grid
from vlweave.data.collate import pad_batch
from vlweave.data.questions import read_questions
from vlweave.eval.vqa import generate_answers, stop_token_ids
from vlweave.modeling import ImageTokenMismatchError, VlweaveForConditionalGeneration
from vlweave.processing import IGNORE_INDEX, encode_prompt
from vlweave.train.trainer import Trainer, make_transform
from vlweave.vision.cache import FeatureCache, load_image
from vlweave.vision.towers import run_tower

# (vision, language, tokenizer, template, tie_word_embeddings)
COMBOS = {
    "clip-llama-vicuna": ("clip", "llama", "llama", "vicuna_v1", False),
    "siglip-qwen2-chatml": ("siglip", "qwen2", "qwen", "tokenizer", True),
    "dinov2-llama-chatml": ("dinov2", "llama", "chatml", "tokenizer", False),
}


@pytest.fixture(autouse=True, scope="module")
def _env(tmp_path_factory):
    with isolated_env(tmp_path_factory.mktemp("vlweave-cache")):
        yield


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, Trainer]:
    """Each combo trained for 20 steps (5 epochs of 16 samples) at a high lr, connector + full LM."""
    out = {}
    for key, (vision, language, tok, template, tie) in COMBOS.items():
        cfg = make_run(tmp_path_factory.mktemp(key), vision=vision, language=language, tokenizer=tok,
                       template=template, tie_word_embeddings=tie)
        stage = cfg.train.stages[0]
        stage.epochs, stage.max_steps, stage.lr = 100.0, 20, 3e-3
        trainer = Trainer(cfg, progress=False)
        trainer.train()
        out[key] = trainer
    return out


def sample_inputs(trainer: Trainer, n: int = 3) -> dict[str, torch.Tensor]:
    """A right-padded batch of the first ``n`` training records (no labels)."""
    batch = make_batch(trainer.model, trainer.tokenizer, trainer.cfg, n)
    return {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")}


@torch.no_grad()
def logits_of(model, inputs) -> torch.Tensor:
    model.eval()
    return model(**inputs).logits


# ---- build, train, save, reload ------------------------------------------------------------------------


@pytest.mark.parametrize("key", list(COMBOS))
def test_combo_trains_and_loss_decreases(trained, key):
    trainer = trained[key]
    curve = losses(trainer.metrics)
    assert len(curve) == 20
    assert all(torch.isfinite(torch.tensor(curve)))
    first, last = sum(curve[:2]) / 2, sum(curve[-2:]) / 2
    assert last < 0.8 * first, f"loss did not go down: {curve}"


@pytest.mark.parametrize("key", list(COMBOS))
def test_combo_save_reload_identical_logits(trained, key):
    trainer = trained[key]
    final = trainer.run_dir / "final"
    model, tokenizer = load_checkpoint(final)
    assert isinstance(model, VlweaveForConditionalGeneration)
    assert len(tokenizer) == len(trainer.tokenizer)
    assert tokenizer.convert_tokens_to_ids("<image>") == model.config.image_token_id
    inputs = sample_inputs(trainer)
    a, b = logits_of(trainer.model, inputs), logits_of(model, inputs)
    assert a.shape == (*inputs["input_ids"].shape, model.config.text_config.vocab_size)
    torch.testing.assert_close(b, a, atol=1e-6, rtol=0)
    # Every tensor survives the round trip (tied embeddings included).
    sa, sb = trainer.model.state_dict(), model.state_dict()
    assert set(sa) == set(sb)
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name
    vision, language, _, _, tie = COMBOS[key]
    assert model.config.text_config.model_type == language
    lm = model.language_model
    assert (lm.get_input_embeddings().weight.data_ptr() == lm.get_output_embeddings().weight.data_ptr()) == tie


def test_reloaded_weights_sit_in_aligned_memory(trained, tmp_path):
    """A checkpoint's tensors come off the file's memory map at 8-byte offsets; vlweave moves them into aligned
    allocations (vlweave/aligned.py), as in the trained model, so alignment-dependent CPU kernels compute the same
    bits after a reload; tied weights stay one tensor."""
    from vlweave.aligned import ALIGNMENT, realign_cpu_tensors

    for key in ("dinov2-llama-chatml", *(k for k in trained if COMBOS[k][4])):
        final = trained[key].run_dir / "final"
        for model in (load_checkpoint(final)[0], AutoModelForImageTextToText.from_pretrained(final)):
            tensors = [*model.parameters(), *model.buffers()]
            assert tensors and all(t.data_ptr() % ALIGNMENT == 0 for t in tensors if t.numel()), key
            lm = model.language_model
            tie = lm.get_input_embeddings().weight is lm.get_output_embeddings().weight
            assert tie == COMBOS[key][4], key
    # a model built from pretrained folders (the LM and tower loaded off their files) computes from aligned memory
    trainer = trained["dinov2-llama-chatml"]
    cfg = copy.deepcopy(trainer.cfg)
    trainer.model.language_model.save_pretrained(tmp_path / "lm")
    trainer.model.vision_towers["base"].save_pretrained(tmp_path / "tower")
    cfg.language.name, cfg.language.random_init = str(tmp_path / "lm"), False
    cfg.vision.name, cfg.vision.random_init = str(tmp_path / "tower"), False
    built, _ = build_model(cfg)
    assert all(t.data_ptr() % ALIGNMENT == 0 for t in [*built.parameters(), *built.buffers()] if t.numel())
    assert torch.equal(built.language_model.get_input_embeddings().weight,
                       trainer.model.language_model.get_input_embeddings().weight)
    # the helper itself: a misaligned parameter and buffer move (the parameter object stays), aligned ones do not
    module = nn.Linear(3, 3)
    module.register_buffer("b", torch.arange(9.0)[1:])  # 4 bytes past an aligned allocation
    weight = module.weight
    module.weight.data = torch.arange(10.0)[1:].view(3, 3)
    assert realign_cpu_tensors(module) == 2
    assert module.weight is weight and module.weight.data_ptr() % ALIGNMENT == 0
    assert torch.equal(module.weight.data, torch.arange(1.0, 10.0).view(3, 3))
    assert torch.equal(module.b, torch.arange(1.0, 9.0)) and module.b.data_ptr() % ALIGNMENT == 0
    assert realign_cpu_tensors(module) == 0


def test_auto_class_loads_vlweave(trained):
    final = trained["dinov2-llama-chatml"].run_dir / "final"
    assert json.loads((final / "config.json").read_text())["model_type"] == "vlweave"
    model = AutoModelForImageTextToText.from_pretrained(final)
    assert type(model) is VlweaveForConditionalGeneration
    inputs = sample_inputs(trained["dinov2-llama-chatml"], 2)
    torch.testing.assert_close(logits_of(model, inputs), logits_of(trained["dinov2-llama-chatml"].model, inputs),
                               atol=1e-6, rtol=0)


def test_submodels_use_sdpa_like_a_reloaded_checkpoint(tmp_path):
    """A VlweaveConfig built around existing models must not reset their attention implementation to None."""
    model, _ = build_model(make_run(tmp_path, vision="siglip", language="qwen2", tokenizer="qwen"))
    assert model.vision_tower.config._attn_implementation == "sdpa"
    assert model.language_model.config._attn_implementation == "sdpa"


# ---- the image-token contract --------------------------------------------------------------------------


def test_image_token_count_mismatch_raises(tmp_path):
    model, tok = build_model(make_run(tmp_path))
    model.eval()
    n = model.num_image_tokens
    img = model.config.image_token_id
    pixels = torch.randn(1, 3, model.facts.image_size, model.facts.image_size)
    ids = torch.tensor([[1] + [img] * (n - 1) + [5, 6]])
    with pytest.raises(ImageTokenMismatchError) as err:
        model(input_ids=ids, pixel_values=pixels)
    msg = str(err.value)
    assert f"{n - 1} image tokens" in msg and f"1 image(s) x {n} tokens = {n}" in msg
    assert f"model.num_image_tokens = {n}" in msg
    # Two rows with image slots but one image.
    ids = torch.tensor([[1] + [img] * n + [5]] * 2)
    with pytest.raises(ImageTokenMismatchError, match=f"the text has {2 * n} image tokens.* 1 image"):
        model(input_ids=ids, pixel_values=pixels)
    # Two images but slots for one.
    with pytest.raises(ImageTokenMismatchError, match=f"the text has {n} image tokens.* 2 image"):
        model(input_ids=torch.tensor([[1] + [img] * n + [5]]), pixel_values=pixels.repeat(2, 1, 1, 1))
    # Image tokens in the text but no image.
    with pytest.raises(ImageTokenMismatchError, match="no image was given"):
        model(input_ids=torch.tensor([[1] + [img] * n]))
    # The right count works.
    out = model(input_ids=torch.tensor([[1] + [img] * n + [5]]), pixel_values=pixels)
    assert out.logits.shape[:2] == (1, n + 2)


# ---- feature selection and connectors ------------------------------------------------------------------


@pytest.mark.parametrize("vision", ["clip", "siglip", "dinov2"])
def test_get_image_features_shape(tmp_path, vision):
    model, _ = build_model(make_run(tmp_path, vision=vision))
    size = model.facts.image_size
    assert model.facts.grid == 4
    tokens, aux = model.get_image_features(torch.randn(3, 3, size, size))
    assert tokens.shape == (3, model.num_image_tokens, model.config.text_config.hidden_size) == (3, 16, 64)
    assert aux == {}


def test_vision_features_are_the_selected_hidden_state_without_cls(tmp_path):
    model, _ = build_model(make_run(tmp_path, vision="clip"))
    model.eval()
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        hs = model.vision_tower(pixel_values=pixels, output_hidden_states=True).hidden_states
        (feat,) = model.vision_features(pixels)
    assert len(hs) == 3  # stem + 2 blocks
    assert torch.equal(feat, hs[-2][:, 1:])  # penultimate block, CLS dropped
    assert not feat.requires_grad


def test_pool_option_reduces_tokens(tmp_path):
    model, _ = build_model(make_run(tmp_path, vision="clip", options={"pool": 2}))
    assert model.num_image_tokens == 4
    tokens, _ = model.get_image_features(torch.randn(2, 3, 32, 32))
    assert tokens.shape == (2, 4, 64)
    with pytest.raises(ValueError, match="pool=3 must be >= 1 and divide the grid"):
        build_model(make_run(tmp_path, vision="clip", options={"pool": 3}))


def test_pool_grid_golden():
    # 4x4 grid of scalar tokens 0..15 (row-major) plus one prefix token; 2x2 average pooling.
    x = torch.cat([torch.tensor([[-1.0]]), torch.arange(16.0).view(16, 1)]).unsqueeze(0)  # [1, 17, 1]
    out = pool_grid(x, grid=4, kernel=2, num_prefix=1)
    assert out.squeeze().tolist() == [-1.0, 2.5, 4.5, 10.5, 12.5]
    assert torch.equal(pool_grid(x, 4, 1, 1), x)


@pytest.mark.parametrize("vision,extra", [("clip", 1), ("siglip", 0), ("dinov2", 1)])
def test_select_strategy_full_keeps_prefix(tmp_path, vision, extra):
    cfg = make_run(tmp_path, vision=vision)
    cfg.vision.select_strategy = "full"
    model, _ = build_model(cfg)
    assert model.num_image_tokens == 16 + extra
    size = model.facts.image_size
    tokens, _ = model.get_image_features(torch.randn(1, 3, size, size))
    assert tokens.shape == (1, 16 + extra, 64)
    # With pooling, the prefix passes through unpooled.
    cfg.connector.options = {"pool": 2}
    model, _ = build_model(cfg)
    assert model.num_image_tokens == 4 + extra


def test_list_select_layer_concatenates_channels(tmp_path):
    cfg = make_run(tmp_path, vision="clip")
    cfg.vision.select_layer = [-2, -1]
    model, _ = build_model(cfg)
    model.eval()
    first = model.connector.projector[0]
    assert isinstance(first, nn.Linear) and first.in_features == 32 * 2
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        hs = model.vision_tower(pixel_values=pixels, output_hidden_states=True).hidden_states
        feats = model.vision_features(pixels)
        tokens, _ = model.get_image_features(vision_features=feats)
        expected = model.connector.projector(torch.cat([hs[1][:, 1:], hs[2][:, 1:]], dim=-1))
    assert [f.shape for f in feats] == [torch.Size([1, 16, 64])]  # prepared: the layers fused on channels
    torch.testing.assert_close(tokens, expected, atol=1e-6, rtol=0)
    cfg.vision.select_layer = 3
    with pytest.raises(ValueError, match="vision layer 3 out of range for a tower with 2 blocks"):
        build_model(cfg)


def spec(**kw) -> ConnectorSpec:
    base = dict(vision_hidden_size=32, num_vision_layers=2, grid=4, num_prefix_tokens=1, text_hidden_size=64)
    base.update(kw)
    return ConnectorSpec(**base)


def test_connector_registry():
    ident = build_connector("identity", spec(text_hidden_size=32))
    x = torch.randn(2, 16, 32)
    assert torch.equal(ident([x]).tokens, x)
    with pytest.raises(ValueError, match="identity connector needs vision width 32 == LM width 64"):
        build_connector("identity", spec())
    lin = build_connector("linear", spec())
    assert [type(m) for m in lin.projector] == [nn.Linear]
    mlp2 = build_connector("mlp2x_gelu", spec())
    assert [type(m) for m in mlp2.projector] == [nn.Linear, nn.GELU, nn.Linear]
    mlp3 = build_connector("mlp3x_gelu", spec())
    linears = [m for m in mlp3.projector if isinstance(m, nn.Linear)]
    assert len(linears) == 3 and [(m.in_features, m.out_features) for m in linears] == [(32, 64), (64, 64), (64, 64)]
    assert mlp3([x]).tokens.shape == (2, 16, 64)
    # The MLP is exactly Linear -> GELU -> Linear (LLaVA's mlp2x_gelu).
    l1, l2 = mlp2.projector[0], mlp2.projector[2]
    torch.testing.assert_close(mlp2([x]).tokens, l2(F.gelu(l1(x))))


def test_connector_unknown_name_and_option():
    with pytest.raises(ValueError) as err:
        build_connector("mlp2x_relu", spec())
    msg = str(err.value)
    assert "unknown connector type 'mlp2x_relu'" in msg
    for name in ("identity", "linear", r"mlp(\d+)x_gelu"):
        assert name in msg
    assert set(known_connectors()) >= {"identity", "linear"}
    with pytest.raises(ValueError, match=re.escape("unknown option(s) ['poool']; allowed: ['efficient_grid', 'input_norm', 'pool', 'standardize']")):
        build_connector("linear", spec(options={"poool": 2}))
    with pytest.raises(ValueError, match="depth must be >= 1"):
        build_connector("mlp0x_gelu", spec())


# ---- generation ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["clip-llama-vicuna", "siglip-qwen2-chatml"])
def test_batched_left_padded_generation_equals_one_by_one(trained, key):
    trainer = trained[key]
    model, tok = trainer.model, trainer.tokenizer
    questions = read_questions(trainer.cfg.eval.data)
    assert len(questions) == 6
    batched = generate_answers(model, tok, questions, batch_size=4, max_new_tokens=6, progress=False)
    single = generate_answers(model, tok, questions, batch_size=1, max_new_tokens=6, progress=False)
    assert batched == single

    # Directly through model.generate, comparing token ids.
    cfg = model.config
    prompts = [encode_prompt([{"from": "human", "value": "<image>\n" + q.text}], tok, cfg.chat_template_name,
                             image_token_id=cfg.image_token_id, num_image_tokens=model.num_image_tokens,
                             system_prompt=cfg.system_prompt) for q in questions[:4]]
    lengths = [len(p) for p in prompts]
    assert len(set(lengths)) > 1, "the prompts must differ in length so that the batch is padded"
    transform = make_transform(model)
    pixels = torch.stack([transform(load_image(q.image)) for q in questions[:4]])
    width, pad = max(lengths), tok.pad_token_id
    ids = torch.full((4, width), pad)
    mask = torch.zeros((4, width), dtype=torch.long)
    for r, p in enumerate(prompts):
        ids[r, width - len(p):] = torch.tensor(p)
        mask[r, width - len(p):] = 1
    kw = dict(max_new_tokens=6, do_sample=False, eos_token_id=stop_token_ids(tok), pad_token_id=pad)
    seen = []
    hook = model.language_model.get_decoder().register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append(kwargs.get("position_ids")), with_kwargs=True)
    try:
        out = model.generate(ids, attention_mask=mask, pixel_values=pixels, **kw)
    finally:
        hook.remove()
    # The prompt's positions count real tokens only (RoPE would hide a uniform shift, an absolute-position LM not).
    assert seen[0] is not None
    for r, p in enumerate(prompts):
        assert seen[0][r, width - len(p):].tolist() == list(range(len(p)))
    assert seen[1][:, -1].tolist() == lengths  # the first new token's position
    for r, p in enumerate(prompts):
        one = model.generate(torch.tensor([p]), pixel_values=pixels[r : r + 1], **kw)[0]
        assert torch.equal(out[r, : len(one)], one), (r, out[r], one)
        assert (out[r, len(one):] == pad).all()
    # Right padding is refused.
    with pytest.raises(ValueError, match="left padding"):
        model.generate(ids.flip(1), attention_mask=mask.flip(1), pixel_values=pixels, **kw)


# ---- the loss --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["clip-llama-vicuna", "siglip-qwen2-chatml"])
def test_loss_equals_full_logits_cross_entropy(trained, key):
    """LM head only at supervised positions == the textbook shifted cross-entropy over all logits."""
    trainer = trained[key]
    model = trainer.model
    model.eval()
    batch = make_batch(model, trainer.tokenizer, trainer.cfg, 4)
    assert (batch["attention_mask"] == 0).any(), "want right padding in the batch"
    with torch.no_grad():
        out = model(**batch)
        embeds, _ = model.embed_inputs(batch["input_ids"], batch["pixel_values"])
        logits = model.language_model(inputs_embeds=embeds, attention_mask=batch["attention_mask"]).logits
    ref = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), batch["labels"][:, 1:].reshape(-1),
                          ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(out.loss, ref, atol=1e-5, rtol=0)
    n_sup = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    assert out.logits.shape == (n_sup, logits.shape[-1])
    # The training collate drops the tokens after the last label (ChatML's newline after <|im_end|>): same loss.
    trimmed = pad_batch([{"input_ids": ids[m.bool()].tolist(), "labels": lab[m.bool()].tolist()}
                         for ids, lab, m in zip(batch["input_ids"], batch["labels"], batch["attention_mask"])],
                        trainer.tokenizer.pad_token_id, trim_unsupervised_tail=True,
                        image_token_id=model.config.image_token_id)
    if key.endswith("chatml"):
        assert trimmed["attention_mask"].sum() < batch["attention_mask"].sum(), "want a trailing token to trim"
    with torch.no_grad():
        out_trimmed = model(**trimmed, pixel_values=batch["pixel_values"])
    torch.testing.assert_close(out_trimmed.loss, out.loss, atol=1e-5, rtol=0)
    labels = batch["labels"].clone()
    labels[:] = IGNORE_INDEX
    with pytest.raises(ValueError, match="no supervised token"):
        model(**{**batch, "labels": labels})


# ---- frozen-feature cache --------------------------------------------------------------------------------


def test_feature_cache_gives_the_same_loss_curve(tmp_path):
    curves, trainers = {}, {}
    for cache in (False, True):
        cfg = make_run(tmp_path, vision="dinov2", language="llama", tokenizer="chatml", template="tokenizer",
                       cache_features=cache, out=f"run-cache-{cache}")
        cfg.train.stages[0].epochs, cfg.train.stages[0].max_steps = 10.0, 6
        trainers[cache] = Trainer(cfg, progress=False)
        trainers[cache].train()
        curves[cache] = losses(trainers[cache].metrics)
    assert trainers[False].store is None and trainers[True].store is not None
    assert len(curves[True]) == 6
    torch.testing.assert_close(torch.tensor(curves[True]), torch.tensor(curves[False]), atol=1e-5, rtol=0)
    for (n, a), (_, b) in zip(trainers[True].model.state_dict().items(), trainers[False].model.state_dict().items()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0, msg=n)


def test_feature_store_is_reused_without_running_the_tower(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("VLWEAVE_CACHE", str(cache))
    cfg = make_run(tmp_path, vision="clip")
    torch.manual_seed(0)  # random-init towers are drawn from the global RNG (the Trainer seeds it the same way)
    model, _ = build_model(cfg)
    images = sorted(str(p) for p in (Path(cfg.data.train).parent / "images").glob("*.png"))[:5]
    features = FeatureCache(model)
    assert list(features.stores) == ["base"]
    store = features.stores["base"]
    features.ensure(images, progress=False)
    assert store.path is not None and store.path.is_file() and store.path.parent == cache / "features"
    first = features.batch(images)["base"]
    assert [f.shape for f in first] == [torch.Size([5, 16, 32])]
    # Features equal the tower's own output for the same pixels.
    pixels = torch.stack([make_transform(model)(load_image(p)) for p in images])
    with torch.no_grad():
        torch.testing.assert_close(first[0], model.vision_features(pixels)[0], atol=1e-6, rtol=0)

    def no_tower(*args, **kwargs):
        raise AssertionError("the tower ran although the features are cached")

    torch.manual_seed(0)
    model2, _ = build_model(cfg)  # same seed -> same tower -> same cache key
    model2.prepare_tower_features = no_tower
    features2 = FeatureCache(model2)
    assert features2.stores["base"].key == store.key and all(p in features2 for p in images)
    features2.ensure(images, progress=False)
    for a, b in zip(first, features2.batch(images)["base"]):
        assert torch.equal(a, b)
    # Another tower (other weights) or transform gets another key.
    torch.manual_seed(1)
    model3, _ = build_model(cfg)
    assert FeatureCache(model3).stores["base"].key != store.key
    cfg.vision.aspect = "square"
    torch.manual_seed(0)
    model4, _ = build_model(cfg)
    assert FeatureCache(model4).stores["base"].key != store.key


def test_trainer_reuses_the_cache_file(tmp_path, monkeypatch):
    monkeypatch.setenv("VLWEAVE_CACHE", str(tmp_path / "cache"))
    cfg = make_run(tmp_path, vision="siglip", language="qwen2", tokenizer="qwen", template="tokenizer",
                   cache_features=True, out="a")
    a = Trainer(cfg, progress=False)
    a.train()
    cfg.train.output_dir = str(tmp_path / "b")
    b = Trainer(cfg, progress=False)

    def no_tower(*args, **kwargs):
        raise AssertionError("the tower ran although the features are cached")

    b.model.prepare_tower_features = no_tower
    b.train()
    assert losses(b.metrics) == losses(a.metrics)


def test_standardize_option_calibrates_and_normalises():
    """``standardize`` maps the calibration features to zero mean / unit std per channel before projecting."""
    import torch

    from vlweave.connectors import ConnectorSpec, build_connector

    spec = ConnectorSpec(vision_hidden_size=8, num_vision_layers=2, grid=4, num_prefix_tokens=1, text_hidden_size=6,
                         select_layer=-1, options={"pool": 2, "standardize": True})
    conn = build_connector("linear", spec)
    torch.manual_seed(0)
    feats = [torch.randn(10, 16, 8) * 5 + 3]
    prepared = conn.prepare(feats)
    conn.calibrate(prepared)
    pooled = prepared[0].flatten(0, 1)
    z = (pooled - conn.feature_mean) / conn.feature_std
    assert torch.allclose(z.mean(0), torch.zeros(8), atol=1e-5)
    assert torch.allclose(z.std(0), torch.ones(8), atol=1e-5)
    expected = conn.projector(z.reshape(10, 4, 8))
    assert torch.allclose(conn(prepared).tokens, expected, atol=1e-6)
    assert {"feature_mean", "feature_std"} <= set(conn.state_dict())  # saved with the checkpoint
