"""MMBench CircularEval scoring (methods.md §6 / 4.4) and the circular rotations of a multiple-choice question.

A question with N options is asked N times with its options circularly shifted; in the distributed TSVs the copies
have ``index + k * 10**6`` and the ``index < 10**6`` row is the main question.  A main question scores 1 only if
*every* copy present is answered correctly.

The choice of each copy is extracted by rules only: no GPT judge, so a copy the rules cannot resolve is wrong (as in
VLMEvalKit's exact-matching mode, which records it as "Z").  Parsers (``parser=``):

* ``vlmevalkit`` (default) -- VLMEvalKit ``vlmeval/utils/matching_util.py`` ``can_infer`` (revision 18fc37a), the
  official MMBench evaluator:

  1. an answer containing one of VLMEvalKit's refusal phrases ("Cannot determine the answer", ...) is "Z";
  2. option letter: the characters ``.()[],:;!*#{}`` become spaces, the text is split on whitespace; if exactly
     one of the question's option letters is a whole token, that letter (upper-case only: "a" is a word).  The
     "A might be a quantifier" check (``A`` with more than 3 tokens -> give up) runs only with ``VERBOSE`` set,
     so by default "A dog is sitting on the mat" picks A;
  3. no option letter at all but a standalone "Z" token -> "Z";
  4. otherwise option text: if exactly one option's text occurs in the answer (both lower-cased), that option;
  5. otherwise unresolved (``None``).

  Later VLMEvalKit revisions add further checks (the letter must be among the last few tokens; answers much longer
  than the options skip text matching); they are not what this parser follows.
* ``lmms_eval`` -- lmms-eval ``lmms_eval/tasks/mmbench/mmbench_evals.py`` (``MMBench_Evaluator.can_infer``): the
  letters are always A-E (whatever the question's options), the text is split on whitespace *without* removing
  punctuation, and the quantifier check is always on:

  1. exactly one bare letter token -> that letter, except when it is ``A`` and there are more than 3 tokens;
  2. else the decorated forms ``X.``, ``X,``, ``X:``, ``X)``, ``X).``, ``(X)``, ``(X).``, ``:X``, ``:X,``,
     ``:X.``, ``:X)``, ``:X).`` in this order: the first form that exactly one letter takes gives that letter;
  3. else option text as above; else unresolved.

  So "A dog is sitting on the mat" falls through to text matching, "[B]" and "**B**" are unresolved, "B, C" is C,
  and "E" on a four-option question is E (wrong).

Accuracies are fractions in [0, 1]; ``None`` over an empty set.
"""

from __future__ import annotations

import dataclasses
import string
from collections.abc import Mapping, Sequence
from typing import Any

from vlweave.eval.benchmarks._common import (
    MULTIPLE_CHOICE_SUFFIX, align_predictions, get_field, ratio, record_label,
)

CIRCULAR_OFFSET = 1_000_000
MMBENCH_PARSERS: tuple[str, ...] = ("vlmevalkit", "lmms_eval")

# VLMEvalKit's can_infer_option: answers containing these are refusals, parsed as "Z" (never correct).
_REFUSALS: tuple[str, ...] = (
    "Sorry, I can't help with images of people yet.",
    "I can't process this file.",
    "I'm sorry, but without the image provided",
    "Cannot determine the answer",
)
# The judge-failure marker both harnesses check: its option-letter step gives up, text matching still runs.
_API_FAILURE = "Failed to obtain answer via API"
_DECORATIONS = str.maketrans({c: " " for c in ".()[],:;!*#{}"})
# lmms-eval's letter set: can_infer_option's default num_choice=5, independent of the question's options.
_LMMS_EVAL_LETTERS = "ABCDE"
# lmms-eval's (prefix, suffix) forms, tried in this order.
_LMMS_EVAL_FORMS: tuple[tuple[str, str], ...] = (
    ("", "."), ("", ","), ("", ":"), ("", ")"), ("", ")."), ("(", ")"), ("(", ")."),
    (":", ""), (":", ","), (":", "."), (":", ")"), (":", ")."),
)


def circular_group(index: int) -> int:
    """The main-question index of a (possibly circular-copy) MMBench row: ``index mod 10**6``."""
    return int(index) % CIRCULAR_OFFSET


def _option_text_choice(text: str, options: Mapping[str, str]) -> str | None:
    """The one option whose (lower-cased) text occurs in the lower-cased answer, else ``None``."""
    lowered = text.lower()
    # An empty option text would occur in every answer; the TSV reader never yields one (an empty cell is a
    # missing option, as pandas' NaN is for VLMEvalKit).
    matches = [letter for letter, option in options.items()
               if str(option) != "" and str(option).lower() in lowered]
    return matches[0] if len(matches) == 1 else None


