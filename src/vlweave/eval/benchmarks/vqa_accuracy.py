"""VQAv2 / TextVQA soft accuracy with the VQA answer normalisation, and GQA exact match (methods.md §6 / 4.5-4.6).

Normalisation (official VQA eval ``vqaEval.py`` and the EvalAI processor of LLaVA's ``m4c_evaluator.py`` /
lmms-eval's ``vqa_eval_metric.py``):

* punctuation: each of ``; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? !`` is deleted when it touches a space in the
  input (or when the input has a comma between digits) and replaced by a space otherwise; then a "." not followed
  by a digit is deleted (the reference regex ``(?!<=\\d)(\\.)(?!\\d)`` -- its look-behind is mistyped, so a period
  *before* a digit survives, "3.5" and ".5" keep theirs; and ``re.UNICODE`` is passed as the ``count`` argument,
  so at most 32 periods are deleted -- both reproduced);
* digit/article: lower-case, split on whitespace, number words zero-ten (and "none") become digits, the articles
  a/an/the are dropped, and apostrophe-less contractions are restored ("dont" -> "don't");
* the EvalAI processor (:func:`normalize_vqa_answer`) first lower-cases, deletes "," and "?", splits "'s" off
  ("dog's" -> "dog 's"), and turns newlines/tabs into spaces.

Soft accuracy of one question with answers a_1..a_n (10 in VQAv2/TextVQA): for each i, count the *other* answers
equal to the prediction, score_i = min(1, count / 3); the question scores the mean of score_i.

Protocols (``parser=``):

* ``evalai`` (TextVQA: LLaVA ``eval_textvqa.py`` via ``m4c_evaluator``, lmms-eval ``textvqa``): prediction and
  every answer go through :func:`normalize_vqa_answer`.
* ``official`` (VQAv2: GT-Vision-Lab ``vqaEval.py``, what the EvalAI server runs): the prediction gets
  punctuation + digit/article processing; the answers are taken as given, except that when they disagree they get
  punctuation processing only.  :func:`score_vqav2` first passes predictions through
  :func:`normalize_vqa_answer`, as LLaVA's ``scripts/convert_vqav2_for_submission.py`` does before upload.

Accuracies are fractions in [0, 1]; ``None`` over an empty set.
"""

from __future__ import annotations

import re
import string
from collections.abc import Mapping, Sequence
from typing import Any

from vlweave.eval.benchmarks._common import align_predictions, get_field, ratio, record_label

VQA_PARSERS: tuple[str, ...] = ("official", "evalai")
GQA_PARSERS: tuple[str, ...] = ("llava", "lmms_eval")

_PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?",
                "!")
_COMMA_BETWEEN_DIGITS = re.compile(r"\d,\d")
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")
_PERIOD_STRIP_COUNT = int(re.UNICODE)  # 32: the reference passes re.UNICODE where `count` goes
_NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                 "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = frozenset({"a", "an", "the"})
# Contractions the reference tables restore, written "key=value".  Entries of the reference tables that can never
# fire (keys with capitals, which a lower-cased word cannot match, and identity entries) are left out; the
# reference's reversed "somebody'd" -> "somebodyd" is kept because it does fire.
_CONTRACTIONS = dict(pair.split("=") for pair in """
aint=ain't arent=aren't cant=can't couldve=could've couldnt=couldn't couldn'tve=couldn't've couldnt've=couldn't've
didnt=didn't doesnt=doesn't dont=don't hadnt=hadn't hadnt've=hadn't've hadn'tve=hadn't've hasnt=hasn't
havent=haven't hed=he'd hed've=he'd've he'dve=he'd've hes=he's howd=how'd howll=how'll hows=how's isnt=isn't
itd=it'd itd've=it'd've it'dve=it'd've itll=it'll maam=ma'am mightnt=mightn't mightnt've=mightn't've
mightn'tve=mightn't've mightve=might've mustnt=mustn't mustve=must've neednt=needn't notve=not've oclock=o'clock
oughtnt=oughtn't ow's'at='ow's'at 'ows'at='ow's'at 'ow'sat='ow's'at shant=shan't shed've=she'd've
she'dve=she'd've shouldve=should've shouldnt=shouldn't shouldnt've=shouldn't've shouldn'tve=shouldn't've
somebody'd=somebodyd somebodyd've=somebody'd've somebody'dve=somebody'd've somebodyll=somebody'll
somebodys=somebody's someoned=someone'd someoned've=someone'd've someone'dve=someone'd've someonell=someone'll
someones=someone's somethingd=something'd somethingd've=something'd've something'dve=something'd've
somethingll=something'll thats=that's thered=there'd thered've=there'd've there'dve=there'd've therere=there're
theres=there's theyd=they'd theyd've=they'd've they'dve=they'd've theyll=they'll theyre=they're theyve=they've
twas='twas wasnt=wasn't wed've=we'd've we'dve=we'd've weve=we've werent=weren't whatll=what'll whatre=what're
whats=what's whatve=what've whens=when's whered=where'd wheres=where's whereve=where've whod=who'd
whod've=who'd've who'dve=who'd've wholl=who'll whos=who's whove=who've whyll=why'll whyre=why're whys=why's
wont=won't wouldve=would've wouldnt=wouldn't wouldnt've=wouldn't've wouldn'tve=wouldn't've yall=y'all
yall'll=y'all'll y'allll=y'all'll yall'd've=y'all'd've y'alld've=y'all'd've y'all'dve=y'all'd've youd=you'd
youd've=you'd've you'dve=you'd've youll=you'll youre=you're youve=you've
""".split())


