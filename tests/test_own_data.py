"""examples/own_data/make_vqa.py: a labelled image folder becomes LLaVA training JSON, caption align data and a
held-out question file that vlweave's own readers accept, with no test image in training."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from PIL import Image

from vlweave.data.llava_json import load_llava_data
from vlweave.data.questions import read_questions
from vlweave.eval.analysis import analyse, train_questions

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "own_data" / "make_vqa.py"


@pytest.fixture(scope="module")
def make_vqa():
    spec = importlib.util.spec_from_file_location("make_vqa", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_folders_to_llava_json(make_vqa, tmp_path):
    src = tmp_path / "src"
    for c, colour in (("cat", (200, 0, 0)), ("dog", (0, 200, 0)), ("owl", (0, 0, 200))):
        (src / c).mkdir(parents=True)
        for i in range(10):
            Image.new("RGB", (12, 12), colour).save(src / c / f"{i}.png")
    (src / "notes.txt").write_text("not a class folder")
    out = tmp_path / "out"
    assert make_vqa.main(["--folders", str(src), "--out", str(out), "--noun", "animal"]) == 0
    train = load_llava_data(out / "train.json")  # vlweave's own validating reader
    captions = load_llava_data(out / "captions.json")
    test = read_questions(out / "test.jsonl")
    assert len(train) == 2 * 24 and len(captions) == 24 and len(test) == 2 * 6  # 20 % of 30 images held out
    assert not {s.image for s in train} & {q.image for q in test}
    assert {q.meta["type"] for q in test} == {"naming", "yes/no"}
    naming = [q for q in test if q.meta["type"] == "naming"]
    assert all(q.text == "What animal is shown?" and Path(q.image).parent.name == q.answer for q in naming)
    for q in test:
        if q.meta["type"] == "yes/no":
            asked = q.text.removeprefix("Is this a ").removesuffix("?")
            assert q.answer == ("yes" if asked == Path(q.image).parent.name else "no")
    # a model that names every image right and always says "no" is fully consistent only where "no" is right
    answers = [Path(q.image).parent.name if q.meta["type"] == "naming" else "no" for q in test]
    report = analyse(test, answers, train_questions(out / "train.json"))
    assert report["group_by"] == "type" and report["groups"]["naming"]["accuracy"] == 1.0
    cons = report["consistency"]
    assert cons["n"] == 6 and cons["naming_implied_accuracy"] == 1.0
    assert cons["model_accuracy"] == cons["consistency"] == report["groups"]["yes/no"]["accuracy"]


def test_paired_gives_every_training_image_a_yes_and_a_no_and_keeps_the_test(make_vqa, tmp_path):
    src = tmp_path / "src"
    for c in ("cat", "dog", "owl"):
        (src / c).mkdir(parents=True)
        for i in range(10):
            Image.new("RGB", (12, 12), (i * 20, 0, 0)).save(src / c / f"{i}.png")
    plain, paired = tmp_path / "plain", tmp_path / "paired"
    assert make_vqa.main(["--folders", str(src), "--out", str(plain)]) == 0
    assert make_vqa.main(["--folders", str(src), "--out", str(paired), "--paired"]) == 0
    assert (paired / "test.jsonl").read_text() == (plain / "test.jsonl").read_text()
    train = load_llava_data(paired / "train.json")
    assert len(train) == 3 * 24
    by_image: dict = {}
    for s in train:
        q, a = s.conversations[0]["value"].replace("<image>\n", ""), s.conversations[1]["value"]
        by_image.setdefault(s.image, []).append((q, a))
    for image, qas in by_image.items():
        label = Path(image).parent.name
        yes_no = sorted(a for q, a in qas if q.startswith("Is this a "))
        assert yes_no == ["no", "yes"] and (f"Is this a {label}?", "yes") in qas
        assert all((a == "yes") == (q == f"Is this a {label}?") for q, a in qas if q.startswith("Is this a "))


def test_not_an_image_folder_is_a_clear_error(make_vqa, tmp_path):
    (tmp_path / "only").mkdir()
    with pytest.raises(SystemExit, match="expected one sub-folder of images per class"):
        make_vqa.main(["--folders", str(tmp_path), "--out", str(tmp_path / "o")])
