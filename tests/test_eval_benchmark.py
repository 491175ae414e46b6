"""``vlweave eval CHECKPOINT --benchmark NAME``: tiny released-format benchmark files (POPE, MME, MMBench with
base64 PNGs, ScienceQA, TextVQA, GQA, VQAv2) run through the CLI on a tiny random checkpoint.  The prompts are
methods.md §0.8's (golden strings), the metrics JSON records how the numbers were made, and scoring the written
predictions with the scorer directly gives the same metrics."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import pytest

from helpers import draw_image, isolated_env, make_run
from vlweave.builder import build_model, load_checkpoint, save_checkpoint
from vlweave.cli import main
from vlweave.data.questions import Question
from vlweave.eval.benchmark_run import read_predictions
from vlweave.eval.benchmarks import SCORERS, expand_circular, parse_benchmark, score_benchmark
from vlweave.eval.benchmarks.inputs import (
    load_benchmark, mme_prompt, multiple_choice_prompt, scienceqa_prompt, short_answer_prompt,
)
from vlweave.eval.benchmarks.readers import (
    attach_pope_labels, read_gqa_questions, read_mmbench_tsv, read_mme, read_pope, read_scienceqa,
    read_vqa_annotations,
)
from vlweave.eval.vqa import generate_answers

SA = "\nAnswer the question using a single word or phrase."
MC = "\nAnswer with the option's letter from the given choices directly."


@pytest.fixture(autouse=True, scope="module")
def _env(tmp_path_factory):
    with isolated_env(tmp_path_factory.mktemp("vlweave-cache")):
        yield


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A tiny random checkpoint (CLIP-style tower, Qwen2-style LM, ChatML template), saved once."""
    tmp = tmp_path_factory.mktemp("ckpt")
    model, tok = build_model(make_run(tmp, vision="clip", language="qwen2", tokenizer="qwen", template="tokenizer"))
    return save_checkpoint(model, tok, tmp / "ckpt")


def _png(path: Path, color: str, shape: str = "square") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    draw_image(color, shape, size=32).save(path)
    return path


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _run(checkpoint: Path, out: Path, *args: str) -> dict:
    rc = main(["eval", str(checkpoint), *args, "--max-new-tokens", "3", "--batch-size", "4", "--output", str(out)])
    assert rc == 0
    return json.loads((out / "metrics.json").read_text())


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]


def _check_parsed(rows: list[dict], name: str, records: list | None, parser: str | None = None) -> None:
    """Every saved prediction carries the parse the scorer compared (under the recorded parser)."""
    assert [r["parsed"] for r in rows] == parse_benchmark(name, [r["prediction"] for r in rows], records,
                                                          parser=parser)


def _check_record(metrics: dict, name: str, checkpoint: Path, n: int) -> None:
    spec = SCORERS[name]
    assert metrics["benchmark"] == name and metrics["scored"] is True
    assert metrics["prompt_suffix"] == spec.prompt_suffix and metrics["parser"] == spec.parser
    assert metrics["headline_metric"] == spec.headline
    assert metrics["n"] == n
    assert metrics["model"]["checkpoint"] == str(checkpoint)
    assert metrics["model"]["config"]["model_type"] == "vlweave"
    assert metrics["generation"]["decoding"] == "greedy" and metrics["generation"]["max_new_tokens"] == 3


# ----------------------------------------------------------------------------------------------------------------
# Prompt builders: golden strings
# ----------------------------------------------------------------------------------------------------------------


def test_prompt_builders_golden():
    assert short_answer_prompt("Is there a dog in the image?") == "Is there a dog in the image?" + SA
    released = "Is there a chair in the image?\nAnswer the question using a single word or phrase."
    assert short_answer_prompt(released) == released  # the suffix is not doubled
    ocr = "what is the brand?\nReference OCR token: Canon, EOS\nAnswer the question using a single word or phrase."
    assert short_answer_prompt(ocr) == ocr
    assert mme_prompt("Is there a cat in this image? Please answer yes or no.") == \
        "Is there a cat in this image?\nAnswer the question using a single word or phrase."
    assert multiple_choice_prompt("What is shown?", {"A": "a cat", "B": "a dog", "C": "a bird"}, "Look closely.") == (
        "Look closely.\nWhat is shown?\nA. a cat\nB. a dog\nC. a bird\n"
        "Answer with the option's letter from the given choices directly.")
    assert multiple_choice_prompt("Which?", {"A": "x", "B": "y"}) == "Which?\nA. x\nB. y" + MC
    sqa = "Context: A magnet.\nWhich is a force?\nA. push\nB. colour"
    assert scienceqa_prompt(sqa) == sqa + MC
    assert scienceqa_prompt(sqa + MC) == sqa + MC


