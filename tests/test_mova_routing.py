"""MoVA routing and expert towers (issue 13 items 1, 4-7): the routing parser, experts run on routed rows only
(training, evaluation, cache), batched routing equals one by one, cached base equals uncached, routing data, bad
routing records, stage mixing.  The MoV-Adapter itself is tested with its own connector; here a test-only routed
``tower_concat`` (``routed_helpers.RoutedConcat``) stands in for it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from helpers import isolated_env, losses
from routed_helpers import EXPERTS, TowerSpy, build_routed, routed_run, swap_connector
from vlweave.context import VlweaveContext
from vlweave.data.llava_json import DataError, load_llava_data
from vlweave.data.questions import read_questions
from vlweave.eval.runner import evaluate
from vlweave.eval.vqa import generate_answers
from vlweave.language.routing import (
    RoutingError,
    RoutingPool,
    fixed_routing,
    parse_routing_answer,
    routing_bits,
)
from vlweave.processing import tower_pixels
from vlweave.vision.cache import FeatureCache

LETTERS = ("A", "B", "C", "D", "E")


# ---- the parser ------------------------------------------------------------------------------------------------

GOLDEN = [
    ("A, D", [1, 0, 0, 1, 0], True),
    ("none", [0, 0, 0, 0, 0], True),
    ("None.", [0, 0, 0, 0, 0], True),
    ("The answer is B", [0, 1, 0, 0, 0], True),
    ("Because", [0, 0, 0, 0, 0], False),  # a capitalised word: no letter (the released substring rule says B)
    ("Because C", [0, 0, 1, 0, 0], True),
    ("A, B, C, D", [1, 1, 1, 0, 0], True),  # only the text before the third comma
    ("A B C D E", [1, 1, 1, 0, 0], True),  # at most three letters, in order of appearance
    ("E, E, A", [1, 0, 0, 0, 1], True),
    ("", [0, 0, 0, 0, 0], False),
    ("a, d", [0, 0, 0, 0, 0], False),  # lower-case letters are not letters of the pool
    ("Z, X", [0, 0, 0, 0, 0], False),  # letters outside the map
    ("Z, C", [0, 0, 1, 0, 0], True),
    ("(D)", [0, 0, 0, 1, 0], True),
    ("AD", [0, 0, 0, 0, 0], False),  # not a whole token
]


@pytest.mark.parametrize("answer,bits,parsed", GOLDEN)
def test_routing_parser_golden(answer, bits, parsed):
    assert parse_routing_answer(answer, LETTERS) == (bits, parsed)


def test_routing_pool_prompt_bits_and_fixed_modes():
    pool = RoutingPool(experts=("docs", "scenes", "charts"), letters=("A", "B", "C"),
                       descriptions=("Documents.", "Scenes.", "Charts."), num_routing_tokens=4)
    prompt = pool.prompt("What is written?")
    assert prompt.endswith("Model pool:\nA. Documents.\nB. Scenes.\nC. Charts.\n\nQuestion:\nWhat is written?")
    assert pool.answer_for([1, 0, 1]) == "A, C" and pool.answer_for([0, 0, 0]) == "none"
    assert fixed_routing("A,C", pool, "q").bits == (1, 0, 1)
    assert fixed_routing("scenes", pool, "q").experts == ("scenes",)
    assert fixed_routing("all", pool, "q").bits == (1, 1, 1) and fixed_routing("none", pool, "q").bits == (0, 0, 0)
    # random: seeded per question (not per batch), K in 0..3, and it differs between questions
    draws = [fixed_routing("random", pool, f"q{i}", seed=3).bits for i in range(40)]
    assert draws == [fixed_routing("random", pool, f"q{i}", seed=3).bits for i in range(40)]
    assert len(set(draws)) > 3 and {sum(d) for d in draws} <= {0, 1, 2, 3}
    with pytest.raises(RoutingError, match="--routing 'A,Q'.*letters"):
        fixed_routing("A,Q", pool, "q")
    with pytest.raises(RoutingError, match="3 experts"):
        routing_bits([1, 0], pool.experts)


# ---- experts run on routed rows only -----------------------------------------------------------------------------


def _image_paths(cfg) -> list[str]:
    return [str(p) for p in sorted((Path(cfg.data.train).parent / "images").glob("*.png"))]


def test_unrouted_expert_never_runs_and_mixed_batch_equals_one_by_one(tmp_path, monkeypatch):
    with isolated_env(tmp_path / "cache"):
        model, tok = build_routed(routed_run(tmp_path))
        model.eval()
        images = _image_paths(routed_run(tmp_path))[:3]
        routing = [[1, 0], [0, 0], [0, 1]]  # docs only, no expert, scenes only
        pixels = tower_pixels(model, images)
        spy = TowerSpy(model, monkeypatch)
        ctx = VlweaveContext.for_batch([True, False, True, True], routing=[routing[0], None, routing[1], routing[2]])
        with torch.no_grad():
            feats = model.tower_features(pixels, None, ctx)
            tokens = model.connector(feats, ctx).tokens
        assert spy.rows == {"base": [3], "docs": [1], "scenes": [1]}
        # Unrouted rows are zeros of the prepared shape.
        assert feats["docs"][0].shape[0] == 3 and not feats["docs"][0][1:].any() and feats["docs"][0][0].any()
        assert not feats["scenes"][0][:2].any() and feats["scenes"][0][2].any()
        # One by one: the same tokens.
        for k in range(3):
            one = VlweaveContext.for_batch([True], routing=[routing[k]])
            with torch.no_grad():
                alone = model.connector(model.tower_features({n: v[k:k + 1] for n, v in pixels.items()}, None, one),
                                        one).tokens
            torch.testing.assert_close(alone[0], tokens[k], atol=1e-6, rtol=0)
        # No expert routed in the whole batch: no expert runs, not even for its shape.
        spy.rows.clear()
        none = VlweaveContext.for_batch([True, True], routing=[[0, 0], [0, 0]])
        with torch.no_grad():
            feats = model.tower_features({"base": pixels["base"][:2]}, None, none)
        assert spy.rows == {"base": [2]} and feats["docs"][0].shape == (2, 16, 24)
        # From cached features of the routed rows only (FeatureCache.batch(rows=...)): the same features.
        rows = model.tower_rows(ctx)
        assert rows["docs"].tolist() == [0] and rows["scenes"].tolist() == [2] and rows["base"] is None
        with torch.no_grad():
            again = model.tower_features(pixels, {"docs": [model.prepare_tower_features("docs", pixels["docs"][:1])[0]]},
                                         ctx)
        torch.testing.assert_close(again["docs"][0], model.tower_features(pixels, None, ctx)["docs"][0])


def _write_routed_records(cfg, routing_by_index: dict[int, object]) -> list[dict]:
    path = Path(cfg.data.train)
    records = json.loads(path.read_text())
    for i, r in enumerate(records):
        r.pop("routing", None)
        if i in routing_by_index:
            r["routing"] = routing_by_index[i]
    path.write_text(json.dumps(records))
    return records


def test_training_runs_experts_on_routed_rows_cached_equals_uncached(tmp_path, monkeypatch):
    import vlweave.train.trainer as trainer_mod
    from vlweave.builder import build_model as real_build

    def build(cfg):
        model, tok = real_build(cfg)
        return swap_connector(model), tok

    monkeypatch.setattr(trainer_mod, "build_model", build)
    routing = {i: ([1, 0] if i % 4 == 0 else ["scenes"] if i % 4 == 1 else [0, 0] if i % 4 == 2 else ["docs", "scenes"])
               for i in range(16)}
    with isolated_env(tmp_path / "cache"):
        cfg = routed_run(tmp_path, cache_features=True, out="cached")
        records = _write_routed_records(cfg, routing)
        trainer = trainer_mod.Trainer(cfg, progress=False)
        assert trainer.pool is not None and trainer.pool.experts == EXPERTS
        spy = TowerSpy(trainer.model, monkeypatch)
        trainer.train()
        images = {r["id"]: r["image"] for r in records}
        docs = {Path(images[f"s{i:02d}"]).name for i in range(16) if i % 4 in (0, 3)}
        scenes = {Path(images[f"s{i:02d}"]).name for i in range(16) if i % 4 in (1, 3)}
        stores = trainer.store.stores
        assert {Path(p).name for p in stores["docs"]._feats} <= docs and len(stores["docs"]._feats) > 0
        assert {Path(p).name for p in stores["scenes"]._feats} <= scenes
        assert len(stores["base"]._feats) >= len(stores["docs"]._feats)
        assert spy.total("docs") == len(stores["docs"]._feats) and spy.total("scenes") == len(stores["scenes"]._feats)
        curve = losses(trainer.metrics)
        assert curve[-1] < curve[0]

        uncached = trainer_mod.Trainer(routed_run(tmp_path, cache_features=False, out="uncached"), progress=False)
        spy2 = TowerSpy(uncached.model, monkeypatch)
        uncached.train()
        torch.testing.assert_close(torch.tensor(losses(uncached.metrics)), torch.tensor(curve), atol=1e-5, rtol=0)
        # Without the cache the experts ran on the routed rows of each batch only.
        assert spy2.total("docs") < spy2.total("base") and spy2.total("scenes") < spy2.total("base")


# ---- coarse routing at inference ---------------------------------------------------------------------------------


def _questions(cfg, text_only: int = 1):
    qs = read_questions(cfg.eval.data, str(Path(cfg.eval.data).parent))
    for q in qs[:text_only]:
        q.image = None
    return qs


ROUTE_ANSWERS = ["A", "B", "A, B", "none", "Because"]


def _image_dependent_router(model, tok, monkeypatch):
    """Make the routing pass answer by looking at the image (a stand-in for a trained router: the tiny random LM
    answers the same gibberish for every image), so that batching or caching mistakes would pair decisions with
    the wrong rows.  The answer pass is the real generation."""
    real = model.generate

    def generate(input_ids, *args, context=None, vision_features=None, **kw):
        if context is None or not context.routing_pass:
            return real(input_ids, *args, context=context, vision_features=vision_features, **kw)
        base = vision_features["base"][0]
        rows = [tok(ROUTE_ANSWERS[int(round(abs(float(base[r].sum())) * 10)) % len(ROUTE_ANSWERS)],
                    add_special_tokens=False)["input_ids"] for r in range(base.shape[0])]
        width = max(len(r) for r in rows)
        return torch.tensor([r + [tok.eos_token_id] * (width - len(r)) for r in rows])

    monkeypatch.setattr(model, "generate", generate)


def test_routing_pass_batched_equals_one_by_one_and_cached_equals_uncached(tmp_path, monkeypatch):
    with isolated_env(tmp_path / "cache"):
        cfg = routed_run(tmp_path)
        model, tok = build_routed(cfg)
        qs = _questions(cfg)
        # The real routing pass first: it runs (all bits 0, pooled tokens) and never raises on gibberish.
        decisions: list = []
        generate_answers(model, tok, qs, batch_size=6, max_new_tokens=2, progress=False, routing="model",
                         decisions=decisions)
        assert decisions[0] is None and all(d.mode == "model" and d.answer is not None for d in decisions[1:])
        _image_dependent_router(model, tok, monkeypatch)
        runs = {}
        for name, bs, cached in (("batched", 6, False), ("single", 1, False), ("cached", 6, True)):
            spy = TowerSpy(model, monkeypatch)
            decisions = []
            store = FeatureCache(model, persist=False) if cached else None
            answers = generate_answers(model, tok, qs, batch_size=bs, max_new_tokens=4, store=store,
                                       progress=False, routing="model", decisions=decisions)
            runs[name] = (answers, [None if d is None else d.to_json() for d in decisions],
                          {k: list(v) for k, v in spy.rows.items()})
        assert runs["batched"][:2] == runs["single"][:2] == runs["cached"][:2]
        decisions = runs["batched"][1]
        assert decisions[0] is None
        assert len({tuple(d["bits"]) for d in decisions[1:]}) >= 2  # the images were routed differently
        n_img = len(qs) - 1
        routed = {e: sum(e in d["experts"] for d in decisions[1:]) for e in EXPERTS}
        assert all(0 < n < n_img for n in routed.values()), routed
        # The base tower ran once per image for both passes; each expert only on the images routed to it.
        for name in ("batched", "single", "cached"):
            rows = runs[name][2]
            assert sum(rows["base"]) == n_img, name
            for e in EXPERTS:
                assert sum(rows.get(e, [])) == routed[e], (name, e)


def test_fixed_routing_mixed_batch_equals_one_by_one_and_predictions(tmp_path, monkeypatch):
    with isolated_env(tmp_path / "cache"):
        cfg = routed_run(tmp_path)
        model, tok = build_routed(cfg)
        qs = _questions(cfg)
        decide = {str(q.question_id): fixed_routing("random", RoutingPool.from_connector(model.connector),
                                                    str(q.question_id), seed=1).bits for q in qs}
        kinds = {sum(b) > 0 for q, b in zip(qs, decide.values()) if q.has_image}
        assert kinds == {True, False}  # routed and unrouted images, plus a text-only question
        spy = TowerSpy(model, monkeypatch)
        out = evaluate(model, tok, qs, out_dir=tmp_path / "eval", batch_size=6, max_new_tokens=4, progress=False,
                       routing="random", routing_seed=1)
        # a fresh cache reads what is on disk, keyed by image content
        store_rows = {n: len(s._by_digest) for n, s in FeatureCache(model).stores.items()}
        for e in EXPERTS:  # the expert stores computed exactly the routed images
            j = EXPERTS.index(e)
            assert store_rows[e] == sum(b[j] for q, b in zip(qs, decide.values()) if q.has_image)
            assert spy.total(e) == store_rows[e]
        single = generate_answers(model, tok, qs, batch_size=1, max_new_tokens=4, progress=False,
                                  routing="random", routing_seed=1)
        assert out["answers"] == single
        preds = [json.loads(line) for line in (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()]
        assert preds[0]["routing"] is None
        assert [tuple(p["routing"]["bits"]) for p in preds[1:]] == [decide[str(q.question_id)] for q in qs[1:]]
        metrics = json.loads((tmp_path / "eval" / "eval_metrics.json").read_text())
        assert metrics["routing"]["mode"] == "random" and metrics["routing"]["routed"] == len(qs) - 1


def test_unparseable_routing_answers_are_counted_not_fatal(tmp_path, monkeypatch):
    import vlweave.language.routing as routing_mod

    with isolated_env(tmp_path / "cache"):
        cfg = routed_run(tmp_path)
        model, tok = build_routed(cfg)
        qs = _questions(cfg, text_only=0)
        answers = iter(["A, B", "Because", "", "none", "b", "B"])
        real = routing_mod.decision_from_answer
        monkeypatch.setattr(routing_mod, "decision_from_answer", lambda pool, a: real(pool, next(answers)))
        out = evaluate(model, tok, qs, out_dir=tmp_path / "eval", batch_size=6, max_new_tokens=2, progress=False,
                       routing="model", use_cache=False)
        stats = out["routing"]
        assert stats["routed"] == 6 and stats["unparseable"] == 3
        assert stats["expert_use"] == {"docs": 1, "scenes": 2}


# ---- bad input ---------------------------------------------------------------------------------------------------


def test_bad_routing_records_are_reported_by_id(tmp_path):
    base = {"image": "a.png", "conversations": [{"from": "human", "value": "<image>\nQ?"},
                                                {"from": "gpt", "value": "A"}]}
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    records = [{**base, "id": "ok", "routing": [1, 0]}, {**base, "id": "short", "routing": [1]},
               {**base, "id": "two", "routing": [0, 2]}, {**base, "id": "name", "routing": ["charts"]},
               {**base, "id": "byname", "routing": ["scenes"]}, {**base, "id": "rp", "routing_pass": "yes"}]
    (tmp_path / "d.json").write_text(json.dumps(records))
    with pytest.raises(DataError) as err:
        load_llava_data(tmp_path / "d.json", routing_experts=EXPERTS)
    msg = str(err.value)
    assert "4 problem(s)" in msg
    assert "'short'): 'routing' has 1 bits; the model has 2 experts" in msg
    assert "'two'): 'routing' must be a list of expert names or of 0/1 bits" in msg
    assert "'name'): unknown expert(s) ['charts']" in msg
    assert "'rp'): 'routing_pass' must be true or false" in msg
    (tmp_path / "g.json").write_text(json.dumps([records[0], records[4]]))
    assert [s.routing for s in load_llava_data(tmp_path / "g.json", routing_experts=EXPERTS)] == [[1, 0], [0, 1]]
    # Without the model's experts the names and bits are kept as written (older data stays loadable).
    assert [s.routing for s in load_llava_data(tmp_path / "g.json")] == [[1, 0], ["scenes"]]


def test_an_expert_that_fails_to_load_names_the_expert_and_its_path(tmp_path):
    from vlweave.builder import build_model

    cfg = routed_run(tmp_path)
    cfg.towers["docs"].random_init = False
    cfg.towers["docs"].name = str(tmp_path / "no-such-expert")
    with pytest.raises(ValueError, match=r"tower 'docs'.*no-such-expert"):
        build_model(cfg)


# ---- routing data ------------------------------------------------------------------------------------------------


def test_routing_data_writes_bits_and_instructions_and_resumes(tmp_path, monkeypatch):
    import vlweave.train.routing_data as rd
    from vlweave.processor import VlweaveProcessor

    with isolated_env(tmp_path / "cache"):
        cfg = routed_run(tmp_path)
        model, tok = build_routed(cfg)
        processor = VlweaveProcessor.from_model(model, tok)
        records = json.loads(Path(cfg.data.train).read_text())
        records[3] = {"id": "text", "conversations": [{"from": "human", "value": "Say red."},
                                                      {"from": "gpt", "value": "red"}], "extra": 7}
        data = Path(cfg.data.train).parent / "records.json"
        data.write_text(json.dumps(records[:8]))
        full = rd.build_routing_data(model, processor, data, tmp_path / "full", batch_size=3, progress=False)

        # The losses are the model's own per-sample losses with one bit on at a time.
        samples = load_llava_data(data, Path(cfg.data.train).parent)
        partial = rd._read_partial(tmp_path / "full" / rd.PARTIAL)
        assert set(partial) == {s.id for s in samples if s.image} and len(partial) == 7
        s0 = samples[0]
        for j, name in [(None, "base"), (0, "docs"), (1, "scenes")]:
            batch = processor(text=[s0.conversations], images=[s0.image])
            batch["context"].routing = [[int(i == j) for i in range(2)]]
            with torch.no_grad():
                loss = float(model(**batch).loss)
            assert partial[s0.id][name] == pytest.approx(loss, abs=1e-5), name
        routed = json.loads((tmp_path / "full" / "routed.json").read_text())
        assert [r["id"] for r in routed] == [r["id"] for r in records[:8]]
        assert "routing" not in routed[3] and routed[3]["extra"] == 7
        for r in routed:
            if r["id"] in partial:
                assert r["routing"] == rd.useful_experts(partial[r["id"]], EXPERTS)
        instr = json.loads((tmp_path / "full" / "routing_instructions.json").read_text())
        assert len(instr) == 7 and all(i["routing_pass"] for i in instr)
        pool = RoutingPool.from_connector(model.connector)
        by_id = {r["id"]: r for r in routed}
        for i in instr:
            rec = by_id[i["id"].removeprefix("route:")]
            assert i["conversations"][1]["value"] == pool.answer_for(rec["routing"])
            assert i["conversations"][0]["value"].startswith("<image>\n" + pool.instruction)
        # The routed records and the instructions load as training data of this model.
        assert len(load_llava_data(tmp_path / "full" / "routed.json", Path(cfg.data.train).parent,
                                   routing_experts=EXPERTS)) == 8
        assert all(s.routing_pass for s in load_llava_data(tmp_path / "full" / "routing_instructions.json"))
        assert sum(row["useful"] for row in full["table"]) == sum(sum(r.get("routing", [])) for r in routed)

        # Interrupted after the first batch, then resumed: the same files, and only the rest was scored.
        real = rd.score_batch
        calls: list[int] = []

        def flaky(model_, processor_, pool_, chunk, **kw):
            if calls:
                raise KeyboardInterrupt
            calls.append(len(chunk))
            return real(model_, processor_, pool_, chunk, **kw)

        monkeypatch.setattr(rd, "score_batch", flaky)
        with pytest.raises(KeyboardInterrupt):
            rd.build_routing_data(model, processor, data, tmp_path / "resumed", batch_size=3, progress=False)
        assert len(rd._read_partial(tmp_path / "resumed" / rd.PARTIAL)) == 3
        with open(tmp_path / "resumed" / rd.PARTIAL, "a") as fh:
            fh.write('{"id": "s0')  # a line cut short by the interruption
        seen: list[int] = []
        monkeypatch.setattr(rd, "score_batch", lambda m, p, pl, chunk, **kw: seen.append(len(chunk)) or
                            real(m, p, pl, chunk, **kw))
        rd.build_routing_data(model, processor, data, tmp_path / "resumed", batch_size=3, progress=False)
        assert sum(seen) == 4
        for name in ("routed.json", "routing_instructions.json"):
            assert (tmp_path / "resumed" / name).read_text() == (tmp_path / "full" / name).read_text()


def test_routing_data_cli_refuses_a_connector_that_does_not_route(tmp_path, capsys):
    from vlweave.builder import build_model, save_checkpoint
    from vlweave.cli import main

    with isolated_env(tmp_path / "cache"):
        cfg = routed_run(tmp_path)
        model, tok = build_model(cfg)
        save_checkpoint(model, tok, tmp_path / "ckpt")
        assert main(["mova", "routing-data", str(tmp_path / "ckpt"), "--data", cfg.data.train,
                     "--output", str(tmp_path / "rd")]) == 2
        assert "does not route between experts" in capsys.readouterr().err


# ---- the recipe: stages, mixing, presets ------------------------------------------------------------------------


def test_two_stage_recipe_trains_base_keeps_experts_frozen_and_mixes_routing_instructions(tmp_path, monkeypatch):
    import vlweave.train.routing_data as rd
    import vlweave.train.trainer as trainer_mod
    from vlweave.builder import build_model as real_build
    from vlweave.config import MixConfig, StageConfig
    from vlweave.processor import VlweaveProcessor

    def build(cfg):
        model, tok = real_build(cfg)
        return swap_connector(model), tok

    monkeypatch.setattr(trainer_mod, "build_model", build)
    with isolated_env(tmp_path / "cache"):
        cfg = routed_run(tmp_path, cache_features=True)
        model, tok = build(cfg)
        rd.build_routing_data(model, VlweaveProcessor.from_model(model, tok), cfg.data.train, tmp_path / "rd",
                              progress=False, batch_size=8)
        cfg.data.train = str(tmp_path / "rd" / "routed.json")
        cfg.data.image_folder = str(Path(routed_run(tmp_path).data.train).parent)
        stage1 = StageConfig(name="pretrain", tune={"vision": "frozen", "vision.base": "full", "connector": "full",
                                                    "language": "frozen"},
                             max_steps=3, batch_size=4, lr=1e-3, warmup_ratio=0.0)
        stage2 = StageConfig(name="finetune", tune={"vision": "frozen", "vision.base": "full", "connector": "full",
                                                    "language": "full"},
                             mix=[MixConfig(path=str(tmp_path / "rd" / "routing_instructions.json"), ratio=0.25)],
                             max_steps=4, batch_size=6, lr=1e-3, warmup_ratio=0.0)
        cfg.train.stages = [stage1, stage2]
        trainer = trainer_mod.Trainer(cfg, progress=False)
        assert set(trainer.store.stores) == {"docs", "scenes"}  # the trained base runs from pixels
        samples = trainer.stage_samples(1, stage2)
        mixed = [s for s in samples if s.routing_pass]
        assert len(samples) == 16 + 4 and len(mixed) == 4 and all(s.id.startswith("mix0:route:") for s in mixed)
        encoded = encode = trainer.encode_used(stage2, samples, set(range(len(samples))))
        image_id = trainer.model.config.image_token_id
        for i, s in enumerate(samples):
            want = 4 if s.routing_pass else trainer.model.num_image_tokens
            assert encoded[i]["input_ids"].count(image_id) == want
        # A micro-batch with both kinds runs as two forwards; the routing pass sees bits 0 and pooled tokens.
        some = [encode[16], encode[0], encode[17]]
        trainer.store.ensure([e["image"] for e in some], False, paths_by_tower=trainer.routed_paths(some))
        parts = trainer.collate_parts(some)
        assert [p["context"].routing_pass for p in parts] == [False, True]
        assert parts[1]["context"].routing == [[0, 0], [0, 0]]
        before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
        trainer.train()
        after = trainer.model.state_dict()
        changed = {k.split(".")[1] for k in before if k.startswith("vision_towers.") and
                   not torch.equal(before[k], after[k])}
        assert changed == {"base"}  # the experts never train
        assert len(losses(trainer.metrics, 1)) == 4 and all(torch.isfinite(torch.tensor(losses(trainer.metrics))))

        bad = routed_run(tmp_path)
        bad.train.stages = [StageConfig(name="x", tune={"vision": "full", "connector": "full"}, max_steps=1)]
        with pytest.raises(ValueError, match=r"expert tower\(s\) \['docs', 'scenes'\] would be trained"):
            trainer_mod.Trainer(bad, progress=False)


@pytest.mark.parametrize("name", ["mova-synthetic", "mova-synthetic-routed", "mova-synthetic-concat"])
def test_mova_presets(name):
    from vlweave.config import RunConfig
    from vlweave.presets import preset_path
    from vlweave.train.policy import resolve_tune

    cfg = RunConfig.load(preset_path(name))
    assert cfg.vision.name == "dinov2-small" and cfg.vision.image_size == 112  # the demo's base
    assert list(cfg.towers) == ["docs", "scenes"]
    assert cfg.towers["docs"].image_size == 224 and cfg.towers["scenes"].name == "efficientnet-lite0"
    comps = ["vision.base", "vision.docs", "vision.scenes", "connector", "language"]
    for stage in cfg.train.stages:
        tune = resolve_tune(stage, comps)
        assert tune["vision.docs"] == tune["vision.scenes"] == "frozen"
    if cfg.connector.type == "mova":
        opts = cfg.connector.options
        assert opts["experts"] == list(cfg.towers) and len(opts["descriptions"]) == len(opts["letters"]) == 2
        assert [s.name for s in cfg.train.stages] == ["pretrain", "finetune"]
        assert [resolve_tune(s, comps)["language"] for s in cfg.train.stages] == ["frozen", "lora"]
        assert all(resolve_tune(s, comps)["vision.base"] == "full" for s in cfg.train.stages)
    if name.endswith("routed"):
        assert cfg.train.stages[1].mix[0].path.endswith("routing_instructions.json")


# The comparison's arms per leg (docs/mova.md; experiments/mova_comparison.sh): single, plain fusion, all experts,
# routed, random.
COMPARISON_ARMS = {
    "synthetic": ["mova-compare-single", "mova-synthetic-concat", "mova-compare-all", "mova-compare-routed",
                  "mova-compare-random"],
    "easy-vqa": ["mova-easyvqa-single", "mova-easyvqa-concat", "mova-easyvqa-all", "mova-easyvqa-routed",
                 "mova-easyvqa-random"],
}


def test_mova_comparison_arms_differ_only_where_they_should():
    """Apples to apples: within a leg every arm has the same base tower, LM, stages (steps, batches, learning
    rates, tune policies) and questions, and differs only in its connector (single, fusion) and expert towers (none
    for the single encoder), its records and routing instructions (routed, random) or its routing at evaluation;
    each easy-vqa arm is its embedded arm with easy-vqa's data and the demo's questions."""
    from vlweave.config import RunConfig
    from vlweave.presets import preset_path

    def load(name):
        return RunConfig.load(preset_path(name)).to_dict()

    def training(d):  # what every arm of a leg shares: no connector, experts, records, routing data, eval routing
        d = json.loads(json.dumps(d))
        for stage in d["train"]["stages"]:
            stage.pop("mix")
        d["train"].pop("output_dir")
        d.pop("connector"), d.pop("towers")
        d["data"].pop("train")
        d["eval"].pop("routing"), d["eval"].pop("routing_seed")
        return d

    legs = {leg: [load(n) for n in arms] for leg, arms in COMPARISON_ARMS.items()}
    for leg, arms in legs.items():
        single, concat, every, routed, random_ = arms
        assert all(training(a) == training(single) for a in arms), leg
        assert single["connector"]["type"] == "mlp2x_gelu" and concat["connector"]["type"] == "tower_concat"
        assert not single["towers"] and all(a["towers"] == concat["towers"] for a in arms[1:])
        assert list(concat["towers"]) == ["docs", "scenes"]
        assert every["connector"] == routed["connector"] == random_["connector"]
        assert every["connector"]["type"] == "mova"
        assert single["data"]["train"] == concat["data"]["train"] == every["data"]["train"]
        assert routed["data"]["train"].endswith("/routed.json") and random_["data"] == routed["data"]
        assert [s["mix"] for s in routed["train"]["stages"]] == [s["mix"] for s in random_["train"]["stages"]]
        assert routed["train"]["stages"][1]["mix"][0]["path"].endswith("/routing_instructions.json")
        assert (every["eval"]["routing"], routed["eval"]["routing"], random_["eval"]["routing"]) == (
            "all", "model", "random")
    # each routed leg reads its own routing data
    assert legs["synthetic"][3]["data"]["train"] == "runs/mova-routing/routed.json"
    assert legs["easy-vqa"][3]["data"]["train"] == "runs/mova-routing-easyvqa/routed.json"
    for embedded, easy in zip(legs["synthetic"], legs["easy-vqa"]):
        a, b = training(embedded), training(easy)
        assert b["data"]["align"] == "easy-vqa:train_single.json" and b["eval"]["data"] == "easy-vqa:test_qa.jsonl"
        a.pop("data"), b.pop("data"), a.pop("eval"), b.pop("eval")
        assert a == b
        assert embedded["connector"] == easy["connector"]
    assert legs["easy-vqa"][0]["data"]["train"] == "easy-vqa:train_single.json"
    assert legs["easy-vqa"][0]["eval"]["limit"] == load("demo")["eval"]["limit"] == 600


def test_chat_routes_each_question(tmp_path, monkeypatch):
    from vlweave.serve.chat import ChatSession

    with isolated_env(tmp_path / "cache"):
        cfg = routed_run(tmp_path)
        model, tok = build_routed(cfg)
        image = _image_paths(cfg)[0]
        spy = TowerSpy(model, monkeypatch)
        session = ChatSession(model, tok, image=image, max_new_tokens=3, routing="A")
        first = session.ask("What color?")
        assert session.last_routing.experts == ("docs",)
        session.ask("And the shape?")
        assert spy.rows == {"base": [1], "docs": [1, 1]}  # base once per session; the unrouted expert never
        # The same first answer as the evaluator's two passes with the same routing.
        from vlweave.data.questions import Question

        (plain,) = generate_answers(model, tok, [Question(question_id="c", text="What color?", image=image)],
                                    progress=False, max_new_tokens=3, routing="A")
        assert first == plain
        with pytest.raises(RoutingError, match="--routing 'Q'"):
            ChatSession(model, tok, image=image, routing="Q")
