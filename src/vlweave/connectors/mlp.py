"""LLaVA projector connectors: ``identity``, ``linear``, ``mlpNx_gelu`` (methods.md §0.5) and ``dense_sti|sci|dci``.

Each is a composition of a parameter-free fusion and a trainable head:

    ProjectorConnector = FusedConnector (fusion: ``layers`` | Dense Connector ``sti``/``sci``/``dci``, with ``pool``)
                         + ProjectorHead (standardize -> input_norm -> identity|linear|mlpNx_gelu -> efficient_grid)

The fusion (:mod:`vlweave.connectors.fusion`, :mod:`vlweave.connectors.dense`) runs in ``prepare_tower``, so its
output is what the frozen-feature cache stores; the head (:mod:`vlweave.connectors.projector`) runs in
``forward`` and is what trains.  The head's parameters sit at the connector's root (``connector.projector.0.weight``,
``connector.input_norm.weight``, ``connector.feature_mean``), the names every checkpoint so far has.

Options (typed, :mod:`vlweave.connectors.options`):

- :class:`ProjectorOptions` (``identity``, ``linear``, ``mlpNx_gelu``): ``pool`` (int >= 1, dividing the grid;
  average-pool the patch grid before projecting: a 2x2 pool turns DINOv2's 8x8 grid at 112 px into 16 tokens),
  ``input_norm`` (bool; a LayerNorm on the tower features: ViT hidden states taken before the final LayerNorm carry
  a few very large channels, and normalising them lets a fresh projector produce tokens on the scale of the LM's
  word embeddings), ``standardize`` (bool; per-channel standardisation with statistics measured on the training
  features by :meth:`ProjectorConnector.calibrate`: on DINOv2-S/easy-vqa the image-to-image variation of a channel
  is a small fraction of its constant part, so a fresh projector maps every image to nearly the same tokens and the
  LM learns the blind prior first), ``efficient_grid`` (int >= 1; Efficient-DC, methods.md §1a: after the
  projector, bilinearly resize the visual-token grid; align_corners False, the paper does not say and the released
  code does not have it; prefix tokens and STI's extra tokens pass through).
- :class:`DenseOptions` (``dense_*``): all of the above, the Dense Connector's (:class:`DenseFusionOptions`:
  ``preset``, ``layers``, ``groups``, ``alpha``, ``sti_pool``, ``final_first``) and ``projector`` (``identity``,
  ``linear`` or ``mlpNx_gelu``, default ``mlp2x_gelu``).

A list ``select_layer`` concatenates the layers on channels (HF llava semantics).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from vlweave.connectors.base import (
    Connector,
    ConnectorOutput,
    ConnectorSpec,
    ContractExample,
    base_features,
    register,
)
from vlweave.connectors.dense import DENSE_KINDS, DenseFusionOptions
from vlweave.connectors.fusion import FusedConnector, FusionOptions, TokenLayout
from vlweave.connectors.options import option_names
from vlweave.connectors.projector import ProjectorHead, ProjectorHeadOptions, projector_depth


@dataclass(frozen=True)
class ProjectorOptions(ProjectorHeadOptions, FusionOptions):
    """``identity``, ``linear``, ``mlpNx_gelu``: ``pool`` + the head's ``input_norm``, ``standardize``,
    ``efficient_grid``."""


@dataclass(frozen=True)
class DenseOptions(ProjectorHeadOptions, DenseFusionOptions):
    """``dense_sti|sci|dci``: the Dense Connector fusion's options, the head's, and which projector."""

    projector: str = "mlp2x_gelu"


PROJECTOR_OPTIONS = option_names(ProjectorOptions)


class ProjectorConnector(FusedConnector, ProjectorHead):
    """A fusion (``fusion_kind``; ``layers`` by default) in front of a LLaVA projector head of ``depth``."""

    options_class = ProjectorOptions
    allowed_options = PROJECTOR_OPTIONS

    def __init__(self, spec: ConnectorSpec, depth: int, fusion_kind: str | None = None) -> None:
        """``depth`` 0 = identity, 1 = linear, N >= 2 = N linears with GELU between (``mlpNx_gelu``)."""
        super().__init__(spec, fusion_kind)  # parses self.options, builds self.fusion
        self.build_head(self.fusion.out_channels, spec.text_hidden_size, depth, self.options)

    @property
    def pool(self) -> int:
        return self.fusion.pool

    @property
    def num_prefix(self) -> int:
        return self.fusion.num_prefix

    def output_layout(self, layout: TokenLayout) -> TokenLayout:
        return self.head_layout(layout)

    @torch.no_grad()
    def calibrate(self, prepared: list[torch.Tensor]) -> None:
        """Measure the per-channel mean/std of prepared features; no-op unless ``standardize`` is on."""
        self.calibrate_features(prepared[0])

    def forward(self, prepared: Mapping[str, list[torch.Tensor]] | list[torch.Tensor],
                context: Any = None) -> ConnectorOutput:
        (x,) = base_features(prepared)
        return ConnectorOutput(tokens=self.project(x, self.fusion.layout()))


class DenseConnector(ProjectorConnector):
    """Dense Connector (STI/SCI/DCI) + a LLaVA projector (``projector`` option, default ``mlp2x_gelu``)."""

    options_class = DenseOptions
    allowed_options = option_names(DenseOptions)

    def __init__(self, spec: ConnectorSpec, kind: str) -> None:
        FusedConnector.__init__(self, spec, kind)
        try:
            depth = projector_depth(self.options.projector)
        except ValueError as err:
            raise ValueError(f"Dense Connector {err}") from None
        self.build_head(self.fusion.out_channels, spec.text_hidden_size, depth, self.options)


# ---- registry ----------------------------------------------------------------------------------------------
# Tiny towers of the contract suite have 32 channels and an LM of 64: identity needs a 64-wide tower.
_WIDE = {"hidden_size": 64, "intermediate_size": 128}
_DEEP = {"num_hidden_layers": 6}  # enough blocks for distinct Dense Connector layers


@register("identity", examples=(
    ContractExample(vision_overrides=_WIDE),
    ContractExample(vision_overrides=_WIDE, options={"pool": 2, "input_norm": True}),
))
def _identity(spec: ConnectorSpec, name: str) -> Connector:
    return ProjectorConnector(spec, depth=0)


@register("linear", examples=(
    ContractExample(select_layer=[-2, -1]),
    ContractExample(vision="dinov2", select_strategy="full", options={"pool": 2}),
))
def _linear(spec: ConnectorSpec, name: str) -> Connector:
    return ProjectorConnector(spec, depth=1)


@register(pattern=r"mlp(\d+)x_gelu", examples=(
    ContractExample(name="mlp2x_gelu"),
    ContractExample(name="mlp3x_gelu", vision="siglip",
                    options={"standardize": True, "input_norm": True, "efficient_grid": 2}),
))
def _mlp(spec: ConnectorSpec, name: str) -> Connector:
    depth = int(re.fullmatch(r"mlp(\d+)x_gelu", name).group(1))  # type: ignore[union-attr]
    if depth < 1:
        raise ValueError(f"{name}: depth must be >= 1")
    return ProjectorConnector(spec, depth=depth)


_DENSE_EXAMPLES = {
    "sti": (ContractExample(vision_overrides=_DEEP),
            ContractExample(vision_overrides=_DEEP, options={"sti_pool": "2d", "alpha": 2, "efficient_grid": 2})),
    "sci": (ContractExample(vision_overrides=_DEEP, options={"final_first": False, "projector": "linear"}),
            ContractExample(vision="dinov2", vision_overrides=_DEEP, select_strategy="full",
                            options={"layers": [1, 2, 3], "pool": 2})),
    "dci": (ContractExample(vision_overrides=_DEEP, options={"groups": 3, "standardize": True, "efficient_grid": 2}),
            ContractExample(vision="siglip", vision_overrides=_DEEP,
                            options={"groups": [[0, 1], [2, 4]], "input_norm": True, "projector": "mlp3x_gelu"})),
}


def _dense_factory(kind: str):
    def factory(spec: ConnectorSpec, name: str) -> Connector:
        return DenseConnector(spec, kind)

    return factory


for _kind in DENSE_KINDS:
    register(f"dense_{_kind}", examples=_DENSE_EXAMPLES[_kind])(_dense_factory(_kind))
