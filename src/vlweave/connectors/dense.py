"""Dense Connector (arXiv 2405.13800; methods.md §1): parameter-free multi-layer fusion before the projector.

Three integrations of the tower's hidden states ``hs`` (``hs[0]`` = stem, ``hs[i]`` = block ``i``):

- ``sti`` (Sparse Token Integration): extra layers average-pooled along the token axis (kernel = stride = ``alpha``)
  and appended as extra tokens after the final feature.  ``sti_pool: 1d`` pools the flattened row-major token
  sequence as the reference code does (``AvgPool1d``: 8 horizontally adjacent patches of a row); ``2d`` pools the
  patch grid by ``alpha`` per side.
- ``sci`` (Sparse Channel Integration): final + extra layers concatenated on channels.
- ``dci`` (Dense Channel Integration, the paper's default): the layers are split into G contiguous groups, each
  averaged (in fp32), and concatenated on channels with the final feature.

Layer conventions.  The paper counts the stem as layer 1, so paper layer ``k`` is ``hs[k - 1]`` (:func:`paper_layer`).
``preset: derived`` (default) derives the layers from the tower depth ``L`` (number of blocks) so any ViT works:

- STI/SCI extras: paper layers ``round(L/3)`` and ``round(2L/3)`` -> ``hs[7]``, ``hs[15]`` for CLIP-L (L = 24),
  ``hs[3]``, ``hs[7]`` for DINOv2-S (L = 12).
- DCI groups: paper layers ``1..L`` (= ``hs[0 .. L-1]``, the stem through LLaVA's penultimate feature) cut into G
  equal contiguous groups -> ``hs[0..11]``, ``hs[12..23]`` for CLIP-L; ``hs[0..5]``, ``hs[6..11]`` for DINOv2-S;
  ``hs[0..12]``, ``hs[13..25]`` for SigLIP-so400m truncated to 26 blocks, as the reference.

``preset: reference`` reproduces the released code exactly (so released DC projector weights load): CLIP-L/14
(24 blocks, final ``hs[23]``, extras ``hs[7]``, ``hs[15]``, groups 0-11 / 12-23) and SigLIP-so400m (final
``hs[26]``, i.e. ``select_layer: -2`` on the 27-block tower or ``-1`` on the 26-block one; extras hard-coded
``hs[7]``, ``hs[15]``; groups 0-12 / 13-25).  In both presets the concatenation order is final-first, as in the
code (the paper's equations list the final feature last; ``final_first: false`` gives that order).

Everything here is parameter-free and deterministic: :class:`DenseFusion` is a
:class:`~vlweave.connectors.fusion.Fusion` (``build_fusion("dci", spec, options)``), so it runs in the connector's
``prepare_tower`` step, its output is what the frozen-feature cache stores (a DCI over 12 layers caches one fused
tensor, not 12 hidden states), and any trainable module can sit behind it (the ``dense_*`` connectors put a LLaVA
projector there, :mod:`vlweave.connectors.mlp`).

Options (:class:`DenseFusionOptions`, typed): ``preset`` (``derived`` | ``reference``), ``layers`` (STI/SCI extra
hs indices), ``groups`` (DCI: a count, or explicit ``[[first, last], ...]`` inclusive hs ranges), ``alpha`` (STI
pooling kernel = stride, >= 1), ``sti_pool`` (``1d`` | ``2d``), ``final_first`` (bool), and every fusion's ``pool``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Sequence

import torch
import torch.nn.functional as F

from vlweave.connectors.base import ConnectorSpec, pool_grid
from vlweave.connectors.fusion import Fusion, FusionOptions, register_fusion
from vlweave.connectors.options import OptionsError, option_names, parse_options

DENSE_KINDS = ("sti", "sci", "dci")


@dataclass(frozen=True)
class DenseFusionOptions(FusionOptions):
    """The Dense Connector fusion's options (and ``pool``, which runs before it)."""

    preset: Literal["derived", "reference"] = "derived"
    layers: int | tuple[int, ...] | None = None  # STI/SCI extra hs indices (default: the preset's)
    groups: int | tuple[tuple[int, int], ...] | None = None  # DCI: a count (derived; default 2) or hs ranges
    alpha: int = field(default=8, metadata={"min": 1})  # STI: pooling kernel = stride
    sti_pool: Literal["1d", "2d"] = "1d"
    final_first: bool = True