# ----------------------------------------------------------------------------------------------------------------
# Benchmarks end to end
# ----------------------------------------------------------------------------------------------------------------


def _pope_files(root: Path) -> Path:
    """LLaVA's POPE layout: llava_pope_test.jsonl (no labels), coco/coco_pope_<split>.json, val2014/ images."""
    pope = root / "pope"
    for i, color in enumerate(("red", "blue", "green")):
        _png(pope / "val2014" / f"COCO_val2014_{i}.png", color)
    questions, labels = [], {"random": [], "popular": []}
    for k, (split, img, obj, label) in enumerate([
        ("random", 0, "red square", "yes"), ("random", 1, "dog", "no"), ("random", 2, "green square", "yes"),
        ("popular", 0, "cat", "no"), ("popular", 1, "blue square", "yes"),
    ]):
        text = f"Is there a {obj} in the image?"
        image = f"COCO_val2014_{img}.png"
        # LLaVA's file carries the suffix; one record without it shows the suffix is added only when missing.
        questions.append({"question_id": k, "image": image, "text": text + (SA if k != 2 else ""),
                          "category": split})
        labels[split].append({"question_id": len(labels[split]) + 1, "image": image, "text": text, "label": label})
    _jsonl(pope / "llava_pope_test.jsonl", questions)
    for split, rows in labels.items():
        _jsonl(pope / "coco" / f"coco_pope_{split}.json", rows)
    return pope


def test_pope(checkpoint, tmp_path):
    pope = _pope_files(tmp_path)
    out = tmp_path / "out"
    metrics = _run(checkpoint, out, "--benchmark", "pope", "--data", str(pope / "llava_pope_test.jsonl"),
                   "--image-folder", str(pope / "val2014"))
    _check_record(metrics, "pope", checkpoint, 5)
    assert metrics["split"] is None and metrics["data"]["annotations"] == str(pope / "coco")
    rows = _rows(out)
    assert [r["question_id"] for r in rows] == [0, 1, 2, 3, 4]
    assert [r["prompt"] for r in rows][:3] == ["Is there a red square in the image?" + SA,
                                               "Is there a dog in the image?" + SA,
                                               "Is there a green square in the image?" + SA]
    assert [r["gold"] for r in rows] == ["yes", "no", "yes", "no", "yes"]
    # Scoring the written predictions with the scorer directly gives the metrics file's numbers.
    records = attach_pope_labels(read_pope(pope / "llava_pope_test.jsonl", require_label=False), pope / "coco")
    direct = score_benchmark("pope", read_predictions(out / "predictions.jsonl"), records)
    assert metrics["metrics"] == direct["metrics"] and metrics["headline"] == direct["headline"]
    _check_parsed(rows, "pope", records)
    assert all(r["parsed"] in ("yes", "no") for r in rows)  # LLaVA's parser: every answer is yes or no
    assert set(metrics["metrics"]["splits"]) == {"random", "popular"}
    # The folder works as --data too (default image folder: the data folder -> give it), --split keeps one split.
    out2 = tmp_path / "out2"
    metrics = _run(checkpoint, out2, "--benchmark", "pope", "--data", str(pope), "--split", "popular",
                   "--image-folder", str(pope / "val2014"))
    assert metrics["split"] == "popular" and metrics["n"] == 2 and [r["question_id"] for r in _rows(out2)] == [3, 4]


