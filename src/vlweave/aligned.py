"""Loaded weights in fresh, aligned memory.

``from_pretrained`` on the CPU leaves a safetensors checkpoint's tensors as views into the memory-mapped file, at
whatever byte offset the file's layout gives them (8-byte aligned), while PyTorch's own allocations are 64-byte
aligned.  Some CPU kernels take alignment-dependent paths (seen on an AMD EPYC with AVX2: fp32 convolutions in the
MoV-Adapter's down-sampler), so the same weights give results that differ in the last bit depending on where
they sit, and a model reloaded from its checkpoint would not reproduce its in-memory logits exactly.  Every model
vlweave loads goes through :func:`realign_cpu_tensors`, so a built, a trained and a reloaded model all compute from
aligned memory (it also lets go of the file mapping).
"""

from __future__ import annotations

import torch
from torch import nn

ALIGNMENT = 64  # bytes: PyTorch's CPU allocator alignment


def realign_cpu_tensors(module: nn.Module) -> int:
    """Copy every parameter and buffer of ``module`` that sits on the CPU at an address not ``ALIGNMENT``-aligned
    into a fresh allocation (parameters keep their identity, so tied weights stay tied); returns how many."""
    moved = 0
    for param in module.parameters():  # (each shared parameter once)
        if _misaligned(param):
            param.data = param.data.clone()
            moved += 1
    for mod in module.modules():
        for name, buf in mod._buffers.items():
            if buf is not None and _misaligned(buf):
                mod._buffers[name] = buf.clone()
                moved += 1
    return moved


def _misaligned(t: torch.Tensor) -> bool:
    return t.device.type == "cpu" and t.numel() > 0 and t.data_ptr() % ALIGNMENT != 0


__all__ = ["ALIGNMENT", "realign_cpu_tensors"]
