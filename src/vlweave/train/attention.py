"""Which attention kernel the LM uses while it trains (``train.attn_implementation``).

On CPU, PyTorch's SDPA backward is slow for the short, padded sequences of LLaVA-style training: a profile of a
MoVA step spent 29 % of its time in ``_scaled_dot_product_flash_attention_for_cpu_backward`` (185 ms per SmolLM2
layer for a [32, 9, 74, 64] batch whose forward took 22 ms).  transformers' eager attention computes the same
function (softmax in fp32) and its backward is a few plain matmuls: ``bench/bench_attention.py`` measures the
demo's whole training step at 0.74x (4 visual tokens) and 0.76x (64) with bf16 autocast, 1 thread.  Generation
does not gain (eager 1.05-1.13x), so the kernel is switched only around training steps and given back after.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

ATTN_CHOICES = ("auto", "model", "sdpa", "eager")


def training_attention(choice: str, device: torch.device | str) -> str | None:
    """The kernel to train with, or None to keep the model's own.  ``auto``: eager on CPU, the model's own
    elsewhere (CUDA's SDPA kernels are the fast ones there); ``model``: keep it; ``sdpa``/``eager``: that one."""
    if choice not in ATTN_CHOICES:
        raise ValueError(f"train.attn_implementation = {choice!r}: expected one of {', '.join(ATTN_CHOICES)}")
    if choice == "model":
        return None
    if choice == "auto":
        return "eager" if torch.device(device).type == "cpu" else None
    return choice


@contextmanager
def attention_kernel(lm: nn.Module, kernel: str | None) -> Iterator[None]:
    """Run the block with ``lm`` (a transformers ``PreTrainedModel``) on ``kernel``, then give its own back."""
    current = getattr(getattr(lm, "config", None), "_attn_implementation", None)
    if kernel is None or current == kernel or not hasattr(lm, "set_attn_implementation"):
        yield
        return
    lm.set_attn_implementation(kernel)
    try:
        yield
    finally:
        lm.set_attn_implementation(current)
