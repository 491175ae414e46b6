"""easy-vqa helpers: question templates (for the blind per-template baseline), question types, and the
caption data of the demo's ``align`` stage.

Every easy-vqa image holds one shape of one colour; its questions ask the colour, the shape, or whether a colour/
shape is (not) present.  The align stage needs image->text pairs like LLaVA's LCS captions; we derive a short
caption ("red circle") for each training image from that image's own training answers, so no test information
is used.
"""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from pathlib import Path
from typing import Any

from vlweave.data.templates import TemplateMasker, is_negated

COLORS = ("red", "green", "blue", "black", "gray", "teal", "brown", "yellow")
SHAPES = ("circle", "rectangle", "triangle")
_COLOR_RE = re.compile(r"\b(" + "|".join(COLORS) + r")\b")
_SHAPE_RE = re.compile(r"\b(" + "|".join(SHAPES) + r")\b")


# easy-vqa's content words by slot: the one template implementation (data/templates.py) with named slots.
_TEMPLATES = TemplateMasker({"color": COLORS, "shape": SHAPES})


def question_template(text: str) -> str:
    """The question with its colour/shape words replaced by placeholders."""
    return _TEMPLATES(text)


def question_type(answer: str) -> str:
    a = answer.lower().strip()
    if a in COLORS:
        return "color"
    if a in SHAPES:
        return "shape"
    return "yes/no"


def add_question_types(questions) -> None:
    """Tag each :class:`~vlweave.data.questions.Question` with its answer's type (``meta["type"]``), the group
    easy-vqa results are reported by."""
    for q in questions:
        q.meta["type"] = question_type(q.answer)


def _facts_from_turns(turns: list[dict[str, str]]) -> tuple[str | None, str | None]:
    """Colour and shape of an image from its QA turns (direct answers first, then yes/no evidence)."""
    color: Counter = Counter()
    shape: Counter = Counter()
    for q, a in zip(turns[0::2], turns[1::2]):
        text = q["value"].replace("<image>", "").strip().lower()
        ans = a["value"].strip().lower()
        if ans in COLORS:
            color[ans] += 2
        elif ans in SHAPES:
            shape[ans] += 2
        elif ans in ("yes", "no"):
            present = (ans == "yes") != is_negated(text)
            if present:
                for c in _COLOR_RE.findall(text):
                    color[c] += 1
                for s in _SHAPE_RE.findall(text):
                    shape[s] += 1
    best = lambda cnt: cnt.most_common(1)[0][0] if cnt else None  # noqa: E731
    return best(color), best(shape)


def build_caption_data(train_json: str | Path, out_path: str | Path) -> int:
    """Write LLaVA-format caption records ("<image>" -> "red circle") for the align stage; returns the count."""
    records = json.loads(Path(train_json).read_text())
    out: list[dict[str, Any]] = []
    for rec in records:
        color, shape = _facts_from_turns(rec["conversations"])
        if color is None or shape is None:
            continue  # not enough evidence in this image's questions; skipping loses no QA data
        out.append({
            "id": rec["id"] + "-caption",
            "image": rec["image"],
            "conversations": [{"from": "human", "value": "<image>\nDescribe the image briefly."},
                              {"from": "gpt", "value": f"{color} {shape}"}],
        })
    Path(out_path).write_text(json.dumps(out))
    return len(out)


def balance_yes_no(records: list[dict[str, Any]], seed: int = 0) -> list[dict[str, Any]]:
    """Single-question records with each yes/no question template answered "yes" and "no" equally often.

    easy-vqa's yes/no answers are predictable from the wording alone: "is there a {color} shape?" is "no" for 88 %
    of the training questions (one colour of eight is present), "is there not a {color} shape?" is "yes" for 87 %.
    A model trained on the raw mix learns that prior first and, within the demo's step budget, never learns to look:
    every demo run scored exactly the blind per-template accuracy on yes/no (0.861). Keeping, per template, as many
    majority answers as there are minority answers (seeded choice, original order kept) removes the shortcut;
    colour and shape questions are all kept. The test split is not touched.
    """
    groups: dict[tuple[str, str], list[int]] = {}
    for i, rec in enumerate(records):
        question = rec["conversations"][0]["value"].replace("<image>", "").strip()
        answer = rec["conversations"][1]["value"].strip().lower()
        if answer in ("yes", "no"):
            groups.setdefault((question_template(question), answer), []).append(i)
    drop: set[int] = set()
    rng = random.Random(seed)
    for template in sorted({t for t, _ in groups}):
        yes, no = groups.get((template, "yes"), []), groups.get((template, "no"), [])
        keep = min(len(yes), len(no))
        for idx in (yes, no):
            drop.update(set(idx) - set(rng.sample(idx, keep)))
    return [rec for i, rec in enumerate(records) if i not in drop]


def image_facts(train_records: list[dict[str, Any]]) -> dict[str, tuple[str, str]]:
    """``image path -> (colour, shape)`` from each image's own training questions (as the align captions)."""
    facts: dict[str, tuple[str, str]] = {}
    for rec in train_records:
        color, shape = _facts_from_turns(rec["conversations"])
        if color is not None and shape is not None:
            facts[rec["image"]] = (color, shape)
    return facts


def pair_yes_no(records: list[dict[str, Any]], facts: dict[str, tuple[str, str]],
                seed: int = 0) -> list[dict[str, Any]]:
    """Single-question records where every yes/no question is followed by its *counterpart*: the same image and
    template with the colour/shape word swapped so that the answer flips ("is there a red shape?" yes -> "is there a
    blue shape?" no).

    :func:`balance_yes_no` removes the wording shortcut by dropping majority answers; this keeps every question and
    adds, per image, the contrast that only looking can resolve: within a pair the wording differs by one word and
    the answer is opposite, so each template is answered "yes" and "no" equally often *for the same image*. The
    swapped-in word is the image's own colour/shape (when the original's word is absent) or a seeded random other
    one. Colour/shape questions are kept as they are; a yes/no question whose answer disagrees with the image's
    facts, or that names no slot word, is kept without a counterpart."""
    rng = random.Random(seed)
    out: list[dict[str, Any]] = []
    for rec in records:
        out.append(rec)
        question = rec["conversations"][0]["value"].replace("<image>", "").strip()
        answer = rec["conversations"][1]["value"].strip().lower()
        if answer not in ("yes", "no") or rec.get("image") not in facts:
            continue
        color, shape = facts[rec["image"]]
        words = _TEMPLATES.words_in(question)
        if len(words) != 1:
            continue
        word = words[0]
        truth, vocab = (color, COLORS) if word in COLORS else (shape, SHAPES)
        present = word == truth
        if (answer == "yes") != (present != is_negated(question)):
            continue  # the record disagrees with the image's facts: do not build on it
        swap = rng.choice([w for w in vocab if w != truth]) if present else truth
        twin_question = re.sub(rf"\b{word}\b", swap, question, count=1)
        twin = {"id": f"{rec['id']}-pair", "image": rec["image"],
                "conversations": [{"from": "human", "value": "<image>\n" + twin_question},
                                  {"from": "gpt", "value": "no" if answer == "yes" else "yes"}]}
        out.append(twin)
    return out
