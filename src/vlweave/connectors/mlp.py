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

- ``efficient_grid`` (int, default off): Efficient-DC's token post-processing (methods.md §1a): after the
  projector, bilinearly resize the visual-token grid to ``efficient_grid`` x ``efficient_grid`` (align_corners False;
  the paper does not say, the released code does not have it).  Prefix tokens and STI's extra tokens pass through.

A list ``select_layer`` concatenates the layers on channels (HF llava semantics).  The ``dense_sti|sci|dci``
connectors (:mod:`vlweave.connectors.dense`) are this projector behind a Dense Connector fusion.

Work is split in two: :meth:`ProjectorConnector.prepare` (pooling and fusion: parameter-free, so its output is what
the frozen-feature cache stores) and :meth:`forward` (standardise, project, post-process: what trains).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vlweave.connectors.base import (
    BASE_TOWER,
    Connector,
    ConnectorOutput,
    ConnectorSpec,
    base_features,
    pool_grid,
    register,
)
from vlweave.connectors.dense import (
    DENSE_KINDS,
    DENSE_OPTIONS,
    DensePlan,
    dense_channels,
    dense_fuse,
    plan_dense,
    sti_extra_tokens,
)

PROJECTOR_OPTIONS = frozenset({"pool", "input_norm", "standardize", "efficient_grid"})


class ProjectorConnector(Connector):
    allowed_options = PROJECTOR_OPTIONS

    def __init__(self, spec: ConnectorSpec, depth: int, dense: DensePlan | None = None) -> None:
        """``depth`` 0 = identity, 1 = linear, N >= 2 = N linears with GELU between (``mlpNx_gelu``);
        ``dense``: a Dense Connector fusion in front of the projector."""
        super().__init__(spec)
        self.dense = dense
        self.pool = int(spec.options.get("pool", 1))
        if self.pool < 1 or spec.grid % self.pool:
            raise ValueError(f"pool={self.pool} must be >= 1 and divide the grid ({spec.grid})")
        self.efficient_grid = spec.options.get("efficient_grid")
        if self.efficient_grid is not None and not 1 <= int(self.efficient_grid):
            raise ValueError(f"efficient_grid must be a positive int, got {self.efficient_grid!r}")
        if dense is not None:
            in_dim = dense_channels(dense, spec.vision_hidden_size)
        else:
            in_dim = spec.vision_hidden_size * len(super().feature_layers())
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

    # ---- facts ---------------------------------------------------------------------------------------------
    @property
    def num_prefix(self) -> int:
        return self.spec.num_prefix_tokens if self.spec.select_strategy == "full" else 0

    def feature_layers(self) -> list[int]:
        return self.dense.layers if self.dense is not None else super().feature_layers()

    def prepare_signature(self, tower: str = BASE_TOWER) -> dict[str, Any]:
        return {"pool": self.pool, "dense": None if self.dense is None else vars(self.dense)}

    def num_tokens(self, grid: int | None = None) -> int:
        g = (self.spec.grid if grid is None else grid) // self.pool
        grid_tokens = int(self.efficient_grid) ** 2 if self.efficient_grid else g * g
        extra = sti_extra_tokens(self.dense, g) if self.dense is not None else 0
        return self.num_prefix + grid_tokens + extra

    # ---- parameter-free part (cached) ------------------------------------------------------------------
    def prepare(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        """Pool each selected layer's grid, then fuse the layers (channel concat, or Dense Connector)."""
        pooled = [pool_grid(f, self.spec.grid, self.pool, self.num_prefix) for f in features]
        if self.dense is not None:
            return [dense_fuse(self.dense, dict(zip(self.feature_layers(), pooled)), self.spec.grid // self.pool)]
        return [torch.cat(pooled, dim=-1) if len(pooled) > 1 else pooled[0]]

    @torch.no_grad()
    def calibrate(self, prepared: list[torch.Tensor]) -> None:
        """Measure the per-channel mean/std of prepared features; no-op unless ``standardize`` is on."""
        if not self.standardize:
            return
        x = prepared[0].flatten(0, 1).float()
        self.feature_mean.copy_(x.mean(0))
        self.feature_std.copy_(x.std(0).clamp_min(1e-6))

    # ---- trained part ------------------------------------------------------------------------------------
    def forward(self, prepared: Mapping[str, list[torch.Tensor]] | list[torch.Tensor],
                context: Any = None) -> ConnectorOutput:
        (x,) = base_features(prepared)
        if self.standardize:
            x = (x - self.feature_mean.to(x.dtype)) / self.feature_std.to(x.dtype)
        tokens = self.projector(self.input_norm(x))
        if self.efficient_grid:
            tokens = self._resize_grid(tokens)
        return ConnectorOutput(tokens=tokens)

    def _resize_grid(self, tokens: torch.Tensor) -> torch.Tensor:
        """Efficient-DC: bilinear resize of the projected patch grid; prefix and STI extra tokens pass through."""
        g = self.spec.grid // self.pool
        p = self.num_prefix
        prefix, grid, rest = tokens[:, :p], tokens[:, p : p + g * g], tokens[:, p + g * g :]
        b, _, d = grid.shape
        img = grid.transpose(1, 2).reshape(b, d, g, g)
        e = int(self.efficient_grid)
        img = F.interpolate(img.float(), size=(e, e), mode="bilinear", align_corners=False).to(tokens.dtype)
        return torch.cat([prefix, img.flatten(2).transpose(1, 2), rest], dim=1)


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


class DenseConnector(ProjectorConnector):
    """Dense Connector (STI/SCI/DCI) + a LLaVA projector (``projector`` option, default ``mlp2x_gelu``)."""

    allowed_options = PROJECTOR_OPTIONS | DENSE_OPTIONS | {"projector"}


def _projector_depth(name: str) -> int:
    if name == "identity":
        return 0
    if name == "linear":
        return 1
    m = re.fullmatch(r"mlp(\d+)x_gelu", name)
    if not m or int(m.group(1)) < 1:
        raise ValueError(f"Dense Connector projector must be identity, linear or mlpNx_gelu; got {name!r}")
    return int(m.group(1))


def _dense_factory(kind: str):
    def factory(spec: ConnectorSpec, name: str) -> Connector:
        opts = dict(spec.options)
        unknown = set(opts) - set(DenseConnector.allowed_options)
        if unknown:
            raise ValueError(f"{name}: unknown option(s) {sorted(unknown)}; allowed: {sorted(DenseConnector.allowed_options)}")
        depth = _projector_depth(str(opts.get("projector", "mlp2x_gelu")))
        return DenseConnector(spec, depth=depth, dense=plan_dense(kind, spec, opts))

    return factory


for _kind in DENSE_KINDS:
    register(f"dense_{_kind}")(_dense_factory(_kind))
