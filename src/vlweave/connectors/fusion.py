"""Parameter-free feature fusions: what runs in a connector's ``prepare_tower`` (and so what the cache stores).

A connector is a *fusion* (no parameters, deterministic: grid pooling, layer concatenation, Dense Connector
STI/SCI/DCI) followed by a *trainable module* (a LLaVA projector today; a MoV-Adapter or a hyper-projector
later).  The fusion is its own object so any trainable module can take its output::

    fusion = build_fusion("dci", spec, {"groups": 2, "pool": 2})
    fusion.layers          # the hs indices of the tower it reads, in the order __call__ takes them
    fusion.out_channels    # the width of the fused tensor (the trainable module's input width)
    fusion.layout()        # TokenLayout(prefix, grid, extra): [prefix][grid x grid patches, row-major][extra]
    fusion.extra_tokens()  # tokens after the patch grid (STI's pooled layers); 0 for the others
    fused = fusion([hs[i][:, 1:] for i in fusion.layers])   # [B, layout().total, out_channels]
    fusion.signature()     # everything that changes its output (part of the feature-cache key)

Kinds (:func:`fusion_kinds`): ``layers`` (the ``select_layer`` hidden states, pooled, concatenated on channels;
a single layer is passed through) and ``sti``/``sci``/``dci`` (:mod:`vlweave.connectors.dense`).  Every kind
takes the ``pool`` option (2-D average pooling of the patch grid, before fusing).

:class:`FusedConnector` is the connector half of the pattern: it owns a fusion and answers ``tower_layers``,
``prepare_tower``, ``prepare_signature`` and ``num_tokens`` from it, leaving ``forward`` (and any change of the
token layout, :meth:`FusedConnector.output_layout`) to the trainable part.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from vlweave.connectors.base import BASE_TOWER, Connector, ConnectorSpec, pool_grid
from vlweave.connectors.options import OptionsError, parse_options


@dataclass(frozen=True)
class FusionOptions:
    """Options every fusion takes."""

    pool: int = field(default=1, metadata={"min": 1})  # 2-D average pooling kernel of the patch grid


@dataclass(frozen=True)
class TokenLayout:
    """The token axis of a fused (or projected) tensor: ``prefix`` tokens (CLS/registers kept by the ``full``
    strategy), then a ``grid`` x ``grid`` row-major patch map, then ``extra`` tokens (STI's pooled layers)."""

    prefix: int
    grid: int
    extra: int = 0

    @property
    def total(self) -> int:
        return self.prefix + self.grid * self.grid + self.extra


class Fusion(ABC):
    """A parameter-free, deterministic map from one tower's selected hidden states to a trainable module's input."""

    kind: str

    def __init__(self, spec: ConnectorSpec, options: FusionOptions) -> None:
        self.spec = spec
        self.pool = options.pool
        if spec.grid % self.pool:
            raise OptionsError(f"pool={self.pool} must be >= 1 and divide the grid ({spec.grid})", key="pool")
        self.num_prefix = spec.num_prefix_tokens if spec.select_strategy == "full" else 0

    # ---- facts --------------------------------------------------------------------------------------------
    layers: tuple[int, ...]  # absolute hidden-state indices, in the order __call__ takes them
    out_channels: int  # channels of the fused tensor

    def layout(self, grid: int | None = None) -> TokenLayout:
        """Token layout of the output for a tower grid of ``grid`` patches per side (default: the spec's)."""
        g = (self.spec.grid if grid is None else grid) // self.pool
        return TokenLayout(prefix=self.num_prefix, grid=g, extra=self.extra_tokens(grid))

    def extra_tokens(self, grid: int | None = None) -> int:
        """Tokens after the patch grid."""
        return 0

    def num_tokens(self, grid: int | None = None) -> int:
        return self.layout(grid).total

    # ---- the computation ----------------------------------------------------------------------------------
    def pool_features(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Each selected layer's patch grid average-pooled by ``pool`` (prefix tokens pass through)."""
        return [pool_grid(f, self.spec.grid, self.pool, self.num_prefix) for f in features]

    @abstractmethod
    def __call__(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        """``features[i]`` = hidden state ``layers[i]`` ``[B, N, C]`` (prefix strategy applied) -> fused tensor."""

    @abstractmethod
    def signature(self) -> dict[str, Any]:
        """Everything that changes the output (JSON-friendly; part of the feature-cache key)."""

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(kind={self.kind!r}, layers={list(self.layers)}, "
                f"out_channels={self.out_channels})")


class LayerFusion(Fusion):
    """``select_layer``'s hidden states, pooled, concatenated on channels (HF llava's list semantics); one layer is
    passed through unchanged."""

    kind = "layers"

    def __init__(self, spec: ConnectorSpec, options: FusionOptions) -> None:
        from vlweave.vision.towers import normalize_layers

        super().__init__(spec, options)
        self.layers = tuple(normalize_layers(spec.select_layer, spec.num_vision_layers))
        self.out_channels = spec.vision_hidden_size * len(self.layers)

    def __call__(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        pooled = self.pool_features(features)
        return torch.cat(pooled, dim=-1) if len(pooled) > 1 else pooled[0]

    def signature(self) -> dict[str, Any]:
        # This exact form is what checkpoints' feature caches were keyed by before fusions were objects.
        return {"pool": self.pool, "dense": None}


# kind -> (fusion class taking (kind, spec, options) or (spec, options), its options class)
_FUSIONS: dict[str, Callable[[str, ConnectorSpec, Any], Fusion]] = {}
_FUSION_OPTIONS: dict[str, type] = {}


def register_fusion(kind: str, options_class: type, factory: Callable[[str, ConnectorSpec, Any], Fusion]) -> None:
    if kind in _FUSIONS:
        raise ValueError(f"fusion {kind!r} registered twice")
    _FUSIONS[kind] = factory
    _FUSION_OPTIONS[kind] = options_class


register_fusion("layers", FusionOptions, lambda kind, spec, options: LayerFusion(spec, options))


def fusion_kinds() -> list[str]:
    from vlweave import connectors as _  # noqa: F401  (registers the built-in fusions)

    return sorted(_FUSIONS)


def fusion_options_class(kind: str) -> type:
    fusion_kinds()
    if kind not in _FUSION_OPTIONS:
        raise ValueError(f"unknown fusion {kind!r}; known: {', '.join(fusion_kinds())}")
    return _FUSION_OPTIONS[kind]


def build_fusion(kind: str, spec: ConnectorSpec, options: "Mapping[str, Any] | Any | None" = None) -> Fusion:
    """The ``kind`` fusion for the tower described by ``spec``.  ``options``: a mapping of that fusion's options
    (``pool``, and for ``sti|sci|dci`` the Dense Connector ones), or an instance of its options class or of a
    subclass of it (a connector family's options, which add the trainable part's fields)."""
    cls = fusion_options_class(kind)
    return _FUSIONS[kind](kind, spec, parse_options(cls, options))


class FusedConnector(Connector):
    """A connector whose base-tower input is one :class:`Fusion`: the fusion runs in ``prepare_tower`` (cached),
    a subclass's trainable part in ``forward``.  ``options_class`` must derive from the fusion's options class;
    ``fusion_kind`` (class attribute or constructor argument) picks the fusion."""

    fusion_kind: str = "layers"

    def __init__(self, spec: ConnectorSpec, fusion_kind: str | None = None) -> None:
        super().__init__(spec)
        kind = fusion_kind or self.fusion_kind
        opts = self.options if self.options_class is not None else {}
        self.fusion: Fusion = build_fusion(kind, spec, opts)

    def feature_layers(self) -> list[int]:
        return list(self.fusion.layers)

    def prepare(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        return [self.fusion(features)]

    def prepare_signature(self, tower: str = BASE_TOWER) -> dict[str, Any]:
        return self.fusion.signature() if tower == BASE_TOWER else {}

    def output_layout(self, layout: TokenLayout) -> TokenLayout:
        """The token layout of ``forward``'s output given the fusion's (default: unchanged)."""
        return layout

    def num_tokens(self, grid: int | None = None) -> int:
        return self.output_layout(self.fusion.layout(grid)).total