def vqa_process_punctuation(text: str) -> str:
    """The reference ``processPunctuation`` (see module docstring)."""
    out = text
    strip_all = _COMMA_BETWEEN_DIGITS.search(text) is not None
    for p in _PUNCTUATION:
        if strip_all or (p + " ") in text or (" " + p) in text:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_NOT_BEFORE_DIGIT.sub("", out, count=_PERIOD_STRIP_COUNT)


def vqa_process_digit_article(text: str) -> str:
    """The reference ``processDigitArticle``: number words -> digits, articles dropped, contractions restored."""
    words = [_NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def normalize_vqa_answer(text: str) -> str:
    """The EvalAI answer processor (LLaVA ``m4c_evaluator.EvalAIAnswerProcessor``, lmms-eval's copy)."""
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return vqa_process_digit_article(vqa_process_punctuation(text))


def _answer_strings(answers: Any, where: str) -> list[str]:
    if isinstance(answers, str) or not isinstance(answers, Sequence) or not answers:
        raise ValueError(f"{where}: answers must be a non-empty list, got {answers!r}")
    out = []
    for answer in answers:
        if isinstance(answer, Mapping):  # VQAv2 annotation format {"answer": ..., "answer_id": ...}
            answer = answer.get("answer")
        if not isinstance(answer, str):
            raise ValueError(f"{where}: answer {answer!r} is not a string")
        out.append(answer)
    return out


def vqa_processed_prediction(prediction: str, parser: str = "evalai") -> str:
    """The prediction as the ``parser`` protocol compares it with the answers (module docstring)."""
    if parser == "evalai":
        return normalize_vqa_answer(prediction)
    if parser == "official":
        pred = prediction.replace("\n", " ").replace("\t", " ").strip()
        return vqa_process_digit_article(vqa_process_punctuation(pred))
    raise ValueError(f"unknown VQA parser {parser!r}; expected one of {VQA_PARSERS}")


def parse_vqav2_item(prediction: str | None, record: Any = None, parser: str = "official") -> str:
    """The per-item parse :func:`score_vqav2` compares (``official``: after LLaVA's submission normalisation)."""
    text = prediction or ""
    return vqa_processed_prediction(normalize_vqa_answer(text) if parser == "official" else text, parser)


def parse_textvqa_item(prediction: str | None, record: Any = None, parser: str = "evalai") -> str:
    """The per-item parse :func:`score_textvqa` compares."""
    return vqa_processed_prediction(prediction or "", parser)


def vqa_soft_accuracy(prediction: str, answers: Sequence[str] | Sequence[Mapping[str, Any]], *,
                      parser: str = "evalai") -> float:
    """Soft accuracy in [0, 1] of one prediction against the human answers (leave-one-out, min(1, matches/3))."""
    gold = _answer_strings(answers, "vqa_soft_accuracy")
    pred = vqa_processed_prediction(prediction, parser)
    if parser == "evalai":
        gold = [normalize_vqa_answer(a) for a in gold]
    elif len(set(gold)) > 1:  # official: answers are punctuation-processed only when they disagree
        gold = [vqa_process_punctuation(a) for a in gold]
    equal = [a == pred for a in gold]
    total = sum(equal)
    return sum(min(1.0, (total - own) / 3) for own in equal) / len(gold)


def _score_vqa(preds: list[str], records: Sequence[Any], parser: str) -> dict[str, Any]:
    scores: list[float] = []
    by_type: dict[str, list[float]] = {}
    for position, (record, prediction) in enumerate(zip(records, preds)):
        answers = _answer_strings(get_field(record, "answers"), record_label(record, position))
        score = vqa_soft_accuracy(prediction, answers, parser=parser)
        scores.append(score)
        answer_type = get_field(record, "answer_type", default=None)
        if answer_type is not None:
            by_type.setdefault(str(answer_type), []).append(score)
    result: dict[str, Any] = {"accuracy": ratio(sum(scores), len(scores)), "n": len(scores)}
    if by_type:
        result["answer_types"] = {t: {"accuracy": ratio(sum(v), len(v)), "n": len(v)}
                                  for t, v in sorted(by_type.items())}
    return result


def score_vqav2(predictions: Sequence[str] | Mapping[Any, str], records: Sequence[Any], *,
                parser: str = "official") -> dict[str, Any]:
    """VQAv2 accuracy.  ``records`` carry ``answers`` (strings or ``{"answer": ...}`` dicts) and optionally
    ``answer_type``; returns ``accuracy``, ``n`` and, with answer types, ``answer_types``.

    ``official``: predictions go through :func:`normalize_vqa_answer` (LLaVA's submission conversion), then the
    official ``vqaEval.py`` protocol; ``evalai``: the TextVQA protocol.
    """
    preds = align_predictions(predictions, records)
    if parser == "official":
        preds = [normalize_vqa_answer(p) for p in preds]
    return _score_vqa(preds, records, parser)


def score_textvqa(predictions: Sequence[str] | Mapping[Any, str], records: Sequence[Any], *,
                  parser: str = "evalai") -> dict[str, Any]:
    """TextVQA accuracy (``evalai`` protocol by default).

    ``records`` carry ``answers``; returns ``accuracy`` and ``n``.
    """
    return _score_vqa(align_predictions(predictions, records), records, parser)


_ALL_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize_gqa_answer(text: str, parser: str = "llava") -> str:
    """``llava``: strip, drop trailing "." and lower-case (LLaVA ``scripts/convert_gqa_for_eval.py``);
    ``lmms_eval``: strip, lower-case, delete all ASCII punctuation (``exact_match`` with ignore_case and
    ignore_punctuation)."""
    if parser == "llava":
        return text.strip().rstrip(".").lower()
    if parser == "lmms_eval":
        return text.strip().lower().translate(_ALL_PUNCTUATION)
    raise ValueError(f"unknown GQA parser {parser!r}; expected one of {GQA_PARSERS}")


def parse_gqa_item(prediction: str | None, record: Any = None, parser: str = "llava") -> str:
    """The per-item parse :func:`score_gqa` compares."""
    return normalize_gqa_answer(prediction or "", parser)


def score_gqa(predictions: Sequence[str] | Mapping[Any, str], records: Sequence[Any], *,
              parser: str = "llava") -> dict[str, Any]:
    """GQA exact-match accuracy; ``records`` carry ``answer``.  Returns ``accuracy``, ``n``, ``correct``.

    ``llava`` compares the normalised prediction with the gold answer *as given* (the official ``eval.py`` does a
    plain string comparison; GQA's answers are already lower-case); ``lmms_eval`` normalises both sides.
    """
    preds = align_predictions(predictions, records)
    correct = 0
    for position, (record, prediction) in enumerate(zip(records, preds)):
        gold = get_field(record, "answer")
        if not isinstance(gold, str):
            raise ValueError(f"{record_label(record, position)}: GQA answer must be a string, got {gold!r}")
        if parser == "lmms_eval":
            gold = normalize_gqa_answer(gold, parser)
        correct += normalize_gqa_answer(prediction, parser) == gold
    return {"accuracy": ratio(correct, len(preds)), "n": len(preds), "correct": correct}
