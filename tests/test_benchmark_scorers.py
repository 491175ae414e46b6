"""Benchmark scorers (vlweave.eval.benchmarks): answer parsing edge cases and hand-computed metrics.

Every expected number is worked out by hand in the comments next to it, not taken from the implementation.
"""

from __future__ import annotations

import pytest

from vlweave.eval.benchmarks import (
    COGNITION_SUBTASKS, MULTIPLE_CHOICE_SUFFIX, PERCEPTION_SUBTASKS, SCORERS, SHORT_ANSWER_SUFFIX,
    apply_prompt_suffix, build_multiple_choice_prompt, canonical_mme_subtask, circular_group, circular_rotations,
    expand_circular, extract_mmbench_choice, extract_sqa_letter, get_benchmark, llava_mme_prompt,
    normalize_gqa_answer, normalize_vqa_answer, parse_benchmark, parse_mme_answer, parse_pope_answer, pope_metrics,
    score_benchmark, score_gqa, score_mmbench, score_mme, score_pope, score_scienceqa, score_textvqa, score_vqav2,
    vqa_process_punctuation, vqa_soft_accuracy,
)

# ================================================================================================================
# MME
# ================================================================================================================

# Official rule (eval_tool/calculation.py): lower-case only -- no strip, no "." removal -- then exactly yes/no, else
# the first 4 characters: "yes" in them -> yes, else "no" in them -> no, else other.  Each row is worked out from
# that rule; the comments show the 4-character window.
MME_OFFICIAL_TABLE = [
    ("yes", "yes"),
    ("Yes", "yes"),                      # case is folded
    ("YES!", "yes"),                     # "yes!"
    ("yes.", "yes"),                     # "yes."
    ("Yes, there is a dog.", "yes"),     # "yes,"
    ("No", "no"),
    ("No.", "no"),
    ("no, there is not.", "no"),
    (" yes", "yes"),                     # " yes": one leading space still leaves "yes" in view
    ("  yes", "other"),                  # "  ye": no strip
    ("   yes", "other"),                 # "   y"
    ("..Yes", "other"),                  # "..ye": dots are not removed
    (".yes", "yes"),                     # ".yes"
    ("  No.  ", "no"),                   # "  no"
    ("   no", "other"),                  # "   n"
    ("\nYes", "yes"),                    # "\nyes"
    ("Yes\n", "yes"),                    # "yes\n" (the eval-tool file lines end so)
    ("not sure", "no"),                  # "not "
    ("None", "no"),                      # "none"
    ("nope", "no"),
    ("Know", "no"),                      # "know" contains "no"
    ("Unknown", "other"),                # "unkn"
    ("nyes", "yes"),                     # "yes" is looked for before "no"
    ("noyes", "no"),                     # "noye": no "yes" in the window
    ("I think yes", "other"),            # "i th": only the first 4 characters count
    ("There is a dog.", "other"),
    ("", "other"),
    ("y", "other"),                      # no single-letter rule
    ("n", "other"),
]


@pytest.mark.parametrize("text, expected", MME_OFFICIAL_TABLE)
def test_mme_official_parser(text: str, expected: str):
    assert parse_mme_answer(text, "official") == expected
    assert parse_mme_answer(text) == expected  # the default


# lmms-eval (tasks/mme/utils.py): lower-case, strip, delete every "." first; one-character "y"/"n" -> yes/no.
@pytest.mark.parametrize("text, expected", [
    ("   yes", "yes"), ("..Yes", "yes"), ("  No.  ", "no"), ("   no", "no"),
    ("y", "yes"), ("N", "no"), ("n.", "no"), ("Y.", "yes"), ("x", "other"), ("Yes", "yes"),
    ("I think yes", "other"), ("", "other"), ("Unknown", "other"),
])
def test_mme_lmms_eval_parser(text: str, expected: str):
    assert parse_mme_answer(text, "lmms_eval") == expected


def test_mme_unknown_parser_and_subtask():
    with pytest.raises(ValueError, match="parser"):
        parse_mme_answer("yes", "vlmevalkit")
    assert canonical_mme_subtask("ocr") == "OCR"
    assert canonical_mme_subtask("Code_Reasoning") == "code_reasoning"
    with pytest.raises(ValueError, match="unknown MME subtask"):
        canonical_mme_subtask("counting")


def _mme(subtask: str, image: str, answer: str) -> dict:
    return {"subtask": subtask, "image_name": image, "answer": answer}


MME_RECORDS = [
    # existence: img1 both right; img2 one right
    _mme("existence", "1.jpg", "Yes"), _mme("existence", "1.jpg", "No"),
    _mme("existence", "2.jpg", "Yes"), _mme("existence", "2.jpg", "No"),
    # OCR (lower-case name on purpose): nothing parseable under the official parser
    _mme("ocr", "3.jpg", "Yes"), _mme("ocr", "3.jpg", "No"),
    # cognition: both right
    _mme("code_reasoning", "4.png", "yes"), _mme("code_reasoning", "4.png", "no"),
]
MME_PREDICTIONS = [
    "Yes, there is", "No.",
    "not sure", "No",
    "", "n",
    "YES.", "  no  ",     # "  no" in the official window
]


def test_mme_scores_by_hand():
    result = score_mme(MME_PREDICTIONS, MME_RECORDS)
    existence = result["subtasks"]["existence"]
    # 3 of 4 questions right -> acc 75; 1 of 2 images fully right -> acc+ 50; score 125
    assert existence["acc"] == pytest.approx(75.0)
    assert existence["acc_plus"] == pytest.approx(50.0)
    assert existence["score"] == pytest.approx(125.0)
    assert (existence["n_questions"], existence["n_images"], existence["n_other"]) == (4, 2, 0)
    # OCR: "" and "n" are both "other" -> 0 + 0
    assert result["subtasks"]["OCR"]["score"] == 0.0
    assert result["subtasks"]["OCR"]["n_other"] == 2
    assert result["subtasks"]["code_reasoning"]["score"] == pytest.approx(200.0)
    assert result["perception"] == pytest.approx(125.0)   # 125 + 0
    assert result["cognition"] == pytest.approx(200.0)
    assert result["total"] == pytest.approx(325.0)
    assert result["n_questions"] == 8 and result["n_other"] == 2
    assert result["complete"] is False
    assert set(result["subtasks"]) == {"existence", "OCR", "code_reasoning"}


def test_mme_lmms_eval_parser_changes_only_single_letters_here():
    result = score_mme(MME_PREDICTIONS, MME_RECORDS, parser="lmms_eval")
    # "n" is now "no" (right), "" still other: OCR acc 50, acc+ 0
    assert result["subtasks"]["OCR"]["acc"] == pytest.approx(50.0)
    assert result["subtasks"]["OCR"]["acc_plus"] == 0.0
    assert result["perception"] == pytest.approx(175.0)  # 125 + 50


