"""Which attention kernel the model's attention layers use while it trains (``train.attn_implementation``).

On CPU, PyTorch's SDPA backward is slow for the short, padded sequences of LLaVA-style training: a profile of a
MoVA step spent 29 % of its time in ``_scaled_dot_product_flash_attention_for_cpu_backward`` (185 ms per SmolLM2
layer for a [32, 9, 74, 64] batch whose forward took 22 ms).  transformers' eager attention computes the same
function (softmax in fp32) and its backward is a few plain matmuls: ``bench/bench_attention.py`` measures the
demo's whole training step at 0.74x (4 visual tokens) and 0.76x (64) with bf16 autocast, 1 thread.  Generation
does not gain (eager 1.05-1.13x), so the kernel is switched only around training steps and given back after.

What is switched (:func:`training_kernels`): the LM (gradients flow through it even when it is frozen), every other
transformers model inside the VLM that has a trained parameter (a trained base tower, MoVA's gate text encoder;
a frozen tower gets no backward, so it keeps its faster SDPA forward), and vlweave's own attention layers that
declare an ``attn_implementation`` attribute (the MoV-Adapter's), which compute ``softmax(q k^T / sqrt(d)) v``
explicitly under ``eager``.  A MoVA step (``mova-synthetic``) spent ~1.5 s in the SDPA backward of those two kinds
after the LM was switched; with all of them, ``bench/bench_train_kernels.py`` measures its pretrain step at 0.69x
and its finetune step at 0.75x of the model's own kernels.
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


def switchable(model: nn.Module, lm: nn.Module) -> list[nn.Module]:
    """The modules :func:`training_kernels` switches: ``lm``, each other transformers model in ``model`` with a
    parameter that requires grad, and each vlweave module with an ``attn_implementation`` attribute."""
    from transformers import PreTrainedModel

    found = [lm] if hasattr(lm, "set_attn_implementation") else []  # an LM that cannot switch keeps its kernel
    inside_lm = {id(m) for m in lm.modules()}
    for m in model.modules():
        if id(m) in inside_lm:
            continue
        if isinstance(m, PreTrainedModel):
            # not the VLM itself (or another model around the LM): switching it would switch every tower in it
            if any(sub is lm for sub in m.modules()):
                continue
            if any(p.requires_grad for p in m.parameters()):
                found.append(m)
        elif hasattr(m, "attn_implementation"):
            found.append(m)
    return found


def _kernel(m: nn.Module) -> str | None:
    """A switchable module's kernel: a transformers model's config value, or a vlweave module's own attribute."""
    if hasattr(m, "set_attn_implementation"):
        return getattr(getattr(m, "config", None), "_attn_implementation", None)
    return m.attn_implementation


def _set_kernel(m: nn.Module, kernel: str | None) -> None:
    if hasattr(m, "set_attn_implementation"):
        m.set_attn_implementation(kernel)
    else:
        m.attn_implementation = kernel


@contextmanager
def training_kernels(model: nn.Module, lm: nn.Module, kernel: str | None) -> Iterator[None]:
    """Run the block with every :func:`switchable` module of ``model`` on ``kernel``, then give each its own back
    (in reverse order, so a model nested in another is restored to what it had)."""
    if kernel is None:
        yield
        return
    restore: list[tuple[nn.Module, str | None]] = []
    try:
        for m in switchable(model, lm):
            current = _kernel(m)
            if current != kernel:
                _set_kernel(m, kernel)
                restore.append((m, current))
        yield
    finally:
        for m, current in reversed(restore):
            _set_kernel(m, current)
