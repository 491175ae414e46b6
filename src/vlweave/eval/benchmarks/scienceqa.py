"""ScienceQA(-IMG) scoring (methods.md §6 / 4.3): option-letter extraction, accuracy overall and on the image subset.

Parsers (``parser=``), each mapping a prediction to a letter or ``None`` (the official script's "FAILED"):

* ``llava`` (default) -- haotian-liu/LLaVA main, ``llava/eval/eval_science_qa.py``, the script LLaVA-1.5's
  ScienceQA-IMG numbers come from.  The prediction is taken *as is* (no strip, newlines kept):

  1. if it equals one of the letters ``A``-``E`` (the script's ``--options`` list), that letter;
  2. else, if it is at least 3 characters long, starts with one of those letters and continues with ``". "``,
     that first letter;
  3. else the regex ``The answer is ([A-Z]).`` is searched with ``findall``; exactly one match gives its letter
     (the "." is unescaped, so it stands for any character but a newline: "The answer is B," and even
     "The answer is Bob" give B, while "The answer is B" at the very end does not match); zero or two or more
     matches (even of the same letter) fail;
  4. else FAILED.

  Case matters throughout ("b" fails).  Steps 1-2 only know A-E, step 3 any capital.
* ``llava_lenient`` -- the rules of an unmerged haotian-liu/LLaVA pull request that vlweave used before: newlines
  become ". ", the stripped prediction may be a bare letter, the "X. " prefix as above, then the *first*
  ``The answer is X.`` (or, failing that, ``The answer is X``) with X in A-E.  Not what any published number used.
* ``lmms_eval`` -- lmms-eval ``scienceqa_img``: the stripped prediction, if it is one letter (any case), or else
  its first character if that is an upper-case letter followed by ".".

Scoring is the official script's for every parser: the letter's index among the question's choices (``A`` = 0,
...); a letter beyond the choices, or FAILED, is index -1 and wrong.  A missing prediction is FAILED -- scoring
goes on -- and, since the script decides "image question" from the prediction's prompt (``<image>`` in it) and a
missing prediction has none, it counts in ``accuracy`` but not in ``img_accuracy``.

Accuracies are fractions in [0, 1]; ``None`` over an empty set.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from vlweave.eval.benchmarks._common import align_predictions, get_field, ratio, record_label

# The official script's default --options: the letters a question's choices are labelled with.
SQA_OPTION_LETTERS = "ABCDE"
SQA_PARSERS: tuple[str, ...] = ("llava", "llava_lenient", "lmms_eval")

# Unescaped "." on purpose: the official pattern, any character after the letter.
_OFFICIAL_ANSWER_IS = re.compile(r"The answer is ([A-Z]).")
_LENIENT_ANSWER_IS_DOT = re.compile(r"The answer is ([A-E])\.")
_LENIENT_ANSWER_IS = re.compile(r"The answer is ([A-E])")


def _starts_with_letter_dot_space(text: str) -> bool:
    return len(text) >= 3 and text[0] in SQA_OPTION_LETTERS and text[1:3] == ". "


def _official_letter(text: str) -> str | None:
    if len(text) == 1 and text in SQA_OPTION_LETTERS:
        return text
    if _starts_with_letter_dot_space(text):
        return text[0]
    matches = _OFFICIAL_ANSWER_IS.findall(text)
    return matches[0] if len(matches) == 1 else None


def _lenient_letter(text: str) -> str | None:
    text = text.replace("\n", ". ")
    stripped = text.strip()
    if len(stripped) == 1 and stripped in SQA_OPTION_LETTERS:
        return stripped
    if _starts_with_letter_dot_space(text):
        return text[0]
    match = _LENIENT_ANSWER_IS_DOT.search(text) or _LENIENT_ANSWER_IS.search(text)
    return match.group(1) if match else None


def _lmms_eval_letter(text: str) -> str | None:
    text = text.strip()
    if len(text) == 1 and text.isalpha():
        return text.upper()
    if len(text) >= 2 and text[0].isupper() and text[1] == ".":
        return text[0]
    return None


_EXTRACTORS = {"llava": _official_letter, "llava_lenient": _lenient_letter, "lmms_eval": _lmms_eval_letter}


def extract_sqa_letter(text: str | None, parser: str = "llava") -> str | None:
    """The option letter a prediction names, or ``None`` (FAILED; also for a missing prediction, ``None``)."""
    if parser not in _EXTRACTORS:
        raise ValueError(f"unknown ScienceQA parser {parser!r}; expected one of {SQA_PARSERS}")
    return None if text is None else _EXTRACTORS[parser](text)


def parse_sqa_item(prediction: str | None, record: Any = None, parser: str = "llava") -> str | None:
    """The per-item parse the scorer uses: the extracted letter, ``None`` for FAILED (``record`` not needed)."""
    return extract_sqa_letter(prediction, parser)


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


def score_scienceqa(predictions: Sequence[str | None] | Mapping[Any, str | None], records: Sequence[Any], *,
                    parser: str = "llava") -> dict[str, Any]:
    """Score ScienceQA predictions.

    ``records`` carry ``answer`` (letter or 0-based index), the choices (``choices`` list or ``num_choices``;
    5 assumed if neither) and whether the question has an image (``has_image``, else a non-empty ``image``).
    ``predictions`` are aligned with ``records`` (``None`` = missing) or keyed by ``question_id`` (absent keys are
    missing); a missing prediction is FAILED (module docstring).

    Returns ``accuracy`` (all records), ``img_accuracy`` (image questions with a prediction: the ScienceQA-IMG
    number), ``n``, ``n_img``, ``correct``, ``img_correct``, ``n_failed`` (no letter: FAILED, missing ones
    included), ``n_missing`` and ``n_out_of_range`` (a letter beyond the question's choices).
    """
    if parser not in SQA_PARSERS:
        raise ValueError(f"unknown ScienceQA parser {parser!r}; expected one of {SQA_PARSERS}")
    preds = align_predictions(predictions, records, allow_missing=True)
    correct = img_correct = n_img = failed = missing = out_of_range = 0
    for position, (record, prediction) in enumerate(zip(records, preds)):
        gold, n_choices = _gold_letter(record, position)
        has_image = get_field(record, "has_image", default=None)
        if has_image is None:
            has_image = bool(get_field(record, "image", default=None))
        letter = parse_sqa_item(prediction, record, parser)
        missing += prediction is None
        failed += letter is None
        # The official get_pred_idx: only letters among this question's choices get an index; others are -1.
        in_range = letter is not None and letter in SQA_OPTION_LETTERS[:n_choices]
        out_of_range += letter is not None and not in_range
        hit = in_range and letter == gold
        correct += hit
        if has_image and prediction is not None:  # the script reads "<image>" from the prediction's prompt
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
        "n_missing": missing,
        "n_out_of_range": out_of_range,
    }