def _mme_files(root: Path) -> Path:
    """MME release layout: existence/ (images + txt side by side) and artwork/ (images/ + questions_answers_YN/)."""
    mme = root / "MME_Benchmark"
    _png(mme / "existence" / "0001.png", "red")
    (mme / "existence" / "0001.txt").write_text(
        "Is there a red square in this image? Please answer yes or no.\tYes\n"
        "Is there a dog in this image? Please answer yes or no.\tNo\n")
    _png(mme / "existence" / "0002.png", "blue", "circle")
    (mme / "existence" / "0002.txt").write_text(
        "Is there a blue circle in this image? Please answer yes or no.\tYes\n"
        "Is there a car in this image? Please answer yes or no.\tNo\n")
    _png(mme / "artwork" / "images" / "10.png", "green")
    (mme / "artwork" / "questions_answers_YN").mkdir(parents=True)
    (mme / "artwork" / "questions_answers_YN" / "10.txt").write_text(
        "Is this artwork created by Monet? Please answer yes or no.\tNo\n"
        "Is this artwork green? Please answer yes or no.\tYes\n")
    return mme


def test_mme(checkpoint, tmp_path):
    mme = _mme_files(tmp_path)
    out = tmp_path / "out"
    metrics = _run(checkpoint, out, "--benchmark", "mme", "--data", str(mme))
    _check_record(metrics, "mme", checkpoint, 6)
    rows = _rows(out)
    assert rows[0]["question_id"] == "existence/0001.png#0"
    assert rows[0]["prompt"] == "Is there a red square in this image?" + SA
    assert rows[-1]["prompt"] == "Is this artwork green?" + SA
    direct = score_benchmark("mme", read_predictions(out / "predictions.jsonl"), read_mme(mme))
    assert metrics["metrics"] == direct["metrics"]
    _check_parsed(rows, "mme", read_mme(mme))
    assert metrics["parser"] == "official"
    assert set(metrics["metrics"]["subtasks"]) == {"existence", "artwork"}
    # --limit counts images: both questions of the first image stay together.
    out2 = tmp_path / "out2"
    metrics = _run(checkpoint, out2, "--benchmark", "mme", "--data", str(mme), "--limit", "1")
    assert metrics["n"] == 2 and metrics["metrics"]["subtasks"]["existence"]["n_images"] == 1


def _b64_png(color: str, shape: str) -> str:
    buf = io.BytesIO()
    draw_image(color, shape, size=32).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _mmbench_tsv(path: Path, with_answers: bool = True) -> Path:
    header = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "l2-category", "image"]
    rows = [
        ["0", "What colour is the square?", "Look at the centre.", "red", "blue", "green", "", "A",
         "attribute", "perception", _b64_png("red", "square")],
        ["1", "Which shape is shown?", "nan", "square", "circle", "", "", "B", "shape", "perception",
         _b64_png("blue", "circle")],
        ["2", "Is the shape blue?", "", "yes", "no", "", "", "A", "attribute", "perception", "1"],  # shares row 1's
    ]
    if not with_answers:
        for row in rows:
            row[7] = ""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\t".join(header) + "\n" + "".join("\t".join(r) + "\n" for r in rows))
    return path


