"""Benchmark scorers (vlweave.eval.benchmarks): answer parsing edge cases and hand-computed metrics.

Every expected number is worked out by hand in the comments next to it, not taken from the implementation.
"""

from __future__ import annotations

import pytest

from vlweave.eval.benchmarks import (
    COGNITION_SUBTASKS, MULTIPLE_CHOICE_SUFFIX, PERCEPTION_SUBTASKS, SCORERS, SHORT_ANSWER_SUFFIX,
    apply_prompt_suffix, build_multiple_choice_prompt, canonical_mme_subtask, circular_group, circular_rotations,
    expand_circular, extract_mmbench_choice, extract_sqa_letter, get_benchmark, llava_mme_prompt,
    normalize_gqa_answer, normalize_vqa_answer, parse_mme_answer, parse_pope_answer, score_benchmark, score_gqa,
    score_mmbench, score_mme, score_pope, score_scienceqa, score_textvqa, score_vqav2, vqa_process_punctuation,
    vqa_soft_accuracy,
)

# ================================================================================================================
# MME
# ================================================================================================================


@pytest.mark.parametrize("text, expected", [
    ("Yes", "yes"),
    ("yes.", "yes"),
    ("  No.  ", "no"),
    ("Yes, there is a dog in the image.", "yes"),
    ("No, there is not.", "no"),
    ("not sure", "no"),          # first 4 chars "not " contain "no"
    ("None", "no"),              # "none" contains "no"
    ("There is a dog.", "other"),  # "ther": neither
    ("I think yes", "other"),    # only the first 4 characters are looked at
    ("", "other"),
    ("y", "other"),              # official: no single-letter rule
    ("YES!", "yes"),
])
def test_mme_official_parser(text: str, expected: str):
    assert parse_mme_answer(text, "official") == expected


@pytest.mark.parametrize("text, expected", [("y", "yes"), ("N", "no"), ("n.", "no"), ("x", "other"), ("Yes", "yes")])
def test_mme_lmms_eval_parser_single_letters(text: str, expected: str):
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
    "YES.", "  no  ",
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


def test_mme_lmms_eval_parser_changes_only_single_letters():
    result = score_mme(MME_PREDICTIONS, MME_RECORDS, parser="lmms_eval")
    # "n" is now "no" (right), "" still other: OCR acc 50, acc+ 0
    assert result["subtasks"]["OCR"]["acc"] == pytest.approx(50.0)
    assert result["subtasks"]["OCR"]["acc_plus"] == 0.0
    assert result["perception"] == pytest.approx(175.0)  # 125 + 50


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
])
def test_pope_llava_parser(text: str, expected: str):
    assert parse_pope_answer(text, "llava") == expected


