"""easy-vqa helpers: templates, question types, and the yes/no-balanced training set (hand-made records)."""

from __future__ import annotations

from collections import Counter

from vlweave.data.easyvqa import balance_yes_no, question_template, question_type


def _rec(i: int, question: str, answer: str) -> dict:
    return {"id": f"r{i}", "image": f"images/{i}.png",
            "conversations": [{"from": "human", "value": "<image>\n" + question},
                              {"from": "gpt", "value": answer}]}


def test_templates_and_types():
    assert question_template("Is there not a Red shape?") == "is there not a {color} shape?"
    assert question_template("does the image contain a circle?") == "does the image contain a {shape}?"
    assert [question_type(a) for a in ("teal", "triangle", "yes", "No")] == ["color", "shape", "yes/no", "yes/no"]


def test_balance_yes_no_equalises_answers_per_template_and_keeps_the_rest():
    records = (
        [_rec(i, f"is there a {c} shape?", "no") for i, c in enumerate(["red", "blue", "gray", "teal", "black"])]
        + [_rec(10, "is there a green shape?", "yes"), _rec(11, "is there a red shape?", "yes")]
        + [_rec(20, "is there not a circle?", "yes"), _rec(21, "is there not a triangle?", "no")]
        + [_rec(30, "what is the color of the shape?", "red"), _rec(31, "what shape is in the image?", "circle")]
        + [_rec(40, "is no circle present?", "yes")]  # a template with one answer only: nothing to pair it with
    )
    out = balance_yes_no(records, seed=0)
    per_template = Counter((question_template(r["conversations"][0]["value"].replace("<image>\n", "")),
                            r["conversations"][1]["value"]) for r in out)
    assert per_template[("is there a {color} shape?", "no")] == per_template[("is there a {color} shape?", "yes")] == 2
    assert per_template[("is there not a {shape}?", "yes")] == per_template[("is there not a {shape}?", "no")] == 1
    assert ("is no {shape} present?", "yes") not in per_template
    ids = [r["id"] for r in out]
    assert {"r10", "r11", "r20", "r21", "r30", "r31"} <= set(ids)  # minority answers and non-yes/no questions stay
    assert ids == [r["id"] for r in records if r["id"] in set(ids)]  # original order kept
    assert balance_yes_no(records, seed=0) == out  # deterministic
    assert any(balance_yes_no(records, seed=s) != out for s in range(1, 6))  # the seed picks which majority rows stay


def test_blind_baselines_per_group():
    from vlweave.data.questions import Question
    from vlweave.eval.vqa import majority_baselines

    def qs(*pairs):
        return [Question(question_id=i, text=text, answer=answer) for i, (text, answer) in enumerate(pairs)]

    train = qs(*[("is there a red shape?", "no")] * 3, ("is there a blue shape?", "yes"),
               *[("what is the color?", "red")] * 2, ("what is the color?", "blue"))
    test = qs(("is there a teal shape?", "no"), ("is there a red shape?", "yes"), ("what is the color?", "red"),
              ("what is the color?", "teal"))
    got = majority_baselines(train, test, question_template, group_fn=lambda q: question_type(q.answer))
    assert got["majority"] == 0.25  # "no" is the overall majority (3 of 7)
    assert got["majority_per_template"] == 0.5
    assert got["majority_per_template_by_group"] == {"yes/no": 0.5, "color": 0.5}
