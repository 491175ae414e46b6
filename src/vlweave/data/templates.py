"""Question templates: a question with its content words masked, the unit blind baselines and result groups are
computed over (``vlweave.eval.analysis``).  One implementation for every data set: easy-vqa names its slots
(``{color}``, ``{shape}``); any other data masks its own answer vocabulary (``analysis.answer_masker``)."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping


class TemplateMasker:
    """``text -> template``: the lower-cased question with every slot word replaced by ``{slot}``.

    ``slots`` maps a slot name to its words (``{"color": ["red", ...]}``); longer phrases are matched first, on
    word boundaries, so a multi-word answer ("light blue") masks as one.  Callable, so it is the ``template_fn`` of
    :func:`~vlweave.eval.vqa.majority_baselines`.
    """

    def __init__(self, slots: Mapping[str, Iterable[str]]) -> None:
        self.slots = {name: sorted({w.lower().strip() for w in words if w.strip()}, key=lambda w: (-len(w), w))
                      for name, words in slots.items()}
        self._patterns = [(name, re.compile(r"(?<!\w)(" + "|".join(map(re.escape, words)) + r")(?!\w)"))
                          for name, words in self.slots.items() if words]

    def __call__(self, text: str) -> str:
        out = text.lower().strip()
        for name, pattern in self._patterns:
            out = pattern.sub("{" + name + "}", out)
        return out

    def words_in(self, text: str, original_case: bool = False) -> list[str]:
        """The slot words a question mentions, in order of appearance: lower-cased, or as ``text`` spells them
        (``original_case``; an option letter "C" stays "C")."""
        low = text.lower()
        source = text if original_case and len(low) == len(text) else low  # (lower() can change a length)
        found: list[tuple[int, str]] = []
        for _, pattern in self._patterns:
            found += [(m.start(), source[m.start(1):m.end(1)]) for m in pattern.finditer(low)]
        return [w for _, w in sorted(found)]


_NEGATION = re.compile(r"\b(not|no)\b")


def is_negated(text: str) -> bool:
    """Whether a yes/no question is asked in the negative ("is there *not* a ...", "is *no* ... present?"): its
    answer is "yes" when the thing is absent."""
    return bool(_NEGATION.search(text.lower()))


__all__ = ["TemplateMasker", "is_negated"]
