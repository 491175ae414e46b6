"""``train.attn_implementation``: the LM trains on the chosen attention kernel (eager on CPU under ``auto``), computes
the same losses as with SDPA, and gets its own kernel back for evaluation and saving."""

from __future__ import annotations

import pytest
import torch

from helpers import finetune_stage, isolated_env, make_run
from vlweave.config import ConfigError
from vlweave.train.attention import training_attention, training_kernels
from vlweave.train.trainer import Trainer


@pytest.fixture(autouse=True, scope="module")
def _env(tmp_path_factory):
    with isolated_env(tmp_path_factory.mktemp("vlweave-cache")):
        yield


def test_choice_resolution():
    assert training_attention("auto", "cpu") == "eager"
    assert training_attention("auto", torch.device("cuda", 0)) is None  # CUDA keeps the model's (fast) SDPA
    assert training_attention("model", "cpu") is None
    assert training_attention("sdpa", "cpu") == "sdpa" and training_attention("eager", "cuda") == "eager"
    with pytest.raises(ValueError, match="expected one of auto, model, sdpa, eager"):
        training_attention("flash", "cpu")


def _run(tmp_path, kernel: str, seen: list[str]) -> Trainer:
    cfg = make_run(tmp_path, out=f"run-{kernel}", stages=[finetune_stage("lora", max_steps=4, epochs=10.0, lr=2e-3)])
    cfg.train.bf16 = False  # fp32: the two kernels agree to rounding
    cfg.train.attn_implementation = kernel
    trainer = Trainer(cfg, progress=False)
    lm = trainer.model.language_model
    # Record the kernel the LM's first attention layer runs on during each training forward.
    attn = next(m for name, m in lm.named_modules() if name.endswith("self_attn"))
    hook = attn.register_forward_pre_hook(lambda m, a: seen.append(m.config._attn_implementation))
    trainer.train()
    hook.remove()
    return trainer


def test_training_on_eager_matches_sdpa_and_gives_the_kernel_back(tmp_path):
    seen_sdpa: list[str] = []
    seen_eager: list[str] = []
    a = _run(tmp_path, "sdpa", seen_sdpa)
    b = _run(tmp_path, "auto", seen_eager)  # CPU: eager
    assert set(seen_sdpa[:4]) == {"sdpa"} and set(seen_eager[:4]) == {"eager"}  # the 4 training steps
    la, lb = [m["loss"] for m in a.metrics], [m["loss"] for m in b.metrics]
    assert len(la) == 4 and la == pytest.approx(lb, rel=1e-4, abs=1e-5) and la[-1] < la[0]
    assert b.model.language_model.config._attn_implementation == "sdpa"  # its own again (evaluation, saving)
    assert "attn_implementation" not in (b.run_dir / "final" / "config.json").read_text()


def test_attention_kernel_context_restores_on_error(tmp_path):
    cfg = make_run(tmp_path, out="ctx")
    from vlweave.builder import build_model

    model, _ = build_model(cfg)
    lm = model.language_model
    before = lm.config._attn_implementation
    with pytest.raises(RuntimeError, match="boom"):
        with training_kernels(model, lm, "eager"):
            assert lm.config._attn_implementation == "eager"
            raise RuntimeError("boom")
    assert lm.config._attn_implementation == before


def test_bad_value_is_a_config_error(tmp_path):
    cfg = make_run(tmp_path, out="bad")
    cfg.train.attn_implementation = "flash"
    with pytest.raises(ConfigError, match=r"train.attn_implementation = 'flash': expected one of auto, model"):
        Trainer(cfg, progress=False)