# Spaces, dots and single letters: where the official rule and lmms-eval's part ways.
MME_TRAP_RECORDS = [
    _mme("color", "a.jpg", "Yes"), _mme("color", "a.jpg", "No"),
    _mme("color", "b.jpg", "Yes"), _mme("color", "b.jpg", "No"),
    _mme("color", "c.jpg", "Yes"), _mme("color", "c.jpg", "No"),
    _mme("text_translation", "d.png", "Yes"), _mme("text_translation", "d.png", "No"),
]
MME_TRAP_PREDICTIONS = ["   Yes", "No", "Yes", "...No", "Yes.", "No.", "y", "n"]


def test_mme_official_acc_and_acc_plus_by_hand():
    result = score_mme(MME_TRAP_PREDICTIONS, MME_TRAP_RECORDS)
    color = result["subtasks"]["color"]
    # official: "   Yes" -> other ("   y"), "...No" -> other ("...n"); 4 of 6 right -> acc 66.67;
    # only image c has both right -> acc+ 1/3 = 33.33; score 100
    assert color["acc"] == pytest.approx(400 / 6)
    assert color["acc_plus"] == pytest.approx(100 / 3)
    assert color["score"] == pytest.approx(100.0)
    assert color["n_other"] == 2
    # "y" / "n" are other under the official rule: text_translation 0 + 0
    assert result["subtasks"]["text_translation"]["score"] == 0.0
    assert (result["perception"], result["cognition"], result["n_other"]) == (pytest.approx(100.0), 0.0, 4)


def test_mme_lmms_eval_acc_and_acc_plus_by_hand():
    result = score_mme(MME_TRAP_PREDICTIONS, MME_TRAP_RECORDS, parser="lmms_eval")
    # stripped and dot-free, every colour answer parses right: 100 + 100; "y"/"n" -> yes/no: 100 + 100
    assert result["subtasks"]["color"]["score"] == pytest.approx(200.0)
    assert result["subtasks"]["text_translation"]["score"] == pytest.approx(200.0)
    assert (result["perception"], result["cognition"], result["n_other"]) == (pytest.approx(200.0), 200.0, 0)


def test_mme_maximum_scores():
    records, predictions = [], []
    for subtask in PERCEPTION_SUBTASKS + COGNITION_SUBTASKS:
        records += [_mme(subtask, "x.png", "yes"), _mme(subtask, "x.png", "no")]
        predictions += ["Yes", "No"]
    result = score_mme(predictions, records)
    assert result["perception"] == pytest.approx(2000.0)  # 10 x 200
    assert result["cognition"] == pytest.approx(800.0)    # 4 x 200
    assert result["complete"] is True


def test_mme_strict_pairs_and_partial_sets():
    records = [_mme("color", "a.jpg", "yes"), _mme("color", "a.jpg", "no"), _mme("color", "b.jpg", "yes")]
    with pytest.raises(ValueError, match="b.jpg.*1 question"):
        score_mme(["yes", "no", "yes"], records)
    result = score_mme(["yes", "no", "yes"], records, strict=False)
    assert result["subtasks"]["color"]["acc"] == pytest.approx(100.0)
    assert result["subtasks"]["color"]["acc_plus"] == pytest.approx(100.0)


def test_mme_predictions_keyed_by_question_id_and_bad_input():
    records = [dict(r, question_id=f"q{i}") for i, r in enumerate(MME_RECORDS)]
    by_id = {f"q{i}": p for i, p in enumerate(MME_PREDICTIONS)}
    assert score_mme(by_id, records)["perception"] == pytest.approx(125.0)
    del by_id["q3"]
    with pytest.raises(ValueError, match="1 record\\(s\\) have no prediction: 'q3'"):
        score_mme(by_id, records)
    with pytest.raises(ValueError, match="7 predictions for 8"):
        score_mme(MME_PREDICTIONS[:-1], MME_RECORDS)
    with pytest.raises(ValueError, match="yes/no"):
        score_mme(["yes"], [_mme("color", "a.jpg", "maybe")], strict=False)


def test_mme_llava_prompt_replaces_native_suffix():
    question = "Is there a dog in the image? Please answer yes or no."
    assert llava_mme_prompt(question) == ("Is there a dog in the image?"
                                         "\nAnswer the question using a single word or phrase.")


# ================================================================================================================
# POPE
# ================================================================================================================

# haotian-liu/LLaVA eval_pope.py: text before the first "."; commas removed; split on single spaces; a word equal to
# "No", "not" or "no" -> no, anything else (unparseable included) -> yes.
@pytest.mark.parametrize("text, expected", [
    ("Yes, there is a cat.", "yes"),
    ("No.", "no"),
    ("No, there is not.", "no"),
    ("There is no dog in the image.", "no"),
    ("not sure", "no"),
    ("Not sure", "yes"),            # "Not" (capital) is not one of No / not / no
    ("NO", "yes"),                  # neither is "NO"
    ("Yes. There is no dog.", "yes"),  # only the first sentence counts
    ("", "yes"),                    # unparseable counts as yes
    ("no,", "no"),                  # commas are dropped before splitting
    ("Yes, no", "no"),              # -> "Yes no": a "no" word
    ("Yes,no", "yes"),              # -> "Yesno": one word
    ("  no", "no"),                 # split(" ") keeps empty words; "no" is still one of them
    ("no\n", "yes"),                # only spaces split: "no\n" is not "no"
    ("cannot", "yes"),
    ("I don't know", "yes"),
])
def test_pope_llava_parser(text: str, expected: str):
    assert parse_pope_answer(text, "llava") == expected


@pytest.mark.parametrize("text, expected", [
    ("yes", "yes"), (" No ", "no"), ("YES", "yes"), ("no\n", "no"), ("Yes.", "other"), ("Yes, there is", "other"),
    ("", "other"),
])
def test_pope_lmms_eval_parser(text: str, expected: str):
    assert parse_pope_answer(text, "lmms_eval") == expected


POPE_RECORDS = [
    {"question_id": 1, "label": "yes", "category": "adversarial"},
    {"question_id": 2, "label": "yes", "category": "adversarial"},
    {"question_id": 3, "label": "no", "category": "adversarial"},
    {"question_id": 4, "label": "no", "category": "adversarial"},
    {"question_id": 5, "label": "yes", "category": "popular"},
    {"question_id": 6, "label": "yes", "category": "popular"},
    {"question_id": 7, "label": "no", "category": "popular"},
]
POPE_PREDICTIONS = [
    "Yes, there is a cat.", "No.", "No, there is not.", "Yes",   # TP, FN, TN, FP
    "There is a dog in the image.", "Yes", "Not sure",           # TP, TP, FP
]