DENSE_OPTIONS = option_names(DenseFusionOptions) - option_names(FusionOptions)  # the DC-specific keys


def paper_layer(k: int) -> int:
    """The paper's layer ``k`` (stem = 1) as an index into ``hidden_states``."""
    if k < 1:
        raise ValueError(f"paper layers count from 1 (the stem); got {k}")
    return k - 1


def derived_extra_layers(num_layers: int, count: int = 2) -> list[int]:
    """STI/SCI extra layers for a tower of ``num_layers`` blocks: paper layers ``round(i*L/(count+1))``."""
    return [paper_layer(max(1, round(i * num_layers / (count + 1)))) for i in range(1, count + 1)]


def derived_groups(num_layers: int, num_groups: int = 2) -> list[tuple[int, int]]:
    """DCI groups: ``hs[0 .. L-1]`` cut into ``num_groups`` contiguous, (near-)equal groups (inclusive ranges)."""
    if not 1 <= num_groups <= num_layers:
        raise ValueError(f"DCI needs 1 <= groups <= {num_layers} (tower blocks); got {num_groups}")
    bounds = [round(i * num_layers / num_groups) for i in range(num_groups + 1)]
    return [(bounds[i], bounds[i + 1] - 1) for i in range(num_groups)]


# The released DenseConnector code, per tower family: (blocks, final hs index, STI/SCI extras, DCI groups).
_REFERENCE = {
    "clip_vision_model": ({24}, 23, [7, 15], [(0, 11), (12, 23)]),
    "siglip_vision_model": ({26, 27}, 26, [7, 15], [(0, 12), (13, 25)]),
}


@dataclass(frozen=True)
class DensePlan:
    """Which hidden states a Dense Connector reads and how it fuses them (absolute ``hs`` indices)."""

    kind: str
    final: int
    extras: tuple[int, ...] = ()
    groups: tuple[tuple[int, int], ...] = ()
    alpha: int = 8
    sti_pool: str = "1d"
    final_first: bool = True

    @property
    def layers(self) -> list[int]:
        """Every hidden state needed, in first-use order (what the tower must hand over)."""
        wanted = [self.final, *self.extras]
        for lo, hi in self.groups:
            wanted += range(lo, hi + 1)
        return list(dict.fromkeys(wanted))


def plan_dense(kind: str, spec: ConnectorSpec, options: "DenseFusionOptions | Mapping[str, Any] | None" = None
               ) -> DensePlan:
    """Resolve the options of a Dense Connector fusion against the tower facts in ``spec``."""
    from vlweave.vision.towers import normalize_layers

    if kind not in DENSE_KINDS:
        raise ValueError(f"unknown Dense Connector kind {kind!r}; known: {', '.join(DENSE_KINDS)}")
    opts = parse_options(DenseFusionOptions, options)
    if not isinstance(spec.select_layer, int):
        raise ValueError(f"dense_{kind}: select_layer must be one int (the final feature), got {spec.select_layer!r}")
    L = spec.num_vision_layers
    (final,) = normalize_layers(spec.select_layer, L)
    if opts.preset == "reference":
        ref = _REFERENCE.get(spec.vision_model_type)
        if ref is None or L not in ref[0] or final != ref[1]:
            raise ValueError(
                f"dense_{kind}: preset 'reference' reproduces the released code for CLIP-L/14 (24 blocks, "
                f"select_layer -2) and SigLIP-so400m (26 or 27 blocks, final hs[26]); this tower is "
                f"{spec.vision_model_type or '?'} with {L} blocks and final hs[{final}]; use preset 'derived'"
            )
        if isinstance(opts.groups, int):
            raise OptionsError(f"dense_{kind}: option 'groups' as a count applies to preset 'derived'; with preset "
                               f"'reference' give explicit [[first, last], ...] hs ranges, or leave it out",
                               key="groups")
        extras, groups = ref[2], ref[3]
    else:
        extras = derived_extra_layers(L)
        explicit = isinstance(opts.groups, tuple)
        groups = [] if explicit else derived_groups(L, 2 if opts.groups is None else opts.groups)
    if opts.layers is not None:
        extras = normalize_layers(opts.layers, L)
    if isinstance(opts.groups, tuple):
        groups = [_group_range(g, L, kind) for g in opts.groups]
    if kind == "sti" and spec.select_strategy != "default":
        raise ValueError("dense_sti pools patch tokens along the grid; use select_strategy 'default' (no CLS)")
    return DensePlan(
        kind=kind,
        final=final,
        extras=tuple(extras) if kind in ("sti", "sci") else (),
        groups=tuple(groups) if kind == "dci" else (),
        alpha=opts.alpha,
        sti_pool=opts.sti_pool,
        final_first=opts.final_first,
    )


