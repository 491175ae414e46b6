"""easy-vqa helpers: templates, question types, and the yes/no-balanced training set (hand-made records)."""

from __future__ import annotations

from collections import Counter

from vlweave.data.easyvqa import balance_yes_no, image_facts, pair_yes_no, question_template, question_type


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


def _multi(i: int, turns: list[tuple[str, str]]) -> dict:
    conv = []
    for k, (q, a) in enumerate(turns):
        conv += [{"from": "human", "value": ("<image>\n" if k == 0 else "") + q}, {"from": "gpt", "value": a}]
    return {"id": f"train-{i}", "image": f"images/{i}.png", "conversations": conv}


def test_pair_yes_no_adds_the_answer_flipping_twin_of_every_yes_no_question():
    facts = image_facts([_multi(0, [("what color is the shape?", "red"), ("what shape is present?", "circle")]),
                         _multi(1, [("is there a blue shape?", "yes"), ("is no triangle present?", "no")]),
                         _multi(2, [("what shape is in the image?", "circle")])])  # colour unknown: no facts
    assert facts == {"images/0.png": ("red", "circle"), "images/1.png": ("blue", "triangle")}
    records = [_rec(0, "is there a red shape?", "yes"),          # present -> swapped for another colour, "no"
               _rec(0, "is there not a green shape?", "yes"),    # absent, negated -> the image's colour, "no"
               _rec(0, "what color is the shape?", "red"),       # naming: kept, no twin
               _rec(1, "does the image contain a circle?", "no"),  # absent -> the image's shape, "yes"
               _rec(1, "is there a blue shape?", "no"),          # contradicts the facts: kept, no twin
               _rec(2, "is there a circle?", "yes")]             # no facts for this image: kept, no twin
    out = pair_yes_no(records, facts, seed=0)
    twins = {r["id"]: r for r in out if r["id"].endswith("-pair")}
    assert [r["id"] for r in out] == ["r0", "r0-pair", "r0", "r0-pair", "r0", "r1", "r1-pair", "r1", "r2"]
    qa = lambda r: (r["conversations"][0]["value"], r["conversations"][1]["value"])  # noqa: E731
    first, second = [r for r in out if r["id"] == "r0-pair"]
    assert qa(second) == ("<image>\nis there not a red shape?", "no")
    q, a = qa(first)
    assert a == "no" and q.startswith("<image>\nis there a ") and q.endswith(" shape?") and "red" not in q
    assert qa(twins["r1-pair"]) == ("<image>\ndoes the image contain a triangle?", "yes")
    assert all(r["image"] == records[0]["image"] for r in (first, second))
    assert pair_yes_no(records, facts, seed=0) == out  # deterministic


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