def test_pope_llava_metrics_by_hand():
    result = score_pope(POPE_PREDICTIONS, POPE_RECORDS)
    adv = result["splits"]["adversarial"]
    # TP=1 FN=1 TN=1 FP=1: acc 2/4, P 1/2, R 1/2, F1 1/2, yes-ratio 2/4
    assert (adv["tp"], adv["fn"], adv["tn"], adv["fp"]) == (1, 1, 1, 1)
    assert adv["accuracy"] == pytest.approx(0.5)
    assert adv["precision"] == pytest.approx(0.5)
    assert adv["recall"] == pytest.approx(0.5)
    assert adv["f1"] == pytest.approx(0.5)
    assert adv["yes_ratio"] == pytest.approx(0.5)
    pop = result["splits"]["popular"]
    # TP=2 FP=1: acc 2/3, P 2/3, R 1, F1 = 2*(2/3)*1/(5/3) = 4/5, yes-ratio 3/3
    assert (pop["tp"], pop["fn"], pop["tn"], pop["fp"]) == (2, 0, 0, 1)
    assert pop["accuracy"] == pytest.approx(2 / 3)
    assert pop["precision"] == pytest.approx(2 / 3)
    assert pop["recall"] == pytest.approx(1.0)
    assert pop["f1"] == pytest.approx(0.8)
    assert pop["yes_ratio"] == pytest.approx(1.0)
    assert result["mean_f1"] == pytest.approx((0.5 + 0.8) / 2)
    assert result["mean_accuracy"] == pytest.approx((0.5 + 2 / 3) / 2)
    assert result["n_splits"] == 2
    pooled = result["pooled"]
    # TP=3 FN=1 TN=1 FP=2 over 7: acc 4/7, P 3/5, R 3/4, F1 = 2*.6*.75/1.35 = 2/3, yes-ratio 5/7, label prior 4/7
    assert pooled["accuracy"] == pytest.approx(4 / 7)
    assert pooled["precision"] == pytest.approx(0.6)
    assert pooled["recall"] == pytest.approx(0.75)
    assert pooled["f1"] == pytest.approx(2 / 3)
    assert pooled["yes_ratio"] == pytest.approx(5 / 7)
    assert pooled["label_yes_ratio"] == pytest.approx(4 / 7)


def test_pope_lmms_eval_metrics_exclude_unparseable():
    result = score_pope(POPE_PREDICTIONS[:4], POPE_RECORDS[:4], parser="lmms_eval")
    adv = result["splits"]["adversarial"]
    # parsed: other, other, other, yes -> only FP=1; accuracy 0/4; precision 0/1 = 0.
    # Recall is 0/0: undefined -> None (it used to read 0.0, which looks like a measured zero), so F1 is None too.
    assert (adv["tp"], adv["fp"], adv["tn"], adv["fn"], adv["n_other"]) == (0, 1, 0, 0, 3)
    assert adv["accuracy"] == 0.0 and adv["precision"] == 0.0
    assert adv["recall"] is None and adv["f1"] is None
    assert adv["yes_ratio"] == pytest.approx(0.25)   # 1 yes prediction of 4
    assert adv["label_yes_ratio"] == pytest.approx(0.5)


# Empty denominators: split "adversarial" has only "no" labels and only "no" answers.
POPE_EMPTY_RECORDS = [
    {"question_id": 1, "label": "yes", "category": "random"},
    {"question_id": 2, "label": "yes", "category": "random"},
    {"question_id": 3, "label": "no", "category": "random"},
    {"question_id": 4, "label": "no", "category": "random"},
    {"question_id": 5, "label": "no", "category": "adversarial"},
    {"question_id": 6, "label": "no", "category": "adversarial"},
]
POPE_EMPTY_PREDICTIONS = ["Yes", "No", "No", "no\n", "No.", "Yes, no"]


def test_pope_empty_denominators_are_none_llava():
    result = score_pope(POPE_EMPTY_PREDICTIONS, POPE_EMPTY_RECORDS)
    rnd = result["splits"]["random"]
    # yes, no, no, yes ("no\n" is not the word "no"): TP=1 FN=1 TN=1 FP=1 -> 0.5 everywhere
    assert (rnd["tp"], rnd["fn"], rnd["tn"], rnd["fp"]) == (1, 1, 1, 1)
    assert (rnd["accuracy"], rnd["precision"], rnd["recall"], rnd["f1"]) == (0.5, 0.5, 0.5, 0.5)
    adv = result["splits"]["adversarial"]
    # no, no against no, no: TN=2; TP+FP = 0 and TP+FN = 0 -> precision, recall, F1 undefined
    assert (adv["tp"], adv["fn"], adv["tn"], adv["fp"]) == (0, 0, 2, 0)
    assert adv["accuracy"] == 1.0 and adv["yes_ratio"] == 0.0
    assert adv["precision"] is None and adv["recall"] is None and adv["f1"] is None
    # one split's F1 is undefined, so the mean F1 is too; mean accuracy (0.5 + 1) / 2
    assert result["mean_f1"] is None
    assert result["mean_accuracy"] == pytest.approx(0.75)
    pooled = result["pooled"]
    # TP=1 FN=1 TN=3 FP=1 over 6: acc 4/6, P 1/2, R 1/2, F1 1/2, yes-ratio 2/6
    assert pooled["accuracy"] == pytest.approx(4 / 6)
    assert (pooled["precision"], pooled["recall"], pooled["f1"]) == (0.5, 0.5, 0.5)
    assert pooled["yes_ratio"] == pytest.approx(2 / 6)


def test_pope_empty_denominators_are_none_lmms_eval():
    result = score_pope(POPE_EMPTY_PREDICTIONS, POPE_EMPTY_RECORDS, parser="lmms_eval")
    rnd = result["splits"]["random"]
    # yes, no, no, no ("no\n" stripped): TP=1 FN=1 TN=2 FP=0 -> acc 3/4, P 1/1, R 1/2, F1 2*1*.5/1.5 = 2/3
    assert (rnd["tp"], rnd["fn"], rnd["tn"], rnd["fp"]) == (1, 1, 2, 0)
    assert rnd["accuracy"] == pytest.approx(0.75) and rnd["precision"] == 1.0 and rnd["recall"] == 0.5
    assert rnd["f1"] == pytest.approx(2 / 3)
    adv = result["splits"]["adversarial"]
    # "No." and "Yes, no" are not exactly yes/no: both other -> accuracy 0/2, nothing to count for P/R
    assert adv["n_other"] == 2 and adv["accuracy"] == 0.0
    assert adv["precision"] is None and adv["recall"] is None and adv["f1"] is None
    assert result["mean_f1"] is None and result["mean_accuracy"] == pytest.approx(0.375)


