"""POPE scoring (methods.md §6 / 4.2): confusion matrix with "yes" as the positive class, per split and pooled.

Two answer parsers:

* ``llava`` -- haotian-liu/LLaVA ``llava/eval/eval_pope.py``: keep the text before the first "."; drop commas; split
  on single spaces; if a word is exactly ``No``, ``not`` or ``no`` the answer is "no", otherwise "yes".  So every
  answer is yes or no, and unparseable ones ("", "Maybe", "NO", "Not sure") count as *yes*.
* ``lmms_eval`` -- lmms-eval ``tasks/pope/utils.py``: lower-cased and stripped, the answer must be exactly "yes"
  or "no"; anything else is "other": wrong for accuracy and neither positive nor negative for precision/recall.

``yes_ratio`` is always the share of *predictions* parsed as yes (LLaVA's definition).  lmms-eval's
``pope_yes_ratio`` reports the share of yes *labels* instead; that number is given as ``label_yes_ratio``.
Ratios are fractions in [0, 1]; a metric whose denominator is 0 is 0.0.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from vlweave.eval.benchmarks._common import align_predictions, get_field, ratio, record_label

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


def pope_metrics(parsed: Sequence[str], labels: Sequence[str]) -> dict[str, float]:
    """Accuracy, precision, recall, F1, yes-ratio (+ TP/FP/TN/FN counts) of parsed answers against yes/no labels."""
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
        "f1": ratio(2 * precision * recall, precision + recall),
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
    TinyLLaVA mean accuracy), and ``n_splits``.
    """
    preds = align_predictions(predictions, records)
    parsed = [parse_pope_answer(p, parser) for p in preds]
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
        "mean_f1": ratio(sum(m["f1"] for m in splits.values()), len(splits)),
        "mean_accuracy": ratio(sum(m["accuracy"] for m in splits.values()), len(splits)),
        "n_splits": len(splits),
    }