def _vlmevalkit_choice(text: str, options: Mapping[str, str]) -> str | None:
    if _API_FAILURE not in text:
        if any(phrase in text for phrase in _REFUSALS):
            return "Z"
        tokens = text.translate(_DECORATIONS).split()
        letters = [letter for letter in options if letter in tokens]
        if len(letters) == 1:
            return letters[0]
        if not letters and "Z" in tokens:
            return "Z"  # VLMEvalKit's "none of the options" letter: resolved, and wrong
    return _option_text_choice(text, options)


def _lmms_eval_choice(text: str, options: Mapping[str, str]) -> str | None:
    if _API_FAILURE not in text:
        tokens = text.split()
        bare = [letter for letter in _LMMS_EVAL_LETTERS if letter in tokens]
        if len(bare) == 1 and not ("A" in tokens and len(tokens) > 3):
            return bare[0]
        for prefix, suffix in _LMMS_EVAL_FORMS:
            hits = [letter for letter in _LMMS_EVAL_LETTERS if prefix + letter + suffix in tokens]
            if len(hits) == 1:
                return hits[0]
    return _option_text_choice(text, options)


_EXTRACTORS = {"vlmevalkit": _vlmevalkit_choice, "lmms_eval": _lmms_eval_choice}


def extract_mmbench_choice(text: str, options: Mapping[str, str], parser: str = "vlmevalkit") -> str | None:
    """The letter an answer picks (module docstring), ``"Z"`` (VLMEvalKit: a refusal or a bare "Z"), or ``None``.

    The result may be a letter outside ``options`` (lmms-eval's letters are always A-E); the scorer counts it
    wrong.
    """
    if parser not in _EXTRACTORS:
        raise ValueError(f"unknown MMBench parser {parser!r}; expected one of {MMBENCH_PARSERS}")
    return _EXTRACTORS[parser](text, options)


def parse_mmbench_item(prediction: str | None, record: Any, parser: str = "vlmevalkit") -> str | None:
    """The per-item parse the scorer uses: :func:`extract_mmbench_choice` with the record's ``options``."""
    return extract_mmbench_choice(prediction or "", dict(get_field(record, "options")), parser)


def _option_items(options: Mapping[str, str] | Sequence[str]) -> list[str]:
    if isinstance(options, Mapping):
        return [options[k] for k in sorted(options)]
    return list(options)


def circular_rotations(options: Mapping[str, str] | Sequence[str],
                       answer: str | None) -> list[tuple[dict[str, str], str | None]]:
    """The N circular versions of an N-option question, as ``(options, answer_letter)`` pairs.

    Version k presents the option texts shifted left by k (``texts[k:] + texts[:k]``, relabelled A, B, ...), as
    haotian-liu/LLaVA ``model_vqa_mmbench.py --all-rounds`` does; the answer letter follows its text.  Version 0 is
    the original.  ``options`` is a letter -> text mapping (taken in letter order) or a list of texts;
    ``answer`` may be ``None`` (test split).
    """
    texts = _option_items(options)
    n = len(texts)
    if n == 0:
        raise ValueError("a multiple-choice question needs at least one option")
    letters = string.ascii_uppercase[:n]
    answer_pos = None
    if answer is not None:
        answer_pos = letters.find(answer.strip().upper()) if len(answer.strip()) == 1 else -1
        if answer_pos < 0:
            raise ValueError(f"answer {answer!r} is not one of the option letters {letters}")
    versions = []
    for k in range(n):
        shifted = texts[k:] + texts[:k]
        new_answer = None if answer_pos is None else letters[(answer_pos - k) % n]
        versions.append((dict(zip(letters, shifted)), new_answer))
    return versions


def expand_circular(records: Sequence[Any]) -> list[Any]:
    """Add the missing circular copies (``index + k * 10**6``, rotated options and answer) of main questions.

    For TSVs that hold only main questions.  Records are dataclasses (copied with ``dataclasses.replace``) or
    dicts, with ``index``, ``options`` and ``answer``; groups that already have copies are left as they are.
    """
    groups: dict[int, list[Any]] = {}
    for record in records:
        groups.setdefault(circular_group(get_field(record, "index")), []).append(record)
    out: list[Any] = []
    for group, members in groups.items():
        out.extend(members)
        if len(members) > 1:
            continue
        main = members[0]
        versions = circular_rotations(get_field(main, "options"), get_field(main, "answer", default=None))
        for k, (options, answer) in enumerate(versions[1:], start=1):
            changes = {"index": group + k * CIRCULAR_OFFSET, "options": options, "answer": answer}
            if isinstance(main, Mapping):
                out.append({**main, **changes})
            else:
                out.append(dataclasses.replace(main, **changes))
    return out


