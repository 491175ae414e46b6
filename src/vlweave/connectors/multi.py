"""``tower_concat``: the simplest connector over several named towers (a multi-encoder baseline, as in
prismatic-vlms' fused DINOv2+SigLIP backbone and MoVA's "concatenate every expert" ablation).

Each tower's selected hidden state (its ``select_layer``; one layer) is laid on its own patch grid and resized to
the *base* tower's grid (parameter-free, in ``prepare_tower``, so the cache stores the aligned map per tower); then
the towers are concatenated on channels in config order and a LLaVA MLP projects them.  Visual tokens: the base
grid's patch count (prefix tokens are dropped).

Options (:class:`TowerConcatOptions`): ``towers`` (names, default every tower of the model), ``resize``
(``area``: adaptive average pooling, exact for integer ratios and the natural reading of "align to a coarser
grid"; ``bilinear``: interpolation, align_corners False), ``projector`` (``linear`` or ``mlpNx_gelu``, default
``mlp2x_gelu``), ``pool`` (average pooling of the concatenated grid by this kernel before the projector; default 1).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from vlweave.connectors.base import (
    BASE_TOWER,
    Connector,
    ContractExample,
    ConnectorOutput,
    ConnectorSpec,
    TowerInput,
    pool_grid,
    register,
)
from vlweave.connectors.options import OptionsError

@dataclass(frozen=True)
class TowerConcatOptions:
    towers: tuple[str, ...] | None = None  # None: every tower of the model
    resize: Literal["area", "bilinear"] = "area"
    projector: str = "mlp2x_gelu"  # linear | mlpNx_gelu
    # 2-D average pooling of the concatenated base grid by this kernel before the projector (1: none), so that a
    # plain-fusion arm can give the LM as many visual tokens as the arm it is compared with (MoVA halves the grid).
    pool: int = field(default=1, metadata={"min": 1})

    def __post_init__(self) -> None:
        if not re.fullmatch(r"linear|mlp[1-9]\d*x_gelu", self.projector):
            raise ValueError(f"tower_concat: option 'projector' must be 'linear' or 'mlpNx_gelu', got "
                             f"{self.projector!r}")


def _final_layer(tower: TowerInput) -> int:
    from vlweave.vision.towers import normalize_layers

    layers = normalize_layers(tower.select_layer, tower.facts.num_layers)
    if len(layers) != 1:
        raise ValueError(f"tower_concat takes one hidden state per tower; select_layer is {tower.select_layer!r}")
    return layers[0]


class TowerConcatConnector(Connector):
    options_class = TowerConcatOptions
    contract_examples = (ContractExample(vision="dinov2", towers={"clip": "clip"}),)
    options: TowerConcatOptions

    def __init__(self, spec: ConnectorSpec) -> None:
        super().__init__(spec)
        if not spec.towers:
            raise ValueError("tower_concat needs the model's named towers (ConnectorSpec.towers)")
        names = list(self.options.towers or spec.towers)
        missing = [n for n in names if n not in spec.towers]
        if missing or BASE_TOWER not in names:
            raise ValueError(f"tower_concat: towers {names} must include {BASE_TOWER!r} and exist in the model "
                             f"(unknown: {missing}; the model has {list(spec.towers)})")
        self.towers = [n for n in spec.towers if n in names]  # config order, base first
        self.pool = self.options.pool
        self.layers = {n: _final_layer(spec.towers[n]) for n in self.towers}
        base = spec.towers[BASE_TOWER].facts
        _, self.grid_h, self.grid_w = base.layer_shape(self.layers[BASE_TOWER])
        if self.pool > 1 and (self.grid_h != self.grid_w or self.grid_h % self.pool):
            raise OptionsError(f"tower_concat: option 'pool' = {self.pool} must divide the square base grid "
                               f"({self.grid_h} x {self.grid_w})", key="pool")
        in_dim = sum(spec.towers[n].facts.layer_shape(self.layers[n])[0] for n in self.towers)
        depth = 1 if self.options.projector == "linear" else int(self.options.projector[3:-6])
        layers: list[nn.Module] = [nn.Linear(in_dim, spec.text_hidden_size)]
        for _ in range(depth - 1):
            layers += [nn.GELU(), nn.Linear(spec.text_hidden_size, spec.text_hidden_size)]
        self.projector = nn.Sequential(*layers)

    # ---- facts ---------------------------------------------------------------------------------------------
    def tower_layers(self) -> dict[str, list[int]]:
        return {n: [self.layers[n]] for n in self.towers}

    def feature_layers(self) -> list[int]:
        return [self.layers[BASE_TOWER]]

    def prepare_signature(self, tower: str = BASE_TOWER) -> dict[str, Any]:
        return {"grid": [self.grid_h, self.grid_w], "resize": self.options.resize}

    def num_tokens(self, grid: int | None = None) -> int:
        return (self.grid_h // self.pool) * (self.grid_w // self.pool)

    # ---- parameter-free part (cached per tower) ----------------------------------------------------------
    def prepare_tower(self, tower: str, features: list[torch.Tensor]) -> list[torch.Tensor]:
        """The tower's patch tokens as a map, resized to the base grid, back to row-major tokens."""
        (x,) = features
        tin = self.spec.towers[tower]
        channels, gh, gw = tin.facts.layer_shape(self.layers[tower])
        x = x[:, x.shape[1] - gh * gw:]  # patch tokens only (a "full" strategy keeps CLS in front)
        if (gh, gw) == (self.grid_h, self.grid_w):
            return [x]
        img = x.transpose(1, 2).reshape(x.shape[0], channels, gh, gw).float()
        if self.options.resize == "area":
            img = F.adaptive_avg_pool2d(img, (self.grid_h, self.grid_w))
        else:
            img = F.interpolate(img, size=(self.grid_h, self.grid_w), mode="bilinear", align_corners=False)
        return [img.flatten(2).transpose(1, 2).to(x.dtype)]

    # ---- trained part --------------------------------------------------------------------------------------
    def forward(self, prepared: Mapping[str, list[torch.Tensor]] | list[torch.Tensor],
                context: Any = None) -> ConnectorOutput:
        if not isinstance(prepared, Mapping):
            raise ValueError(f"tower_concat needs features keyed by tower ({self.towers}), got a list")
        missing = [n for n in self.towers if n not in prepared]
        if missing:
            raise ValueError(f"tower_concat: no features for tower(s) {missing}")
        x = torch.cat([prepared[n][0] for n in self.towers], dim=-1)
        x = pool_grid(x, self.grid_h, self.pool)
        return ConnectorOutput(tokens=self.projector(x))


@register("tower_concat")
def _tower_concat(spec: ConnectorSpec, name: str) -> Connector:
    return TowerConcatConnector(spec)