def test_pope_f1_is_zero_when_precision_and_recall_are_zero():
    # one yes label answered no (FN), one no label answered yes (FP): P = 0/1, R = 0/1 -> F1 0, not undefined
    m = pope_metrics(["no", "yes"], ["yes", "no"])
    assert (m["precision"], m["recall"], m["f1"], m["accuracy"]) == (0.0, 0.0, 0.0, 0.0)
    empty = pope_metrics([], [])
    assert all(empty[k] is None for k in ("accuracy", "precision", "recall", "f1", "yes_ratio", "label_yes_ratio"))


def test_pope_records_without_split_and_bad_labels():
    result = score_pope(["yes", "no"], [{"label": "yes"}, {"answer": "No"}])
    # no split -> no mean over splits: None (it used to be 0.0, indistinguishable from a model scoring 0)
    assert result["splits"] == {} and result["n_splits"] == 0 and result["mean_f1"] is None
    assert result["mean_accuracy"] is None
    assert result["pooled"]["accuracy"] == 1.0
    with pytest.raises(ValueError, match="record 0 \\(question_id 9\\).*yes/no"):
        score_pope(["yes"], [{"question_id": 9, "label": "unsure"}])
    with pytest.raises(ValueError, match="parser"):
        score_pope(["yes"], [{"label": "yes"}], parser="vlmevalkit")


# ================================================================================================================
# ScienceQA
# ================================================================================================================

# haotian-liu/LLaVA main llava/eval/eval_science_qa.py, step by step on the raw text (no strip): (1) the whole text
# is one of A-E; (2) >= 3 characters, first in A-E, then ". "; (3) findall of r"The answer is ([A-Z])." (unescaped
# "." = any character but a newline) matches exactly once; else FAILED (None).
SQA_OFFICIAL_TABLE = [
    ("B", "B"),
    ("E", "E"),                              # a letter of --options, whatever the question's choices
    (" B", None),                            # no strip: not a letter, too short for "X. ", no regex match
    ("B ", None),
    ("B\n", None),                           # newlines are not rewritten on main
    ("b", None),                             # case matters
    ("F", None),                             # not in --options and no "The answer is"
    ("AB", None),
    ("B. apple", "B"),
    ("B.apple", None),                       # no space after the period
    ("B.", None),                            # too short for the "X. " rule
    ("B)", None),
    ("E. five", "E"),
    ("F. six", None),                        # the "X. " rule only knows A-E
    ("A\nBecause it is red.", None),         # "A\n" is not "A. "
    ("The answer is C.", "C"),
    ("The answer is C", None),               # the regex needs one more character after the letter
    ("The answer is C, because", "C"),       # ... any character
    ("The answer is Cat.", "C"),             # ... even a letter
    ("The answer is C\n", None),             # ... but not a newline
    ("the answer is C.", None),              # "The" with a capital
    ("The answer is c.", None),
    ("The answer is  C.", None),             # two spaces
    ("The answer is F.", "F"),               # the regex takes any capital (scored as index -1 later)
    ("The answer is A. The answer is B.", None),  # two matches fail
    ("The answer is A. The answer is A.", None),  # even of the same letter
    ("A. The answer is B.", "A"),            # the "X. " rule comes first
    ("I think The answer is D!", "D"),
    ("", None),
]


@pytest.mark.parametrize("text, expected", SQA_OFFICIAL_TABLE)
def test_sqa_official_letter_extraction(text: str, expected: str | None):
    assert extract_sqa_letter(text, "llava") == expected
    assert extract_sqa_letter(text) == expected  # the default


@pytest.mark.parametrize("text, expected", [
    # the unmerged-PR rules vlweave used to call "llava": strip, newline -> ". ", first match, "The answer is X"
    ("  B ", "B"), ("B\n", "B"), ("A\nBecause it is red.", "A"), ("I think The answer is D", "D"),
    ("The answer is A. The answer is B.", "A"), ("The answer is F.", None), ("B.", None), ("b", None),
    ("B. apple", "B"), ("", None),
])
def test_sqa_lenient_letter_extraction(text: str, expected: str | None):
    assert extract_sqa_letter(text, "llava_lenient") == expected


@pytest.mark.parametrize("text, expected", [
    ("b", "B"), (" C ", "C"), ("B.", "B"), ("B. apple", "B"), ("b.", None), ("The answer is B.", None), ("", None),
])
def test_sqa_lmms_eval_letter_extraction(text: str, expected: str | None):
    assert extract_sqa_letter(text, "lmms_eval") == expected


def test_sqa_missing_prediction_and_unknown_parser():
    assert extract_sqa_letter(None) is None
    with pytest.raises(ValueError, match="unknown ScienceQA parser 'judge'"):
        extract_sqa_letter("A", "judge")
    with pytest.raises(ValueError, match="unknown ScienceQA parser"):
        score_scienceqa(["A"], [{"answer": "A", "num_choices": 2}], parser="judge")


SQA_RECORDS = [
    {"question_id": "1", "answer": "B", "num_choices": 3, "has_image": True},
    {"question_id": "2", "answer": 0, "choices": ["x", "y"], "image": "image.png"},  # index 0 = A; image -> IMG
    {"question_id": "3", "answer": "C", "num_choices": 3, "has_image": False},
    {"question_id": "4", "answer": "A", "num_choices": 2, "has_image": True},
    {"question_id": "5", "answer": "D", "num_choices": 4, "has_image": False},
    {"question_id": "6", "answer": "C", "num_choices": 5, "has_image": True},
    {"question_id": "7", "answer": "B", "num_choices": 3, "has_image": True},
    {"question_id": "8", "answer": "A", "num_choices": 2, "has_image": True},
]
SQA_PREDICTIONS = {  # question 7 has no prediction
    "1": "B", "2": "The answer is A.", "3": " C", "4": "E", "5": "The answer is D",
    "6": "The answer is C. The answer is C.", "8": "A. yes",
}


def test_sqa_official_scores_by_hand():
    result = score_scienceqa(SQA_PREDICTIONS, SQA_RECORDS)
    # 1 B right; 2 A right; 3 " C" FAILED; 4 "E" parses but is beyond 2 choices -> index -1; 5 FAILED (nothing after
    # the letter); 6 FAILED (two matches); 7 missing -> FAILED; 8 "A. " right.  3 of 8 right.
    assert result["accuracy"] == pytest.approx(3 / 8)
    # image questions: 1, 2, 4, 6, 8 -- not 7: the script reads "<image>" from the (missing) prediction's prompt
    assert (result["n_img"], result["img_correct"]) == (5, 3)
    assert result["img_accuracy"] == pytest.approx(3 / 5)
    assert (result["n"], result["correct"]) == (8, 3)
    assert (result["n_failed"], result["n_missing"], result["n_out_of_range"]) == (4, 1, 1)
    # the same with a list holding None for the missing prediction
    as_list = [SQA_PREDICTIONS.get(r["question_id"]) for r in SQA_RECORDS]
    assert score_scienceqa(as_list, SQA_RECORDS) == result