def build_multiple_choice_prompt(question: str, options: Mapping[str, str], hint: str | None = None,
                                 suffix: str = MULTIPLE_CHOICE_SUFFIX) -> str:
    """LLaVA's MMBench prompt: optional hint line, question, ``"A. <option>"`` lines, then ``suffix``."""
    text = f"{hint}\n{question}" if hint else question
    for letter in sorted(options):
        text += f"\n{letter}. {options[letter]}"
    return text + suffix


def score_mmbench(predictions: Sequence[str] | Mapping[Any, str], records: Sequence[Any], *,
                  parser: str = "vlmevalkit") -> dict[str, Any]:
    """Circular accuracy of MMBench predictions (rule-based choice extraction, no judge).

    ``records`` (main questions and their circular copies) carry ``index``, ``options`` (letter -> text),
    ``answer`` (letter), ``category`` and optionally ``l2_category``; a group takes its categories from its main
    question (else its first copy).  ``predictions`` are aligned with ``records`` or keyed by ``index``.

    ``parser``: ``vlmevalkit`` (default) or ``lmms_eval`` (module docstring).

    Returns ``accuracy`` (circular, over main questions), ``copy_accuracy`` (over single copies, not circular),
    ``n_questions``, ``n_copies``, ``n_unresolved`` (copies whose choice could not be extracted), ``n_invalid``
    (copies parsed to a letter that is not one of their options: VLMEvalKit's "Z", lmms-eval's E), and per-group
    breakdowns ``categories`` and ``l2_categories`` (``{name: {"accuracy", "n"}}``; the latter only when records
    carry ``l2_category``).
    """
    if parser not in MMBENCH_PARSERS:
        raise ValueError(f"unknown MMBench parser {parser!r}; expected one of {MMBENCH_PARSERS}")
    preds = align_predictions(predictions, records, id_fields=("index", "question_id"))
    hits: dict[int, list[bool]] = {}
    meta: dict[int, tuple[int, Any, Any]] = {}
    unresolved = invalid = copies_right = 0
    for position, (record, prediction) in enumerate(zip(records, preds)):
        index = int(get_field(record, "index"))
        options = dict(get_field(record, "options"))
        answer = get_field(record, "answer", default=None)
        if answer is None:
            raise ValueError(f"{record_label(record, position)}: no ground-truth answer (MMBench test-split "
                             "predictions are scored by the OpenCompass server)")
        answer = str(answer).strip().upper()
        if answer not in options:
            raise ValueError(f"{record_label(record, position)}: answer {answer!r} is not one of the options "
                             f"{''.join(sorted(options))}")
        choice = extract_mmbench_choice(prediction, options, parser)
        unresolved += choice is None
        invalid += choice is not None and choice not in options
        hit = choice == answer
        copies_right += hit
        group = circular_group(index)
        hits.setdefault(group, []).append(hit)
        rank = 0 if index == group else 1  # prefer the main question's categories
        if group not in meta or rank < meta[group][0]:
            meta[group] = (rank, get_field(record, "category", default=None),
                           get_field(record, "l2_category", default=None))

    solved = {group: all(marks) for group, marks in hits.items()}
    result: dict[str, Any] = {
        "accuracy": ratio(sum(solved.values()), len(solved)),
        "copy_accuracy": ratio(copies_right, len(preds)),
        "n_questions": len(solved),
        "n_copies": len(preds),
        "n_unresolved": unresolved,
        "n_invalid": invalid,
        "categories": _breakdown(solved, {g: m[1] for g, m in meta.items()}),
    }
    if any(m[2] is not None for m in meta.values()):
        result["l2_categories"] = _breakdown(solved, {g: m[2] for g, m in meta.items()})
    return result


def _breakdown(solved: Mapping[int, bool], names: Mapping[int, Any]) -> dict[str, dict[str, float]]:
    groups: dict[str, list[bool]] = {}
    for group, ok in solved.items():
        if names.get(group) is not None:
            groups.setdefault(str(names[group]), []).append(ok)
    return {name: {"accuracy": ratio(sum(marks), len(marks)), "n": len(marks)}
            for name, marks in sorted(groups.items())}
