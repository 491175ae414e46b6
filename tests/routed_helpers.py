"""A test-only routed connector and a tiny routed model, for the routing machinery without the MoV-Adapter.

``RoutedConcat`` is ``tower_concat`` (base + experts aligned to the base grid, concatenated, an MLP) that honours
the MoVA interface: options ``experts``/``letters``/``descriptions``/``num_routing_tokens``; ``tower_rows`` gives an
expert the images whose bit is 1 (none in the routing pass; all when the batch has no routing); ``forward``
multiplies each expert's channels by its bit (an unrouted expert cannot change the output) and, in the routing
pass, average-pools the tokens to ``num_routing_tokens``.  It is *not* registered (the contract suite iterates the
live registry): :func:`routed_model` swaps it into a model built with ``tower_concat``.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from helpers import make_run
from vlweave.builder import build_model
from vlweave.config import VisionConfig
from vlweave.connectors.multi import TowerConcatConnector, TowerConcatOptions

EXPERTS = ("docs", "scenes")
DESCRIPTIONS = ("Reads text in documents and charts.", "Recognises objects and scenes.")

# Two tiny CLIP experts at their own resolutions (8x8 and 4x4 grids, aligned to DINOv2's 4x4 base grid).
DOCS = VisionConfig(name="clip_vision_model", image_size=32, random_init=True, select_layer=-2,
                    config_overrides={"hidden_size": 24, "intermediate_size": 48, "num_hidden_layers": 2,
                                      "num_attention_heads": 2, "patch_size": 4, "image_size": 32})
SCENES = VisionConfig(name="clip_vision_model", image_size=32, random_init=True, select_layer=-1,
                      config_overrides={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2,
                                        "num_attention_heads": 2, "patch_size": 8, "image_size": 32})


@dataclass(frozen=True)
class RoutedConcatOptions(TowerConcatOptions):
    experts: tuple[str, ...] = EXPERTS
    letters: tuple[str, ...] | None = None
    descriptions: tuple[str, ...] = DESCRIPTIONS
    num_routing_tokens: int = 4
    routing_instruction: str | None = "Pick experts."  # short: the tiny test tokenizer spells unknown words out


class RoutedConcat(TowerConcatConnector):
    options_class = RoutedConcatOptions
    options: RoutedConcatOptions

    @property
    def num_routing_tokens(self) -> int:
        return self.options.num_routing_tokens

    def _bits(self, context: Any, n: int, device) -> torch.Tensor:
        e = len(self.options.experts)
        if context is None or context.routing is None:
            return torch.ones(n, e, device=device)
        if context.routing_pass:
            return torch.zeros(n, e, device=device)
        return torch.tensor([[1] * e if r is None else list(r) for r in context.routing], dtype=torch.float32,
                            device=device)

    def tower_rows(self, tower: str, context: Any) -> torch.Tensor | None:
        if tower not in self.options.experts or context is None or context.routing is None:
            return None
        if context.routing_pass:
            return torch.empty(0, dtype=torch.long)
        j = self.options.experts.index(tower)
        return torch.tensor([i for i, r in enumerate(context.routing) if r is None or r[j]], dtype=torch.long)

    def forward(self, prepared, context=None):
        n = prepared["base"][0].shape[0]
        bits = self._bits(context, n, prepared["base"][0].device)
        parts = []
        for name in self.towers:
            x = prepared[name][0]
            if name in self.options.experts:
                x = x * bits[:, self.options.experts.index(name)].view(-1, 1, 1).to(x.dtype)
            parts.append(x)
        tokens = self.projector(torch.cat(parts, dim=-1))
        if context is not None and context.routing_pass:
            side = int(math.isqrt(self.options.num_routing_tokens))
            grid = tokens.transpose(1, 2).reshape(n, -1, self.grid_h, self.grid_w)
            tokens = F.adaptive_avg_pool2d(grid, side).flatten(2).transpose(1, 2)
        return dataclasses.replace(super().forward(prepared, None), tokens=tokens)


def routed_run(tmp_path, **kw):
    cfg = make_run(tmp_path, vision="dinov2", connector="tower_concat", **kw)
    cfg.towers = {"docs": copy.deepcopy(DOCS), "scenes": copy.deepcopy(SCENES)}
    return cfg


def swap_connector(model, **options):
    """Replace a tower_concat model's connector with a seeded RoutedConcat (same towers and grid)."""
    spec = dataclasses.replace(model.connector_spec(), options=dict(options))
    torch.manual_seed(0)
    model.connector = RoutedConcat(spec)
    model.connector.requires_grad_(True)
    return model


def build_routed(cfg, **options):
    model, tok = build_model(cfg)
    return swap_connector(model, **options), tok


class TowerSpy:
    """Counts, per tower, the image rows each call of ``model.prepare_tower_features`` ran on."""

    def __init__(self, model, monkeypatch) -> None:
        self.rows: dict[str, list[int]] = {}
        original = model.prepare_tower_features

        def spy(tower, pixel_values):
            self.rows.setdefault(tower, []).append(int(pixel_values.shape[0]))
            return original(tower, pixel_values)

        monkeypatch.setattr(model, "prepare_tower_features", spy)

    def total(self, tower: str) -> int:
        return sum(self.rows.get(tower, []))