def test_sqa_lenient_scores_by_hand():
    result = score_scienceqa(SQA_PREDICTIONS, SQA_RECORDS, parser="llava_lenient")
    # 3 " C" -> C right (strip); 5 -> D right ("The answer is X" without dot); 6 -> C right (first match);
    # 4 still out of range, 7 still missing: right 1, 2, 3, 5, 6, 8 -> 6/8; image 1, 2, 6, 8 of 5 -> 4/5
    assert result["accuracy"] == pytest.approx(6 / 8)
    assert result["img_accuracy"] == pytest.approx(4 / 5)
    assert result["n_failed"] == 1  # only the missing one


def test_sqa_lmms_eval_scores_by_hand():
    result = score_scienceqa(SQA_PREDICTIONS, SQA_RECORDS, parser="lmms_eval")
    # 1 "B" right; 2 "Th..." None; 3 " C" -> C right; 4 "E" out of range; 5, 6 None; 7 missing; 8 "A." right -> 3/8;
    # image 1, 2, 4, 6, 8: right 1 and 8 -> 2/5
    assert result["accuracy"] == pytest.approx(3 / 8)
    assert result["img_accuracy"] == pytest.approx(2 / 5)


def test_sqa_no_image_questions_and_bad_ground_truth():
    result = score_scienceqa(["A"], [{"answer": "A", "num_choices": 2, "has_image": False}])
    assert result["accuracy"] == 1.0 and result["n_img"] == 0 and result["img_accuracy"] is None  # empty set
    with pytest.raises(ValueError, match="record 0 \\(question_id 'x'\\).*not one of ABC"):
        score_scienceqa(["A"], [{"question_id": "x", "answer": "E", "num_choices": 3}])
    with pytest.raises(ValueError, match="index 3 outside 2 choices"):
        score_scienceqa(["A"], [{"answer": 3, "num_choices": 2}])


# ================================================================================================================
# MMBench
# ================================================================================================================

FRUITS = {"A": "apple", "B": "banana", "C": "cherry", "D": "date"}
ANIMALS = {"A": "cat", "B": "dog"}

# VLMEvalKit can_infer (revision 18fc37a), non-verbose: refusal phrase -> Z; ".()[],:;!*#{}" -> spaces, split; exactly
# one option letter as a token -> it; no letter but a "Z" token -> Z; else exactly one option text in the
# lower-cased answer; else None.
MMBENCH_VLMEVALKIT_TABLE = [
    ("B", FRUITS, "B"),
    (" B ", FRUITS, "B"),
    ("B. banana", FRUITS, "B"),
    ("(C)", FRUITS, "C"),
    ("C: cherry", FRUITS, "C"),
    ("[D]", FRUITS, "D"),
    ("**B**", FRUITS, "B"),
    ("B)", FRUITS, "B"),
    ("The answer is D.", FRUITS, "D"),
    ("Answer: B", FRUITS, "B"),
    ("A dog is sitting on the mat", FRUITS, "A"),   # the quantifier check only runs in verbose mode
    ("A dog is sitting on the mat", ANIMALS, "A"),
    ("I think A is right", FRUITS, "A"),
    ("A cat", ANIMALS, "A"),
    ("banana", FRUITS, "B"),                        # no letter -> the unique option text in the answer
    ("I like Banana.", FRUITS, "B"),                # text matching ignores case
    ("B-banana", FRUITS, "B"),                      # "B-banana" is no letter token; "banana" is in it
    ("The answer is date", FRUITS, "D"),
    ("b", FRUITS, None),                            # lower case is not a letter, and no option text matches
    ("A or B", FRUITS, None),                       # two letters, no option text
    ("B, C", FRUITS, None),
    ("(A) or B.", FRUITS, None),
    ("B/C", FRUITS, None),                          # "/" is not a separator: one token, no letter
    ("apple and banana", FRUITS, None),             # two option texts
    ("A. apple B. banana", FRUITS, None),
    ("E", FRUITS, None),                            # not one of the options
    ("C", {"A": "yes", "B": "no"}, None),
    ("Z", FRUITS, "Z"),                             # VLMEvalKit's "none of these": resolved, and wrong
    ("None of these: Z.", FRUITS, "Z"),
    ("Cannot determine the answer", FRUITS, "Z"),   # a refusal phrase
    ("Failed to obtain answer via API: B", FRUITS, None),  # letters ignored, text matching only
    ("category", {"A": "cat", "B": "category"}, None),  # "cat" is in "category" too: two texts
    ("", FRUITS, None),
]


@pytest.mark.parametrize("text, options, expected", MMBENCH_VLMEVALKIT_TABLE)
def test_mmbench_vlmevalkit_choice_extraction(text: str, options: dict, expected: str | None):
    assert extract_mmbench_choice(text, options, "vlmevalkit") == expected
    assert extract_mmbench_choice(text, options) == expected  # the default


# lmms-eval mmbench_evals.py can_infer: letters A-E always; whitespace split without removing punctuation; one bare
# letter -> it, unless it is "A" among more than 3 tokens; else the first decorated form (X. X, X: X) X). (X)
# (X). :X :X, :X. :X) :X).) that exactly one letter takes; else option text; else None.
MMBENCH_LMMS_EVAL_TABLE = [
    ("B", FRUITS, "B"),
    (" B ", FRUITS, "B"),
    ("B. banana", FRUITS, "B"),                     # "B." form
    ("(C)", FRUITS, "C"),
    ("C: cherry", FRUITS, "C"),
    ("B)", FRUITS, "B"),
    ("[D]", FRUITS, None),                          # no such form, and no option text
    ("**B**", FRUITS, None),
    ("The answer is D.", FRUITS, "D"),
    ("The answer is D", FRUITS, "D"),
    ("Answer: B", FRUITS, "B"),
    ("A dog is sitting on the mat", FRUITS, None),  # "A" among 7 tokens: quantifier -> no letter; no fruit text
    ("A dog is sitting on the mat", ANIMALS, "B"),  # ... falls through to option text: "dog"
    ("I think A is right", FRUITS, None),
    ("A cat", ANIMALS, "A"),                        # 2 tokens: not a quantifier
    ("A is right", FRUITS, "A"),                    # 3 tokens: still not
    ("A is the answer", FRUITS, None),              # 4 tokens
    ("banana", FRUITS, "B"),
    ("b", FRUITS, None),
    ("A or B", FRUITS, None),
    ("B, C", FRUITS, "C"),                          # "B," is not bare: the one bare letter is C
    ("(A) or B.", FRUITS, "B"),                     # "X." is tried before "(X)"
    ("A. apple B. banana", FRUITS, None),           # two "X." forms; two option texts
    ("E", FRUITS, "E"),                             # A-E whatever the options: E, wrong
    ("Z", FRUITS, None),                            # no Z rule
    ("Cannot determine the answer", FRUITS, None),  # no refusal list
    ("Failed to obtain answer via API: B", FRUITS, None),
    ("category", {"A": "cat", "B": "category"}, None),
    ("", FRUITS, None),
]


