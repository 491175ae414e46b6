"""``vlweave compare``: every config trained with the same seeds and evaluated on the same questions; summary
numbers are the mean/std of the per-seed runs; JSON, PNG and the CLI."""

from __future__ import annotations

import json
import statistics

import pytest
import torch

from helpers import align_stage, finetune_stage, isolated_env, make_run
from vlweave import cli


@pytest.fixture(autouse=True, scope="module")
def _env(tmp_path_factory):
    with isolated_env(tmp_path_factory.mktemp("vlweave-cache")):
        yield


def test_compare_two_connectors_two_seeds(tmp_path, capsys):
    paths = []
    for connector, options in (("mlp2x_gelu", {}), ("dense_dci", {"groups": 2})):
        cfg = make_run(tmp_path, vision="clip", connector=connector, options=options)
        cfg.vision.config_overrides["num_hidden_layers"] = 4
        cfg.train.stages[0].max_steps = 3
        path = tmp_path / f"{connector}.yaml"
        cfg.save(path)
        paths.append(str(path))
    out = tmp_path / "cmp"
    assert cli.main(["compare", *paths, "--seeds", "2", "--output", str(out)]) == 0
    data = json.loads((out / "compare.json").read_text())
    assert (out / "compare.png").stat().st_size > 1000
    assert data["seeds"] == [0, 1] and data["n_questions"] == 6
    for name in paths:
        runs = data["runs"][name]
        assert set(runs) == {"0", "1"}
        accs = [runs[s]["accuracy"] for s in ("0", "1")]
        summary = data["summary"][name]["accuracy"]
        assert summary["mean"] == pytest.approx(statistics.fmean(accs))
        assert summary["std"] == pytest.approx(statistics.stdev(accs))
        for seed in ("0", "1"):  # each run saved its predictions on the same 6 questions
            preds = (out / f"{name.rsplit('/', 1)[-1][:-5]}-seed{seed}" / "predictions.jsonl").read_text().splitlines()
            assert [json.loads(line)["question_id"] for line in preds] == [f"q{i}" for i in range(6)]
    # groups (question templates here: the questions have no type field) with counts and blind baselines
    assert sum(data["group_counts"].values()) == 6
    assert set(data["baselines"]) == set(data["group_counts"]) | {"accuracy"}
    assert all(set(b) == {"blind_majority", "blind_per_template"} for b in data["baselines"].values())
    printed = capsys.readouterr().out
    assert "blind:" in printed and "what color?" in printed  # the baseline columns, a template row
    md = (out / "compare.md").read_text().splitlines()  # the same table in Markdown
    assert md[2].startswith("| group | n | ") and md[2].endswith("| blind: majority | blind: per template |")
    s0 = data["summary"][paths[0]]["accuracy"]
    assert md[4].startswith(f"| all | 6 | {s0['mean']:.3f} ± {s0['std']:.3f} | ")
    # different seeds train different models (different init and data order)
    first = data["runs"][paths[0]]
    assert first["0"]["train_seconds"] > 0
    assert "compare:" in printed


def test_compare_reuses_finished_runs_and_retrains_a_changed_config(tmp_path, capsys):
    cfg = make_run(tmp_path, vision="clip", connector="mlp2x_gelu")
    cfg.vision.config_overrides["num_hidden_layers"] = 4
    cfg.train.stages[0].max_steps = 2
    path = tmp_path / "a.yaml"
    cfg.save(path)
    out = tmp_path / "cmp"
    assert cli.main(["compare", str(path), "--seed-list", "0", "--output", str(out)]) == 0
    first = json.loads((out / "compare.json").read_text())["runs"][str(path)]["0"]
    capsys.readouterr()
    # a second process over more seeds: seed 0 is taken from its run folder, seed 1 trains
    assert cli.main(["compare", str(path), "--seeds", "2", "--output", str(out)]) == 0
    printed = capsys.readouterr().err
    assert "seed 0: finished run reused" in printed and "seed 1: finished run reused" not in printed
    runs = json.loads((out / "compare.json").read_text())["runs"][str(path)]
    assert runs["0"] == first and set(runs) == {"0", "1"}
    # a changed config (another lr) is not the run on disk: it trains again
    assert cli.main(["compare", str(path), "--seed-list", "0", "--set", "train.stages.0.lr=1e-2",
                     "--output", str(out)]) == 0
    assert "finished run reused" not in capsys.readouterr().err


