"""Readable results for any data (``vlweave.eval.analysis``): template masking, groups with counts and blind
baselines from the training answers, the confusion summary and the yes/no-vs-naming consistency check, on small
hand-checked question sets; and the trainer's slow-step warning."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from vlweave.data.questions import Question
from vlweave.data.templates import TemplateMasker
from vlweave.eval.analysis import analyse, answer_masker, confusion_summary, consistency_check, group_field, \
    train_questions, yes_no_balance


def q(qid, text, answer, image="img0.png", **meta) -> Question:
    return Question(question_id=qid, text=text, image=image, answer=answer, meta=meta)


def test_masker_masks_whole_words_longest_first():
    m = TemplateMasker({"answer": ["blue", "light blue", "3"]})
    assert m("Is this LIGHT blue?") == "is this {answer}?"
    assert m("Is this a 3? Not 33 or bluebird.") == "is this a {answer}? not 33 or bluebird."
    assert m.words_in("Is 3 light blue or blue?") == ["3", "light blue", "blue"]
    # the training answer vocabulary without yes/no
    train = [q("a", "What digit?", "3"), q("b", "Is this a 3?", "Yes"), q("c", "What digit?", "7")]
    assert answer_masker(train).slots == {"answer": ["3", "7"]}


DIGITS_TRAIN = [  # naming: "what digit is shown?"; yes/no: "is this a N?"
    q("t0", "What digit is shown?", "3"), q("t1", "What digit is shown?", "3"), q("t2", "What digit is shown?", "7"),
    q("t3", "Is this a 3?", "no"), q("t4", "Is this a 7?", "no"), q("t5", "Is this a 3?", "yes"),
]


def digits_test():
    # Two images: a 3 (img3) and a 7 (img7).  Each has a naming question and two yes/no questions.
    qs = [q("n3", "What digit is shown?", "3", "img3"), q("y33", "Is this a 3?", "yes", "img3"),
          q("y37", "Is this a 7?", "no", "img3"),
          q("n7", "What digit is shown?", "7", "img7"), q("y77", "Is this a 7?", "yes", "img7"),
          q("y73", "Is this a 3?", "no", "img7")]
    answers = ["3", "no", "no",  # right name; "no" to "is this a 3?" contradicts its own name
               "3", "no", "yes"]  # wrong name (3 for a 7); its yes/no answers agree with that name
    return qs, answers


def test_groups_by_template_with_counts_and_blind_baselines():
    qs, answers = digits_test()
    r = analyse(qs, answers, DIGITS_TRAIN)
    assert r["group_by"] == "template" and r["n"] == 6 and r["accuracy"] == pytest.approx(2 / 6)
    naming, yes_no = r["groups"]["what digit is shown?"], r["groups"]["is this a {answer}?"]
    # Overall majority answer in training: "3" (2) and "no" (2) tie; Counter keeps the first seen: "3".
    assert naming == {"n": 2, "accuracy": 0.5, "blind_majority": 0.5, "blind_per_template": 0.5}
    assert yes_no["n"] == 4 and yes_no["accuracy"] == 0.25
    assert yes_no["blind_per_template"] == 0.5 and yes_no["blind_majority"] == 0.0  # per template: "no"
    assert list(r["groups"]) == ["is this a {answer}?", "what digit is shown?"]  # largest group first
    assert r["baselines"] == {"majority": pytest.approx(1 / 6), "majority_per_template": pytest.approx(3 / 6)}
    assert r["baseline_source"] == "6 training question(s)"


def test_confusion_summary_per_answer_and_top_confusions():
    qs, answers = digits_test()
    c = confusion_summary(qs, answers)
    assert c["vocabulary"] == 4
    assert c["per_answer"]["7"] == {"accuracy": 0.0, "n": 1} and c["per_answer"]["no"] == {"accuracy": 0.5, "n": 2}
    assert c["per_answer"]["yes"] == {"accuracy": 0.0, "n": 2}
    assert c["top_confusions"][0] == {"answer": "yes", "predicted": "no", "count": 2}
    assert {"answer": "7", "predicted": "3", "count": 1} in c["top_confusions"] and len(c["top_confusions"]) == 3
    assert c["outside_vocabulary"] == 0
    # an open vocabulary (more distinct gold answers than the limit) has no confusion summary
    many = [q(str(i), "What?", f"w{i}") for i in range(60)]
    assert confusion_summary(many, ["x"] * 60) is None


def test_consistency_with_the_models_own_names():
    qs, answers = digits_test()
    c = consistency_check(qs, answers, DIGITS_TRAIN, answer_masker(DIGITS_TRAIN))
    # implied by the names: img3 named "3" -> yes / no (both right); img7 named "3" -> "is this a 7?" no (wrong),
    # "is this a 3?" yes (wrong).  The model said no, no, no, yes: only the first contradicts its names.
    assert c == {"n": 4, "model_accuracy": 0.25, "naming_implied_accuracy": 0.5, "consistency": 0.75}
    # negation flips the implied answer; a yes/no question without a naming question on its image is skipped
    extra = [q("neg", "Is this not a 3?", "no", "img3"), q("lone", "Is this a 3?", "no", "img9")]
    c2 = consistency_check(qs + extra, answers + ["yes", "no"], DIGITS_TRAIN, answer_masker(DIGITS_TRAIN))
    assert c2["n"] == 5 and c2["consistency"] == pytest.approx(3 / 5)  # said "yes", its name implies "no"
    # no naming questions at all: nothing to check
    assert consistency_check(qs[1:3], answers[1:3], DIGITS_TRAIN, answer_masker(DIGITS_TRAIN)) is None


def test_yes_no_balance_is_one_half_for_any_answer_of_the_wording_alone():
    m = answer_masker(DIGITS_TRAIN)
    # template "is this a {answer}?": 1 gold yes, 3 gold no; template "is this not a {answer}?": 2 yes, 1 no
    qs = [q("a", "Is this a 3?", "yes"), q("b", "Is this a 7?", "no"), q("c", "Is this a 3?", "no"),
          q("d", "Is this a 7?", "no"), q("e", "Is this not a 3?", "yes"), q("f", "Is this not a 7?", "yes"),
          q("g", "Is this not a 7?", "no"), q("h", "What digit is shown?", "3")]
    gold = [x.answer for x in qs]
    # the per-template majority ("no" / "yes"): 5 of 7 yes/no right, but balanced 0.5 in each template
    blind = ["no", "no", "no", "no", "yes", "yes", "yes", "3"]
    r = yes_no_balance(qs, blind, m)
    assert (r["n"], r["templates"], r["template_balanced_accuracy"]) == (7, 2, 0.5)
    assert (r["yes_recall"], r["no_recall"]) == (2 / 3, 3 / 4)
    assert yes_no_balance(qs, gold, m)["template_balanced_accuracy"] == 1.0
    flipped = ["no" if a == "yes" else "yes" if a == "no" else a for a in gold]
    assert yes_no_balance(qs, flipped, m)["template_balanced_accuracy"] == 0.0
    # one mistake on the lone gold "no" of the negated template: that template scores (1 + 0) / 2, weight 3 of 7
    said = gold[:6] + ["yes", "3"]
    assert yes_no_balance(qs, said, m)["template_balanced_accuracy"] == pytest.approx((4 * 1.0 + 3 * 0.5) / 7)
    # a template with one gold answer only cannot tell: it is left out; none left -> None
    assert yes_no_balance(qs[:1], ["yes"], m) is None
    assert analyse(qs, blind, DIGITS_TRAIN)["yes_no_balance"]["template_balanced_accuracy"] == 0.5


def test_groups_from_a_record_field_and_group_by():
    qs = [q("a", "What digit is shown?", "3", kind="naming", category="c1"),
          q("b", "Is this a 3?", "yes", kind="yes/no", category="c2")]
    assert group_field(qs) == "category"  # the first of category/type/domain that every question has
    r = analyse(qs, ["3", "no"], DIGITS_TRAIN, group_by="kind")
    assert r["group_by"] == "kind" and set(r["groups"]) == {"naming", "yes/no"}
    assert r["groups"]["naming"]["accuracy"] == 1.0 and r["groups"]["yes/no"]["accuracy"] == 0.0
    with pytest.raises(ValueError, match=r"--group-by 'colour': 2 of 2 questions have no 'colour' field \(first: "
                                         r"question_id 'a'\)"):
        group_field(qs, "colour")
    # no training answers: groups and accuracy, no baselines
    r = analyse(qs, ["3", "no"], None)
    assert r["baselines"] is None and "blind_majority" not in r["groups"]["c1"] and r["consistency"] is None


def test_train_questions_reads_every_turn_pair(tmp_path):
    records = [{"id": "r0", "image": "a.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat digit is shown?"}, {"from": "gpt", "value": "3"},
        {"from": "human", "value": "Is this a 7?"}, {"from": "gpt", "value": "no"}]}]
    path = tmp_path / "train.json"
    path.write_text(json.dumps(records))
    got = train_questions(path)
    assert [(x.question_id, x.text, x.answer) for x in got] == [("r0#0", "What digit is shown?", "3"),
                                                                 ("r0#1", "Is this a 7?", "no")]


def test_slow_step_warning():
    from vlweave.train.trainer import SLOW_WINDOW, Trainer

    def run(times):
        t = SimpleNamespace(metrics=[], warnings=[], _slow_stages=set())
        for i, s in enumerate(times):
            t.metrics.append({"stage_index": 0, "step": i + 1, "seconds": s})
            Trainer._check_speed(t, SimpleNamespace(name="finetune"), 0)
        return t.warnings

    steady = [3.0] + [1.0] * (4 * SLOW_WINDOW)
    assert run(steady) == []
    slowed = [3.0] + [1.0] * (2 * SLOW_WINDOW) + [2.5] * (2 * SLOW_WINDOW)
    (msg,) = run(slowed)  # once, however long it stays slow
    assert "stage 0 (finetune)" in msg and "2.5x" in msg and "competing" in msg
