"""``stages[].word_tie``: the align objective that pulls visual tokens toward the LM embeddings of the caption's
words - zero exactly when they are those embeddings, added to the loss only in its stage, and it moves the tokens."""

from __future__ import annotations

import pytest
import torch

from helpers import align_stage, finetune_stage, isolated_env, make_batch, make_run
from vlweave.builder import build_model
from vlweave.config import ConfigError
from vlweave.processing import IGNORE_INDEX
from vlweave.train.trainer import Trainer


@pytest.fixture(autouse=True, scope="module")
def _env(tmp_path_factory):
    with isolated_env(tmp_path_factory.mktemp("vlweave-cache")):
        yield


def test_word_tie_loss_against_a_direct_computation(tmp_path):
    model, _ = build_model(make_run(tmp_path, out="direct"))
    image = model.config.image_token_id
    embed = model.get_input_embeddings()
    # one image row with 3 visual tokens and the answer "7 9 <end>"; one text-only row
    ids = torch.tensor([[5, image, image, image, 6, 7, 9, 2], [5, 6, 7, 8, 9, 10, 11, 2]])
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[0, 5:8] = ids[0, 5:8]
    labels[1, 6:8] = ids[1, 6:8]
    embeds = embed(ids).detach().clone()
    targets = embed(torch.tensor([7, 9, 7])).detach()  # visual token j <-> answer token j mod 2, end left out
    embeds[0, 1:4] = targets
    assert model.word_tie_loss(ids, embeds, labels).item() == pytest.approx(0.0, abs=1e-7)
    embeds[0, 1:4] = targets + 0.5
    expected = ((0.5 ** 2) * targets.shape[1]) / (targets ** 2).sum(-1).mean()
    assert model.word_tie_loss(ids, embeds, labels).item() == pytest.approx(float(expected), rel=1e-5)
    labels[0] = IGNORE_INDEX
    labels[0, 7] = 2  # only the end token is supervised: no word to tie to
    assert model.word_tie_loss(ids, embeds, labels) is None


def test_a_word_tie_stage_moves_the_visual_tokens_and_only_that_stage_has_it(tmp_path):
    def run(weight: float, out: str):
        cfg = make_run(tmp_path, out=out, stages=[align_stage(max_steps=8, epochs=10.0, lr=5e-3),
                                                  finetune_stage("lora", max_steps=2, epochs=10.0)])
        cfg.train.bf16 = False
        cfg.train.stages[0].word_tie = weight
        trainer = Trainer(cfg, progress=False)
        trainer.train()
        return trainer, cfg

    (plain, cfg), (tied, _) = run(0.0, "plain"), run(1.0, "tied")
    assert tied.model.word_tie == 0.0  # reset after its stage

    def tie_of(trainer) -> float:
        model = trainer.model.eval()
        batch = make_batch(model, trainer.tokenizer, cfg, n=4)
        with torch.no_grad():
            embeds, _ = model.embed_inputs(batch["input_ids"], batch["pixel_values"])
            return float(model.word_tie_loss(batch["input_ids"], embeds, batch["labels"]))

    # Same seed and batches: the tied run's first align step carries the tie term on top of the same LM loss, and
    # its training pulled the visual tokens toward the answer words far more than the plain run's did.
    assert tied.metrics[0]["loss"] > plain.metrics[0]["loss"]
    assert tie_of(tied) < 0.5 * tie_of(plain)


def test_bad_word_tie_is_a_config_error(tmp_path):
    cfg = make_run(tmp_path, out="bad")
    cfg.train.stages[0].word_tie = -1.0
    with pytest.raises(ConfigError, match=r"word_tie = -1.0: must be a finite number >= 0"):
        Trainer(cfg, progress=False)
