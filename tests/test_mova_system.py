"""MoVA as one system (issue 13), with the real ``mova`` connector (the MoV-Adapter), not a stand-in.

The model: a tiny DINOv2 base (32 wide, 4x4 grid), two frozen experts of other widths and grids -- ``docs`` a CLIP
(24 wide, 8x8) and ``scenes`` an EfficientNet-Lite CNN (32 channels, 2x2 map) -- both aligned to 4x4 by the
adapter's prepare step, the tiny BERT gate encoder of test_mova_adapter (with its WordPiece tokenizer) and a tiny
llama.  The letters are explicit (``A`` -> docs, ``C`` -> scenes) so that the letter map is exercised.

End to end: routing data from the model's own losses, two training stages (stage 1 adapter + text encoder + base
tower; stage 2 everything but the experts, routing instructions mixed in), evaluation under every routing mode;
exact resume; save -> reload identical logits; the routing pass with the cached base equals it without the cache;
a mixed batch (routed, unrouted, text-only) equals one by one; an unrouted expert's features change nothing
through the whole model; the presets build on the meta device and their adapter runs on meta tensors.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from helpers import isolated_env, losses, make_run
from test_mova_adapter import write_tiny_bert
from vlweave.builder import build_model, load_checkpoint, load_processor, save_checkpoint
from vlweave.config import MixConfig, StageConfig, VisionConfig
from vlweave.context import VlweaveContext
from vlweave.data.questions import read_questions
from vlweave.eval.runner import evaluate
from vlweave.eval.vqa import generate_answers
from vlweave.language.routing import RoutingPool, fixed_routing
from vlweave.processor import VlweaveProcessor
from vlweave.vision.cache import FeatureCache

EXPERTS = ("docs", "scenes")
TOWERS = {
    "docs": VisionConfig(name="clip_vision_model", image_size=32, random_init=True, select_layer=-2,
                         config_overrides={"hidden_size": 24, "intermediate_size": 48, "num_hidden_layers": 2,
                                           "num_attention_heads": 2, "patch_size": 4, "image_size": 32}),
    # total stride 32 at 64 px: a 2x2 map of 32 channels
    "scenes": VisionConfig(name="vlweave_efficientnet_lite", image_size=64, random_init=True, select_layer=-1,
                           aspect="square",
                           config_overrides={"image_size": 64, "stem_channels": 8, "hidden_size": 32,
                                             "stages": [[1, 3, 1, 1, 8], [1, 3, 2, 2, 16], [1, 3, 2, 2, 16],
                                                        [1, 3, 2, 2, 24], [1, 3, 2, 2, 24]]}),
}
TUNE_1 = {"vision": "frozen", "vision.base": "full", "connector": "full", "language": "frozen"}
TUNE_2 = {"vision": "frozen", "vision.base": "full", "connector": "full", "language": "full"}


def mova_cfg(tmp: Path, bert: Path, *, out: str = "run", cache: bool = True, **options):
    opts = {"experts": list(EXPERTS), "letters": ["A", "C"], "text_encoder": str(bert), "top_k": 2,
            "num_blocks": 2, "num_heads": 2, "num_routing_tokens": 1, "zero_init": False,
            "descriptions": ["Reads text.", "Sees objects."], "routing_instruction": "Pick experts."}
    opts.update(options)
    cfg = make_run(tmp, vision="dinov2", connector="mova", options=opts, cache_features=cache, out=out)
    cfg.towers = copy.deepcopy(TOWERS)
    return cfg


@pytest.fixture(scope="module")
def system(tmp_path_factory):
    """Routing data from the untrained model, then two stages on the routed records with the routing
    instructions mixed in; the trainer, its config and the routing-data folder."""
    import vlweave.train.routing_data as rd
    from vlweave.train.trainer import Trainer

    tmp = tmp_path_factory.mktemp("mova-system")
    with isolated_env(tmp / "cache"):
        bert = write_tiny_bert(tmp / "bert")
        cfg = mova_cfg(tmp, bert)
        torch.manual_seed(0)
        model, tok = build_model(cfg)
        summary = rd.build_routing_data(model, VlweaveProcessor.from_model(model, tok), cfg.data.train,
                                        tmp / "rd", progress=False, batch_size=8)
        images = str(Path(cfg.data.train).parent)
        cfg.data.train = str(tmp / "rd" / "routed.json")
        cfg.data.image_folder = images
        cfg.train.stages = [
            StageConfig(name="pretrain", tune=dict(TUNE_1), max_steps=3, batch_size=4, lr=2e-3, warmup_ratio=0.0),
            StageConfig(name="finetune", tune=dict(TUNE_2), max_steps=4, batch_size=6, lr=1e-3, warmup_ratio=0.0,
                        mix=[MixConfig(path=str(tmp / "rd" / "routing_instructions.json"), ratio=0.25)]),
        ]
        cfg.train.save_every = 2
        trainer = Trainer(cfg, progress=False)
        start = {k: v.clone() for k, v in trainer.model.state_dict().items()}
        trainer.train()
    # (each test enters the throwaway cache again: a module fixture must not hold it over other files' tests)
    return {"trainer": trainer, "cfg": cfg, "start": start, "summary": summary, "tmp": tmp, "bert": bert,
            "rd": tmp / "rd"}


def test_two_stages_train_the_adapter_text_encoder_and_base_never_the_experts(system):
    trainer, start = system["trainer"], system["start"]
    routed = json.loads((system["rd"] / "routed.json").read_text())
    assert sum("routing" in r for r in routed) == 16  # every image record got bits from the losses
    assert len(json.loads((system["rd"] / "routing_instructions.json").read_text())) == 16
    # routed.json loads from its own folder (the routed preset names no image folder): its image paths resolve.
    from vlweave.data.llava_json import load_llava_data

    assert len(load_llava_data(system["rd"] / "routed.json", routing_experts=list(EXPERTS))) == 16
    curve = losses(trainer.metrics)
    assert len(curve) == 7 and all(torch.isfinite(torch.tensor(curve)))
    after = trainer.model.state_dict()
    changed = {k for k in start if not torch.equal(start[k], after[k])}
    assert not any(k.startswith(("vision_towers.docs.", "vision_towers.scenes.")) for k in changed)
    assert any(k.startswith("vision_towers.base.") for k in changed)
    assert any(k.startswith("connector.text_encoder.") for k in changed)
    assert any(k.startswith("connector.blocks.") for k in changed) and any(k.startswith("connector.mlp.")
                                                                             for k in changed)
    assert any(k.startswith("language_model.") for k in changed)  # stage 2
    assert [(m["stage_index"], m["step"]) for m in trainer.metrics] == [(0, 1), (0, 2), (0, 3)] + [
        (1, s) for s in range(1, 5)]


@pytest.mark.parametrize("mode", ["model", "all", "none", "random", "A,C"])
def test_eval_under_every_routing_mode(system, mode, tmp_path):
    cfg = system["cfg"]
    with isolated_env(system["tmp"] / "cache"):
        model, tok = load_checkpoint(system["trainer"].run_dir / "final")
        qs = read_questions(cfg.eval.data, str(Path(cfg.eval.data).parent))
        qs[0].image = None  # one text-only question
        out = evaluate(model, tok, qs, out_dir=tmp_path, batch_size=4, max_new_tokens=3, progress=False,
                       processor=load_processor(system["trainer"].run_dir / "final", tok), routing=mode,
                       routing_seed=2)
    preds = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == len(qs) and preds[0]["routing"] is None
    bits = [tuple(p["routing"]["bits"]) for p in preds[1:]]
    want = {"all": (1, 1), "A,C": (1, 1), "none": (0, 0)}
    if mode in want:
        assert set(bits) == {want[mode]}
    if mode == "random":
        pool = RoutingPool.from_connector(model.connector)
        assert bits == [fixed_routing("random", pool, str(q.question_id), seed=2).bits for q in qs[1:]]
    if mode == "model":
        assert all(p["routing"]["mode"] == "model" and p["routing"]["answer"] is not None for p in preds[1:])
    metrics = json.loads((tmp_path / "eval_metrics.json").read_text())
    assert metrics["routing"]["mode"] == mode and metrics["routing"]["routed"] == len(qs) - 1
    assert len(out["answers"]) == len(qs)


def test_resume_is_exact(system, tmp_path):
    from vlweave.train.trainer import Trainer

    trainer = system["trainer"]
    with isolated_env(system["tmp"] / "cache"):
        cfg = copy.deepcopy(system["cfg"])
        cfg.train.output_dir = str(tmp_path / "resumed")
        resumed = Trainer(cfg, progress=False)
        resumed.train(resume=trainer.run_dir / "checkpoints" / "ckpt-s1-000002")
    n_before = len(json.loads((trainer.run_dir / "checkpoints" / "ckpt-s1-000002" / "progress.json").read_text())
                   ["metrics"])
    a, b = losses(trainer.metrics), losses(resumed.metrics)
    assert n_before == 5 and len(a) == len(b) == 7
    assert b == a  # the two steps after the checkpoint (routing instructions mixed in) repeat exactly
    with safe_open(str(trainer.run_dir / "final" / "model.safetensors"), "pt") as fa, \
            safe_open(str(resumed.run_dir / "final" / "model.safetensors"), "pt") as fb:
        assert sorted(fa.keys()) == sorted(fb.keys())
        for key in fa.keys():
            assert torch.equal(fa.get_tensor(key), fb.get_tensor(key)), key


def _batch(processor, qs, routing):
    """A generation batch of questions with ``routing`` given per question (``context.routing`` is per image)."""
    batch = processor(text=[q.text for q in qs], images=[q.image for q in qs])
    batch["context"].routing = [r for q, r in zip(qs, routing) if q.image is not None]
    return batch


def _questions(cfg, n: int = 5):
    qs = read_questions(cfg.eval.data, str(Path(cfg.eval.data).parent))[:n]
    qs[0].image = None
    return qs


def test_save_reload_identical_logits_with_routing(system, tmp_path):
    trainer, cfg = system["trainer"], system["cfg"]
    model = trainer.model.eval()
    with isolated_env(system["tmp"] / "cache"):
        processor = VlweaveProcessor.from_model(model, trainer.tokenizer)
        save_checkpoint(model, trainer.tokenizer, tmp_path / "ckpt", processor=processor)
        again, tok = load_checkpoint(tmp_path / "ckpt")
        qs = _questions(cfg)[1:4]
        routing = [[1, 0], [0, 0], [1, 1]]
        with torch.no_grad():
            a = model(**_batch(processor, qs, routing)).logits
            b = again.eval()(**_batch(load_processor(tmp_path / "ckpt", tok), qs, routing)).logits
    assert torch.equal(a, b)
    assert again.connector.options.letters == ("A", "C") and again.connector.experts == list(EXPERTS)


def test_unrouted_expert_changes_nothing_through_the_model(system):
    """Bit-exact: image 0 routes docs only, image 1 scenes only; scrambling the scenes tower's weights leaves
    row 0's logits identical and changes row 1's (so the check can fail)."""
    trainer = system["trainer"]
    model = copy.deepcopy(trainer.model).eval()
    with isolated_env(system["tmp"] / "cache"):
        processor = VlweaveProcessor.from_model(model, trainer.tokenizer)
        qs = _questions(system["cfg"])[1:3]
        with torch.no_grad():
            before = model(**_batch(processor, qs, [[1, 0], [0, 1]])).logits
            gen = torch.Generator().manual_seed(3)
            for p in model.vision_towers["scenes"].parameters():
                p.add_(torch.randn(p.shape, generator=gen) * 0.5)
            after = model(**_batch(processor, qs, [[1, 0], [0, 1]])).logits
    assert torch.equal(before[0], after[0])
    assert not torch.allclose(before[1], after[1])


def test_mixed_batch_equals_one_by_one(system):
    """Routed, unrouted and text-only rows in one batch give the same logits and the same answers as alone."""
    trainer, cfg = system["trainer"], system["cfg"]
    model = trainer.model.eval()
    with isolated_env(system["tmp"] / "cache"):
        processor = VlweaveProcessor.from_model(model, trainer.tokenizer)
        qs = _questions(cfg)
        routing = [None, [1, 0], [0, 0], [0, 1], [1, 1]]  # text-only, docs, none, scenes, both
        with torch.no_grad():
            batch = _batch(processor, qs, routing)
            logits = model(**batch).logits
            mask = batch["attention_mask"].bool()
            for i, q in enumerate(qs):
                one = _batch(processor, [q], [routing[i]])
                alone = model(**one).logits[0]
                # right padding: the sample's tokens are its first positions in the batch
                torch.testing.assert_close(logits[i][mask[i]], alone[one["attention_mask"][0].bool()],
                                           atol=2e-5, rtol=0)
        # The answers through generation (fixed routing, every kind of row in one batch) equal one by one.
        decide = {str(q.question_id): fixed_routing("random", RoutingPool.from_connector(model.connector),
                                                    str(q.question_id), seed=1).bits for q in qs}
        assert {sum(b) > 0 for q, b in zip(qs, decide.values()) if q.has_image} == {True, False}
        batched = generate_answers(model, trainer.tokenizer, qs, batch_size=5, max_new_tokens=4, progress=False,
                                   routing="random", routing_seed=1)
        single = generate_answers(model, trainer.tokenizer, qs, batch_size=1, max_new_tokens=4, progress=False,
                                  routing="random", routing_seed=1)
    assert batched == single


def test_routing_pass_with_the_cached_base_equals_without(system):
    """``--routing model``: the decisions (raw routing answers) and the final answers are the same with the base
    features from the feature cache, from pixels, batched and one by one."""
    trainer, cfg = system["trainer"], system["cfg"]
    model = trainer.model.eval()
    with isolated_env(system["tmp"] / "cache"):
        qs = _questions(cfg, n=6)
        runs = {}
        for name, bs, cached in (("pixels", 6, False), ("single", 1, False), ("cached", 6, True),
                                 ("cached-again", 3, True)):
            decisions: list = []
            store = FeatureCache(model) if cached else None
            answers = generate_answers(model, trainer.tokenizer, qs, batch_size=bs, max_new_tokens=4, store=store,
                                       progress=False, routing="model", decisions=decisions)
            runs[name] = (answers, [None if d is None else d.to_json() for d in decisions])
    assert runs["pixels"] == runs["single"] == runs["cached"] == runs["cached-again"]
    assert runs["pixels"][1][0] is None and all(d["mode"] == "model" for d in runs["pixels"][1][1:])


def test_routed_answers_through_the_real_adapter_do_not_depend_on_batching_or_cache(system, monkeypatch):
    """The tiny LM's routing answers carry no letters, so here the routing pass answers from the image (a stand-in
    for a trained router, so that a decision paired with the wrong row would show) and the answer pass runs the
    experts on the routed rows of each batch: the same answers batched, one by one and from the cache."""
    trainer, cfg = system["trainer"], system["cfg"]
    model, tok = trainer.model.eval(), trainer.tokenizer
    real = model.generate
    choices = ["A", "C", "A, C", "none"]

    def generate(input_ids, *args, context=None, vision_features=None, **kw):
        if context is None or not context.routing_pass:
            return real(input_ids, *args, context=context, vision_features=vision_features, **kw)
        base = vision_features["base"][0]
        rows = [tok(choices[int(abs(float(base[r].sum())) * 100) % len(choices)], add_special_tokens=False)
                ["input_ids"] for r in range(base.shape[0])]
        width = max(len(r) for r in rows)
        return torch.tensor([r + [tok.eos_token_id] * (width - len(r)) for r in rows])

    monkeypatch.setattr(model, "generate", generate)
    with isolated_env(system["tmp"] / "cache"):
        qs = _questions(cfg, n=7)
        runs = {}
        for name, bs, cached in (("batched", 7, False), ("single", 1, False), ("cached", 4, True)):
            decisions: list = []
            answers = generate_answers(model, tok, qs, batch_size=bs, max_new_tokens=4, progress=False,
                                       store=FeatureCache(model) if cached else None, routing="model",
                                       decisions=decisions)
            runs[name] = (answers, [None if d is None else tuple(d.bits) for d in decisions])
    assert runs["batched"] == runs["single"] == runs["cached"]
    assert len(set(runs["batched"][1][1:])) >= 2, runs["batched"][1]  # the images were routed differently


# ---- the presets ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["mova-synthetic", "mova-synthetic-routed", "mova-synthetic-concat"])
def test_mova_presets_build_on_meta_and_their_connector_runs(name):
    """The shipped presets' options are MoVAOptions' (built for real sizes on the meta device: DINOv2-S base at
    112 px, DINOv2-S at 224 px and EfficientNet-Lite0 as experts, the MiniLM gate encoder, SmolLM2's width), and
    the connector maps meta features of the towers' shapes to the answer and routing-pass token counts."""
    from vlweave.config import RunConfig
    from vlweave.presets import preset_path

    needed = ["dinov2-small", "efficientnet-lite0", "smollm2-135m-instruct", "all-minilm-l6-v2"]
    root = Path(os.environ.get("VLWEAVE_CACHE") or Path.home() / ".cache" / "vlweave") / "assets"
    if not all((root / a).is_dir() for a in needed):
        pytest.skip(f"offline assets {needed} not prepared under {root} (vlweave assets pull ...)")
    cfg = RunConfig.load(preset_path(name))
    cfg.vision.random_init = True
    for tower in cfg.towers.values():
        tower.random_init = True
    cfg.language.random_init = True
    with torch.device("meta"):
        model, _ = build_model(cfg)
    d_text = model.config.text_config.hidden_size
    spec = model.connector_spec()
    if name == "mova-synthetic-routed":  # the same connector as mova-synthetic (its base): built on meta is enough
        assert cfg.connector == RunConfig.load(preset_path("mova-synthetic")).connector
        return
    # The connector itself for real (random init, on CPU; the rest of the model stays on meta), on random
    # features of the towers' stated shapes.
    from vlweave.connectors import build_connector

    torch.manual_seed(0)
    conn = build_connector(cfg.connector.type, spec).eval()
    prepared = {}
    for tower, layers in conn.tower_layers().items():
        facts = spec.towers[tower].facts
        feats = []
        for layer in layers:
            c, gh, gw = facts.layer_shape(layer)
            feats.append(torch.randn(2, facts.num_prefix_tokens + gh * gw, c))
        prepared[tower] = conn.prepare_tower(tower, feats)
    ctx = VlweaveContext.for_batch([True, True], routing=[[1, 0], [0, 1]])
    if cfg.connector.type == "mova":
        ctx.text_input_ids = [[101, 102], [101, 2054, 102]]
    with torch.no_grad():
        tokens = conn(prepared, ctx).tokens
        assert tuple(tokens.shape) == (2, model.num_image_tokens, d_text) and torch.isfinite(tokens).all()
        if cfg.connector.type == "mova":
            assert model.num_image_tokens == 16 and conn.options.top_k == 2 and conn.num_heads == 6
            assert conn.grid == 8 and conn.text_proj is None  # MiniLM is 384 wide, as DINOv2-S
            ctx.routing_pass = True
            assert tuple(conn(prepared, ctx).tokens.shape) == (2, conn.num_routing_tokens, d_text) == (2, 4, d_text)


# ---- HyperLLaVA's visual expert on the MoV-Adapter (hyper_mova) ------------------------------------------------


def test_hyper_mova_starts_as_the_plain_adapter_and_trains_its_expert(system, tmp_path):
    """``hyper_mova`` finds the adapter's final MLP (``mlp``) through ``Connector.projector_head``: with the
    plain model's weights its logits equal the plain model's exactly (a zero-initialised expert), one training
    step moves the expert, the routing pool is the adapter's, and the checkpoint reloads with identical logits."""
    from vlweave.train.trainer import Trainer

    bert, qs = system["bert"], _questions(system["cfg"])
    with isolated_env(tmp_path / "cache"):
        plain_cfg = mova_cfg(tmp_path, bert, out="plain", cache=False)
        del plain_cfg.connector.options["zero_init"]  # the key would go to the expert under hyper_mova
        torch.manual_seed(0)
        plain, tok = build_model(plain_cfg)
        hyper_cfg = copy.deepcopy(plain_cfg)
        hyper_cfg.connector.type = "hyper_mova"
        hyper_cfg.connector.options.update({"bottleneck": 4, "embed_dim": 8})
        hyper_cfg.train.output_dir = str(tmp_path / "hyper")
        hyper_cfg.train.stages = [StageConfig(name="s", tune={"vision": "frozen", "connector": "full",
                                                             "language": "frozen"},
                                              max_steps=1, batch_size=4, lr=1e-2, warmup_ratio=0.0)]
        trainer = Trainer(hyper_cfg, progress=False)
        hyper = trainer.model
        assert hyper.connector.inner.projector_head() is hyper.connector.inner.mlp
        assert RoutingPool.from_connector(hyper.connector).letters == ("A", "C")
        state = {k.replace("connector.", "connector.inner.", 1) if k.startswith("connector.") else k: v
                 for k, v in plain.state_dict().items()}
        missing, unexpected = hyper.load_state_dict(state, strict=False)
        assert not unexpected and missing and all(k.startswith("connector.expert.") for k in missing)
        processor = VlweaveProcessor.from_model(plain, tok)
        routing = [None, [1, 0], [0, 0], [0, 1], [1, 1]]
        with torch.no_grad():
            a = plain.eval()(**_batch(processor, qs, routing)).logits
            b = hyper.eval()(**_batch(processor, qs, routing)).logits
        assert torch.equal(a, b)
        expert0 = {k: v.clone() for k, v in hyper.connector.expert.state_dict().items()}
        trainer.train()
        moved = [k for k, v in hyper.connector.expert.state_dict().items() if not torch.equal(v, expert0[k])]
        assert moved and all(torch.isfinite(torch.tensor(losses(trainer.metrics))))
        with torch.no_grad():
            c = hyper.eval()(**_batch(processor, qs, routing)).logits
            again, tok2 = load_checkpoint(trainer.run_dir / "final")
            d = again.eval()(**_batch(load_processor(trainer.run_dir / "final", tok2), qs, routing)).logits
        assert not torch.equal(a, c) and torch.equal(c, d)


def test_plain_fusion_pool_gives_the_adapters_token_count(tmp_path):
    """``tower_concat`` option ``pool``: the concatenated aligned grid average-pooled before the projector (the
    plain-fusion arm gets MoVA's token count); a pool that does not divide the grid is refused by name."""
    import torch.nn.functional as F

    from vlweave.connectors import OptionsError, build_connector
    from vlweave.processing import tower_pixels

    with isolated_env(tmp_path / "cache"):
        cfg = make_run(tmp_path, vision="dinov2", connector="tower_concat", options={"resize": "bilinear", "pool": 2})
        cfg.towers = copy.deepcopy(TOWERS)
        model, _ = build_model(cfg)
        conn = model.connector.eval()
        assert model.num_image_tokens == conn.num_tokens() == 4  # 4x4 base grid -> 2x2
        images = sorted(str(p) for p in (Path(cfg.data.train).parent / "images").glob("*.png"))[:2]
        with torch.no_grad():
            feats = model.tower_features(tower_pixels(model, images), None, None)
            tokens = conn(feats).tokens
            x = torch.cat([feats[n][0] for n in conn.towers], dim=-1)  # [2, 16, C]
            img = x.transpose(1, 2).reshape(2, x.shape[-1], 4, 4)
            want = conn.projector(F.avg_pool2d(img, 2).flatten(2).transpose(1, 2))
        torch.testing.assert_close(tokens, want, atol=1e-6, rtol=0)
        with pytest.raises(OptionsError, match="'pool' = 3 must divide"):
            build_connector("tower_concat", type(model.connector_spec())(**{
                **model.connector_spec().__dict__, "options": {"pool": 3}}))
