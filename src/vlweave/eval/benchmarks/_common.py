"""Small helpers shared by the benchmark scorers: field access on records, prediction alignment, safe division.

Ground-truth records may be the dataclasses of :mod:`vlweave.eval.benchmarks.readers` or plain dicts; scorers read
fields through :func:`get_field`, so both work.  Pure Python, no torch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

# Prompt suffixes of methods.md §0.8 (haotian-liu/LLaVA docs/Evaluation.md), appended to the question text.
SHORT_ANSWER_SUFFIX = "\nAnswer the question using a single word or phrase."
MULTIPLE_CHOICE_SUFFIX = "\nAnswer with the option's letter from the given choices directly."

_MISSING = object()


def get_field(record: Any, *names: str, default: Any = _MISSING) -> Any:
    """The first of ``names`` that ``record`` (a mapping or an object) carries with a non-``None`` value.

    Raises ``ValueError`` naming the fields when none is present and no ``default`` is given.
    """
    for name in names:
        if isinstance(record, Mapping):
            value = record.get(name)
        else:
            value = getattr(record, name, None)
        if value is not None:
            return value
    if default is not _MISSING:
        return default
    raise ValueError(f"record has no {' / '.join(repr(n) for n in names)} field: {_short(record)}")


def record_label(record: Any, position: int) -> str:
    """``"record 3 (question_id 17)"`` -- how error messages name a ground-truth record."""
    for name in ("question_id", "index", "id"):
        value = get_field(record, name, default=None)
        if value is not None:
            return f"record {position} ({name} {value!r})"
    return f"record {position}"


def align_predictions(predictions: Sequence[str | None] | Mapping[Any, str | None], records: Sequence[Any],
                      id_fields: Sequence[str] = ("question_id",), *,
                      allow_missing: bool = False) -> list[str | None]:
    """Predictions as a list aligned with ``records``.

    ``predictions`` is either a sequence in the same order as ``records`` (same length), or a mapping from the
    record id (the first of ``id_fields`` a record carries; keys are compared as strings) to the prediction.
    Extra mapping keys are ignored.  A missing prediction (an id without a key, or ``None``) raises
    ``ValueError``, unless ``allow_missing``: then it is ``None`` in the result (ScienceQA's official script
    scores a missing prediction as FAILED instead of stopping).  A non-string prediction raises ``ValueError``.
    """
    if isinstance(predictions, str):
        raise ValueError("predictions must be a sequence or a mapping of strings, not a single string")
    if isinstance(predictions, Mapping):
        by_id = {str(k): v for k, v in predictions.items()}
        out: list[str | None] = []
        missing: list[str] = []
        for record in records:
            rid = str(get_field(record, *id_fields))
            if rid not in by_id:
                missing.append(rid)
            out.append(by_id.get(rid))
        if missing and not allow_missing:
            shown = ", ".join(repr(m) for m in missing[:5]) + (" ..." if len(missing) > 5 else "")
            raise ValueError(f"{len(missing)} record(s) have no prediction: {shown}")
    else:
        out = list(predictions)
        if len(out) != len(records):
            raise ValueError(f"{len(out)} predictions for {len(records)} ground-truth records")
    for position, value in enumerate(out):
        if value is None and allow_missing:
            continue
        if not isinstance(value, str):
            raise ValueError(f"prediction for {record_label(records[position], position)} is "
                             f"{type(value).__name__}, expected str")
    return out


def apply_prompt_suffix(text: str, suffix: str) -> str:
    """``text + suffix``, unless ``text`` already ends with the suffix (LLaVA's released question files carry it)."""
    if suffix.strip() and text.rstrip().endswith(suffix.strip()):
        return text
    return text + suffix


def ratio(numerator: float, denominator: float) -> float | None:
    """``numerator / denominator``, or ``None`` when the denominator is 0.

    An empty set has no accuracy, precision or recall: ``None`` (JSON ``null``) says so, where 0.0 would read as a
    measured zero.  (The reference scripts divide by zero there: LLaVA's ``eval_pope.py`` raises, lmms-eval's POPE
    aggregates raise, sklearn warns and returns 0.)
    """
    return numerator / denominator if denominator else None


def mean_or_none(values: Sequence[float | None]) -> float | None:
    """The mean of ``values``; ``None`` if there are none or any is ``None`` (an undefined part leaves the mean
    undefined, rather than silently averaging over fewer parts)."""
    if not values or any(v is None for v in values):
        return None
    return sum(values) / len(values)  # type: ignore[arg-type]


def _short(record: Any) -> str:
    text = repr(record)
    return text if len(text) <= 120 else text[:117] + "..."