def test_compare_evaluates_a_trained_model_again_when_only_eval_differs(tmp_path, capsys):
    cfg = make_run(tmp_path, vision="clip", connector="mlp2x_gelu")
    cfg.vision.config_overrides["num_hidden_layers"] = 4
    cfg.train.stages[0].max_steps = 2
    for name, max_new in (("a", cfg.eval.max_new_tokens), ("b", cfg.eval.max_new_tokens), ("c", 1)):
        cfg.eval.max_new_tokens = max_new
        cfg.save(tmp_path / f"{name}.yaml")
    paths = [str(tmp_path / f"{n}.yaml") for n in "abc"]
    out = tmp_path / "cmp"
    assert cli.main(["compare", *paths, "--seed-list", "0", "--output", str(out)]) == 0
    printed = capsys.readouterr().err
    assert printed.count("evaluating the model trained in") == 2  # b and c: a's model, evaluated again
    runs = json.loads((out / "compare.json").read_text())["runs"]
    assert "trained_in" not in runs[paths[0]]["0"]
    assert runs[paths[1]]["0"]["trained_in"] == runs[paths[2]]["0"]["trained_in"] == str(out / "a-seed0")
    assert not (out / "b-seed0" / "final").exists()  # nothing trained there

    def answers(run):
        return [json.loads(line)["prediction"] for line in (out / run / "predictions.jsonl").read_text().splitlines()]

    # the reloaded model answers exactly as the in-memory one did at the end of training
    assert answers("b-seed0") == answers("a-seed0")
    assert runs[paths[1]]["0"]["accuracy"] == runs[paths[0]]["0"]["accuracy"]
    assert all(len(a.split()) <= 1 for a in answers("c-seed0"))  # c's own eval block (1 new token) was used
    # a changed training setting is not that model: it trains
    assert cli.main(["compare", paths[0], "--seed-list", "0", "--set", "train.stages.0.lr=1e-2",
                     "--output", str(out / "other")]) == 0
    assert "evaluating the model trained in" not in capsys.readouterr().err


def test_compare_bad_config_fails_before_training(tmp_path, capsys):
    assert cli.main(["compare", "demo", "no-such-config", "--output", str(tmp_path / "x")]) == 2
    assert "no config file or preset named 'no-such-config'" in capsys.readouterr().err
    assert not (tmp_path / "x" / "compare.json").exists()


def test_compare_resumes_an_interrupted_training_exactly(tmp_path, capsys, monkeypatch):
    """A training killed mid-run continues from its newest checkpoint on the next ``compare`` and ends with the
    weights and answers of an uninterrupted run; ``save_every`` is not part of the run's keys; checkpoints written
    with other training settings are deleted, not resumed from."""
    from safetensors.torch import load_file

    from vlweave.compare import compare
    from vlweave.train.trainer import Trainer

    cfg = make_run(tmp_path, vision="clip", connector="mlp2x_gelu", stages=[align_stage(), finetune_stage()])
    cfg.vision.config_overrides["num_hidden_layers"] = 4
    path = tmp_path / "a.yaml"
    cfg.save(path)
    saving = ["train.save_every=2"]
    real_check = Trainer._check_speed

    def killed_at_step_7(self, stage, index):  # (4 + 4 steps): after finetune's checkpoint at its step 2
        real_check(self, stage, index)
        if len(self.metrics) == 7:
            raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "_check_speed", killed_at_step_7)
    out = tmp_path / "cmp"
    with pytest.raises(KeyboardInterrupt):
        compare([str(path)], [0], out, saving, progress=False)
    run = out / "a-seed0"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "ckpt-s0-000002", "ckpt-s0-000004", "ckpt-s1-000002"]
    assert not (run / "compare_run.json").exists()
    monkeypatch.setattr(Trainer, "_check_speed", real_check)
    capsys.readouterr()
    resumed = compare([str(path)], [0], out, saving, progress=False)["runs"][str(path)]["0"]
    assert "resuming the interrupted training" in capsys.readouterr().err and resumed["resumed"]
    # the uninterrupted run, without save_every, in another folder: the same steps, losses, weights, answers
    whole = compare([str(path)], [0], tmp_path / "whole", progress=False)["runs"][str(path)]["0"]

    def log(d):
        return [(s["stage_index"], s["step"], s["loss"])
                for s in json.loads((d / "train_metrics.json").read_text())["log"]]

    assert log(run) == log(tmp_path / "whole" / "a-seed0")
    assert [s[:2] for s in log(run)] == [(0, i) for i in range(1, 5)] + [(1, i) for i in range(1, 5)]
    a, b = (load_file(str(d / "final" / "model.safetensors")) for d in (run, tmp_path / "whole" / "a-seed0"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["accuracy"] == whole["accuracy"] and resumed["groups"] == whole["groups"]

    def answers(d):
        return [json.loads(line)["prediction"] for line in (d / "predictions.jsonl").read_text().splitlines()]

    assert answers(run) == answers(tmp_path / "whole" / "a-seed0")
    # save_every left the keys alone: the finished run is reused with or without it
    capsys.readouterr()
    compare([str(path)], [0], out, progress=False)
    assert "finished run reused" in capsys.readouterr().err
    # a run with other settings is not resumed from: its checkpoints and numbers go, it trains from step 1
    monkeypatch.setattr(Trainer, "_check_speed", killed_at_step_7)
    with pytest.raises(KeyboardInterrupt):
        compare([str(path)], [0], out, saving + ["train.stages.1.lr=1e-2"], progress=False)
    assert not (run / "compare_run.json").exists()  # (its final/ is the old model's until the new one is saved)
    monkeypatch.setattr(Trainer, "_check_speed", real_check)
    capsys.readouterr()
    compare([str(path)], [0], out, saving + ["train.stages.1.lr=5e-3"], progress=False)
    err = capsys.readouterr().err
    assert "resuming" not in err and "deleting" in err and "other training settings" in err
    assert [s[:2] for s in log(run)] == [(0, i) for i in range(1, 5)] + [(1, i) for i in range(1, 5)]
    assert log(run)[-1] != log(tmp_path / "whole" / "a-seed0")[-1]  # (the third lr trained)
