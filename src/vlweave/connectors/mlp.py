"""LLaVA projectors: ``identity``, ``linear`` and ``mlpNx_gelu`` (methods.md §0.5).

Options shared by all three:
- ``pool`` (int, default 1): average-pool the patch grid by this kernel before projecting (fewer visual tokens;
  a 2x2 pool turns DINOv2's 8x8 grid at 112 px into 16 tokens).
- ``input_norm`` (bool, default False): a LayerNorm on the tower features before the projector.  ViT hidden
  states taken before the final LayerNorm carry a few very large channels; normalising them lets a freshly
  initialised projector produce tokens on the scale of the LM's word embeddings.
- ``standardize`` (bool, default False): per-channel standardisation with statistics measured once on the
  training features (:meth:`calibrate`; saved as buffers).  Measured on DINOv2-S/easy-vqa: the image-to-image
  variation of a channel is a small fraction of its constant part, so a fresh projector maps every image to
  nearly the same tokens and the LM learns the blind prior first; standardised inputs make the differences
  between images the largest part of the signal.

A list ``select_layer`` concatenates the layers on channels (HF llava semantics).
"""

from __future__ import annotations

import re

import torch
from torch import nn

from vlweave.connectors.base import Connector, ConnectorContext, ConnectorOutput, ConnectorSpec, pool_grid, register


class ProjectorConnector(Connector):
    allowed_options = frozenset({"pool", "input_norm", "standardize"})

    def __init__(self, spec: ConnectorSpec, depth: int) -> None:
        """``depth`` 0 = identity, 1 = linear, N >= 2 = N linears with GELU between (``mlpNx_gelu``)."""
        super().__init__(spec)
        self.pool = int(spec.options.get("pool", 1))
        if self.pool < 1 or spec.grid % self.pool:
            raise ValueError(f"pool={self.pool} must be >= 1 and divide the grid ({spec.grid})")
        in_dim = spec.vision_hidden_size * len(self.feature_layers())
        out_dim = spec.text_hidden_size
        self.input_norm = nn.LayerNorm(in_dim) if spec.options.get("input_norm", False) else nn.Identity()
        self.standardize = bool(spec.options.get("standardize", False))
        if self.standardize:
            self.register_buffer("feature_mean", torch.zeros(in_dim))
            self.register_buffer("feature_std", torch.ones(in_dim))
        if depth == 0:
            if in_dim != out_dim:
                raise ValueError(f"identity connector needs vision width {in_dim} == LM width {out_dim}")
            self.projector: nn.Module = nn.Identity()
        else:
            layers: list[nn.Module] = [nn.Linear(in_dim, out_dim)]
            for _ in range(depth - 1):
                layers += [nn.GELU(), nn.Linear(out_dim, out_dim)]
            self.projector = nn.Sequential(*layers)

    @torch.no_grad()
    def calibrate(self, features: list[torch.Tensor]) -> None:
        """Measure the per-channel mean/std of (pooled) input features; no-op unless ``standardize`` is on."""
        if not self.standardize:
            return
        x = self._pooled_input(features).flatten(0, 1).float()
        self.feature_mean.copy_(x.mean(0))
        self.feature_std.copy_(x.std(0).clamp_min(1e-6))

    def _pooled_input(self, features: list[torch.Tensor]) -> torch.Tensor:
        x = torch.cat(features, dim=-1) if len(features) > 1 else features[0]
        keep_prefix = self.spec.num_prefix_tokens if self.spec.select_strategy == "full" else 0
        return pool_grid(x, self.spec.grid, self.pool, keep_prefix)

    def num_tokens(self, grid: int | None = None) -> int:
        g = self.spec.grid if grid is None else grid
        keep_prefix = self.spec.num_prefix_tokens if self.spec.select_strategy == "full" else 0
        return (g // self.pool) ** 2 + keep_prefix

    def forward(self, features: list[torch.Tensor], context: ConnectorContext | None = None) -> ConnectorOutput:
        x = self._pooled_input(features)
        if self.standardize:
            x = (x - self.feature_mean.to(x.dtype)) / self.feature_std.to(x.dtype)
        return ConnectorOutput(tokens=self.projector(self.input_norm(x)))


@register("identity")
def _identity(spec: ConnectorSpec, name: str) -> Connector:
    return ProjectorConnector(spec, depth=0)


@register("linear")
def _linear(spec: ConnectorSpec, name: str) -> Connector:
    return ProjectorConnector(spec, depth=1)


@register(pattern=r"mlp(\d+)x_gelu")
def _mlp(spec: ConnectorSpec, name: str) -> Connector:
    depth = int(re.fullmatch(r"mlp(\d+)x_gelu", name).group(1))  # type: ignore[union-attr]
    if depth < 1:
        raise ValueError(f"{name}: depth must be >= 1")
    return ProjectorConnector(spec, depth=depth)