def test_mmbench_base64_images_in_memory(checkpoint, tmp_path):
    tsv = _mmbench_tsv(tmp_path / "mmbench_dev_en.tsv")
    out = tmp_path / "out"
    metrics = _run(checkpoint, out, "--benchmark", "mmbench", "--data", str(tsv), "--split", "dev")
    _check_record(metrics, "mmbench", checkpoint, 3 + 2 + 2)  # every circular copy is asked
    assert metrics["split"] == "dev"
    rows = _rows(out)
    assert [r["question_id"] for r in rows] == [0, 1_000_000, 2_000_000, 1, 1_000_001, 2, 1_000_002]
    assert rows[0]["prompt"] == ("Look at the centre.\nWhat colour is the square?\nA. red\nB. blue\nC. green" + MC)
    assert rows[1]["prompt"] == ("Look at the centre.\nWhat colour is the square?\nA. blue\nB. green\nC. red" + MC)
    assert rows[1]["gold"] == "C"
    assert rows[3]["prompt"] == "Which shape is shown?\nA. square\nB. circle" + MC  # "nan" hint = no hint
    assert all(r["image"] is None for r in rows)  # decoded in memory, never written
    records = expand_circular(read_mmbench_tsv(tsv))
    direct = score_benchmark("mmbench", read_predictions(out / "predictions.jsonl"), records)
    assert metrics["metrics"] == direct["metrics"] and metrics["metrics"]["n_questions"] == 3
    _check_parsed(rows, "mmbench", records)
    assert metrics["parser"] == "vlmevalkit"
    # The lmms-eval rule is selectable from the command line; the metrics file records it and the saved parses
    # follow it.
    out_lmms = tmp_path / "out_lmms"
    lmms = _run(checkpoint, out_lmms, "--benchmark", "mmbench", "--data", str(tsv), "--parser", "lmms_eval")
    assert lmms["parser"] == "lmms_eval"
    lmms_rows = _rows(out_lmms)
    _check_parsed(lmms_rows, "mmbench", records, parser="lmms_eval")
    again = score_benchmark("mmbench", read_predictions(out_lmms / "predictions.jsonl"), records, parser="lmms_eval")
    assert lmms["metrics"] == again["metrics"]
    # The in-memory images give the same answers as the same pictures read from files.
    files = []
    for record in records:
        path = tmp_path / "decoded" / f"{record.index}.png"
        path.parent.mkdir(exist_ok=True)
        record.load_image().save(path)
        files.append(Question(question_id=record.index, text=rows[len(files)]["prompt"], image=str(path)))
    model, tok = load_checkpoint(checkpoint)
    assert generate_answers(model, tok, files, batch_size=4, max_new_tokens=3, progress=False) == \
        [r["prediction"] for r in rows]


def test_mmbench_test_split_is_written_not_scored(checkpoint, tmp_path, capsys):
    tsv = _mmbench_tsv(tmp_path / "mmbench_test_en.tsv", with_answers=False)
    out = tmp_path / "out"
    metrics = _run(checkpoint, out, "--benchmark", "mmbench", "--data", str(tsv), "--limit", "1")
    assert metrics["scored"] is False and metrics["metrics"] is None and "OpenCompass" in metrics["unscored_reason"]
    assert metrics["prompt_suffix"] == MC and metrics["n"] == 3 and len(_rows(out)) == 3
    # No answers, but the choice each prediction names is still saved (the parse reads only the options).
    _check_parsed(_rows(out), "mmbench", load_benchmark("mmbench", tsv, limit=1).records)
    assert "not scored" in capsys.readouterr().err


def test_scienceqa_llava_file_with_problems(checkpoint, tmp_path):
    sqa = tmp_path / "scienceqa"
    _png(sqa / "images" / "test" / "7" / "image.png", "yellow")
    text = "Context: The picture shows a shape.\nWhich colour is it?\nA. yellow\nB. red"
    (sqa / "llava_test_CQM-A.json").write_text(json.dumps([
        {"id": "7", "image": "7/image.png",
         "conversations": [{"from": "human", "value": "<image>\n" + text}, {"from": "gpt", "value": "A"}]},
        {"id": "9", "conversations": [{"from": "human", "value": "Question: Which is a mammal?\nA. trout\nB. cow\n"
                                                                 "C. frog"}, {"from": "gpt", "value": "B"}]},
    ]))
    (sqa / "problems.json").write_text(json.dumps({
        "7": {"question": "Which colour is it?", "choices": ["yellow", "red"], "answer": 0, "image": "image.png",
              "hint": "The picture shows a shape.", "split": "test", "subject": "natural science"},
        "9": {"question": "Which is a mammal?", "choices": ["trout", "cow", "frog"], "answer": 1, "image": None,
              "hint": "", "split": "test", "subject": "natural science"},
        "11": {"question": "Unused?", "choices": ["a", "b"], "answer": 0, "image": None, "split": "val"},
    }))
    out = tmp_path / "out"
    metrics = _run(checkpoint, out, "--benchmark", "scienceqa_img", "--data", str(sqa / "llava_test_CQM-A.json"),
                   "--image-folder", str(sqa / "images" / "test"))
    _check_record(metrics, "scienceqa_img", checkpoint, 2)
    assert metrics["split"] == "test" and metrics["metrics"]["n_img"] == 1
    rows = _rows(out)
    assert rows[0]["prompt"] == text + MC and rows[0]["image"] == str(sqa / "images" / "test" / "7" / "image.png")
    assert rows[1]["image"] is None  # text-only question
    truth = {r.question_id: r for r in read_scienceqa(sqa / "problems.json")}
    direct = score_benchmark("scienceqa_img", read_predictions(out / "predictions.jsonl"), [truth["7"], truth["9"]])
    assert metrics["metrics"] == direct["metrics"]
    _check_parsed(rows, "scienceqa_img", None)
    assert metrics["metrics"]["n_missing"] == 0


