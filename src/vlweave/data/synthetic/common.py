"""Pieces shared by the synthetic domains: answer formats, the ``Fact`` a question is built from, fonts, helpers.

A domain generator turns a random ``spec`` (a JSON-able description of one image) into an image and into
``Fact`` objects.  A fact is one piece of knowledge about the image, phrased three ways:

* an open question and its short answer (``question`` / ``answer``)            -> short-answer VQA format;
* the same question with ``answer`` plus three of ``distractors`` as options   -> multiple choice (MMBench);
* ``claim(value)``: a yes/no question asserting ``value`` (true for ``answer``,
  false for every value of ``no_values``, which defaults to ``distractors``)    -> yes/no (POPE).

Every distractor must be a *wrong* answer for the image; the domain modules guarantee it and the tests check it.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from PIL import ImageFont

FORMATS = ("yesno", "mc", "short")
LETTERS = ("A", "B", "C", "D")

#: LLaVA's suffix for POPE / VQAv2 / GQA style questions.
SHORT_SUFFIX = "Answer the question using a single word or phrase."
#: LLaVA's suffix for MMBench-style multiple choice questions.
MC_SUFFIX = "Answer with the option's letter from the given choices directly."

ORDINALS = ("first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth")

RGB = tuple[int, int, int]


@dataclass
class Fact:
    """One thing that is true about an image, usable as a short-answer, multiple-choice or yes/no question."""

    category: str
    question: str
    answer: str
    distractors: list[str]
    claim: Callable[[str], str] | None = None
    no_values: list[str] | None = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        seen = {self.answer}
        for d in self.distractors:
            if d in seen:
                raise ValueError(f"duplicate or correct distractor {d!r} for {self.question!r}")
            seen.add(d)
        for v in self.no_values or ():
            if v == self.answer:
                raise ValueError(f"no-value {v!r} equals the answer of {self.question!r}")

    def supports(self, fmt: str) -> bool:
        if fmt == "short":
            return True
        if fmt == "mc":
            return len(self.distractors) >= 3
        if fmt == "yesno":
            return self.claim is not None and bool(self.no_values if self.no_values is not None else self.distractors)
        raise ValueError(f"unknown format {fmt!r}")


@functools.lru_cache(maxsize=64)
def font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """PIL's built-in font at ``size`` px (Aileron via FreeType on Pillow >= 10.1; the old bitmap font otherwise)."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: no size argument
        return ImageFont.load_default()


def text_width(text: str, size: int) -> float:
    return font(size).getlength(text)


def fit_font_size(texts: Sequence[str], max_width: float, start: int, minimum: int = 6) -> int:
    """The largest size <= ``start`` (but >= ``minimum``) at which every text is at most ``max_width`` wide."""
    size = start
    while size > minimum and max(text_width(t, size) for t in texts) > max_width:
        size -= 1
    return size


def pick_distractors(rng: random.Random, answer: str, preferred: Sequence[str], pool: Sequence[str],
                     k: int) -> list[str]:
    """Up to ``k`` distinct wrong answers: as many from ``preferred`` (hard distractors) as fit, then ``pool``."""
    out: list[str] = []
    for group in (list(preferred), list(pool)):
        group = [g for g in dict.fromkeys(group) if g != answer and g not in out]
        rng.shuffle(group)
        out.extend(group[: k - len(out)])
        if len(out) >= k:
            break
    return out