@pytest.mark.parametrize("text, options, expected", MMBENCH_LMMS_EVAL_TABLE)
def test_mmbench_lmms_eval_choice_extraction(text: str, options: dict, expected: str | None):
    assert extract_mmbench_choice(text, options, "lmms_eval") == expected


def test_mmbench_unknown_parser():
    with pytest.raises(ValueError, match="unknown MMBench parser 'rules'"):
        extract_mmbench_choice("A", FRUITS, "rules")


def test_circular_rotations_move_the_answer_with_its_text():
    versions = circular_rotations(FRUITS, "C")
    assert [opts for opts, _ in versions] == [
        {"A": "apple", "B": "banana", "C": "cherry", "D": "date"},
        {"A": "banana", "B": "cherry", "C": "date", "D": "apple"},
        {"A": "cherry", "B": "date", "C": "apple", "D": "banana"},
        {"A": "date", "B": "apple", "C": "banana", "D": "cherry"},
    ]
    assert [ans for _, ans in versions] == ["C", "B", "A", "D"]
    assert all(opts[ans] == "cherry" for opts, ans in versions)
    assert circular_rotations(["yes", "no"], None) == [({"A": "yes", "B": "no"}, None), ({"A": "no", "B": "yes"}, None)]
    with pytest.raises(ValueError, match="not one of the option letters AB"):
        circular_rotations(["yes", "no"], "C")


def _mmb(index: int, options: dict, answer: str, category: str, **extra) -> dict:
    return {"index": index, "options": options, "answer": answer, "category": category, **extra}


def _mmbench_case() -> tuple[list[dict], list[str]]:
    records, predictions = [], []
    # group 1: three options, every rotation answered right -> solved
    for k, (opts, ans) in enumerate(circular_rotations(["red", "green", "blue"], "B")):
        records.append(_mmb(1 + k * 1_000_000, opts, ans, "ocr", l2_category="perception"))
        predictions.append(f"{ans}. {opts[ans]}")
    # group 2: two options, the second rotation is answered unparseably -> the question is wrong
    for k, (opts, ans) in enumerate(circular_rotations(["cat", "dog"], "A")):
        records.append(_mmb(2 + k * 1_000_000, opts, ans, "ocr", l2_category="perception"))
    predictions += ["A", "I don't know"]
    # group 3: only the main question, answered right by option text
    records.append(_mmb(3, FRUITS, "D", "scene", l2_category="reasoning"))
    predictions.append("It is a date.")
    return records, predictions


def test_mmbench_circular_scores_by_hand():
    records, predictions = _mmbench_case()
    result = score_mmbench(predictions, records)
    # groups: 1 solved, 2 failed (one rotation wrong), 3 solved -> 2/3; single copies right: 3 + 1 + 1 of 6
    assert result["accuracy"] == pytest.approx(2 / 3)
    assert result["copy_accuracy"] == pytest.approx(5 / 6)
    assert (result["n_questions"], result["n_copies"], result["n_unresolved"], result["n_invalid"]) == (3, 6, 1, 0)
    assert result["categories"] == {"ocr": {"accuracy": 0.5, "n": 2}, "scene": {"accuracy": 1.0, "n": 1}}
    assert result["l2_categories"] == {"perception": {"accuracy": 0.5, "n": 2}, "reasoning": {"accuracy": 1.0, "n": 1}}


def _mmbench_parser_case() -> tuple[list[dict], list[str]]:
    """Four questions whose copies the two parsers read differently (worked out in the tests below)."""
    records, predictions = [], []
    # g1: cat/dog, answer dog.  k0 {A cat, B dog} -> B; k1 {A dog, B cat} -> A.  Both answered with the sentence.
    for k, (opts, ans) in enumerate(circular_rotations(["cat", "dog"], "B")):
        records.append(_mmb(1 + k * 1_000_000, opts, ans, "animals"))
        predictions.append("A dog is sitting on the mat")
    # g2: red/green/blue, answer blue.  k0 -> C, k1 {A green, B blue, C red} -> B, k2 {A blue, ...} -> A.
    for k, (opts, ans) in enumerate(circular_rotations(["red", "green", "blue"], "C")):
        records.append(_mmb(2 + k * 1_000_000, opts, ans, "colours"))
    predictions += ["C", "[B]", "A"]
    # g3: yes/no, answer yes.  k0 {A yes, B no} -> A answered "E"; k1 {A no, B yes} -> B answered "B".
    for k, (opts, ans) in enumerate(circular_rotations(["yes", "no"], "A")):
        records.append(_mmb(3 + k * 1_000_000, opts, ans, "other"))
    predictions += ["E", "B"]
    # g4: one copy of the fruits, answer D, answered "Z".
    records.append(_mmb(4, FRUITS, "D", "other"))
    predictions.append("Z")
    return records, predictions


def test_mmbench_vlmevalkit_circular_by_hand():
    records, predictions = _mmbench_parser_case()
    result = score_mmbench(predictions, records)
    # g1: A, A -> k0 wrong (answer B), k1 right -> failed.  g2: C, B, A -> solved.  g3: "E" is no option letter and
    # no text -> None (wrong), "B" right -> failed.  g4: "Z" -> Z, wrong.  Circular 1/4; copies right 1+3+1+0 = 5/8.
    assert result["accuracy"] == pytest.approx(1 / 4)
    assert result["copy_accuracy"] == pytest.approx(5 / 8)
    assert (result["n_unresolved"], result["n_invalid"]) == (1, 1)  # g3 k0 None; g4 "Z"
    assert result["categories"] == {"animals": {"accuracy": 0.0, "n": 1}, "colours": {"accuracy": 1.0, "n": 1},
                                    "other": {"accuracy": 0.0, "n": 2}}


def test_mmbench_lmms_eval_circular_by_hand():
    records, predictions = _mmbench_parser_case()
    result = score_mmbench(predictions, records, parser="lmms_eval")
    # g1: quantifier -> text "dog": B, A -> solved.  g2: C right, "[B]" -> None, A right -> failed.  g3: "E" -> E
    # (A-E always), wrong; "B" right -> failed.  g4: "Z" -> None.  Circular 1/4; copies right 2+2+1+0 = 5/8.
    assert result["accuracy"] == pytest.approx(1 / 4)
    assert result["copy_accuracy"] == pytest.approx(5 / 8)
    assert (result["n_unresolved"], result["n_invalid"]) == (2, 1)  # g2 k1, g4; g3 k0 "E"
    assert result["categories"] == {"animals": {"accuracy": 1.0, "n": 1}, "colours": {"accuracy": 0.0, "n": 1},
                                    "other": {"accuracy": 0.0, "n": 2}}


