"""What the machine can do fast: detected, never assumed (some of this project's CPUs have AMX, some do not)."""

from __future__ import annotations

import torch


def bf16_available() -> bool:
    """Native bf16 only: without AMX/AVX512-BF16 a CPU emulates bf16 matmuls ~100x slower than fp32
    (measured on this project's CI machine: 1.2 vs 135 GFLOP/s), so autocast would be a trap there."""
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    try:  # AMX/AVX512-BF16 CPUs run bf16 matmuls natively
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False
