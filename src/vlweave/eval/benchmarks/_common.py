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


def align_predictions(predictions: Sequence[str] | Mapping[Any, str], records: Sequence[Any],
                      id_fields: Sequence[str] = ("question_id",)) -> list[str]:
    """Predictions as a list aligned with ``records``.

    ``predictions`` is either a sequence in the same order as ``records`` (same length), or a mapping from the
    record id (the first of ``id_fields`` a record carries; keys are compared as strings) to the prediction.
    A missing prediction or a non-string one raises ``ValueError``; extra mapping keys are ignored.
    """
    if isinstance(predictions, str):
        raise ValueError("predictions must be a sequence or a mapping of strings, not a single string")
    if isinstance(predictions, Mapping):
        by_id = {str(k): v for k, v in predictions.items()}
        out: list[str] = []
        missing: list[str] = []
        for record in records:
            rid = str(get_field(record, *id_fields))
            if rid not in by_id:
                missing.append(rid)
            else:
                out.append(by_id[rid])
        if missing:
            shown = ", ".join(repr(m) for m in missing[:5]) + (" ..." if len(missing) > 5 else "")
            raise ValueError(f"{len(missing)} record(s) have no prediction: {shown}")
    else:
        out = list(predictions)
        if len(out) != len(records):
            raise ValueError(f"{len(out)} predictions for {len(records)} ground-truth records")
    for position, value in enumerate(out):
        if not isinstance(value, str):
            raise ValueError(f"prediction for {record_label(records[position], position)} is "
                             f"{type(value).__name__}, expected str")
    return out


def apply_prompt_suffix(text: str, suffix: str) -> str:
    """``text + suffix``, unless ``text`` already ends with the suffix (LLaVA's released question files carry it)."""
    if suffix.strip() and text.rstrip().endswith(suffix.strip()):
        return text
    return text + suffix


def ratio(numerator: float, denominator: float) -> float:
    """``numerator / denominator``, or 0.0 when the denominator is 0 (lmms-eval's convention for empty sets)."""
    return numerator / denominator if denominator else 0.0


def _short(record: Any) -> str:
    text = repr(record)
    return text if len(text) <= 120 else text[:117] + "..."
