"""The embedded multi-domain benchmark evaluated with the exact scorers: subset selection keeps circular groups
whole, gold answers score 1.0 everywhere, an always-"yes" model scores exactly the yes/no balance, and compare
runs on it end to end with a tiny model."""

from __future__ import annotations

import json

import pytest

import vlweave.eval.suite as suite_mod
from helpers import isolated_env, make_run
from vlweave import assets, cli
from vlweave.builder import build_model


@pytest.fixture(autouse=True, scope="module")
def _env(tmp_path_factory):
    with isolated_env(tmp_path_factory.mktemp("vlweave-cache")):
        yield


@pytest.fixture(scope="module")
def folder():
    return assets.pull("synthetic")


def test_subset_keeps_every_rotation_and_is_per_domain(folder):
    s = suite_mod.load_suite(folder, limit_per_domain=3)
    for fmt, qs in s.items():
        per_domain = {}
        for q in qs:
            per_domain.setdefault(q.meta["domain"], []).append(q)
        assert sorted(per_domain) == ["charts", "documents", "scenes"]
        for domain, items in per_domain.items():
            assert len(items) == (12 if fmt == "mc" else 3), (fmt, domain)
    groups = {}
    for q in s["mc"]:
        groups.setdefault(q.meta["circular_group"], set()).add(q.answer)
    assert all(len(letters) > 1 for letters in groups.values())  # rotations move the answer letter
    assert suite_mod.load_suite(folder, limit_per_domain=3) == s  # the subset is fixed


def _fake_answers(kind):
    def fake(model, tokenizer, questions, **kw):
        if kind == "gold":
            return [q.answer for q in questions]
        return ["yes" if "Answer the question" in q.text else "A" for q in questions]
    return fake


def test_scores_gold_and_always_yes(folder, tmp_path, monkeypatch):
    model, tok = build_model(make_run(tmp_path, vision="clip"))
    monkeypatch.setattr(suite_mod, "generate_answers", _fake_answers("gold"))
    report = suite_mod.evaluate_suite(model, tok, folder, limit_per_domain=4, out_dir=tmp_path / "gold")
    assert report["mean"] == 1.0
    assert all(v == 1.0 for by_fmt in report["scores"].values() for v in by_fmt.values())
    assert report["how"]["scenes/mc"]["benchmark"] == "mmbench" and report["how"]["charts/yesno"]["parser"] == "llava"
    assert json.loads((tmp_path / "gold" / "suite_metrics.json").read_text())["mean"] == 1.0
    assert report["how"]["scenes/mc"]["parser"] == "vlmevalkit"
    # Saved predictions carry the scorer's parse: gold multiple-choice answers are their own letters.
    mc_rows = [json.loads(line) for line in (tmp_path / "gold" / "predictions_mc.jsonl").read_text().splitlines()]
    assert mc_rows and all(r["parsed"] == r["answer"] for r in mc_rows)
    monkeypatch.setattr(suite_mod, "generate_answers", _fake_answers("yes"))
    full = suite_mod.load_suite(folder)
    yes_share = {d: sum(q.answer == "yes" for q in full["yesno"] if q.meta["domain"] == d) /
                 sum(q.meta["domain"] == d for q in full["yesno"]) for d in ("scenes", "documents", "charts")}
    report = suite_mod.evaluate_suite(model, tok, folder)
    for domain, share in yes_share.items():
        assert report["scores"][domain]["yesno"] == pytest.approx(share)
        # always "A": right on exactly one rotation of four, so never right circularly
        assert report["scores"][domain]["mc"] == 0.0
        assert report["scores"][domain]["mc_copy"] == pytest.approx(0.25)  # ...but right on 1 of 4 copies
    assert report["mean"] == pytest.approx(sum(report["overall"][f] for f in ("yesno", "mc", "short")) / 3)


def test_compare_on_the_embedded_benchmark(tmp_path):
    cfg = make_run(tmp_path, vision="clip", tokenizer="chatml", template="tokenizer")
    cfg.data.train = str(assets.pull("synthetic") / "train.json")
    cfg.eval.data, cfg.eval.limit, cfg.eval.max_new_tokens = "synthetic", 1, 2
    cfg.train.stages[0].max_steps = 2
    cfg.save(tmp_path / "tiny.yaml")
    out = tmp_path / "cmp"
    assert cli.main(["compare", str(tmp_path / "tiny.yaml"), "--seeds", "1", "--output", str(out)]) == 0
    data = json.loads((out / "compare.json").read_text())
    groups = data["summary"][str(tmp_path / "tiny.yaml")]["groups"]
    assert {"scenes/yesno", "documents/mc", "charts/short", "all/yesno"} <= set(groups)
    assert (out / "compare.png").exists()
