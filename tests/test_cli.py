"""The command line (``vlweave.cli.main``): train -> eval -> chat on a tiny offline run; user errors exit 2 with
one clear message and no traceback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from helpers import finetune_stage, isolated_env, make_run
from vlweave.builder import load_checkpoint
from vlweave.cli import main
from vlweave.data.questions import Question, read_questions
from vlweave.eval.vqa import generate_answers


@pytest.fixture(autouse=True, scope="module")
def _env(tmp_path_factory):
    with isolated_env(tmp_path_factory.mktemp("vlweave-cache")):
        yield


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """``vlweave train tiny.yaml`` once; returns (tmp folder, run folder, config)."""
    tmp = tmp_path_factory.mktemp("cli")
    cfg = make_run(tmp, vision="siglip", language="qwen2", tokenizer="qwen", template="tokenizer", cache_features=True,
                   stages=[finetune_stage("lora", max_steps=3)])
    cfg.save(tmp / "tiny.yaml")
    rc = main(["train", str(tmp / "tiny.yaml"), "--output", str(tmp / "run")])
    assert rc == 0
    return tmp, tmp / "run", cfg


def blind_majority(cfg) -> float:
    """The majority training answer's accuracy on the eval questions, counted here from the files."""
    from collections import Counter

    train = [r["conversations"][1]["value"] for r in json.loads(Path(cfg.data.train).read_text())]
    top = Counter(train).most_common(1)[0][0]
    gold = [q.answer for q in read_questions(cfg.eval.data)]
    return gold.count(top) / len(gold)


def test_train_writes_a_run(trained_run, capsys):
    tmp, run, cfg = trained_run
    assert (run / "final" / "model.safetensors").is_file()
    assert (run / "config.yaml").is_file()
    metrics = json.loads((run / "train_metrics.json").read_text())
    assert len(metrics["log"]) == 3
    (stage,) = metrics["summary"]["stages"]
    assert stage["stage"] == "finetune" and stage["steps"] == 3
    assert stage["seconds"] >= stage["step_seconds"] > 0 and stage["data_seconds"] > 0
    # 3 steps of 4 from 16 records: every image the stage visits is computed once (a fresh cache), none reused
    cache = metrics["summary"]["feature_cache"]["base"]
    assert cache["hits"] == 0 and 4 <= cache["misses"] <= 12 and cache["hit_rate"] == 0.0
    # the config has an eval block: train evaluated at the end, into the run folder
    final = json.loads((run / "metrics.json").read_text())
    assert final["n"] == 6 and (run / "predictions.jsonl").is_file() and (run / "eval_metrics.json").is_file()
    assert final["group_by"] == "template" and sum(g["n"] for g in final["groups"].values()) == 6
    assert final["baselines"]["majority"] == pytest.approx(blind_majority(cfg))
    assert (run / "final" / "run_config.yaml").is_file()


