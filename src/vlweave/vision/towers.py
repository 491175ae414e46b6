"""Vision towers: any HF vision model -> *all* hidden states, plus the shape facts connectors are built from.

Conventions (methods.md §0.4, §1a): ``hs[0]`` is the stem/embedding output, ``hs[i]`` the output of block ``i``;
no post-LayerNorm is applied to any ``hs[i]``.  ``select_layer=-2`` is LLaVA-1.5's penultimate block.
The "default" strategy drops the prefix tokens (CLS and registers), "full" keeps them (HF llava semantics).

A model holds several *named* towers (``base`` first; MoVA's experts beside it), each described by a
:class:`TowerSpec` (its HF config, input size, normalisation, aspect handling and feature selection).  Facts come
from the config alone (:func:`tower_facts`), per tower *family*: ViT-like models (a patch grid, every hidden state
the same shape) by default, CNNs through a registered facts function that states each hidden state's shape
(:func:`register_tower_family`).  A new tower family is one module plus one ``register_tower_family`` line.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel

from vlweave import assets

BASE_TOWER = "base"


@dataclass(frozen=True)
class TowerFacts:
    """Shape facts of a vision tower at a given input size (stated at build time, as prismatic-vlms does).

    ViTs: every hidden state is ``[B, prefix + grid**2, hidden_size]``.  CNNs set ``layer_shapes``: one
    ``(channels, grid_h, grid_w)`` per hidden state (their ``N`` and ``C`` differ from stage to stage); the scalar
    facts then describe the final hidden state.
    """

    hidden_size: int
    num_layers: int  # blocks/stages; len(hidden_states) == num_layers + 1
    patch_size: int  # pixels per token side of the final hidden state (a CNN's total stride)
    image_size: int
    num_prefix_tokens: int  # CLS + register tokens in front of the patch tokens
    layer_shapes: tuple[tuple[int, int, int], ...] | None = None

    @property
    def grid(self) -> int:
        """Patches per side (of the final hidden state)."""
        return self.image_size // self.patch_size

    @property
    def has_cls(self) -> bool:
        return self.num_prefix_tokens > 0

    def layer_shape(self, layer: int) -> tuple[int, int, int]:
        """``(channels, grid_h, grid_w)`` of ``hidden_states[layer]`` (absolute index)."""
        if self.layer_shapes is not None:
            return self.layer_shapes[layer]
        return self.hidden_size, self.grid, self.grid

    def to_dict(self) -> dict[str, Any]:
        return {"hidden_size": self.hidden_size, "num_layers": self.num_layers, "patch_size": self.patch_size,
                "image_size": self.image_size, "num_prefix_tokens": self.num_prefix_tokens,
                "layer_shapes": None if self.layer_shapes is None else [list(s) for s in self.layer_shapes]}


def vision_sub_config(config: PretrainedConfig) -> PretrainedConfig:
    """CLIP/SigLIP checkpoints are dual-encoder configs; the tower is their ``vision_config``."""
    return getattr(config, "vision_config", None) or config


FactsFunction = Callable[[PretrainedConfig, int], TowerFacts]
_FAMILIES: dict[str, FactsFunction] = {}


def register_tower_family(model_type: str, facts: FactsFunction) -> None:
    """Facts for towers of ``model_type`` (HF ``config.model_type``) whose hidden states are not a ViT's."""
    _FAMILIES[model_type] = facts


def _vit_facts(cfg: PretrainedConfig, size: int) -> TowerFacts:
    model_type = getattr(cfg, "model_type", "")
    if model_type in ("siglip_vision_model", "siglip2_vision_model"):
        prefix = 0  # SigLIP has no CLS token
    else:
        prefix = 1 + int(getattr(cfg, "num_register_tokens", 0) or 0)
    if size % cfg.patch_size:
        raise ValueError(f"image_size {size} is not a multiple of the tower's patch size {cfg.patch_size}")
    return TowerFacts(hidden_size=int(cfg.hidden_size), num_layers=int(cfg.num_hidden_layers),
                      patch_size=int(cfg.patch_size), image_size=size, num_prefix_tokens=prefix)


def tower_facts(config: PretrainedConfig, image_size: int | None = None) -> TowerFacts:
    cfg = vision_sub_config(config)
    size = int(image_size or cfg.image_size)
    return _FAMILIES.get(getattr(cfg, "model_type", ""), _vit_facts)(cfg, size)


@dataclass(frozen=True)
class TowerSpec:
    """One named tower as a model config describes it: what to build and how its input and output are handled."""

    name: str
    config: PretrainedConfig
    image_size: int | None = None  # None: the tower's own
    image_mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    image_std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    aspect: str = "pad"
    select_layer: int | list[int] = -2
    select_strategy: str = "default"
    facts: TowerFacts = field(init=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "facts", tower_facts(self.config, self.image_size))

    @property
    def model_type(self) -> str:
        return str(getattr(vision_sub_config(self.config), "model_type", ""))

    def transform_desc(self) -> dict[str, Any]:
        """Everything that changes the pixels this tower sees (part of the feature-cache key)."""
        return {"size": self.facts.image_size, "mean": list(self.image_mean), "std": list(self.image_std),
                "aspect": self.aspect}


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


# ---- tower families whose hidden states are not a ViT's (one line each) ---------------------------------------
from vlweave.vision import efficientnet_lite as _efficientnet_lite  # noqa: E402

register_tower_family(_efficientnet_lite.EfficientNetLiteConfig.model_type, _efficientnet_lite.tower_facts)
