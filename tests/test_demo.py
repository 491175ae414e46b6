"""``vlweave demo`` on a tiny config: train and evaluate through the step ``compare`` shares
(``vlweave.runs.train_and_evaluate``), then the table beside the blind baselines and the run folder."""

from __future__ import annotations

import json

import pytest

from helpers import isolated_env, make_run
from vlweave import demo


@pytest.fixture(autouse=True, scope="module")
def _env(tmp_path_factory):
    with isolated_env(tmp_path_factory.mktemp("vlweave-cache")):
        yield


def test_demo_on_a_tiny_config(tmp_path, monkeypatch, capsys):
    cfg = make_run(tmp_path, vision="clip")
    cfg.train.stages[0].max_steps = 2
    cfg.save(tmp_path / "tiny.yaml")
    easy = tmp_path / "easy-vqa"  # the blind baselines learn from easy-vqa's training questions
    easy.mkdir()
    (easy / "train_qa.jsonl").write_text("".join(
        json.dumps({"question_id": f"t{i}", "image": "none.png", "text": "What color?", "answer": a}) + "\n"
        for i, a in enumerate(["red", "red", "blue"])))
    monkeypatch.setattr(demo.assets, "pull", lambda name: easy)
    result = demo.run_demo([], output_dir=str(tmp_path / "demo"), progress=False, config=str(tmp_path / "tiny.yaml"))
    run = tmp_path / "demo"
    assert json.loads((run / "metrics.json").read_text()) == result
    assert result["n_questions"] == 6 and set(result["by_type"]) == {"color"} and result["visual_tokens"] == 16
    rows = [json.loads(line) for line in (run / "predictions.jsonl").read_text().splitlines()]
    assert result["accuracy"] == pytest.approx(sum(r["correct"] for r in rows) / 6)
    assert result["by_type"]["color"] == {"accuracy": result["accuracy"], "n": 6}
    answers = [r["answer"] for r in rows]
    assert result["baselines"]["majority"] == pytest.approx(answers.count("red") / 6)  # "red": 2 of 3 train answers
    assert result["baselines"]["majority_per_template_by_group"] == {"color": pytest.approx(answers.count("red") / 6)}
    assert set(result["seconds"]) == {"assets", "train", "eval", "total"} and result["seconds"]["train"] > 0
    assert (run / "final").is_dir() and (run / "eval_metrics.json").is_file()
    printed = capsys.readouterr().out
    assert "majority per template (blind)" in printed and "color questions (6)" in printed