def test_train_set_override_and_resume(trained_run, capsys, tmp_path):
    tmp, run, _ = trained_run
    out = tmp_path / "again"
    rc = main(["train", str(tmp / "tiny.yaml"), "--output", str(out), "--set", "train.stages.0.max_steps=2"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["steps"] == 2 and summary["run_dir"] == str(out) and summary["final"] == str(out / "final")
    # --resume of a finished run folder reuses its config.yaml and trains nothing more.
    assert main(["train", str(tmp / "tiny.yaml"), "--resume", str(out)]) == 0
    assert json.loads(capsys.readouterr().out)["steps"] == 2


def test_eval_on_the_checkpoint(trained_run, capsys, tmp_path):
    tmp, run, cfg = trained_run
    qfile = Path(cfg.eval.data)
    out = tmp_path / "eval"
    rc = main(["eval", str(run / "final"), "--data", str(qfile), "--batch-size", "4", "--max-new-tokens", "4",
               "--output", str(out)])
    assert rc == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert report["n"] == 6 and 0.0 <= report["accuracy"] <= 1.0
    assert report["decoding"] == "greedy" and report["max_new_tokens"] == 4
    assert "predictions.jsonl" in captured.err
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    questions = read_questions(qfile)
    assert [r["question_id"] for r in rows] == [q.question_id for q in questions]
    assert [r["answer"] for r in rows] == [q.answer for q in questions]
    assert report["accuracy"] == pytest.approx(sum(r["correct"] for r in rows) / 6)
    assert json.loads((out / "eval_metrics.json").read_text())["accuracy"] == report["accuracy"]
    # The CLI's answers are the library's greedy answers for the same checkpoint.
    model, tok = load_checkpoint(run / "final")
    expected = generate_answers(model, tok, questions, batch_size=1, max_new_tokens=4, progress=False)
    assert [r["prediction"] for r in rows] == expected
    # --limit takes a fixed subset.
    assert main(["eval", str(run / "final"), "--data", str(qfile), "--limit", "2", "--output", str(tmp_path / "e2")]) == 0
    assert json.loads(capsys.readouterr().out)["n"] == 2
    assert len((tmp_path / "e2" / "predictions.jsonl").read_text().splitlines()) == 2


def test_eval_uses_the_checkpoints_own_settings(trained_run, capsys, tmp_path):
    tmp, run, cfg = trained_run
    out = tmp_path / "own"
    assert main(["eval", str(run / "final"), "--output", str(out)]) == 0  # no --data: the run config's eval block
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert report["n"] == 6 and report["max_new_tokens"] == cfg.eval.max_new_tokens == 4
    assert report["settings"]["data"] == cfg.eval.data and report["settings"]["template"] == "tokenizer"
    assert report["settings"]["run_config"].endswith("run_config.yaml")
    # the same answers as the evaluation `vlweave train` ran at the end
    assert (out / "predictions.jsonl").read_text() == (run / "predictions.jsonl").read_text()
    assert "blind per template" in captured.err and "all" in captured.err  # the printed table
    # blind baselines from the training data; every group has its count
    assert report["baselines"]["majority"] == pytest.approx(blind_majority(cfg))
    assert all({"n", "accuracy", "blind_majority", "blind_per_template"} <= set(g) for g in report["groups"].values())
    # an override wins; a --group-by the questions lack is a clear error before the model load
    assert main(["eval", str(run / "final"), "--max-new-tokens", "2", "--output", str(out)]) == 0
    assert json.loads(capsys.readouterr().out)["max_new_tokens"] == 2
    assert main(["eval", str(run / "final"), "--group-by", "colour"]) == 2
    assert "--group-by 'colour': 6 of 6 questions have no 'colour' field" in capsys.readouterr().err


def test_chat_prompt(trained_run, capsys):
    tmp, run, cfg = trained_run
    image = sorted((Path(cfg.data.train).parent / "images").glob("*.png"))[0]
    rc = main(["chat", str(run / "final"), "--image", str(image), "--prompt", "What color?", "--max-new-tokens", "5"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert printed.endswith("\n") and printed.count("\n") >= 1
    model, tok = load_checkpoint(run / "final")
    q = [Question(question_id="c", image=str(image), text="What color?")]
    (expected,) = generate_answers(model, tok, q, batch_size=1, max_new_tokens=5, progress=False)
    assert printed == expected + "\n"
    # Text-only chat works too.
    assert main(["chat", str(run / "final"), "--prompt", "Hello", "--max-new-tokens", "3"]) == 0


def test_bad_data_record_exit_code_2(tmp_path, capsys):
    cfg = make_run(tmp_path, stages=[finetune_stage("full", max_steps=1)])
    records = json.loads(Path(cfg.data.train).read_text())
    records[3]["conversations"] = [{"from": "human", "value": "<image>\nWhat color is this?"}]  # no answer
    bad = Path(cfg.data.train).parent / "bad.json"  # image paths are relative to the data file
    bad.write_text(json.dumps(records))
    cfg.data.train = str(bad)
    cfg.save(tmp_path / "bad.yaml")
    rc = main(["train", str(tmp_path / "bad.yaml")])
    err = capsys.readouterr().err
    assert rc == 2
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert lines[0].startswith("vlweave train: error: ") and str(bad) in lines[0]
    assert len(lines) == 2  # the file, then the one bad record
    assert "record 3 (id 's03')" in lines[1] and "ends with a human turn" in lines[1]


def test_bad_question_file_exit_code_2(trained_run, tmp_path, capsys):
    _, run, _ = trained_run
    q = tmp_path / "q.jsonl"
    q.write_text(json.dumps({"question_id": "a", "text": "What?", "image": "missing.png"}) + "\n")
    assert main(["eval", str(run / "final"), "--data", str(q)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"vlweave eval: error: {q.resolve()}") and "record 0 (line 1)" in err
    assert "image file not found" in err and "Traceback" not in err


def test_unknown_preset_exit_code_2(capsys):
    assert main(["train", "no-such-preset"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vlweave train: error: no config file or preset named 'no-such-preset'")
    assert "demo" in err and len(err.strip().splitlines()) == 1


def test_bad_override_and_missing_checkpoint_exit_code_2(tmp_path, capsys):
    assert main(["train", "demo", "--set", "train.sed=1"]) == 2
    err = capsys.readouterr().err
    assert "unknown key(s) train.sed" in err and "Traceback" not in err
    q = tmp_path / "q.jsonl"
    q.write_text(json.dumps({"question_id": "a", "text": "What?", "answer": "x"}) + "\n")  # scorable: has an answer
    assert main(["eval", str(tmp_path), "--data", str(q)]) == 2
    assert "not a checkpoint folder" in capsys.readouterr().err


def test_train_with_a_missing_eval_file_fails_before_training(tmp_path, capsys):
    cfg = make_run(tmp_path, stages=[finetune_stage("full", max_steps=1)])
    cfg.eval.data = str(tmp_path / "no-such-questions.jsonl")
    cfg.save(tmp_path / "noeval.yaml")
    assert main(["train", str(tmp_path / "noeval.yaml")]) == 2
    err = capsys.readouterr().err
    assert "no-such-questions.jsonl" in err and "--no-eval" in err and "Traceback" not in err
    assert not (tmp_path / "run" / "checkpoints").exists()  # nothing was trained
