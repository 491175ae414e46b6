"""Loading/validation of LLaVA data (vlweave.data.llava_json), question files (vlweave.data.questions) and batch
padding (vlweave.data.collate)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from vlweave.data.collate import pad_batch
from vlweave.data.llava_json import DataError, Sample, load_llava_data
from vlweave.data.questions import Question, read_questions
from vlweave.processing import IGNORE_INDEX


def human(value: str) -> dict:
    return {"from": "human", "value": value}


def gpt(value: str) -> dict:
    return {"from": "gpt", "value": value}


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (4, 4)).save(images / "a.png")
    Image.new("RGB", (4, 4)).save(images / "b.png")
    return tmp_path


def write_json(path: Path, records: list) -> Path:
    path.write_text(json.dumps(records), encoding="utf-8")
    return path


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n", encoding="utf-8")
    return path


# --------------------------------------------------------------------------------------------------------------
# load_llava_data: valid files
# --------------------------------------------------------------------------------------------------------------


def test_load_json_list(folder: Path):
    path = write_json(folder / "train.json", [
        {"id": "x1", "image": "images/a.png", "conversations": [human("<image>\nWhat?"), gpt("A.")]},
        {"id": "x2", "conversations": [human("Hi"), gpt("Hello"), human("Bye"), gpt("Bye")]},
        {"id": 3, "image": "images/b.png", "conversations": [human("No placeholder"), gpt("ok")]},
    ])
    samples = load_llava_data(path)
    assert [s.id for s in samples] == ["x1", "x2", "3"]
    assert samples[0] == Sample("x1", [human("<image>\nWhat?"), gpt("A.")], str(folder / "images" / "a.png"))
    assert samples[1].image is None  # text-only
    # an image without a placeholder gets one in front of the first human turn (LLaVA custom-data convention)
    assert samples[2].conversations[0] == human("<image>\nNo placeholder")


def test_load_jsonl_with_image_folder_and_roles(folder: Path):
    data_dir = folder / "data"
    data_dir.mkdir()
    path = write_jsonl(data_dir / "train.jsonl", [
        {"image": "a.png",
         "conversations": [{"from": "user", "value": "<image> Q"}, {"from": "assistant", "value": "A"}]},
        {"conversations": [human("Q"), gpt("A")]},
    ])
    samples = load_llava_data(path, image_folder=folder / "images")
    assert [s.id for s in samples] == ["train.jsonl:0", "train.jsonl:1"]  # "<file>:<index>" when ids are missing
    assert samples[0].image == str((folder / "images" / "a.png").resolve())
    assert [t["from"] for t in samples[0].conversations] == ["human", "gpt"]


def test_leading_gpt_turn_dropped_with_warning(folder: Path):
    path = write_json(folder / "t.json", [{"id": "lead", "conversations": [gpt("hi"), human("Q"), gpt("A")]}])
    with pytest.warns(UserWarning, match=r"t\.json.*leading gpt turn.*'lead'"):
        samples = load_llava_data(path)
    assert samples[0].conversations == [human("Q"), gpt("A")]


def test_check_images_false_skips_existence(folder: Path):
    path = write_json(folder / "t.json", [{"id": "m", "image": "missing.png", "conversations": [human("Q"), gpt("A")]}])
    samples = load_llava_data(path, check_images=False)
    assert samples[0].image == str(folder / "missing.png")


# --------------------------------------------------------------------------------------------------------------
# load_llava_data: errors
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("record", "problem"),
    [
        ({"id": "r", "image": "images/nope.png", "conversations": [human("<image>"), gpt("A")]},
         "image file not found"),
        ({"id": "r"}, "missing 'conversations'"),
        ({"id": "r", "conversations": []}, "'conversations' must be a non-empty list"),
        ({"id": "r", "conversations": "Q"}, "'conversations' must be a non-empty list"),
        ({"id": "r", "conversations": [{"from": "human"}, gpt("A")]},
         "turn 0 must be an object with 'from' and 'value'"),
        ({"id": "r", "conversations": [{"value": "Q"}, gpt("A")]}, "turn 0 must be an object with 'from' and 'value'"),
        ({"id": "r", "conversations": [human("Q"), human("Q2")]}, "turn 1 is 'human'; turns must alternate"),
        ({"id": "r", "conversations": [human("Q"), gpt("A"), human("Q2")]}, "ends with a human turn"),
        ({"id": "r", "conversations": [{"from": "bot", "value": "Q"}, gpt("A")]}, "unknown role 'bot'"),
        ({"id": "r", "conversations": [gpt("only")]}, "the only turn is a gpt turn"),
        ({"id": "r", "image": "images/a.png", "conversations": [human("<image><image>"), gpt("A")]},
         "2 <image> placeholders"),
        ({"id": "r", "image": "images/a.png", "conversations": [human("Q"), gpt("<image>")]}, "<image> in gpt turn 1"),
        ({"id": "r", "conversations": [human("<image>\nQ"), gpt("A")]},
         "<image> in turn 0 but the record has no 'image'"),
        ({"id": "r", "image": ["a.png", "b.png"], "conversations": [human("Q"), gpt("A")]}, "'image' is a list"),
        ({"id": "r", "conversations": [human(3), gpt("A")]}, "turn 0 'value' must be a string"),
    ],
)
def test_record_errors_name_file_record_and_problem(folder: Path, record: dict, problem: str):
    good = {"id": "ok", "conversations": [human("Q"), gpt("A")]}
    path = write_json(folder / "bad.json", [good, record])
    with pytest.raises(DataError) as err:
        load_llava_data(path)
    message = str(err.value)
    assert str(path) in message
    assert "record 1 (id 'r')" in message
    assert problem in message
    assert "'ok'" not in message


def test_missing_id_is_named_by_file_and_index(folder: Path):
    path = write_json(folder / "noid.json", [{"conversations": [human("Q"), gpt("A")]}, {"conversations": []}])
    with pytest.raises(DataError, match=r"record 1 \(id 'noid\.json:1'\)"):
        load_llava_data(path)


def test_duplicate_ids(folder: Path):
    path = write_json(folder / "dup.json", [{"id": "same", "conversations": [human("Q"), gpt("A")]}] * 2)
    with pytest.raises(DataError, match=r"record 1 \(id 'same'\): duplicate id \(first used by record 0\)"):
        load_llava_data(path)


def test_many_bad_records_in_one_error(folder: Path):
    records = [{"id": f"bad{i}", "conversations": []} for i in range(25)]
    records.insert(3, {"id": "img", "image": "images/gone.png", "conversations": [human("Q"), gpt("A")]})
    path = write_json(folder / "many.json", records)
    with pytest.raises(DataError) as err:
        load_llava_data(path)
    lines = str(err.value).splitlines()
    assert lines[0] == f"{path}: 26 problem(s) in records:"
    assert "record 3 (id 'img'): image file not found" in str(err.value)
    assert lines[-1] == "  ... and 6 more"
    assert len(lines) == 1 + 20 + 1


def test_missing_image_folder_is_hinted(folder: Path):
    path = write_json(folder / "t.json", [{"id": "a", "image": "a.png", "conversations": [human("Q"), gpt("A")]}])
    with pytest.raises(DataError, match=r"(?s)image file not found.*image folder .*nowhere does not exist"):
        load_llava_data(path, image_folder=folder / "nowhere")


def test_jsonl_bad_lines_report_line_numbers(folder: Path):
    path = folder / "broken.jsonl"
    good = json.dumps({"id": "a", "conversations": [human("Q"), gpt("A")]})
    path.write_text(f"{good}\n\n{{\"id\": \"b\",\n{good}\nnot json\n", encoding="utf-8")
    with pytest.raises(DataError) as err:
        load_llava_data(path)
    message = str(err.value)
    assert str(path) in message and "line 3: invalid JSON" in message and "line 5: invalid JSON" in message
    assert "line 1" not in message and "line 4" not in message


def test_jsonl_record_errors_name_line_and_record(folder: Path):
    path = folder / "r.jsonl"
    path.write_text("\n" + json.dumps({"id": "e", "conversations": []}) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"record 0 \(line 2\) \(id 'e'\)"):
        load_llava_data(path)


@pytest.mark.parametrize(
    ("content", "problem"),
    [('{"id": 1}', "expected a JSON list"), ("[1, 2", "invalid JSON at line 1"), ("[3]", "expected an object")],
)
def test_file_level_errors(folder: Path, content: str, problem: str):
    path = folder / "f.json"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=problem) as err:
        load_llava_data(path)
    assert str(path) in str(err.value)


def test_missing_file(folder: Path):
    with pytest.raises(DataError, match="data file not found"):
        load_llava_data(folder / "absent.json")


# --------------------------------------------------------------------------------------------------------------
# read_questions
# --------------------------------------------------------------------------------------------------------------

SUFFIX = "\nAnswer the question using a single word or phrase."


def question_errors(path: Path) -> str:
    """The one ``DataError`` message :func:`read_questions` raises for ``path`` (it names the file)."""
    with pytest.raises(DataError) as info:
        read_questions(path)
    message = str(info.value)
    assert str(path) in message
    return message


def test_read_questions(folder: Path):
    path = write_jsonl(folder / "q.jsonl", [
        {"question_id": 1, "image": "images/a.png", "text": "Is it red?\nAnswer yes or no.", "category": "c"},
        {"question_id": "q2", "text": "Text only?", "answer": "yes"},
    ])
    questions = read_questions(path)
    assert questions[0].image == str(folder / "images" / "a.png") and questions[0].meta["category"] == "c"
    assert questions[1].image is None and questions[1].answer == "yes"
    assert questions[0].has_image and not questions[1].has_image
    assert questions[1].as_record() == {"question_id": "q2", "image": None, "text": "Text only?", "answer": "yes"}


def test_llava_jsonl_questions(tmp_path: Path):
    path = write_jsonl(tmp_path / "q.jsonl", [
        {"question_id": 1, "image": "a.jpg", "text": "What is it?" + SUFFIX, "category": "default", "extra_key": 5},
        {"question_id": "x2", "text": "Text only?", "answer": "yes"},
    ])
    questions = read_questions(path, image_folder=tmp_path / "imgs", check_images=False)
    assert questions[0] == Question(question_id=1, text="What is it?" + SUFFIX, image=str(tmp_path / "imgs" / "a.jpg"),
                                    meta={"category": "default", "extra_key": 5})
    assert questions[1].image is None and questions[1].answer == "yes"
    # no folder: relative to the file's folder
    assert read_questions(path, check_images=False)[0].image == str(tmp_path / "a.jpg")


def test_llava_conversation_json(tmp_path: Path):
    path = tmp_path / "llava_test_CQM-A.json"
    path.write_text(json.dumps([
        {"id": "4", "image": "4/image.png", "conversations": [
            {"from": "human", "value": "<image>\nWhich is north?\nA. x\nB. y"}, {"from": "gpt", "value": "B"}]},
        {"id": "5", "conversations": [{"from": "human", "value": "Which is warm?"}]},
    ]), encoding="utf-8")
    first, second = read_questions(path, check_images=False)
    assert (first.question_id, first.text, first.answer, first.image) == ("4", "Which is north?\nA. x\nB. y", "B",
                                                                          str(tmp_path / "4" / "image.png"))
    assert (second.text, second.answer, second.image) == ("Which is warm?", None, None)


def test_question_file_line_numbers_ids_and_answers(tmp_path: Path):
    # Line numbers count blank lines; ids are strings or integers (not booleans); answers are strings or numbers.
    path = tmp_path / "bad.jsonl"
    path.write_text('{"question_id": 1, "text": "ok"}\n\n{"question_id": 2, "text": ""}\n'
                    '{"question_id": true, "text": "bool id"}\n{"question_id": 7, "text": "Q", "answer": ["a"]}\n'
                    '{"question_id": 8, "text": "Q", "answer": 3}\n', encoding="utf-8")
    message = question_errors(path)
    assert "3 problem(s)" in message
    assert "record 1 (line 3) (question_id 2): missing or empty 'text'" in message
    assert "record 2 (line 4) (question_id True): 'question_id' must be a string or an integer, got bool" in message
    assert "record 3 (line 5) (question_id 7): 'answer' must be a string, got list" in message
    path.write_text('{"question_id": 8, "text": "Q", "answer": 3}\n', encoding="utf-8")
    assert read_questions(path)[0].answer == "3"
    # The benchmark runner reports a bad question file as a BenchmarkDataError with the same message.
    from vlweave.eval.benchmarks.inputs import load_benchmark
    from vlweave.eval.benchmarks.readers import BenchmarkDataError

    path.write_text('{"question_id": 1, "text": ""}\n', encoding="utf-8")
    with pytest.raises(BenchmarkDataError, match=r"bad\.jsonl: 1 problem\(s\) in records:\n  record 0 \(line 1\) "
                                                 r"\(question_id 1\): missing or empty 'text'"):
        load_benchmark("vqav2", path)


def test_llava_questions_invalid_json_and_missing_file(tmp_path: Path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"question_id": 1, "text": "ok"}\n{"question_id": 2, "te\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"(?s)broken\.jsonl.*line 2: invalid JSON"):
        read_questions(path)
    with pytest.raises(ValueError, match="nothing.jsonl: data file not found"):
        read_questions(tmp_path / "nothing.jsonl")
    listing = tmp_path / "list.json"
    listing.write_text('[{"question_id": 1, "text": "ok"}, 7]', encoding="utf-8")
    with pytest.raises(ValueError, match=r"(?s)list\.json.*record 1: expected an object, got int"):
        read_questions(listing)


def test_question_errors_in_one_message(folder: Path):
    path = write_jsonl(folder / "q.jsonl", [
        {"question_id": 1, "text": "ok"},
        {"question_id": 1, "text": "dup"},
        {"text": "no id"},
        {"question_id": 4, "text": ""},
        {"question_id": 5, "image": "images/none.png", "text": "Q"},
        {"question_id": 6, "text": "<image> Q"},
    ])
    message = question_errors(path)
    assert "5 problem(s)" in message
    assert "record 1 (line 2) (question_id 1): duplicate question_id (first used by record 0 (line 1))" in message
    assert "record 2 (line 3) (question_id None): missing 'question_id'" in message
    assert "(question_id 4): missing or empty 'text'" in message
    assert "(question_id 5): image file not found" in message
    assert "(question_id 6): <image> in 'text' but the record has no 'image'" in message


# --------------------------------------------------------------------------------------------------------------
# pad_batch
# --------------------------------------------------------------------------------------------------------------

FEATURES = [
    {"input_ids": [5, 6, 7], "labels": [-100, 6, 7], "pixel_values": torch.ones(3, 2, 2), "id": "a"},
    {"input_ids": torch.tensor([8]), "labels": torch.tensor([8]), "pixel_values": torch.zeros(3, 2, 2), "id": "b"},
]


def test_pad_right():
    batch = pad_batch(FEATURES, pad_token_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, IGNORE_INDEX, IGNORE_INDEX]]
    assert batch["input_ids"].dtype == torch.long and batch["attention_mask"].dtype == torch.long
    assert batch["pixel_values"].shape == (2, 3, 2, 2)
    assert batch["id"] == ["a", "b"]


def test_pad_left_for_generation():
    batch = pad_batch(FEATURES, pad_token_id=9, padding_side="left")
    assert batch["input_ids"].tolist() == [[5, 6, 7], [9, 9, 8]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [-100, -100, 8]]


def test_pad_to_multiple_and_fixed_length():
    assert pad_batch(FEATURES, 0, pad_to_multiple_of=4)["input_ids"].shape == (2, 4)
    assert pad_batch(FEATURES, 0, pad_to_multiple_of=3)["input_ids"].shape == (2, 3)
    fixed = pad_batch(FEATURES, 0, max_length=6)
    assert fixed["input_ids"].shape == fixed["labels"].shape == fixed["attention_mask"].shape == (2, 6)
    assert fixed["attention_mask"].sum().item() == 4
    with pytest.raises(ValueError, match="more than max_length=2"):
        pad_batch(FEATURES, 0, max_length=2)


def test_trim_unsupervised_tail():
    feats = [{"input_ids": [1, 2, 3, 4, 5], "labels": [-100, -100, 3, 4, -100]},  # chat template's trailing newline
             {"input_ids": [1, 7, 8], "labels": [-100, 7, 8]},
             {"input_ids": [1, 9, 9], "labels": [-100, -100, -100]}]  # nothing supervised: kept whole
    batch = pad_batch(feats, 0, trim_unsupervised_tail=True)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4], [1, 7, 8, 0], [1, 9, 9, 0]]
    assert batch["labels"].tolist() == [[-100, -100, 3, 4], [-100, 7, 8, -100], [-100, -100, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 1, 0]]
    # An image placeholder (id 9) after the last label is never cut: the image count must still match.
    kept = pad_batch([{"input_ids": [1, 2, 9, 9, 5], "labels": [-100, 2, -100, -100, -100]}], 0,
                     trim_unsupervised_tail=True, image_token_id=9)
    assert kept["input_ids"].tolist() == [[1, 2, 9, 9]]
    with pytest.raises(ValueError, match="needs labels"):
        pad_batch([{"input_ids": [1, 2]}], 0, trim_unsupervised_tail=True)


def test_pad_without_labels_and_mixed_extras():
    batch = pad_batch([{"input_ids": [1, 2], "pixel_values": None}, {"input_ids": [3], "pixel_values": torch.ones(1)}],
                      pad_token_id=0)
    assert "labels" not in batch and batch["pixel_values"][0] is None  # not stackable: passed through as a list
    with pytest.raises(ValueError, match=r"features \[1\] have no 'labels'"):
        pad_batch([{"input_ids": [1], "labels": [1]}, {"input_ids": [2]}], pad_token_id=0)
    with pytest.raises(ValueError, match="feature 0: 2 input_ids but 1 labels"):
        pad_batch([{"input_ids": [1, 2], "labels": [1]}], pad_token_id=0)
    with pytest.raises(ValueError, match="padding_side"):
        pad_batch(FEATURES, 0, padding_side="middle")
