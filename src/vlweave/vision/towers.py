"""Vision towers: any HF vision model -> *all* hidden states, plus the shape facts connectors are built from.

Conventions (methods.md §0.4, §1a): ``hs[0]`` is the stem/embedding output, ``hs[i]`` the output of block ``i``;
no post-LayerNorm is applied to any ``hs[i]``.  ``select_layer=-2`` is LLaVA-1.5's penultimate block.
The "default" strategy drops the prefix tokens (CLS and registers), "full" keeps them (HF llava semantics).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel

from vlweave import assets


@dataclass(frozen=True)
class TowerFacts:
    """Shape facts of a vision tower at a given input size (stated at build time, as prismatic-vlms does)."""

    hidden_size: int
    num_layers: int  # transformer blocks; len(hidden_states) == num_layers + 1
    patch_size: int
    image_size: int
    num_prefix_tokens: int  # CLS + register tokens in front of the patch tokens

    @property
    def grid(self) -> int:
        """Patches per side."""
        return self.image_size // self.patch_size

    @property
    def has_cls(self) -> bool:
        return self.num_prefix_tokens > 0


def vision_sub_config(config: PretrainedConfig) -> PretrainedConfig:
    """CLIP/SigLIP checkpoints are dual-encoder configs; the tower is their ``vision_config``."""
    return getattr(config, "vision_config", None) or config


def tower_facts(config: PretrainedConfig, image_size: int | None = None) -> TowerFacts:
    cfg = vision_sub_config(config)
    model_type = getattr(cfg, "model_type", "")
    if model_type in ("siglip_vision_model", "siglip2_vision_model"):
        prefix = 0  # SigLIP has no CLS token
    else:
        prefix = 1 + int(getattr(cfg, "num_register_tokens", 0) or 0)
    size = int(image_size or cfg.image_size)
    if size % cfg.patch_size:
        raise ValueError(f"image_size {size} is not a multiple of the tower's patch size {cfg.patch_size}")
    return TowerFacts(
        hidden_size=int(cfg.hidden_size),
        num_layers=int(cfg.num_hidden_layers),
        patch_size=int(cfg.patch_size),
        image_size=size,
        num_prefix_tokens=prefix,
    )


def load_vision_config(name: str, overrides: dict | None = None) -> PretrainedConfig:
    cfg = vision_sub_config(AutoConfig.from_pretrained(assets.resolve(name)))
    for key, value in (overrides or {}).items():
        setattr(cfg, key, value)
    return cfg


def build_vision_model(config: PretrainedConfig) -> PreTrainedModel:
    """A randomly initialised tower of the given (vision) config."""
    return AutoModel.from_config(vision_sub_config(config))


def load_vision_model(name: str) -> PreTrainedModel:
    """Load pretrained tower weights; for CLIP/SigLIP checkpoints only the vision half is loaded."""
    path = assets.resolve(name)
    cfg = vision_sub_config(AutoConfig.from_pretrained(path))
    model_cls = AutoModel._model_mapping[type(cfg)]
    return model_cls.from_pretrained(path, config=cfg)


def run_tower(model: nn.Module, pixel_values: torch.Tensor, facts: TowerFacts) -> tuple[torch.Tensor, ...]:
    """All hidden states of the tower (``len == num_layers + 1``)."""
    kwargs = {"output_hidden_states": True, "return_dict": True}
    native = getattr(vision_sub_config(model.config), "image_size", facts.image_size)
    if native != facts.image_size and "interpolate_pos_encoding" in inspect.signature(model.forward).parameters:
        # DINOv2 always interpolates; CLIP/SigLIP need to be asked when the size differs from pre-training.
        if getattr(model.config, "model_type", "") != "dinov2":
            kwargs["interpolate_pos_encoding"] = True
    out = model(pixel_values=pixel_values, **kwargs)
    hs = out.hidden_states
    if len(hs) != facts.num_layers + 1:
        raise RuntimeError(f"tower returned {len(hs)} hidden states, expected {facts.num_layers + 1}")
    return tuple(hs)


def normalize_layers(layers: int | Sequence[int], num_layers: int) -> list[int]:
    """Absolute indices into ``hidden_states`` (length ``num_layers + 1``); negative indices count from the end."""
    items = [layers] if isinstance(layers, int) else list(layers)
    total = num_layers + 1
    out = []
    for layer in items:
        idx = layer + total if layer < 0 else layer
        if not 0 <= idx < total:
            raise ValueError(f"vision layer {layer} out of range for a tower with {num_layers} blocks ({total} states)")
        out.append(idx)
    return out


def select_features(
    hidden_states: Sequence[torch.Tensor], layers: Sequence[int], strategy: str, facts: TowerFacts
) -> list[torch.Tensor]:
    """Pick hidden states by absolute index and apply the prefix-token strategy (``default`` drops CLS/registers)."""
    if strategy not in ("default", "full"):
        raise ValueError(f"unknown select_strategy {strategy!r}; known: 'default', 'full'")
    start = facts.num_prefix_tokens if strategy == "default" else 0
    return [hidden_states[i][:, start:] for i in layers]