def test_mmbench_one_wrong_rotation_fails_the_question():
    records = [_mmb(7 + k * 1_000_000, o, a, "x") for k, (o, a) in enumerate(circular_rotations(FRUITS, "A"))]
    right = [a for _, a in circular_rotations(FRUITS, "A")]
    assert score_mmbench(right, records)["accuracy"] == 1.0
    wrong_last = right[:-1] + ["A" if right[-1] != "A" else "B"]
    assert score_mmbench(wrong_last, records)["accuracy"] == 0.0
    assert score_mmbench(wrong_last, records)["copy_accuracy"] == pytest.approx(0.75)


def test_mmbench_predictions_by_index_and_errors():
    records, predictions = _mmbench_case()
    by_index = {r["index"]: p for r, p in zip(records, predictions)}
    assert score_mmbench(by_index, records)["accuracy"] == pytest.approx(2 / 3)
    assert score_mmbench([], [])["accuracy"] is None  # no questions: no accuracy
    with pytest.raises(ValueError, match="no ground-truth answer"):
        score_mmbench(["A"], [{"index": 1, "options": FRUITS, "answer": None}])
    with pytest.raises(ValueError, match="answer 'E' is not one of the options ABCD"):
        score_mmbench(["A"], [_mmb(1, FRUITS, "E", "x")])
    with pytest.raises(ValueError, match="unknown MMBench parser"):
        score_mmbench(["A"], [_mmb(1, FRUITS, "A", "x")], parser="rules")


def test_expand_circular_and_group():
    mains = [_mmb(5, {"A": "p", "B": "q", "C": "r"}, "C", "x"), _mmb(6, {"A": "s", "B": "t"}, "A", "y")]
    expanded = expand_circular(mains)
    assert sorted(r["index"] for r in expanded) == [5, 6, 1_000_005, 1_000_006, 2_000_005]
    copy = next(r for r in expanded if r["index"] == 2_000_005)
    assert copy["options"] == {"A": "r", "B": "p", "C": "q"} and copy["answer"] == "A" and copy["category"] == "x"
    assert circular_group(2_000_005) == 5
    # groups that already have copies are left alone
    assert len(expand_circular(expanded)) == 5


def test_multiple_choice_prompt():
    prompt = build_multiple_choice_prompt("What fruit?", {"A": "apple", "B": "pear"}, hint="A still life.")
    assert prompt == ("A still life.\nWhat fruit?\nA. apple\nB. pear\n"
                      "Answer with the option's letter from the given choices directly.")
    assert build_multiple_choice_prompt("Q?", {"A": "x", "B": "y"}, suffix="") == "Q?\nA. x\nB. y"


# ================================================================================================================
# VQA normalisation and accuracy
# ================================================================================================================


@pytest.mark.parametrize("text, expected", [
    ("Two", "2"),
    ("two", "2"),
    ("none", "0"),
    ("a dog", "dog"),
    ("The Dog.", "dog"),
    ("an apple", "apple"),
    ("dont", "don't"),
    ("isnt", "isn't"),
    ("don't", "don't"),
    ("Yes!", "yes"),
    ("dog's bone", "dog 's bone"),
    ("3.5", "3.5"),              # a period before a digit stays
    ("10.", "10"),
    ("red-white", "red white"),  # punctuation not touching a space becomes a space
    ("red - white", "red white"),  # punctuation touching a space is deleted
    ("1,000", "1000"),
    ("  yes \n", "yes"),
    ("what's up?", "what 's up"),
])
def test_normalize_vqa_answer(text: str, expected: str):
    assert normalize_vqa_answer(text) == expected


def test_official_punctuation_comma_between_digits_deletes_all():
    # a comma between digits makes every listed punctuation mark vanish instead of becoming a space
    assert vqa_process_punctuation("1,000-2") == "10002"
    assert vqa_process_punctuation("a-b") == "a b"


def test_vqa_soft_accuracy_by_hand():
    answers = ["2"] * 3 + ["3"] * 7
    # "two" -> "2": leaving out one of the three "2"s leaves 2 matches (2/3); leaving out a "3" leaves 3 (1)
    assert vqa_soft_accuracy("two", answers) == pytest.approx((3 * 2 / 3 + 7 * 1) / 10)  # 0.9
    assert vqa_soft_accuracy("3", answers) == pytest.approx(1.0)
    assert vqa_soft_accuracy("4", answers) == 0.0
    one = ["cat"] + ["dog"] * 9
    # the "cat" answer itself scores 0; each of the 9 others sees 1 match -> 1/3
    assert vqa_soft_accuracy("a cat", one) == pytest.approx(9 * (1 / 3) / 10)  # 0.3
    two = ["cat"] * 2 + ["dog"] * 8
    assert vqa_soft_accuracy("Cat", two) == pytest.approx((2 * 1 / 3 + 8 * 2 / 3) / 10)  # 0.6


def test_vqa_official_protocol_differs_from_evalai():
    # official: answers are only punctuation-processed (and only when they disagree): "the dog" stays "the dog"
    answers = ["dog"] * 2 + ["the dog"] * 8
    assert vqa_soft_accuracy("dog", answers, parser="official") == pytest.approx((2 * 1 / 3 + 8 * 2 / 3) / 10)
    assert vqa_soft_accuracy("dog", answers, parser="evalai") == pytest.approx(1.0)
    # identical answers are not processed at all under the official protocol
    assert vqa_soft_accuracy("two", ["Two"] * 10, parser="official") == 0.0
    assert vqa_soft_accuracy("two", ["2"] * 10, parser="official") == 1.0
    # answer dicts (VQAv2 annotation format) are accepted
    assert vqa_soft_accuracy("2", [{"answer": "2", "answer_id": i} for i in range(10)], parser="official") == 1.0
    with pytest.raises(ValueError, match="non-empty list"):
        vqa_soft_accuracy("2", [])


def test_score_vqav2_and_textvqa_by_hand():
    records = [
        {"question_id": 1, "answers": ["2"] * 10, "answer_type": "number"},
        {"question_id": 2, "answers": ["yes"] * 10, "answer_type": "yes/no"},
        {"question_id": 3, "answers": ["red"] * 2 + ["blue"] * 8, "answer_type": "other"},
    ]
    predictions = ["two", "No", "Red."]
    result = score_vqav2(predictions, records)
    # 1.0, 0.0, and "red" with 2 human matches -> (2*1/3 + 8*2/3)/10 = 0.6
    assert result["accuracy"] == pytest.approx((1.0 + 0.0 + 0.6) / 3)
    assert result["answer_types"]["number"] == {"accuracy": 1.0, "n": 1}
    assert result["answer_types"]["other"]["accuracy"] == pytest.approx(0.6)
    text = score_textvqa(predictions, [{"answers": r["answers"]} for r in records])
    assert text["accuracy"] == pytest.approx((1.0 + 0.0 + 0.6) / 3) and text["n"] == 3
    assert "answer_types" not in text