def test_textvqa_and_gqa(checkpoint, tmp_path):
    folder = tmp_path / "vqa"
    _png(folder / "images" / "a.png", "red")
    _png(folder / "images" / "b.png", "blue", "circle")
    ocr = "what colour is the sign?\nReference OCR token: STOP, red" + SA
    _jsonl(folder / "llava_textvqa_val_v051_ocr.jsonl", [
        {"question_id": 34602, "image": "a.png", "text": ocr},
        {"question_id": 34603, "image": "b.png", "text": "what shape is it?"},
    ])
    (folder / "TextVQA_0.5.1_val.json").write_text(json.dumps({"data": [
        {"question_id": 34602, "image_id": "a", "question": "what colour is the sign?", "answers": ["red"] * 10},
        {"question_id": 34603, "image_id": "b", "question": "what shape is it?", "answers": ["circle"] * 9 + ["round"]},
    ]}))
    out = tmp_path / "textvqa"
    metrics = _run(checkpoint, out, "--benchmark", "textvqa", "--data",
                   str(folder / "llava_textvqa_val_v051_ocr.jsonl"), "--image-folder", str(folder / "images"))
    _check_record(metrics, "textvqa", checkpoint, 2)
    assert metrics["split"] == "val" and metrics["data"]["annotations"] == str(folder / "TextVQA_0.5.1_val.json")
    rows = _rows(out)
    assert [r["prompt"] for r in rows] == [ocr, "what shape is it?" + SA]
    direct = score_benchmark("textvqa", read_predictions(out / "predictions.jsonl"),
                             read_vqa_annotations(folder / "TextVQA_0.5.1_val.json"))
    assert metrics["metrics"] == direct["metrics"]

    _jsonl(folder / "llava_gqa_testdev_balanced.jsonl", [
        {"question_id": "201", "image": "b.png", "text": "Is the circle blue?" + SA},
        {"question_id": "202", "image": "a.png", "text": "What colour is the square?" + SA},
    ])
    (folder / "gqa_truth.json").write_text(json.dumps({
        "202": {"imageId": "a", "question": "What colour is the square?", "answer": "red"},
        "201": {"imageId": "b", "question": "Is the circle blue?", "answer": "yes"},
    }))
    out = tmp_path / "gqa"
    metrics = _run(checkpoint, out, "--benchmark", "gqa", "--data", str(folder / "llava_gqa_testdev_balanced.jsonl"),
                   "--annotations", str(folder / "gqa_truth.json"), "--image-folder", str(folder / "images"))
    _check_record(metrics, "gqa", checkpoint, 2)
    truth = {r.question_id: r for r in read_gqa_questions(folder / "gqa_truth.json")}
    direct = score_benchmark("gqa", read_predictions(out / "predictions.jsonl"), [truth["201"], truth["202"]])
    assert metrics["metrics"] == direct["metrics"]


# ----------------------------------------------------------------------------------------------------------------
# Bad input: one clear line naming the file / record, exit 2, no traceback
# ----------------------------------------------------------------------------------------------------------------


