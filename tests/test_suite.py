"""The embedded multi-domain benchmark evaluated with the exact scorers: subset selection keeps circular groups
whole, gold answers score 1.0 everywhere, an always-"yes" model scores exactly the yes/no balance, the blind
baselines answer as the training text alone says (golden answers) and are scored by the same scorers, and compare
runs on it end to end with a tiny model, baselines beside."""

from __future__ import annotations

import json

import pytest

import vlweave.eval.suite as suite_mod
from helpers import isolated_env, make_run
from vlweave import assets, cli
from vlweave.builder import build_model
from vlweave.data.questions import Question
from vlweave.eval.analysis import train_questions
from vlweave.eval.benchmarks import registry


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
    # The blind baselines come from the run's training data, on the same questions, into the table.
    suite = suite_mod.load_suite(assets.pull("synthetic"), limit_per_domain=1)
    blind = suite_mod.suite_baselines(train_questions(cfg.data.train), suite)
    assert data["baselines"] == {g: pytest.approx(b) for g, b in blind.items()}
    assert "blind: per template" in (out / "compare.md").read_text()


SHORT = "Answer the question using a single word or phrase."
LETTER = "Answer with the option's letter from the given choices directly."


def _q(qid, text, answer=None):
    return Question(question_id=qid, text=text, answer=answer)


def test_blind_answers_golden():
    train = [_q(1, f"Is there a red circle in the image?\n{SHORT}", "yes"),
             _q(2, f"Is there a blue square in the image?\n{SHORT}", "yes"),
             _q(3, f"Is the square blue?\n{SHORT}", "no"),
             _q(4, f"Is the circle red?\n{SHORT}", "yes"),
             _q(5, f"What color is the circle?\n{SHORT}", "red"),
             _q(6, f"What color is the square?\n{SHORT}", "blue"),
             _q(7, f"What color is the circle?\n{SHORT}", "red"),
             # the second label named is the answer twice, the first once: "the second one" is learned, not the
             # most frequent label ("owl")
             _q(8, f"Which is higher, the ram bar or the emu bar?\n{SHORT}", "emu"),
             _q(9, f"Which is higher, the emu bar or the owl bar?\n{SHORT}", "owl"),
             _q(10, f"Which is higher, the owl bar or the ram bar?\n{SHORT}", "owl"),
             _q(11, f"Which shape is shown?\nA. circle\nB. square\n{LETTER}", "B"),
             _q(12, f"Which shape is shown?\nA. square\nB. circle\n{LETTER}", "B"),
             _q(13, f"Which shape is shown?\nA. circle\nB. square\n{LETTER}", "A")]
    test = [_q("a", f"Is there a blue circle in the image?\n{SHORT}"),
            _q("b", f"What color is the circle?\n{SHORT}"),
            _q("c", f"Which is higher, the owl bar or the emu bar?\n{SHORT}"),
            _q("d", f"Which shape is shown?\nA. square\nB. circle\n{LETTER}"),
            _q("e", f"How tall is the tower?\n{SHORT}")]  # a template never seen: the instruction's majority
    guesses = suite_mod.blind_answers(train, test)
    assert guesses["blind_majority"] == ["yes", "yes", "yes", "B", "yes"]
    # the template's own answers: "red" for the circle, the second label named, and the second option letter
    # copied as the question spells it ("B", which the MMBench parser reads; not "b")
    assert guesses["blind_per_template"] == ["yes", "red", "emu", "B", "yes"]


def test_suite_baselines_are_scored_by_the_suite_scorers(folder):
    train = train_questions(folder / "train.json")
    suite = suite_mod.load_suite(folder, limit_per_domain=10)
    blind = suite_mod.suite_baselines(train, suite)
    for fmt, questions in suite.items():
        guesses = suite_mod.blind_answers(train, questions)
        _, bench, headline = suite_mod.FORMATS[fmt]
        for domain in ("scenes", "documents", "charts"):
            idx = [i for i, q in enumerate(questions) if q.meta["domain"] == domain]
            for name in suite_mod.BLIND:
                result = registry.score_benchmark(bench, [guesses[name][i] for i in idx],
                                                  [questions[i].as_record() for i in idx])
                assert blind[f"{domain}/{fmt}"][name] == pytest.approx(suite_mod._get(result["metrics"], headline))
        # a blind guess cannot follow the rotations of a circular question
        assert fmt != "mc" or all(blind[f"{d}/mc"][n] == 0.0 for d in ("scenes", "documents", "charts")
                                  for n in suite_mod.BLIND)
    for name in suite_mod.BLIND:
        assert blind["accuracy"][name] == pytest.approx(sum(blind[f"all/{f}"][name] for f in suite_mod.FORMATS) / 3)
    # the majority of the shared "single word or phrase" instruction is a yes/no word, so it names no short answer
    assert all(blind[f"{d}/short"]["blind_majority"] == 0.0 for d in ("scenes", "documents", "charts"))
    assert blind["all/short"]["blind_per_template"] > 0.0  # ...while the templates' own answers do