def _group_range(group: Sequence[int], num_layers: int, kind: str) -> tuple[int, int]:
    from vlweave.vision.towers import normalize_layers

    if len(group) != 2:
        raise ValueError(f"dense_{kind}: a group is [first, last] (inclusive hs indices), got {group!r}")
    lo, hi = normalize_layers(list(group), num_layers)
    if lo > hi:
        raise ValueError(f"dense_{kind}: group {list(group)} is empty")
    return lo, hi


def dense_channels(plan: DensePlan, width: int) -> int:
    """Projector input width: ``width`` for STI, ``(1 + extras)`` or ``(1 + groups)`` times it for SCI/DCI."""
    if plan.kind == "sci":
        return width * (1 + len(plan.extras))
    if plan.kind == "dci":
        return width * (1 + len(plan.groups))
    return width


def sti_extra_tokens(plan: DensePlan, grid: int) -> int:
    """Tokens one extra STI layer adds for a ``grid`` x ``grid`` patch map (floor, as ``AvgPool1d`` does)."""
    if plan.kind != "sti":
        return 0
    per_layer = (grid * grid) // plan.alpha if plan.sti_pool == "1d" else (grid // plan.alpha) ** 2
    return per_layer * len(plan.extras)


def dense_fuse(plan: DensePlan, by_index: dict[int, torch.Tensor], grid: int) -> torch.Tensor:
    """Fuse per-layer features ``[B, N, C]`` (keyed by ``hs`` index) into the projector input."""
    final = by_index[plan.final]
    if plan.kind == "sti":
        pooled = [_sti_pool(by_index[i], plan, grid) for i in plan.extras]
        parts = [final, *pooled] if plan.final_first else [*pooled, final]
        return torch.cat(parts, dim=1)
    if plan.kind == "sci":
        extra = [by_index[i] for i in plan.extras]
    else:  # dci: mean of each group, accumulated in fp32 (12 bf16/fp16 tensors would lose precision)
        extra = [torch.stack([by_index[i].float() for i in range(lo, hi + 1)]).mean(0).to(final.dtype)
                 for lo, hi in plan.groups]
    parts = [final, *extra] if plan.final_first else [*extra, final]
    return torch.cat(parts, dim=-1)


def _sti_pool(x: torch.Tensor, plan: DensePlan, grid: int) -> torch.Tensor:
    if plan.sti_pool == "1d":
        return F.avg_pool1d(x.transpose(1, 2), kernel_size=plan.alpha, stride=plan.alpha).transpose(1, 2)
    return pool_grid(x, grid, plan.alpha)  # floor, like the 1-D pooling


class DenseFusion(Fusion):
    """Dense Connector STI/SCI/DCI as a :class:`~vlweave.connectors.fusion.Fusion`: ``pool`` first (each layer's
    grid), then :func:`dense_fuse`.  ``layers`` are the plan's (final first, then extras / group members)."""

    def __init__(self, kind: str, spec: ConnectorSpec, options: DenseFusionOptions) -> None:
        super().__init__(spec, options)
        self.kind = kind
        self.plan = plan_dense(kind, spec, options)
        self.layers = tuple(self.plan.layers)
        self.out_channels = dense_channels(self.plan, spec.vision_hidden_size)

    def extra_tokens(self, grid: int | None = None) -> int:
        g = (self.spec.grid if grid is None else grid) // self.pool
        return sti_extra_tokens(self.plan, g)

    def __call__(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        pooled = self.pool_features(features)
        return dense_fuse(self.plan, dict(zip(self.layers, pooled)), self.spec.grid // self.pool)

    def signature(self) -> dict[str, Any]:
        # This exact form is what feature caches were keyed by before fusions were objects.
        return {"pool": self.pool, "dense": dict(vars(self.plan))}


for _kind in DENSE_KINDS:
    register_fusion(_kind, DenseFusionOptions, DenseFusion)