def _fails(capsys, *argv: str) -> str:
    assert main(["eval", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vlweave eval: error: ") and "Traceback" not in err
    return err


def test_bad_input_errors(tmp_path, capsys):
    ckpt = str(tmp_path / "no-checkpoint-needed")  # the data is checked before the checkpoint is loaded
    q = _jsonl(tmp_path / "q.jsonl", [{"question_id": 1, "image": "x.png", "text": "Why?"}])
    err = _fails(capsys, ckpt, "--benchmark", "nosuch", "--data", str(q))
    assert "unknown benchmark 'nosuch'" in err and "pope" in err
    err = _fails(capsys, ckpt, "--benchmark", "pope", "--data", str(tmp_path / "missing.jsonl"))
    assert f"{tmp_path / 'missing.jsonl'}: benchmark data not found" in err
    err = _fails(capsys, ckpt, "--benchmark", "vqav2", "--data", str(q), "--parser", "nosuch")
    assert "unknown parser 'nosuch' for vqav2" in err
    # A record without an image, and one whose image file does not exist, are named with the file.
    _png(tmp_path / "ok.png", "red")
    bad = _jsonl(tmp_path / "bad.jsonl", [{"question_id": "q1", "text": "What?"},
                                          {"question_id": "q2", "image": "gone.png", "text": "What?"},
                                          {"question_id": "q3", "image": "ok.png", "text": "What?"}])
    err = _fails(capsys, ckpt, "--benchmark", "vqav2", "--data", str(bad))
    assert f"{bad}: 2 bad record(s)" in err
    assert "question_id 'q1': record has no image" in err and "question_id 'q2': image file not found" in err
    # POPE labels that cannot be found, and a POPE record without an image.
    pope = _jsonl(tmp_path / "pope" / "llava_pope_test.jsonl",
                  [{"question_id": 1, "image": "ok.png", "text": "Is there a cat?", "category": "random"}])
    err = _fails(capsys, ckpt, "--benchmark", "pope", "--data", str(pope))
    assert str(pope) in err and "--annotations" in err
    _jsonl(pope, [{"question_id": 1, "text": "Is there a cat?", "label": "no"}])
    err = _fails(capsys, ckpt, "--benchmark", "pope", "--data", str(pope))
    assert str(pope) in err and "line 1 (question_id 1): missing or empty 'image'" in err
    # MMBench: a TSV without the image column, and a row whose base64 is not a picture (found before generation).
    tsv = tmp_path / "mmb.tsv"
    tsv.write_text("index\tquestion\tA\tB\tanswer\n0\tQ?\tx\ty\tA\n")
    err = _fails(capsys, ckpt, "--benchmark", "mmbench", "--data", str(tsv))
    assert str(tsv) in err and "missing column(s) 'image'" in err
    not_png = base64.b64encode(b"not a picture" * 10).decode()
    tsv.write_text(f"index\tquestion\tA\tB\tanswer\timage\n0\tQ?\tx\ty\tA\t{_b64_png('red', 'square')}\n"
                   f"1\tQ2?\tx\ty\tB\t{not_png}\n")
    err = _fails(capsys, ckpt, "--benchmark", "mmbench", "--data", str(tsv))
    assert f"{tsv}: row 2 (line 3) (index 1): image is not a readable picture" in err
    # Options that belong to plain eval only.
    err = _fails(capsys, ckpt, "--benchmark", "pope", "--data", str(pope), "--prompt-suffix", "x")
    assert "--prompt-suffix" in err
    err = _fails(capsys, ckpt, "--data", str(q), "--split", "val")
    assert "need --benchmark" in err


def test_load_benchmark_limit_and_vqav2_without_annotations(tmp_path):
    _png(tmp_path / "a.png", "red")
    q = _jsonl(tmp_path / "llava_vqav2_mscoco_test-dev2015.jsonl",
               [{"question_id": i, "image": "a.png", "text": f"Question {i}?" + SA} for i in range(5)])
    inputs = load_benchmark("vqav2", q, limit=2)
    assert [it.question_id for it in inputs.items] == [0, 1] and inputs.split is None
    assert inputs.unscored_reason is not None and "EvalAI" in inputs.unscored_reason
    assert inputs.items[0].text == "Question 0?" + SA and inputs.items[0].image == str(tmp_path / "a.png")
    with pytest.raises(ValueError, match="--limit must be at least 1"):
        load_benchmark("vqav2", q, limit=0)
