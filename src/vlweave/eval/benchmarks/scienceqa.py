"""ScienceQA(-IMG) scoring (methods.md §6 / 4.3): option-letter extraction, accuracy overall and on the image subset.

Parsers:

* ``llava`` -- haotian-liu/LLaVA ``llava/eval/eval_science_qa.py``: newlines become ". "; the answer is the text
  itself if, stripped, it is one of the letters A-E; else its first character if the text starts with
  ``"X. "``; else the letter of ``The answer is X.`` (or, failing that, ``The answer is X``); else FAILED.
  Letters are upper-case only ("b" fails) and a letter beyond the question's choices is wrong.
* ``lmms_eval`` -- lmms-eval ``scienceqa_img``: the stripped prediction equals the target letter ignoring case, or
  it starts with an upper-case letter followed by "." and that letter is the target.

Accuracies are fractions in [0, 1].
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from vlweave.eval.benchmarks._common import align_predictions, get_field, ratio, record_label

SQA_OPTION_LETTERS = "ABCDE"
SQA_PARSERS: tuple[str, ...] = ("llava", "lmms_eval")

_ANSWER_IS_DOT = re.compile(r"The answer is ([A-E])\.")
_ANSWER_IS = re.compile(r"The answer is ([A-E])")


def extract_sqa_letter(text: str, parser: str = "llava") -> str | None:
    """The option letter a prediction names, or ``None`` (LLaVA's FAILED)."""
    if parser == "llava":
        text = text.replace("\n", ". ")
        if text.strip() in SQA_OPTION_LETTERS and len(text.strip()) == 1:
            return text.strip()
        if len(text) >= 3 and text[0] in SQA_OPTION_LETTERS and text[1:3] == ". ":
            return text[0]
        if "The answer is " in text:
            match = _ANSWER_IS_DOT.search(text) or _ANSWER_IS.search(text)
            if match:
                return match.group(1)
        return None
    if parser == "lmms_eval":
        text = text.strip()
        if len(text) == 1 and text.isalpha():
            return text.upper()
        if len(text) >= 2 and text[0].isupper() and text[1] == ".":
            return text[0]
        return None
    raise ValueError(f"unknown ScienceQA parser {parser!r}; expected one of {SQA_PARSERS}")


def _gold_letter(record: Any, position: int) -> tuple[str, int]:
    """(answer letter, number of choices) of a record; ``answer`` may be a letter or a 0-based index."""
    answer = get_field(record, "answer")
    choices = get_field(record, "choices", default=None)
    n_choices = int(get_field(record, "num_choices", default=len(choices) if choices is not None else 5))
    if isinstance(answer, bool) or not isinstance(answer, (int, str)):
        raise ValueError(f"{record_label(record, position)}: answer must be a letter or an index, got {answer!r}")
    if isinstance(answer, int):
        if not 0 <= answer < n_choices:
            raise ValueError(f"{record_label(record, position)}: answer index {answer} outside {n_choices} choices")
        return SQA_OPTION_LETTERS[answer], n_choices
    letter = answer.strip().upper()
    if len(letter) != 1 or letter not in SQA_OPTION_LETTERS[:n_choices]:
        raise ValueError(f"{record_label(record, position)}: answer {answer!r} is not one of "
                         f"{SQA_OPTION_LETTERS[:n_choices]}")
    return letter, n_choices


def score_scienceqa(predictions: Sequence[str] | Mapping[Any, str], records: Sequence[Any], *,
                    parser: str = "llava") -> dict[str, Any]:
    """Score ScienceQA predictions.

    ``records`` carry ``answer`` (letter or 0-based index), the choices (``choices`` list or ``num_choices``;
    5 assumed if neither) and whether the question has an image (``has_image``, else a non-empty ``image``).
    ``predictions`` are aligned with ``records`` or keyed by ``question_id``.

    Returns ``accuracy`` (all records), ``img_accuracy`` (image questions: the ScienceQA-IMG number),
    ``n``, ``n_img``, ``correct``, ``img_correct`` and ``n_failed`` (no letter extracted).
    """
    preds = align_predictions(predictions, records)
    correct = img_correct = n_img = failed = 0
    for position, (record, prediction) in enumerate(zip(records, preds)):
        gold, n_choices = _gold_letter(record, position)
        has_image = get_field(record, "has_image", default=None)
        if has_image is None:
            has_image = bool(get_field(record, "image", default=None))
        letter = extract_sqa_letter(prediction, parser)
        if letter is None:
            failed += 1
        # LLaVA's get_pred_idx only accepts letters among the question's choices; other letters are wrong.
        hit = letter is not None and letter in SQA_OPTION_LETTERS[:n_choices] and letter == gold
        correct += hit
        if has_image:
            n_img += 1
            img_correct += hit
    return {
        "accuracy": ratio(correct, len(preds)),
        "img_accuracy": ratio(img_correct, n_img),
        "n": len(preds),
        "n_img": n_img,
        "correct": correct,
        "img_correct": img_correct,
        "n_failed": failed,
    }
