"""POPE scoring (methods.md §6 / 4.2): confusion matrix with "yes" as the positive class, per split and pooled.

Two answer parsers:

* ``llava`` -- haotian-liu/LLaVA ``llava/eval/eval_pope.py``: keep the text before the first "."; drop commas; split
  on single spaces; if a word is exactly ``No``, ``not`` or ``no`` the answer is "no", otherwise "yes".  So every
  answer is yes or no, and unparseable ones ("", "Maybe", "NO", "Not sure") count as *yes*.
* ``lmms_eval`` -- lmms-eval ``tasks/pope/utils.py``: lower-cased and stripped, the answer must be exactly "yes"
  or "no"; anything else is "other": wrong for accuracy and neither positive nor negative for precision/recall.

``yes_ratio`` is always the share of *predictions* parsed as yes (LLaVA's definition).  lmms-eval's
``pope_yes_ratio`` reports the share of yes *labels* instead; that number is given as ``label_yes_ratio``.
Ratios are fractions in [0, 1].  A ratio whose denominator is 0 is ``None`` (JSON ``null``), not 0: precision
without a single "yes" prediction, recall without a single "yes" label, accuracy of an empty set.  F1 is ``None``
when precision or recall is, and 0.0 when both are 0.  (LLaVA's ``eval_pope.py`` and lmms-eval's aggregates divide
by zero in these cases.)  ``mean_f1`` / ``mean_accuracy`` are ``None`` when any split's value is.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from vlweave.eval.benchmarks._common import align_predictions, get_field, mean_or_none, ratio, record_label

POPE_SPLITS: tuple[str, ...] = ("adversarial", "popular", "random")
POPE_PARSERS: tuple[str, ...] = ("llava", "lmms_eval")


def parse_pope_answer(text: str, parser: str = "llava") -> str:
    """``"yes"``, ``"no"`` or (``lmms_eval`` parser only) ``"other"``."""
    if parser == "llava":
        first = text.split(".")[0]
        words = first.replace(",", "").split(" ")
        return "no" if ("No" in words or "not" in words or "no" in words) else "yes"
    if parser == "lmms_eval":
        answer = text.lower().strip()
        return answer if answer in ("yes", "no") else "other"
    raise ValueError(f"unknown POPE parser {parser!r}; expected one of {POPE_PARSERS}")


def parse_pope_item(prediction: str | None, record: Any = None, parser: str = "llava") -> str:
    """The per-item parse the scorer uses (``record`` is not needed)."""
    return parse_pope_answer(prediction or "", parser)


def _f1(precision: float | None, recall: float | None) -> float | None:
    if precision is None or recall is None:
        return None
    # Both 0 (no true positive, but yes predictions and yes labels exist): the harmonic mean's limit, 0.
    return 2 * precision * recall / (precision + recall) if precision + recall else 0.0


def pope_metrics(parsed: Sequence[str], labels: Sequence[str]) -> dict[str, float | int | None]:
    """Accuracy, precision, recall, F1, yes-ratio (+ TP/FP/TN/FN counts) of parsed answers against yes/no labels;
    ``None`` where a denominator is 0 (module docstring)."""
    if len(parsed) != len(labels):
        raise ValueError(f"{len(parsed)} parsed answers for {len(labels)} labels")
    tp = fp = tn = fn = 0
    for answer, label in zip(parsed, labels):
        if answer == "yes":
            tp += label == "yes"
            fp += label == "no"
        elif answer == "no":
            tn += label == "no"
            fn += label == "yes"
    n = len(labels)
    precision = ratio(tp, tp + fp)
    recall = ratio(tp, tp + fn)
    return {
        "accuracy": ratio(tp + tn, n),
        "precision": precision,
        "recall": recall,
        "f1": _f1(precision, recall),
        "yes_ratio": ratio(sum(a == "yes" for a in parsed), n),
        "label_yes_ratio": ratio(sum(label == "yes" for label in labels), n),
        "tp": tp, "fp": fp, "tn": tn, "fn": fn,
        "n": n,
        "n_other": sum(a not in ("yes", "no") for a in parsed),
    }


def score_pope(predictions: Sequence[str] | Mapping[Any, str], records: Sequence[Any], *,
               parser: str = "llava") -> dict[str, Any]:
    """Score POPE predictions per split and pooled.

    ``records`` carry the yes/no ``label`` (or ``answer``) and the split in ``split`` or ``category``
    (adversarial / popular / random; records without one are only pooled).  ``predictions`` are aligned with
    ``records`` or keyed by ``question_id``.

    Returns ``splits`` (per split: the :func:`pope_metrics` dict), ``pooled`` (all records together, as lmms-eval's
    ``pope`` task), ``mean_f1`` and ``mean_accuracy`` over the splits present (LLaVA-1.5 tables report mean F1,
    TinyLLaVA mean accuracy; ``None`` without splits or when a split's value is ``None``), and ``n_splits``.
    """
    preds = align_predictions(predictions, records)
    parsed = [parse_pope_item(p, None, parser) for p in preds]
    labels: list[str] = []
    groups: dict[str, list[int]] = {}
    for position, record in enumerate(records):
        label = str(get_field(record, "label", "answer", default="")).strip().lower()
        if label not in ("yes", "no"):
            raise ValueError(f"{record_label(record, position)}: POPE label must be yes/no, got {label!r}")
        labels.append(label)
        split = get_field(record, "split", "category", default=None)
        if split is not None:
            groups.setdefault(str(split), []).append(position)
    splits = {name: pope_metrics([parsed[i] for i in idx], [labels[i] for i in idx])
              for name, idx in sorted(groups.items())}
    return {
        "splits": splits,
        "pooled": pope_metrics(parsed, labels),
        "mean_f1": mean_or_none([m["f1"] for m in splits.values()]),
        "mean_accuracy": mean_or_none([m["accuracy"] for m in splits.values()]),
        "n_splits": len(splits),
    }
