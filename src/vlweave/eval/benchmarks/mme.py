"""MME scoring as the official ``eval_tool/calculation.py`` does it (methods.md §6 / 4.1).

* 14 subtasks: 10 perception, 4 cognition; every image has 2 yes/no questions.
* A prediction is parsed to "yes" / "no" / "other" ("other" is always wrong).
* Per subtask: ``acc`` = correct questions / questions x 100, ``acc_plus`` = images with both questions correct /
  images x 100, ``score`` = acc + acc_plus (max 200).
* ``perception`` = sum of the 10 perception subtask scores (max 2000), ``cognition`` = sum of the 4 (max 800).
  LLaVA-1.5 papers report ``perception`` (1510.7 for LLaVA-1.5-7B).

All MME numbers are in percentage points, as the official tool prints them.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

from vlweave.eval.benchmarks._common import SHORT_ANSWER_SUFFIX, align_predictions, get_field, record_label

PERCEPTION_SUBTASKS: tuple[str, ...] = (
    "existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork", "OCR",
)
COGNITION_SUBTASKS: tuple[str, ...] = (
    "commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning",
)
MME_SUBTASKS: tuple[str, ...] = PERCEPTION_SUBTASKS + COGNITION_SUBTASKS
MME_PARSERS: tuple[str, ...] = ("official", "lmms_eval")

# MME's questions end with this; LLaVA-1.5 and lmms-eval replace it with the short-answer suffix.
MME_NATIVE_SUFFIX = " Please answer yes or no."

_CANONICAL = {name.lower(): name for name in MME_SUBTASKS}


def canonical_mme_subtask(name: str) -> str:
    """The official spelling of a subtask name (case-insensitive: ``"ocr"`` -> ``"OCR"``); ValueError if unknown."""
    key = str(name).strip().lower().replace(" ", "_")
    if key not in _CANONICAL:
        raise ValueError(f"unknown MME subtask {name!r}; expected one of {', '.join(MME_SUBTASKS)}")
    return _CANONICAL[key]


def parse_mme_answer(text: str, parser: str = "official") -> str:
    """Map a generated answer to ``"yes"``, ``"no"`` or ``"other"``.

    ``official`` (MME ``eval_tool/calculation.py``, methods.md 4.1): the answer is only lower-cased -- no strip, no
    removal of "." -- so leading spaces or dots push "yes" out of view ("   yes" and "..Yes" are "other").  Exactly
    "yes"/"no" is kept; otherwise the first 4 characters decide: containing "yes" -> yes, else containing "no" ->
    no (so "nope", "not sure", "None" and "know" are "no"), else other.
    ``lmms_eval`` (lmms-eval ``tasks/mme/utils.py``): lower-case, strip and delete every "." first, then the same
    rule, plus a one-character answer "y"/"n" maps to yes/no (any other single character is "other").
    """
    if parser == "official":
        answer = text.lower()
    elif parser == "lmms_eval":
        answer = text.lower().strip().replace(".", "")
    else:
        raise ValueError(f"unknown MME parser {parser!r}; expected one of {MME_PARSERS}")
    if answer in ("yes", "no"):
        return answer
    if parser == "lmms_eval" and len(answer) == 1:
        return {"y": "yes", "n": "no"}.get(answer, "other")
    head = answer[:4]
    if "yes" in head:
        return "yes"
    if "no" in head:
        return "no"
    return "other"


def parse_mme_item(prediction: str | None, record: Any = None, parser: str = "official") -> str:
    """The per-item parse the scorer uses (``record`` is not needed: the rule reads the answer alone)."""
    return parse_mme_answer(prediction or "", parser)


def score_mme(predictions: Sequence[str] | Mapping[Any, str], records: Sequence[Any], *,
              parser: str = "official", strict: bool = True) -> dict[str, Any]:
    """Score MME predictions.

    ``records`` carry ``subtask`` (or ``category``; any case), the image (``image_name`` or ``image``) and the
    ground-truth ``answer`` ("yes"/"no", any case).  ``predictions`` are aligned with ``records`` or keyed by
    ``question_id``.  With ``strict`` every image must have exactly 2 questions (the official tool asserts this);
    without it, ``acc_plus`` counts images whose questions are all correct.  ``parser``: see
    :func:`parse_mme_answer` (default ``official``, the rule the MME leaderboard numbers were computed with).

    Returns ``perception``, ``cognition``, ``total`` (their sum), ``n_questions``, ``n_other`` (unparseable
    answers), ``complete`` (all 14 subtasks present) and ``subtasks``: per subtask ``acc``, ``acc_plus``, ``score``,
    ``n_questions``, ``n_images``, ``n_other``.  Subtasks without records are absent (and ``complete`` is False).
    """
    preds = align_predictions(predictions, records)
    # subtask -> image -> list of per-question correctness
    per_image: dict[str, dict[str, list[bool]]] = defaultdict(lambda: defaultdict(list))
    other: dict[str, int] = defaultdict(int)
    for position, (record, prediction) in enumerate(zip(records, preds)):
        subtask = canonical_mme_subtask(get_field(record, "subtask", "category"))
        image = str(get_field(record, "image_name", "image"))
        gold = str(get_field(record, "answer", "label")).strip().lower()
        if gold not in ("yes", "no"):
            raise ValueError(f"{record_label(record, position)}: MME ground truth must be yes/no, got {gold!r}")
        parsed = parse_mme_answer(prediction, parser)
        if parsed == "other":
            other[subtask] += 1
        per_image[subtask][image].append(parsed == gold)

    subtasks: dict[str, dict[str, float]] = {}
    for subtask in MME_SUBTASKS:
        images = per_image.get(subtask)
        if not images:
            continue
        if strict:
            odd = [name for name, marks in images.items() if len(marks) != 2]
            if odd:
                raise ValueError(f"MME subtask {subtask}: image {odd[0]!r} has {len(images[odd[0]])} question(s), "
                                 f"expected 2 ({len(odd)} such image(s)); pass strict=False to score a partial set")
        n_questions = sum(len(marks) for marks in images.values())
        acc = 100.0 * sum(sum(marks) for marks in images.values()) / n_questions
        acc_plus = 100.0 * sum(all(marks) for marks in images.values()) / len(images)
        subtasks[subtask] = {"acc": acc, "acc_plus": acc_plus, "score": acc + acc_plus,
                             "n_questions": n_questions, "n_images": len(images), "n_other": other[subtask]}

    perception = sum(subtasks[s]["score"] for s in PERCEPTION_SUBTASKS if s in subtasks)
    cognition = sum(subtasks[s]["score"] for s in COGNITION_SUBTASKS if s in subtasks)
    return {
        "perception": perception,
        "cognition": cognition,
        "total": perception + cognition,
        "n_questions": len(preds),
        "n_other": sum(other.values()),
        "complete": len(subtasks) == len(MME_SUBTASKS),
        "subtasks": subtasks,
    }


def llava_mme_prompt(question: str, suffix: str = SHORT_ANSWER_SUFFIX) -> str:
    """The prompt LLaVA-1.5 / lmms-eval send for an MME question: " Please answer yes or no." replaced by ``suffix``."""
    return question.strip().replace(MME_NATIVE_SUFFIX, "") + suffix
