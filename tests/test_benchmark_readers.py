"""Benchmark file readers (vlweave.eval.benchmarks.readers) on small files written into tmp_path."""

from __future__ import annotations

import base64
import csv
import io
import json
from pathlib import Path

import pytest
from PIL import Image

from vlweave.eval.benchmarks import score_mme, score_mmbench, score_pope
from vlweave.eval.benchmarks.readers import (
    BenchmarkDataError, MMBenchRecord, attach_pope_labels, read_gqa_questions, read_mmbench_tsv, read_mme,
    read_pope, read_scienceqa, read_vqa_annotations,
)

SUFFIX = "\nAnswer the question using a single word or phrase."


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def png_b64(color: tuple[int, int, int], size: tuple[int, int] = (2, 3)) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


# ================================================================================================================
# MME
# ================================================================================================================


def make_mme_release(root: Path) -> Path:
    """A miniature MME_Benchmark: artwork (images/ + questions_answers_YN/), existence and OCR (flat)."""
    art = root / "artwork"
    (art / "images").mkdir(parents=True)
    (art / "questions_answers_YN").mkdir()
    Image.new("RGB", (4, 4)).save(art / "images" / "10002.jpg")
    (art / "questions_answers_YN" / "10002.txt").write_text(
        "Does this artwork exist in the form of painting? Please answer yes or no.\tYes\n"
        "Does this artwork exist in the form of glassware? Please answer yes or no.\tNo\n\n", encoding="utf-8")
    for folder, stem, suffix in (("existence", "000000006040", ".jpg"), ("OCR", "0001", ".png")):
        (root / folder).mkdir()
        Image.new("RGB", (4, 4)).save(root / folder / (stem + suffix))
        (root / folder / f"{stem}.txt").write_text(
            f"Is there a train in this image? Please answer yes or no.\tYes\r\n"
            f"Is there a bed in this image? Please answer yes or no.\tNo \r\n", encoding="utf-8")
    (root / "not_a_subtask").mkdir()
    return root


def test_mme_release_layout(tmp_path: Path):
    root = make_mme_release(tmp_path / "MME_Benchmark")
    records = read_mme(root)
    # official subtask order: existence ... OCR (perception), artwork before OCR
    assert [r.subtask for r in records] == ["existence", "existence", "artwork", "artwork", "OCR", "OCR"]
    art = records[2]
    assert art.question_id == "artwork/10002.jpg#0" and art.answer == "yes" and art.image_name == "10002.jpg"
    assert art.image == str(root / "artwork" / "images" / "10002.jpg")
    assert art.question.endswith("Please answer yes or no.")
    assert art.text == "Does this artwork exist in the form of painting?" + SUFFIX
    assert records[1].answer == "no" and records[1].question_id == "existence/000000006040.jpg#1"
    assert records[5].image == str(root / "OCR" / "0001.png")
    assert [r.subtask for r in read_mme(root, subtasks=["ocr"])] == ["OCR", "OCR"]
    # end to end: every question answered right -> 200 per subtask
    result = score_mme([r.answer.capitalize() for r in records], records)
    assert result["perception"] == pytest.approx(600.0)


def test_mme_eval_tool_layout(tmp_path: Path):
    results = tmp_path / "Your_Results"
    results.mkdir()
    (results / "existence.txt").write_text(
        "1.jpg\tIs there a dog? Please answer yes or no.\tYes\tYes, there is.\n"
        "1.jpg\tIs there a cat? Please answer yes or no.\tNo\tYes\n"
        "2.jpg\tIs there a car? Please answer yes or no.\tYes\tyes\n"
        "2.jpg\tIs there a bus? Please answer yes or no.\tNo\tNo.\n", encoding="utf-8")
    (results / "code_reasoning.txt").write_text("0020.png\tWill it print 5? Please answer yes or no.\tNo\n"
                                                "0020.png\tWill it print 6? Please answer yes or no.\tYes\n",
                                                encoding="utf-8")
    records = read_mme(results)
    assert [r.question_id for r in records[:2]] == ["existence/1.jpg#0", "existence/1.jpg#1"]
    assert records[0].prediction == "Yes, there is." and records[4].prediction is None
    assert records[0].image is None
    result = score_mme([r.prediction or "" for r in records], records)
    # existence: 3/4 right -> 75; image 2 fully right -> acc+ 50 -> 125; code_reasoning: "" twice -> 0
    assert result["subtasks"]["existence"]["score"] == pytest.approx(125.0)
    assert result["cognition"] == 0.0
    single = read_mme(results / "existence.txt")
    assert len(single) == 4