@pytest.mark.parametrize("text, expected", [
    ("yes", "yes"), (" No ", "no"), ("YES", "yes"), ("Yes.", "other"), ("Yes, there is", "other"), ("", "other"),
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
    # parsed: other, other, other, yes -> only FP=1; accuracy 0/4; precision 0/1; recall 0/0 -> 0
    assert (adv["tp"], adv["fp"], adv["tn"], adv["fn"], adv["n_other"]) == (0, 1, 0, 0, 3)
    assert adv["accuracy"] == 0.0 and adv["precision"] == 0.0 and adv["recall"] == 0.0 and adv["f1"] == 0.0
    assert adv["yes_ratio"] == pytest.approx(0.25)   # 1 yes prediction of 4
    assert adv["label_yes_ratio"] == pytest.approx(0.5)


def test_pope_records_without_split_and_bad_labels():
    result = score_pope(["yes", "no"], [{"label": "yes"}, {"answer": "No"}])
    assert result["splits"] == {} and result["n_splits"] == 0 and result["mean_f1"] == 0.0
    assert result["pooled"]["accuracy"] == 1.0
    with pytest.raises(ValueError, match="record 0 \\(question_id 9\\).*yes/no"):
        score_pope(["yes"], [{"question_id": 9, "label": "unsure"}])
    with pytest.raises(ValueError, match="parser"):
        score_pope(["yes"], [{"label": "yes"}], parser="vlmevalkit")


# ================================================================================================================
# ScienceQA
# ================================================================================================================


@pytest.mark.parametrize("text, expected", [
    ("B", "B"),
    ("  B ", "B"),
    ("B. apple", "B"),
    ("The answer is C.", "C"),
    ("I think The answer is D", "D"),
    ("A\nBecause it is red.", "A"),   # newline becomes ". " -> "A. Because ..."
    ("b", None),                     # lower-case letters are not accepted
    ("B.", None),                    # no space after the period: FAILED in LLaVA's scorer
    ("The answer is b.", None),
    ("", None),
    ("apple", None),
])
def test_sqa_llava_letter_extraction(text: str, expected: str | None):
    assert extract_sqa_letter(text, "llava") == expected


@pytest.mark.parametrize("text, expected", [
    ("b", "B"), (" C ", "C"), ("B.", "B"), ("B. apple", "B"), ("b.", None), ("The answer is B.", None), ("", None),
])
def test_sqa_lmms_eval_letter_extraction(text: str, expected: str | None):
    assert extract_sqa_letter(text, "lmms_eval") == expected


SQA_RECORDS = [
    {"question_id": "1", "answer": "B", "num_choices": 3, "has_image": True},
    {"question_id": "2", "answer": 0, "choices": ["x", "y"], "image": "image.png"},  # index 0 = A; image -> IMG
    {"question_id": "3", "answer": "C", "num_choices": 3, "has_image": False},
    {"question_id": "4", "answer": "A", "num_choices": 2, "has_image": True},
    {"question_id": "5", "answer": "D", "num_choices": 4, "has_image": False},
]
SQA_PREDICTIONS = ["B. apple", "The answer is A.", "b", "E", "D"]


def test_sqa_scores_by_hand():
    result = score_scienceqa(SQA_PREDICTIONS, SQA_RECORDS)
    # right: 1, 2, 5 -> 3/5; image questions 1, 2, 4 -> 2/3; "b" failed; "E" is a letter beyond 2 choices -> wrong
    assert result["accuracy"] == pytest.approx(0.6)
    assert result["img_accuracy"] == pytest.approx(2 / 3)
    assert (result["n"], result["n_img"], result["correct"], result["img_correct"]) == (5, 3, 3, 2)
    assert result["n_failed"] == 1


def test_sqa_lmms_eval_scores_by_hand():
    result = score_scienceqa(SQA_PREDICTIONS, SQA_RECORDS, parser="lmms_eval")
    # right: 1 ("B. apple"), 5 ("D") -> 2/5; image: 1 of 3
    assert result["accuracy"] == pytest.approx(0.4)
    assert result["img_accuracy"] == pytest.approx(1 / 3)


def test_sqa_bad_ground_truth():
    with pytest.raises(ValueError, match="record 0 \\(question_id 'x'\\).*not one of ABC"):
        score_scienceqa(["A"], [{"question_id": "x", "answer": "E", "num_choices": 3}])
    with pytest.raises(ValueError, match="index 3 outside 2 choices"):
        score_scienceqa(["A"], [{"answer": 3, "num_choices": 2}])


# ================================================================================================================
# MMBench
# ================================================================================================================

FRUITS = {"A": "apple", "B": "banana", "C": "cherry", "D": "date"}


@pytest.mark.parametrize("text, expected", [
    ("B", "B"),
    (" B ", "B"),
    ("B. banana", "B"),
    ("(C)", "C"),
    ("C: cherry", "C"),
    ("The answer is D.", "D"),
    ("banana", "B"),                     # no letter -> the unique option text contained in the answer
    ("I like Banana.", "B"),             # option text matching ignores case
    ("b", None),                         # lower-case letter is not an option letter, and no option text matches
    ("A or B", None),                    # two letters, no option text
    ("apple and banana", None),          # two option texts
    ("", None),
])
def test_mmbench_choice_extraction(text: str, expected: str | None):
    assert extract_mmbench_choice(text, FRUITS) == expected


def test_mmbench_letter_outside_options_is_ignored():
    assert extract_mmbench_choice("C", {"A": "yes", "B": "no"}) is None


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
    assert (result["n_questions"], result["n_copies"], result["n_unresolved"]) == (3, 6, 1)
    assert result["categories"] == {"ocr": {"accuracy": 0.5, "n": 2}, "scene": {"accuracy": 1.0, "n": 1}}
    assert result["l2_categories"] == {"perception": {"accuracy": 0.5, "n": 2}, "reasoning": {"accuracy": 1.0, "n": 1}}


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
    with pytest.raises(ValueError, match="no ground-truth answer"):
        score_mmbench(["A"], [{"index": 1, "options": FRUITS, "answer": None}])
    with pytest.raises(ValueError, match="answer 'E' is not one of the options ABCD"):
        score_mmbench(["A"], [_mmb(1, FRUITS, "E", "x")])


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
    defaults = {name: spec.parser for name, spec in SCORERS.items()}
    assert defaults == {"mme": "official", "pope": "llava", "scienceqa_img": "llava", "mmbench": "rules",
                        "vqav2": "official", "textvqa": "evalai", "gqa": "llava"}
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


def test_apply_prompt_suffix_does_not_double():
    released = "Is there a chair in the image?\nAnswer the question using a single word or phrase."
    assert apply_prompt_suffix(released, SHORT_ANSWER_SUFFIX) == released
    assert apply_prompt_suffix("Is there a chair?", SHORT_ANSWER_SUFFIX) == "Is there a chair?" + SHORT_ANSWER_SUFFIX


def test_predictions_must_be_strings():
    with pytest.raises(ValueError, match="single string"):
        score_gqa("yes", [{"answer": "yes"}])
    with pytest.raises(ValueError, match="record 0 \\(question_id 4\\) is NoneType"):
        score_gqa([None], [{"question_id": 4, "answer": "yes"}])
