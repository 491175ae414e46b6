"""The HF-native model: ``VlweaveConfig`` + ``VlweaveForConditionalGeneration``.

vision tower (any HF vision model) -> feature selection -> connector (registry) -> causal LM (any HF causal LM).
Image tokens are scattered into the LM's input embeddings at the positions of the ``<image>`` token id, with a
count check (HF llava semantics).  Training losses are computed only at supervised positions: the LM head over a
49k vocabulary at every position is the single largest waste in a small-LM training step (design §7: 21-31 %).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    PreTrainedConfig,
    PreTrainedModel,
)
from transformers.configuration_utils import SubConfigSpec
from transformers.modeling_outputs import CausalLMOutputWithPast

from vlweave.connectors import ConnectorContext, ConnectorSpec, build_connector
from vlweave.processing import IGNORE_INDEX
from vlweave.vision.towers import TowerFacts, run_tower, select_features, tower_facts, vision_sub_config


class ImageTokenMismatchError(ValueError):
    """The number of ``<image>`` tokens in the text does not match the visual tokens the connector produced."""


class VlweaveConfig(PreTrainedConfig):
    """Composite config (``vision_config``/``text_config`` like HF ``LlavaConfig``) plus the connector choice."""

    model_type = "vlweave"
    sub_configs_defaults = {
        "vision_config": SubConfigSpec(config_class=AutoConfig, model_type="dinov2"),
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama"),
    }

    vision_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    connector_type: str = "mlp2x_gelu"
    connector_options: dict | None = None
    image_token_id: int = 0
    image_size: int | None = None  # None: the tower's own
    vision_feature_layer: int | list[int] = -2
    vision_feature_select_strategy: str = "default"
    image_mean: list[float] | None = None
    image_std: list[float] | None = None
    image_aspect: str = "pad"
    chat_template_name: str = "tokenizer"
    system_prompt: str | None = None
    tie_word_embeddings: bool = False
    video_pool: int = 2  # zero-shot video: max-pool kernel over each frame's tokens (FreeVA --use_pool); 1 = none

    def __post_init__(self, **kwargs: Any) -> None:
        super().__post_init__(**kwargs)
        if self.connector_options is None:
            self.connector_options = {}
        if self.image_mean is None:
            self.image_mean = [0.485, 0.456, 0.406]
        if self.image_std is None:
            self.image_std = [0.229, 0.224, 0.225]


class VlweavePreTrainedModel(PreTrainedModel):
    config: VlweaveConfig
    config_class = VlweaveConfig
    base_model_prefix = ""
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _skip_keys_device_placement = ["past_key_values"]

    def _init_weights(self, module: nn.Module) -> None:
        # Sub-models initialise themselves; connector layers keep PyTorch's defaults (as LLaVA's projector does).
        pass


class VlweaveForConditionalGeneration(VlweavePreTrainedModel):
    def __init__(
        self,
        config: VlweaveConfig,
        vision_tower: PreTrainedModel | None = None,
        language_model: PreTrainedModel | None = None,
    ) -> None:
        super().__init__(config)
        self.vision_tower = vision_tower if vision_tower is not None else AutoModel.from_config(config.vision_config)
        self.language_model = (
            language_model if language_model is not None else AutoModelForCausalLM.from_config(config.text_config)
        )
        self._restore_attn_implementation()
        self.facts: TowerFacts = tower_facts(config.vision_config, config.image_size)
        self.connector = build_connector(config.connector_type, self.connector_spec())
        self.post_init()

    def _restore_attn_implementation(self) -> None:
        """Give prebuilt sub-models their attention implementation back.

        ``PreTrainedConfig.__post_init__`` sets ``_attn_implementation = None`` recursively on its sub-configs, and
        a ``VlweaveConfig`` built around existing models (``builder.build_model``) shares their config objects, so
        the tower and the LM silently fell back to eager attention (with transformers' "AttentionInterface ...
        None" warning) while the same checkpoint reloaded with ``from_pretrained`` used SDPA.
        """
        for module in (self.vision_tower, self.language_model):
            sub = getattr(module, "config", None)
            if isinstance(module, PreTrainedModel) and sub is not None and sub._attn_implementation is None:
                sub._attn_implementation = module._check_and_adjust_attn_implementation(None, is_init_check=True)

    # ---- facts -----------------------------------------------------------------------------------------
    def connector_spec(self) -> ConnectorSpec:
        f = tower_facts(self.config.vision_config, self.config.image_size)
        return ConnectorSpec(
            vision_hidden_size=f.hidden_size,
            num_vision_layers=f.num_layers,
            grid=f.grid,
            num_prefix_tokens=f.num_prefix_tokens,
            text_hidden_size=int(self.config.text_config.hidden_size),
            select_layer=self.config.vision_feature_layer,
            select_strategy=self.config.vision_feature_select_strategy,
            options=dict(self.config.connector_options or {}),
            vision_model_type=str(getattr(vision_sub_config(self.config.vision_config), "model_type", "")),
        )

    @property
    def num_image_tokens(self) -> int:
        """Visual tokens per image; the processor expands ``<image>`` to exactly this many ids."""
        return self.connector.num_tokens()

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.language_model.get_output_embeddings()

    # ---- vision ----------------------------------------------------------------------------------------
    def vision_features(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        """The connector's prepared input (selected hidden states after its parameter-free ``prepare``: pooling,
        multi-layer fusion); this is what the frozen-feature cache stores."""
        frozen = not any(p.requires_grad for p in self.vision_tower.parameters())
        first = next(self.vision_tower.parameters())
        with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen):
            hs = run_tower(self.vision_tower, pixel_values.to(device=first.device, dtype=first.dtype), self.facts)
            selected = select_features(
                hs, self.connector.feature_layers(), self.config.vision_feature_select_strategy, self.facts
            )
            return self.connector.prepare(selected)

    def get_image_features(
        self,
        pixel_values: torch.Tensor | None = None,
        vision_features: list[torch.Tensor] | None = None,
        context: ConnectorContext | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Visual tokens [N_images, T, D_text] and the connector's auxiliary losses."""
        if vision_features is None:
            if pixel_values is None:
                raise ValueError("get_image_features needs pixel_values or vision_features")
            vision_features = self.vision_features(pixel_values)
        out = self.connector(list(vision_features), context)
        return out.tokens, out.aux_losses

    # ---- video (training-free, methods.md §1d) --------------------------------------------------------
    def num_video_tokens(self, num_frames: int) -> int:
        """Visual tokens of a ``num_frames`` video: per frame ``num_image_tokens // video_pool`` (max-pooled)."""
        return num_frames * (self.num_image_tokens // int(self.config.video_pool))

    def check_video_fits(self, num_frames: int, text_tokens: int = 0) -> None:
        """Raise a clear error when ``num_frames`` x tokens (+ text) exceeds the LM's context."""
        limit = getattr(self.config.text_config, "max_position_embeddings", None)
        need = self.num_video_tokens(num_frames) + text_tokens
        if limit is not None and need > int(limit):
            per = self.num_image_tokens // int(self.config.video_pool)
            raise ValueError(
                f"a {num_frames}-frame video needs {num_frames} x {per} = {self.num_video_tokens(num_frames)} visual "
                f"tokens (+{text_tokens} text), more than the LM's context of {limit}; use fewer frames"
            )

    def get_video_features(self, pixel_values_videos: torch.Tensor) -> torch.Tensor:
        """[B, T, 3, H, W] frames -> [B, T * tokens_per_frame, D_text]: every frame through tower + connector as an
        image, then max-pooling (kernel ``video_pool``) along each frame's row-major token axis, then frames
        concatenated in time order (they fill the single ``<image>`` slot)."""
        if pixel_values_videos.dim() != 5:
            raise ValueError(f"videos must be [batch, frames, 3, H, W], got {tuple(pixel_values_videos.shape)}")
        b, t = pixel_values_videos.shape[:2]
        self.check_video_fits(t)
        tokens, _ = self.get_image_features(pixel_values_videos.flatten(0, 1))  # [B*T, N, D]
        k = int(self.config.video_pool)
        if k > 1:
            tokens = F.max_pool1d(tokens.transpose(1, 2), kernel_size=k, stride=k).transpose(1, 2)
        return tokens.reshape(b, t * tokens.shape[1], tokens.shape[2])

    # ---- LM input --------------------------------------------------------------------------------------
    def embed_inputs(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        vision_features: list[torch.Tensor] | None = None,
        pixel_values_videos: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """LM input embeddings with the visual tokens (of images, or of videos) scattered into the ``<image>`` slots."""
        image_mask = input_ids == self.config.image_token_id
        embed = self.get_input_embeddings()
        embeds = embed(input_ids.masked_fill(image_mask, 0))
        aux: dict[str, torch.Tensor] = {}
        has_images = pixel_values is not None or vision_features is not None
        n_slots = int(image_mask.sum())
        if has_images and pixel_values_videos is not None:
            raise ValueError("give images or videos in one batch, not both")
        if not has_images and pixel_values_videos is None:
            if n_slots:
                raise ImageTokenMismatchError(f"the text has {n_slots} image tokens but no image was given")
            return embeds, aux
        if pixel_values_videos is not None:
            tokens = self.get_video_features(pixel_values_videos)
        else:
            tokens, aux = self.get_image_features(pixel_values, vision_features)
        n_feats = tokens.shape[0] * tokens.shape[1]
        if n_slots != n_feats:
            raise ImageTokenMismatchError(
                f"image tokens do not match: the text has {n_slots} image tokens, the connector produced "
                f"{tokens.shape[0]} image(s) x {tokens.shape[1]} tokens = {n_feats} (expand <image> to "
                f"model.num_image_tokens = {self.num_image_tokens} per image)"
            )
        embeds = embeds.masked_scatter(image_mask.unsqueeze(-1), tokens.to(embeds.dtype))
        return embeds, aux

    # ---- forward ---------------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        vision_features: list[torch.Tensor] | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: Any = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        aux: dict[str, torch.Tensor] = {}
        if inputs_embeds is None:
            if input_ids is None:
                raise ValueError("forward needs input_ids or inputs_embeds")
            inputs_embeds, aux = self.embed_inputs(input_ids, pixel_values, vision_features, pixel_values_videos)
        if labels is None:
            out = self.language_model(
                inputs_embeds=inputs_embeds,
                attention_mask=attention_mask,
                position_ids=position_ids,
                past_key_values=past_key_values,
                use_cache=use_cache,
                **kwargs,
            )
            return out
        # Training path: run the decoder, then the LM head only where the next token is supervised.
        decoder = self.language_model.get_decoder()
        hidden = decoder(
            inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        ).last_hidden_state
        targets = labels[:, 1:]
        keep = targets != IGNORE_INDEX
        if not bool(keep.any()):
            raise ValueError(f"batch has no supervised token (all labels are {IGNORE_INDEX})")
        logits = self.get_output_embeddings()(hidden[:, :-1][keep])
        loss = F.cross_entropy(logits.float(), targets[keep])
        for value in aux.values():
            loss = loss + value
        return CausalLMOutputWithPast(loss=loss, logits=logits)

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        vision_features: list[torch.Tensor] | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        **generate_kwargs: Any,
    ) -> torch.Tensor:
        """Greedy/sampled generation with KV cache; returns only the new tokens. Use LEFT padding for batches."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if attention_mask.shape[0] > 1 and bool((attention_mask[:, -1] == 0).any()):
            raise ValueError("batched generation needs left padding (tokenizer.padding_side = 'left')")
        embeds, _ = self.embed_inputs(input_ids, pixel_values, vision_features, pixel_values_videos)
        return self.language_model.generate(inputs_embeds=embeds, attention_mask=attention_mask, **generate_kwargs)


def register_auto_classes() -> None:
    """Make ``AutoConfig``/``AutoModelForImageTextToText`` load vlweave checkpoints by ``model_type``."""
    try:
        AutoConfig.register("vlweave", VlweaveConfig)
    except ValueError:
        pass  # already registered
    for auto in (AutoModelForImageTextToText, AutoModel):
        try:
            auto.register(VlweaveConfig, VlweaveForConditionalGeneration)
        except ValueError:
            pass


register_auto_classes()

__all__ = [
    "IGNORE_INDEX",
    "ImageTokenMismatchError",
    "VlweaveConfig",
    "VlweaveForConditionalGeneration",
    "vision_sub_config",
]