def test_mme_eval_tool_resolves_images_from_release(tmp_path: Path):
    release = make_mme_release(tmp_path / "MME_Benchmark")
    tool = tmp_path / "artwork.txt"
    tool.write_text("10002.jpg\tQ1? Please answer yes or no.\tYes\n10002.jpg\tQ2? Please answer yes or no.\tNo\n",
                    encoding="utf-8")
    records = read_mme(tool, image_root=release)
    assert records[0].image == str(release / "artwork" / "images" / "10002.jpg")


def test_mme_bad_files(tmp_path: Path):
    results = tmp_path / "res"
    results.mkdir()
    bad = results / "color.txt"
    bad.write_text("a.jpg\tIs it red?\tYes\n"
                   "a.jpg only one field\n"
                   "b.jpg\tIs it blue?\tMaybe\n", encoding="utf-8")
    with pytest.raises(ValueError) as info:
        read_mme(results)
    message = str(info.value)
    assert str(bad) in message
    assert "line 2: expected 3 or 4 tab-separated fields" in message
    assert "line 3: answer must be Yes or No, got 'Maybe'" in message

    release = tmp_path / "rel"
    (release / "count").mkdir(parents=True)
    (release / "count" / "7.txt").write_text("How many? Please answer yes or no.\tYes\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"7\.txt: no image named 7\.<jpg"):
        read_mme(release)
    Image.new("RGB", (2, 2)).save(release / "count" / "7.jpg")
    (release / "count" / "7.txt").write_text("Two fields\tYes\textra\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"7\.txt: 1 bad record\(s\):\n  line 1: expected 2 tab-separated fields"):
        read_mme(release)
    with pytest.raises(ValueError, match="no MME subtask folders"):
        read_mme(tmp_path / "res" / ".." / "rel" / "count")
    with pytest.raises(ValueError, match="not an MME subtask"):
        read_mme(release / "count" / "7.txt")


# ================================================================================================================
# POPE
# ================================================================================================================


def test_pope_annotation_file_split_from_name(tmp_path: Path):
    path = write_jsonl(tmp_path / "coco_pope_adversarial.json", [
        {"question_id": 1, "image": "COCO_val2014_000000310196.jpg", "text": "Is there a snowboard in the image?",
         "label": "yes"},
        {"question_id": 2, "image": "COCO_val2014_000000310196.jpg", "text": "Is there a dog in the image?",
         "label": "no"},
    ])
    records = read_pope(path, image_folder="/data/coco/val2014")
    assert [(r.question_id, r.label, r.split) for r in records] == [(1, "yes", "adversarial"), (2, "no", "adversarial")]
    assert records[0].image == "/data/coco/val2014/COCO_val2014_000000310196.jpg"
    result = score_pope(["Yes", "No"], records)
    assert result["splits"]["adversarial"]["accuracy"] == 1.0


def test_pope_llava_question_file_with_labels_attached(tmp_path: Path):
    annotations = tmp_path / "coco"
    annotations.mkdir()
    for split, labels in (("random", ["yes", "no"]), ("popular", ["no"])):
        write_jsonl(annotations / f"coco_pope_{split}.json", [
            {"question_id": i + 1, "image": f"{split}{i}.jpg", "text": f"Is there a {split} thing {i}?", "label": label}
            for i, label in enumerate(labels)])
    questions_path = write_jsonl(tmp_path / "llava_pope_test.jsonl", [
        {"question_id": 10, "image": "random0.jpg", "text": "Is there a random thing 0?" + SUFFIX,
         "category": "random"},
        {"question_id": 11, "image": "popular0.jpg", "text": "Is there a popular thing 0?" + SUFFIX,
         "category": "popular"},
        {"question_id": 12, "image": "random1.jpg", "text": "Is there a random thing 1?" + SUFFIX,
         "category": "random"},
    ])
    with pytest.raises(ValueError, match="line 1 \\(question_id 10\\): missing 'label'"):
        read_pope(questions_path)
    questions = read_pope(questions_path, require_label=False)
    assert all(q.label is None for q in questions)
    labelled = attach_pope_labels(questions, annotations)
    assert [(q.question_id, q.label) for q in labelled] == [(10, "yes"), (11, "no"), (12, "no")]
    assert questions[0].label is None  # the input list is not modified

    write_jsonl(annotations / "coco_pope_popular.json", [
        {"question_id": 1, "image": "p.jpg", "text": "Is there a cat?", "label": "no"}])
    with pytest.raises(ValueError, match=r"coco_pope_popular\.json: annotation 0 .* does not match question 11"):
        attach_pope_labels(questions, annotations)


def test_pope_bad_records(tmp_path: Path):
    path = write_jsonl(tmp_path / "pope.jsonl", [
        {"question_id": 1, "image": "a.jpg", "text": "Is there a cat?", "label": "maybe", "category": "random"},
        {"question_id": 2, "image": "", "text": "Is there a dog?", "label": "yes", "category": "random"},
        {"question_id": 3, "image": "c.jpg", "text": "Is there a cow?", "label": "no", "category": "hard"},
    ])
    with pytest.raises(ValueError) as info:
        read_pope(path)
    message = str(info.value)
    assert str(path) in message
    assert "line 1 (question_id 1): 'label' must be yes or no, got 'maybe'" in message
    assert "line 2 (question_id 2): missing or empty 'image'" in message
    assert "line 3 (question_id 3): unknown split 'hard'" in message


# ================================================================================================================
# MMBench TSV
# ================================================================================================================

MMB_HEADER = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "l2-category", "image"]
RED = (255, 0, 0)
BLUE = (0, 0, 255)


def write_tsv(path: Path, header: list[str], rows: list[list]) -> Path:
    with open(path, "w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh, delimiter="\t", lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)
    return path


def mmbench_rows() -> list[list]:
    red = png_b64(RED)
    return [
        [0, "What color is the square?", "nan", "red", "green", "blue", "", "A", "attribute_recognition",
         "finegrained_perception", red],
        # the circular copy shares row 0's picture by naming its index
        [1000000, "What color is the square?", "nan", "green", "blue", "red", "", "C", "attribute_recognition",
         "finegrained_perception", "0"],
        # a question spanning two lines (quoted by the csv writer) with a hint and two options
        [1, "Which is true?\nPick one.", "The picture is blue.", "It is blue", "It is red", "nan", "nan", "A",
         "image_scene", "coarse_perception", png_b64(BLUE)],
    ]


def test_mmbench_tsv_lazy_images(tmp_path: Path):
    path = write_tsv(tmp_path / "mmbench_dev.tsv", MMB_HEADER, mmbench_rows())
    records = read_mmbench_tsv(path)
    assert [r.index for r in records] == [0, 1000000, 1]
    main, copy, other = records
    assert main.options == {"A": "red", "B": "green", "C": "blue"}   # D empty -> 3 options
    assert (main.answer, main.hint, main.category, main.l2_category) == ("A", None, "attribute_recognition",
                                                                         "finegrained_perception")
    assert main.image is None and main.is_main and not copy.is_main and copy.group == 0
    assert copy.image_b64 == main.image_b64
    img = copy.load_image()
    assert img.size == (2, 3) and img.getpixel((0, 0)) == RED
    assert other.question == "Which is true?\nPick one." and other.options == {"A": "It is blue", "B": "It is red"}
    assert other.prompt() == ("The picture is blue.\nWhich is true?\nPick one.\nA. It is blue\nB. It is red\n"
                              "Answer with the option's letter from the given choices directly.")
    assert other.load_image().getpixel((1, 1)) == BLUE
    assert "image_b64" not in repr(main)
    # end to end: main right, copy wrong -> group 0 fails; group 1 right
    result = score_mmbench(["A", "B", "It is blue"], records)
    assert result["accuracy"] == pytest.approx(0.5)
    assert result["categories"] == {"attribute_recognition": {"accuracy": 0.0, "n": 1},
                                    "image_scene": {"accuracy": 1.0, "n": 1}}


def test_mmbench_tsv_images_written_once(tmp_path: Path):
    path = write_tsv(tmp_path / "mmbench_dev.tsv", MMB_HEADER, mmbench_rows())
    folder = tmp_path / "images"
    records = read_mmbench_tsv(path, image_dir=folder)
    assert sorted(p.name for p in folder.iterdir()) == ["0.png", "1.png"]
    assert records[0].image == records[1].image == str(folder / "0.png")
    assert records[2].image == str(folder / "1.png")
    with Image.open(records[2].image) as img:
        assert img.getpixel((0, 0)) == BLUE
    assert records[1].load_image().getpixel((0, 0)) == RED


def test_mmbench_test_split_without_answers(tmp_path: Path):
    header = [c for c in MMB_HEADER if c != "answer"]
    rows = [[v for c, v in zip(MMB_HEADER, row) if c != "answer"] for row in mmbench_rows()]
    records = read_mmbench_tsv(write_tsv(tmp_path / "mmbench_test.tsv", header, rows))
    assert all(r.answer is None for r in records)
    assert records[0].l2_category == "finegrained_perception"


def test_mmbench_missing_column(tmp_path: Path):
    header = [c for c in MMB_HEADER if c != "question"]
    path = write_tsv(tmp_path / "no_question.tsv", header, [])
    with pytest.raises(ValueError, match=r"no_question\.tsv: missing column\(s\) 'question'"):
        read_mmbench_tsv(path)
    empty = tmp_path / "empty.tsv"
    empty.write_text("", encoding="utf-8")
    with pytest.raises(ValueError, match=r"empty\.tsv: empty file"):
        read_mmbench_tsv(empty)


def test_mmbench_bad_rows_name_row_and_line(tmp_path: Path):
    rows = mmbench_rows()
    rows += [
        ["x7", "Q?", "", "a", "b", "", "", "A", "c", "l2", png_b64(RED)],     # row 4: index not an integer
        [8, "Q?", "", "a", "b", "", "", "E", "c", "l2", png_b64(RED)],        # row 5: answer not an option
        [9, "Q?", "", "a", "", "", "", "A", "c", "l2", png_b64(RED)],         # row 6: one option only
        [10, "Q?", "", "a", "b", "", "", "A", "c", "l2", "42"],               # row 7: reference to no row
        [0, "Q?", "", "a", "b", "", "", "A", "c", "l2", png_b64(RED)],        # row 8: duplicate index
    ]
    path = write_tsv(tmp_path / "bad.tsv", MMB_HEADER, rows)
    with pytest.raises(ValueError) as info:
        read_mmbench_tsv(path)
    message = str(info.value)
    assert str(path) in message
    # row 3 spans lines 4-5, so row 4 starts on line 6
    assert "row 4 (line 6): 'index' must be an integer, got 'x7'" in message
    assert "row 5 (line 7) (index 8): answer 'E' is not one of the options AB" in message
    assert "row 6 (line 8) (index 9): needs at least options A and B, got 1" in message
    assert "row 8 (line 10) (index 0): duplicate index (first at row 1 (line 2) (index 0))" in message
    ok = write_tsv(tmp_path / "ref.tsv", MMB_HEADER, mmbench_rows()[:1] + [rows[6]])
    with pytest.raises(ValueError, match=r"row 2 \(line 3\) \(index 10\): 'image' '42' is neither base64"):
        read_mmbench_tsv(ok)


def test_mmbench_corrupt_image(tmp_path: Path):
    not_png = base64.b64encode(b"this is not an image at all" * 4).decode("ascii")
    rows = [[5, "Q?", "", "a", "b", "", "", "A", "c", "l2", not_png],
            [6, "Q?", "", "a", "b", "", "", "A", "c", "l2", "!!!" + "A" * 80]]
    path = write_tsv(tmp_path / "corrupt.tsv", MMB_HEADER, rows)
    records = read_mmbench_tsv(path)  # lazy: nothing decoded yet
    with pytest.raises(ValueError, match=r"corrupt\.tsv: row 1 \(line 2\) \(index 5\): image is not a readable"):
        records[0].load_image()
    with pytest.raises(ValueError, match=r"corrupt\.tsv: row 2 \(line 3\) \(index 6\): invalid base64"):
        records[1].load_image()
    with pytest.raises(ValueError, match=r"row 1 \(line 2\) \(index 5\): image is not a readable"):
        read_mmbench_tsv(path, image_dir=tmp_path / "out")
    assert isinstance(records[0], MMBenchRecord)


# ================================================================================================================
# ScienceQA, VQAv2 / TextVQA, GQA
# ================================================================================================================


def test_scienceqa_problems(tmp_path: Path):
    problems = tmp_path / "problems.json"
    problems.write_text(json.dumps({
        "10": {"question": "Which is north?", "choices": ["x", "y", "z"], "answer": 2, "hint": "", "image": "image.png",
               "split": "test", "subject": "social science"},
        "11": {"question": "Which is warm?", "choices": ["a", "b"], "answer": 0, "hint": "Think.", "image": None,
               "split": "test"},
        "12": {"question": "Train?", "choices": ["a", "b"], "answer": 1, "image": None, "split": "train"},
    }), encoding="utf-8")
    records = read_scienceqa(problems, image_root=tmp_path / "test")
    assert [r.question_id for r in records] == ["10", "11"]
    assert (records[0].answer, records[0].num_choices, records[0].has_image) == ("C", 3, True)
    assert records[0].image == str(tmp_path / "test" / "10" / "image.png")
    assert (records[1].answer, records[1].has_image, records[1].hint, records[1].image) == ("A", False, "Think.", None)
    splits = tmp_path / "pid_splits.json"
    splits.write_text(json.dumps({"test": ["11"], "train": ["12"]}), encoding="utf-8")
    assert [r.question_id for r in read_scienceqa(problems, splits, split="train")] == ["12"]
    splits.write_text(json.dumps({"test": ["11", "99"]}), encoding="utf-8")
    with pytest.raises(ValueError, match=r"problems\.json: 1 bad record\(s\):\n  problem '99': not found"):
        read_scienceqa(problems, splits)
    problems.write_text(json.dumps({"1": {"question": "Q", "choices": ["a", "b"], "answer": 2, "split": "test"}}))
    with pytest.raises(ValueError, match="problem '1': 'answer' must be an index into the 2 choices, got 2"):
        read_scienceqa(problems)


def test_vqav2_annotations_with_questions(tmp_path: Path):
    annotations = tmp_path / "v2_mscoco_val2014_annotations.json"
    annotations.write_text(json.dumps({"annotations": [
        {"question_id": 1, "image_id": 9, "answer_type": "number", "question_type": "how many",
         "answers": [{"answer": "2", "answer_confidence": "yes", "answer_id": i + 1} for i in range(10)]},
    ]}), encoding="utf-8")
    questions = tmp_path / "v2_OpenEnded_mscoco_val2014_questions.json"
    questions.write_text(json.dumps({"questions": [{"question_id": 1, "image_id": 9, "question": "How many?"}]}))
    (record,) = read_vqa_annotations(annotations, questions)
    assert (record.question_id, record.answers, record.question, record.answer_type) == (1, ["2"] * 10, "How many?",
                                                                                          "number")


def test_textvqa_annotations_and_errors(tmp_path: Path):
    path = tmp_path / "TextVQA_0.5.1_val.json"
    path.write_text(json.dumps({"dataset_name": "textvqa", "data": [
        {"question_id": 34602, "image_id": "003a8ae2ef43b901", "question": "what is the brand?",
         "answers": ["nous les gosses"] * 9 + ["dakota"]},
        {"question_id": 34603, "question": "what year?", "answers": []},
    ]}), encoding="utf-8")
    with pytest.raises(ValueError, match=r"TextVQA_0\.5\.1_val\.json: 1 bad record\(s\):\n  record 1 \(question_id "
                                         r"34603\): 'answers' must be a non-empty list"):
        read_vqa_annotations(path)
    data = json.loads(path.read_text())
    data["data"].pop()
    path.write_text(json.dumps(data))
    (record,) = read_vqa_annotations(path)
    assert record.answers[-1] == "dakota" and record.image_id == "003a8ae2ef43b901"
    wrong = tmp_path / "wrong.json"
    wrong.write_text("[]")
    with pytest.raises(ValueError, match=r"wrong\.json: expected an object with an 'annotations'"):
        read_vqa_annotations(wrong)


def test_gqa_questions(tmp_path: Path):
    path = tmp_path / "testdev_balanced_questions.json"
    path.write_text(json.dumps({
        "20968033": {"imageId": "n288870", "question": "Is the sky blue?", "answer": "yes", "types": {}},
        "20968034": {"imageId": "n288870", "question": "What is it?"},
    }), encoding="utf-8")
    with pytest.raises(ValueError, match="question '20968034': missing 'answer'"):
        read_gqa_questions(path)
    data = json.loads(path.read_text())
    del data["20968034"]
    path.write_text(json.dumps(data))
    (record,) = read_gqa_questions(path)
    assert (record.question_id, record.answer, record.image_id) == ("20968033", "yes", "n288870")
    bad = tmp_path / "bad.json"
    bad.write_text('{"a": 1,}')
    with pytest.raises(ValueError, match=r"bad\.json: invalid JSON at line 1"):
        read_gqa_questions(bad)
