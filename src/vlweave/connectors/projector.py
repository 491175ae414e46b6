"""The trainable LLaVA projector (methods.md §0.5) and its pre/post-processing, apart from any fusion.

:class:`ProjectorHead` maps a fused tensor ``[B, T, in_dim]`` (laid out as a
:class:`~vlweave.connectors.fusion.TokenLayout`) to LM-space tokens, in this order:

1. ``standardize`` (bool): per-channel standardisation with statistics measured once on training features
   (:meth:`ProjectorHead.calibrate_features`; saved as the buffers ``feature_mean``/``feature_std``).
2. ``input_norm`` (bool): a LayerNorm over the input channels.
3. the projector: ``identity`` (depth 0; needs ``in_dim == out_dim``), ``linear`` (depth 1) or ``mlpNx_gelu``
   (N linears with GELU between), an ``nn.Sequential`` (``nn.Identity`` for identity) named ``projector``.
4. ``efficient_grid`` (int >= 1, default off): Efficient-DC's bilinear resize of the projected patch grid to
   ``efficient_grid`` x ``efficient_grid`` (align_corners False); prefix and extra tokens pass through.

State-dict names, relative to the module holding the head, are those of every vlweave checkpoint so far:
``input_norm.{weight,bias}``, ``feature_mean``, ``feature_std``, ``projector.<i>.{weight,bias}`` (``projector.0`` is
HF llava's ``multi_modal_projector.linear_1``).  To keep them at the connector's root
(``connector.projector.0.weight``), the LLaVA connectors *are* a head
(``class ProjectorConnector(FusedConnector, ProjectorHead)``); a connector with other trainable parts can instead
hold one as a child module, e.g. ``self.out = ProjectorHead(d, d_text, 2)``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from vlweave.connectors.fusion import TokenLayout
from vlweave.connectors.options import OptionsError, parse_options

PROJECTOR_NAME = re.compile(r"identity|linear|mlp(\d+)x_gelu")


@dataclass(frozen=True)
class ProjectorHeadOptions:
    """Options of the trainable head (see the module docstring)."""

    input_norm: bool = False
    standardize: bool = False
    efficient_grid: int | None = field(default=None, metadata={"min": 1})


def projector_depth(name: str) -> int:
    """``identity`` -> 0, ``linear`` -> 1, ``mlpNx_gelu`` -> N (>= 1)."""
    m = PROJECTOR_NAME.fullmatch(name)
    if not m:
        raise ValueError(f"projector must be identity, linear or mlpNx_gelu; got {name!r}")
    if name == "identity":
        return 0
    if name == "linear":
        return 1
    depth = int(m.group(1))
    if depth < 1:
        raise ValueError(f"{name}: depth must be >= 1")
    return depth


class ProjectorHead(nn.Module):
    """standardize -> input_norm -> identity | linear | mlpNx_gelu -> Efficient-DC resize (all optional but the
    projector).  ``ProjectorHead(in_dim, out_dim, depth, options)`` builds a standalone head; a class that mixes
    it in calls :meth:`build_head` once its input width is known."""

    def __init__(self, in_dim: int | None = None, out_dim: int | None = None, depth: int | None = None,
                 options: ProjectorHeadOptions | None = None) -> None:
        super().__init__()
        if in_dim is not None:
            if out_dim is None or depth is None:
                raise ValueError("ProjectorHead(in_dim, out_dim, depth, options): give all of in_dim, out_dim, depth")
            self.build_head(in_dim, out_dim, depth, options)

    def build_head(self, in_dim: int, out_dim: int, depth: int,
                   options: ProjectorHeadOptions | None = None) -> None:
        opts = parse_options(ProjectorHeadOptions, options if options is not None else {})
        self.efficient_grid = opts.efficient_grid
        # Creation order is part of reproducibility: the linears draw their init from the RNG last, as before.
        self.input_norm = nn.LayerNorm(in_dim) if opts.input_norm else nn.Identity()
        self.standardize = opts.standardize
        if self.standardize:
            self.register_buffer("feature_mean", torch.zeros(in_dim))
            self.register_buffer("feature_std", torch.ones(in_dim))
        if depth == 0:
            if in_dim != out_dim:
                raise OptionsError(f"identity connector needs vision width {in_dim} == LM width {out_dim}")
            self.projector: nn.Module = nn.Identity()
        else:
            layers: list[nn.Module] = [nn.Linear(in_dim, out_dim)]
            for _ in range(depth - 1):
                layers += [nn.GELU(), nn.Linear(out_dim, out_dim)]
            self.projector = nn.Sequential(*layers)

    # ---- facts ---------------------------------------------------------------------------------------------
    def head_layout(self, layout: TokenLayout) -> TokenLayout:
        """The output's token layout for an input laid out as ``layout`` (Efficient-DC changes the grid)."""
        if self.efficient_grid:
            return TokenLayout(prefix=layout.prefix, grid=int(self.efficient_grid), extra=layout.extra)
        return layout

    # ---- calibration (no gradients) ------------------------------------------------------------------------
    @torch.no_grad()
    def calibrate_features(self, x: torch.Tensor) -> None:
        """Measure the per-channel mean/std of input features ``[B, T, in_dim]``; no-op unless ``standardize``."""
        if not self.standardize:
            return
        x = x.flatten(0, 1).float()
        self.feature_mean.copy_(x.mean(0))
        self.feature_std.copy_(x.std(0).clamp_min(1e-6))

    # ---- the trained computation ---------------------------------------------------------------------------
    def project(self, x: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
        """``[B, layout.total, in_dim]`` -> ``[B, head_layout(layout).total, out_dim]``."""
        if self.standardize:
            x = (x - self.feature_mean.to(x.dtype)) / self.feature_std.to(x.dtype)
        tokens = self.projector(self.input_norm(x))
        if self.efficient_grid:
            tokens = resize_grid(tokens, layout, int(self.efficient_grid))
        return tokens

    def forward(self, x: torch.Tensor, layout: TokenLayout) -> torch.Tensor:  # standalone use
        return self.project(x, layout)


def resize_grid(tokens: torch.Tensor, layout: TokenLayout, size: int) -> torch.Tensor:
    """Efficient-DC: bilinear resize (align_corners False, in fp32) of the patch grid of ``tokens`` to
    ``size`` x ``size``; prefix and extra tokens pass through."""
    g, p = layout.grid, layout.prefix
    prefix, grid, rest = tokens[:, :p], tokens[:, p : p + g * g], tokens[:, p + g * g :]
    b, _, d = grid.shape
    img = grid.transpose(1, 2).reshape(b, d, g, g)
    img = F.interpolate(img.float(), size=(size, size), mode="bilinear", align_corners=False).to(tokens.dtype)
    return torch.cat([prefix, img.flatten(2).transpose(1, 2), rest], dim=1)