def test_gqa_exact_match_by_hand():
    records = [{"answer": "yes"}, {"answer": "table"}, {"answer": "left"}, {"answer": "Red"}, {"answer": "t-shirt"}]
    predictions = ["Yes.", "The table", "left.", "red", "T-shirt"]
    # llava: yes / left / t-shirt right; "the table" != "table"; "red" != "Red" (gold is compared as given)
    assert score_gqa(predictions, records)["accuracy"] == pytest.approx(3 / 5)
    # lmms_eval: both sides lower-cased, punctuation deleted: "red" == "red" now right too
    assert score_gqa(predictions, records, parser="lmms_eval")["accuracy"] == pytest.approx(4 / 5)
    assert normalize_gqa_answer(" Left. ") == "left"
    assert normalize_gqa_answer("T-shirt.", "lmms_eval") == "tshirt"


# ================================================================================================================
# Registry
# ================================================================================================================


def test_registry_contents():
    assert set(SCORERS) == {"mme", "pope", "scienceqa_img", "mmbench", "vqav2", "textvqa", "gqa"}
    short = "\nAnswer the question using a single word or phrase."
    mc = "\nAnswer with the option's letter from the given choices directly."
    assert SHORT_ANSWER_SUFFIX == short and MULTIPLE_CHOICE_SUFFIX == mc
    for name in ("mme", "pope", "vqav2", "textvqa", "gqa"):
        assert SCORERS[name].prompt_suffix == short
    for name in ("scienceqa_img", "mmbench"):
        assert SCORERS[name].prompt_suffix == mc
    # Defaults are the rules the headline numbers were computed with.  MMBench's default was called "rules" and lacked
    # VLMEvalKit's "Z" and refusal rules; it is now VLMEvalKit's can_infer and named for it.
    parsers = {name: spec.parsers for name, spec in SCORERS.items()}
    assert parsers == {"mme": ("official", "lmms_eval"), "pope": ("llava", "lmms_eval"),
                       "scienceqa_img": ("llava", "llava_lenient", "lmms_eval"),
                       "mmbench": ("vlmevalkit", "lmms_eval"), "vqav2": ("official", "evalai"),
                       "textvqa": ("evalai", "official"), "gqa": ("llava", "lmms_eval")}
    assert SCORERS["pope"].headline == "mean_f1" and SCORERS["mme"].headline == "perception"


def test_score_benchmark_records_prompt_and_parser():
    result = score_benchmark("pope", POPE_PREDICTIONS, POPE_RECORDS, split="adversarial+popular")
    assert result["benchmark"] == "pope" and result["split"] == "adversarial+popular"
    assert result["prompt_suffix"] == SHORT_ANSWER_SUFFIX and result["parser"] == "llava"
    assert result["headline_metric"] == "mean_f1" and result["headline"] == pytest.approx(0.65)
    strict = score_benchmark("pope", POPE_PREDICTIONS, POPE_RECORDS, parser="lmms_eval")
    assert strict["parser"] == "lmms_eval" and strict["metrics"]["pooled"]["n_other"] == 5
    assert get_benchmark("mme").describe(split="test") == {
        "benchmark": "mme", "split": "test", "prompt_suffix": SHORT_ANSWER_SUFFIX, "parser": "official"}
    assert get_benchmark("gqa").score(["Yes."], [{"answer": "yes"}])["accuracy"] == 1.0
    with pytest.raises(ValueError, match="unknown benchmark 'mmvet'"):
        score_benchmark("mmvet", [], [])
    with pytest.raises(ValueError, match="unknown parser 'judge' for mmbench"):
        score_benchmark("mmbench", [], [], parser="judge")


def test_mmbench_lmms_eval_parser_through_the_registry():
    assert get_benchmark("mmbench").describe(split="dev", parser="lmms_eval") == {
        "benchmark": "mmbench", "split": "dev", "prompt_suffix": MULTIPLE_CHOICE_SUFFIX, "parser": "lmms_eval"}
    assert get_benchmark("mmbench").describe()["parser"] == "vlmevalkit"
    records = [_mmb(1, ANIMALS, "B", "animals")]
    default = score_benchmark("mmbench", ["A dog is sitting on the mat"], records)
    lmms = score_benchmark("mmbench", ["A dog is sitting on the mat"], records, parser="lmms_eval")
    assert (default["parser"], default["headline"]) == ("vlmevalkit", 0.0)   # VLMEvalKit reads A
    assert (lmms["parser"], lmms["headline"]) == ("lmms_eval", 1.0)          # lmms-eval reads "dog" -> B


def test_parse_benchmark_gives_what_the_scorer_compares():
    assert parse_benchmark("mme", ["   yes", "Yes", "y"]) == ["other", "yes", "other"]
    assert parse_benchmark("mme", ["   yes", "y"], parser="lmms_eval") == ["yes", "yes"]
    assert parse_benchmark("pope", ["no\n", "Yes, no"]) == ["yes", "no"]
    assert parse_benchmark("scienceqa_img", ["B", " B", "The answer is F.", None]) == ["B", None, "F", None]
    records = [_mmb(1, ANIMALS, "B", "animals"), _mmb(2, FRUITS, "A", "x")]
    assert parse_benchmark("mmbench", ["A dog is sitting on the mat", "Z"], records) == ["A", "Z"]
    assert parse_benchmark("mmbench", ["A dog is sitting on the mat", "Z"], records, parser="lmms_eval") == ["B", None]
    assert parse_benchmark("vqav2", ["Two dogs."]) == ["2 dogs"]   # no ground truth needed (test-dev)
    assert parse_benchmark("gqa", [" Left. "]) == ["left"]
    with pytest.raises(ValueError, match="unknown parser 'rules' for mmbench"):
        parse_benchmark("mmbench", ["A"], records[:1], parser="rules")
    with pytest.raises(ValueError, match="2 predictions for 1 records"):
        parse_benchmark("mmbench", ["A", "B"], records[:1])


def test_apply_prompt_suffix_does_not_double():
    released = "Is there a chair in the image?\nAnswer the question using a single word or phrase."
    assert apply_prompt_suffix(released, SHORT_ANSWER_SUFFIX) == released
    assert apply_prompt_suffix("Is there a chair?", SHORT_ANSWER_SUFFIX) == "Is there a chair?" + SHORT_ANSWER_SUFFIX


def test_predictions_must_be_strings():
    with pytest.raises(ValueError, match="single string"):
        score_gqa("yes", [{"answer": "yes"}])
    with pytest.raises(ValueError, match="record 0 \\(question_id 4\\) is NoneType"):
        score_gqa([None], [{"question_id": 4, "answer": "yes"}])
