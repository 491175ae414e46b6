"""``vlweave eval`` of a saved ``final/`` reproduces the end-of-training evaluation of the same weights.

The bug this guards (digits run, bf16): the trained model's towers are frozen (``requires_grad`` False), so the
in-process evaluation read float32 tower features from the feature cache; the reloaded checkpoint's parameters
all ``requires_grad``, so ``FeatureCache.usable`` refused the cache and the tower ran from pixels inside the bf16
autocast -- 18 of 300 near-tie greedy answers differed.  Now both read the same cached float32 features."""

from __future__ import annotations

import json

import pytest
import torch

from helpers import isolated_env, make_run
from vlweave.builder import build_model, load_checkpoint, load_processor
from vlweave.cli import main
from vlweave.eval.runner import evaluate, load_eval_questions
from vlweave.runs import evaluate_trained
from vlweave.train.trainer import Trainer
from vlweave.vision.cache import FeatureCache


@pytest.fixture(autouse=True, scope="module")
def _env(tmp_path_factory):
    with isolated_env(tmp_path_factory.mktemp("vlweave-cache")):
        yield


def _tower_calls(model) -> list[int]:
    calls = [0]
    for tower in model.vision_towers.values():
        tower.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


@pytest.mark.parametrize("bf16", [False, True])
def test_reloaded_checkpoint_answers_as_the_end_of_training_eval(tmp_path, bf16):
    cfg = make_run(tmp_path, cache_features=True)
    trainer = Trainer(cfg, progress=False)
    trainer.train()
    # Evaluation autocasts to bf16 as train.bf16 says (where bf16 is native: vlweave.hardware.bf16_available);
    # set after training, so one process need not build accelerate's state twice with two precisions.
    cfg.train.bf16 = bf16
    questions = load_eval_questions(cfg.eval.data)
    # The end-of-training evaluation (runs.evaluate_trained: what `vlweave train` and the demo report).
    _, _, in_process, _ = evaluate_trained(trainer, cfg, questions, tmp_path / "run", progress=False,
                                           train=[])
    end_of_training = [json.loads(line)["prediction"]
                       for line in (tmp_path / "run" / "predictions.jsonl").read_text().splitlines()]
    # Fresh objects, as `vlweave eval run/final` builds them (its bf16 default is the run's train.bf16).
    model, tokenizer = load_checkpoint(tmp_path / "run" / "final")
    assert any(p.requires_grad for p in model.vision_towers.parameters())  # what used to switch the cache off
    assert FeatureCache.usable(model)
    calls = _tower_calls(model)
    reloaded = evaluate(model, tokenizer, questions, batch_size=cfg.eval.batch_size,
                        max_new_tokens=cfg.eval.max_new_tokens, progress=False, bf16=bf16,
                        processor=load_processor(tmp_path / "run" / "final", tokenizer))
    assert calls[0] == 0  # every image's features came from the store the in-process evaluation filled
    assert reloaded["answers"] == end_of_training
    assert reloaded["accuracy"] == in_process["accuracy"]
    # The command itself, with the checkpoint's own eval settings (no --batch-size: that used to crash).
    out = tmp_path / "cli-eval"
    assert main(["eval", str(tmp_path / "run" / "final"), "--output", str(out), "--bf16" if bf16 else "--no-bf16"]) == 0
    assert [json.loads(line)["prediction"] for line in (out / "predictions.jsonl").read_text().splitlines()] \
        == end_of_training


def test_cached_features_do_not_depend_on_the_callers_autocast(tmp_path):
    """The store computes float32 features even when filled inside a bf16 autocast region (a store must not
    depend on who filled it first: the trainer fills it outside autocast, evaluation inside)."""
    cfg = make_run(tmp_path)
    model, _ = build_model(cfg)
    images = sorted(str(p) for p in (tmp_path / "data" / "images").iterdir())[:3]
    plain = FeatureCache(model, persist=False)
    plain.ensure(images, progress=False)
    inside = FeatureCache(model, persist=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside.ensure(images, progress=False)
    for tower in plain.stores:
        a, b = plain.stores[tower].batch(images), inside.stores[tower].batch(images)
        assert all(torch.equal(x, y) for x, y in zip(a, b))

