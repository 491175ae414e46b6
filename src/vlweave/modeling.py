"""The HF-native model: ``VlweaveConfig`` + ``VlweaveForConditionalGeneration``.

named vision towers (any HF vision models, ``base`` first) -> feature selection -> connector (registry) -> causal LM
(any HF causal LM).  Image tokens are scattered into the LM's input embeddings at the positions of the ``<image>``
token id, with a count check (HF llava semantics).  Training losses are computed only at supervised positions: the
LM head over a 49k vocabulary at every position is the single largest waste in a small-LM training step (design
§7: 21-31 %).

Generation runs through this model's own ``forward`` on every step (``GenerationMixin``; images only at prefill,
as HF llava), so a module can compute per-sample state once at prefill (:meth:`register_prefill_hook`) and read it
on every cached decode step through the context.

Checkpoint layout: the base tower's weights are saved as ``vision_tower.*`` (HF llava's name, and what checkpoints
saved before named towers contain); the others as ``vision_towers.<name>.*``.  In memory every tower lives in the
``vision_towers`` ``ModuleDict``; a registered weight renaming maps between the two on load and save.  LM-side
modules (``config.lm_modules``, ``vlweave.language.modules``) are built here and saved as ``lm_modules.<name>.*``.
``components()`` names what a tune policy can train.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    GenerationMixin,
    PreTrainedConfig,
    PreTrainedModel,
)
from transformers.configuration_utils import SubConfigSpec
from transformers.conversion_mapping import register_checkpoint_conversion_mapping
from transformers.core_model_loading import WeightRenaming
from transformers.modeling_outputs import CausalLMOutputWithPast

from vlweave.connectors import ConnectorSpec, build_connector
from vlweave.connectors.base import TowerInput
from vlweave.context import VlweaveContext
from vlweave.language.modules import LMModuleSpec, build_lm_module, lm_module_entries
from vlweave.processing import IGNORE_INDEX
from vlweave.vision.towers import (
    BASE_TOWER,
    TowerFacts,
    TowerSpec,
    run_tower,
    select_features,
    vision_sub_config,
)


# Per-tower settings an extra tower may carry (the base tower keeps the flat fields of older configs).
TOWER_KEYS = ("vision_config", "image_size", "image_mean", "image_std", "image_aspect", "vision_feature_layer",
              "vision_feature_select_strategy")

PrefillHook = Callable[["VlweaveForConditionalGeneration", VlweaveContext, torch.Tensor, "torch.Tensor | None"], None]


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
    # Towers beside the base one, by name: {name: {"vision_config": {... "model_type": ...}, "image_size": ...,
    # "image_mean": [...], "image_std": [...], "image_aspect": ..., "vision_feature_layer": ...,
    # "vision_feature_select_strategy": ...}} (plain JSON, so config.json stays readable by any tool).
    extra_vision_towers: dict | None = None
    # LM-side modules a method injects inside or beside the LM (``vlweave.language.modules``), built with the model
    # so that from_pretrained rebuilds them: [{"type": "block_adapter", "name": "block_adapter", "options": {...}}].
    lm_modules: list | None = None

    def __post_init__(self, **kwargs: Any) -> None:
        super().__post_init__(**kwargs)
        if self.connector_options is None:
            self.connector_options = {}
        if self.image_mean is None:
            self.image_mean = [0.485, 0.456, 0.406]
        if self.image_std is None:
            self.image_std = [0.229, 0.224, 0.225]
        if self.extra_vision_towers is None:
            self.extra_vision_towers = {}
        self.lm_modules = lm_module_entries(self.lm_modules)
        for name, tower in self.extra_vision_towers.items():
            unknown = set(tower) - set(TOWER_KEYS)
            if name == BASE_TOWER or "vision_config" not in tower or unknown:
                raise ValueError(f"extra_vision_towers[{name!r}]: needs a 'vision_config' and a name other than "
                                 f"{BASE_TOWER!r}; unknown key(s) {sorted(unknown)}; known: {list(TOWER_KEYS)}")

    def tower_specs(self) -> dict[str, TowerSpec]:
        """Every named tower, ``base`` first (built from the flat fields), then the extra ones in config order."""
        specs = {BASE_TOWER: TowerSpec(
            name=BASE_TOWER, config=self.vision_config, image_size=self.image_size,
            image_mean=tuple(self.image_mean), image_std=tuple(self.image_std), aspect=self.image_aspect,
            select_layer=self.vision_feature_layer, select_strategy=self.vision_feature_select_strategy)}
        for name, tower in (self.extra_vision_towers or {}).items():
            vcfg = dict(tower["vision_config"])
            specs[name] = TowerSpec(
                name=name, config=AutoConfig.for_model(vcfg.pop("model_type"), **vcfg),
                image_size=tower.get("image_size"),
                image_mean=tuple(tower.get("image_mean") or (0.485, 0.456, 0.406)),
                image_std=tuple(tower.get("image_std") or (0.229, 0.224, 0.225)),
                aspect=tower.get("image_aspect", "pad"),
                select_layer=tower.get("vision_feature_layer", -1),
                select_strategy=tower.get("vision_feature_select_strategy", "default"))
        return specs


def connector_spec_for(config: VlweaveConfig, tower_specs: Mapping[str, TowerSpec] | None = None) -> ConnectorSpec:
    """The connector's shape facts from a ``VlweaveConfig`` alone (no weights): what the model builds its connector
    from, and what a processor reads ``num_image_tokens`` and the needed towers off for a config without a model."""
    specs = dict(tower_specs) if tower_specs is not None else config.tower_specs()
    f = specs[BASE_TOWER].facts
    towers = {n: TowerInput(facts=s.facts, select_layer=s.select_layer, select_strategy=s.select_strategy,
                            model_type=s.model_type) for n, s in specs.items()}
    return ConnectorSpec(
        vision_hidden_size=f.hidden_size,
        num_vision_layers=f.num_layers,
        grid=f.grid,
        num_prefix_tokens=f.num_prefix_tokens,
        text_hidden_size=int(config.text_config.hidden_size),
        select_layer=config.vision_feature_layer,
        select_strategy=config.vision_feature_select_strategy,
        options=dict(config.connector_options or {}),
        vision_model_type=specs[BASE_TOWER].model_type,
        towers=towers,
    )


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

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any):
        """HF's, with the loaded weights moved into aligned memory (:mod:`vlweave.aligned`: a reloaded model
        computes exactly what the saved one did)."""
        from vlweave.aligned import realign_cpu_tensors

        out = super().from_pretrained(*args, **kwargs)
        realign_cpu_tensors(out[0] if isinstance(out, tuple) else out)
        return out


class VlweaveForConditionalGeneration(VlweavePreTrainedModel, GenerationMixin):
    def __init__(
        self,
        config: VlweaveConfig,
        vision_tower: PreTrainedModel | None = None,
        language_model: PreTrainedModel | None = None,
        extra_towers: Mapping[str, PreTrainedModel] | None = None,
    ) -> None:
        super().__init__(config)
        self.tower_specs: dict[str, TowerSpec] = config.tower_specs()
        given = dict(extra_towers or {})
        unknown = set(given) - set(self.tower_specs)
        if unknown:
            raise ValueError(f"towers {sorted(unknown)} are not in the config; configured: {list(self.tower_specs)}")
        towers: dict[str, nn.Module] = {}
        for name, spec in self.tower_specs.items():
            model = vision_tower if name == BASE_TOWER else given.get(name)
            towers[name] = model if model is not None else AutoModel.from_config(vision_sub_config(spec.config))
        self.vision_towers = nn.ModuleDict(towers)
        self.language_model = (
            language_model if language_model is not None else AutoModelForCausalLM.from_config(config.text_config)
        )
        self._restore_attn_implementation()
        self.tower_facts: dict[str, TowerFacts] = {n: s.facts for n, s in self.tower_specs.items()}
        self.facts: TowerFacts = self.tower_facts[BASE_TOWER]
        self.connector = build_connector(config.connector_type, self.connector_spec())
        unknown_towers = set(self.connector.tower_layers()) - set(self.tower_specs)
        if unknown_towers:
            raise ValueError(f"connector {config.connector_type!r} needs tower(s) {sorted(unknown_towers)}; this "
                             f"model has {list(self.tower_specs)}")
        self._prefill_hooks: dict[str, PrefillHook] = {}
        self.active_context: VlweaveContext | None = None  # the context of the forward now running (else None)
        # Weight of the word-tie align objective (set by the trainer for a stage's steps; not part of the model).
        self.word_tie = 0.0
        # After the connector, so that adding a module leaves the connector's seeded init unchanged.
        self.lm_modules = nn.ModuleDict()
        for entry in config.lm_modules:
            spec = LMModuleSpec(name=entry["name"], type=entry["type"], options=entry["options"],
                                hidden_size=int(config.text_config.hidden_size),
                                num_layers=int(config.text_config.num_hidden_layers))
            self.lm_modules[spec.name] = build_lm_module(spec)
            self.lm_modules[spec.name].attach(self)
        self.post_init()

    @property
    def vision_tower(self) -> nn.Module:
        """The base tower (HF llava's attribute name)."""
        return self.vision_towers[BASE_TOWER]

    def components(self) -> dict[str, nn.Module]:
        """The trainable components by tune-policy name: ``vision.<tower>`` for every tower (base first),
        ``connector`` (and ``connector.<name>`` for the connector's :meth:`sub_components`), ``language``, then each
        LM-side module by its name.  Tune policies, optimizer groups,
        checkpoints and export iterate over these; a parameter belongs to the innermost component holding it."""
        out: dict[str, nn.Module] = {f"vision.{name}": tower for name, tower in self.vision_towers.items()}
        out["connector"] = self.connector
        for sub, module in self.connector.sub_components().items():  # e.g. MoVA's connector.text_encoder
            out[f"connector.{sub}"] = module
        out["language"] = self.language_model
        out.update(self.lm_modules.items())
        return out

    def _restore_attn_implementation(self) -> None:
        """Give prebuilt sub-models their attention implementation back.

        ``PreTrainedConfig.__post_init__`` sets ``_attn_implementation = None`` recursively on its sub-configs, and
        a ``VlweaveConfig`` built around existing models (``builder.build_model``) shares their config objects, so
        the tower and the LM silently fell back to eager attention (with transformers' "AttentionInterface ...
        None" warning) while the same checkpoint reloaded with ``from_pretrained`` used SDPA.
        """
        for module in (*self.vision_towers.values(), self.language_model):
            sub = getattr(module, "config", None)
            if isinstance(module, PreTrainedModel) and sub is not None and sub._attn_implementation is None:
                sub._attn_implementation = module._check_and_adjust_attn_implementation(None, is_init_check=True)

    # ---- facts -----------------------------------------------------------------------------------------
    def connector_spec(self) -> ConnectorSpec:
        return connector_spec_for(self.config, self.tower_specs)

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
    def needed_towers(self) -> list[str]:
        """The towers the connector reads, in config order (the others are never run)."""
        wanted = self.connector.tower_layers()
        return [n for n in self.tower_specs if n in wanted]

    def prepare_tower_features(self, tower: str, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        """One tower's contribution to the connector input: run it, select the connector's layers of it (prefix
        strategy applied), then the connector's parameter-free ``prepare_tower``.  This is what the frozen-feature
        cache stores per (image, tower)."""
        module = self.vision_towers[tower]
        spec = self.tower_specs[tower]
        frozen = not any(p.requires_grad for p in module.parameters())
        first = next(module.parameters())
        with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen):
            hs = run_tower(module, pixel_values.to(device=first.device, dtype=first.dtype), spec.facts)
            selected = select_features(hs, self.connector.tower_layers()[tower], spec.select_strategy, spec.facts)
            return self.connector.prepare_tower(tower, selected)

    def vision_features(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        """The base tower's prepared connector input (see :meth:`prepare_tower_features`)."""
        return self.prepare_tower_features(BASE_TOWER, pixel_values)

    def tower_rows(self, context: VlweaveContext | None) -> dict[str, torch.Tensor | None]:
        """Per needed tower, the image rows it runs on (``connector.tower_rows``; None = every image)."""
        out: dict[str, torch.Tensor | None] = {}
        for name in self.needed_towers():
            rows = None if context is None else self.connector.tower_rows(name, context)
            out[name] = None if rows is None else torch.as_tensor(rows, dtype=torch.long).flatten().cpu()
        return out

    def tower_features(
        self,
        pixel_values: torch.Tensor | Mapping[str, torch.Tensor] | None = None,
        vision_features: Mapping[str, list[torch.Tensor]] | list[torch.Tensor] | None = None,
        context: VlweaveContext | None = None,
    ) -> dict[str, list[torch.Tensor]]:
        """Prepared connector input of every tower the connector needs, keyed by tower name: taken from
        ``vision_features`` (cached) where given, else computed from ``pixel_values`` (a tensor is the base tower's
        pixels; a mapping gives each tower its own, as each has its own transform).

        A tower for which ``connector.tower_rows(tower, context)`` names a subset of the images runs on those rows
        only (training and inference alike); the other rows get zeros of the prepared shape.  Its cached features
        may hold every image or only the routed rows, in row order (what ``FeatureCache.batch(rows=...)`` gives);
        with no routed row it needs neither pixels nor cached features."""
        pixels = _by_tower(pixel_values)
        cached = _by_tower(vision_features)
        rows_by_tower = self.tower_rows(context)
        n_images = self._num_images(pixels, cached, context)
        out: dict[str, list[torch.Tensor]] = {}
        for name in self.needed_towers():
            rows = rows_by_tower[name]
            if rows is not None and n_images is not None and rows.numel() == n_images:
                rows = None  # every image routed: the plain path
            if rows is None:
                if name in cached:
                    out[name] = list(cached[name])
                elif name in pixels:
                    out[name] = self.prepare_tower_features(name, pixels[name])
                else:
                    raise ValueError(f"the connector needs tower {name!r}: give pixel_values[{name!r}] or its cached "
                                     f"features (have pixels for {sorted(pixels)}, features for {sorted(cached)})")
                continue
            if n_images is None:
                raise ValueError(f"tower {name!r} runs on image rows {rows.tolist()}, but the batch's image count is "
                                 "unknown (give a context with image_rows, or the base tower's input)")
            if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= n_images):
                raise ValueError(f"connector.tower_rows({name!r}) = {rows.tolist()} out of range for {n_images} images")
            feats: list[torch.Tensor] | None = None
            if name in cached:
                given = list(cached[name])
                if given and given[0].shape[0] == n_images:
                    feats = [f.index_select(0, rows.to(f.device)) for f in given]
                elif given and given[0].shape[0] == rows.numel():
                    feats = given
                elif given:
                    raise ValueError(f"cached features of tower {name!r} have {given[0].shape[0]} rows; expected all "
                                     f"{n_images} images or the {rows.numel()} routed ones")
            if feats is None and rows.numel() and name in pixels:
                feats = self.prepare_tower_features(name, pixels[name].index_select(0, rows.to(pixels[name].device)))
            if feats is None and rows.numel():
                raise ValueError(f"the connector needs tower {name!r} for image rows {rows.tolist()}: give "
                                 f"pixel_values[{name!r}] or its cached features")
            out[name] = self._scatter_rows(name, feats, rows, n_images)
        return out

    @staticmethod
    def _num_images(pixels: Mapping[str, Any], cached: Mapping[str, Any], context: VlweaveContext | None) -> int | None:
        if context is not None and context.image_rows is not None:
            return int(context.image_rows.numel())
        if BASE_TOWER in pixels:
            return int(pixels[BASE_TOWER].shape[0])
        if cached.get(BASE_TOWER):
            return int(cached[BASE_TOWER][0].shape[0])
        return None

    def _scatter_rows(self, name: str, feats: list[torch.Tensor] | None, rows: torch.Tensor,
                      n_images: int) -> list[torch.Tensor]:
        """``[n_images, ...]`` tensors with ``feats`` at ``rows`` and zeros elsewhere (differentiable)."""
        if feats is None or not rows.numel():
            first = next(self.vision_towers[name].parameters())
            return [torch.zeros((n_images, *shape), dtype=first.dtype, device=first.device)
                    for shape in self._prepared_shapes(name)]
        out = []
        for f in feats:
            full = f.new_zeros((n_images, *f.shape[1:]))
            out.append(full.index_copy(0, rows.to(f.device), f))
        return out

    def _prepared_shapes(self, name: str) -> list[tuple[int, ...]]:
        """Per-image shapes of tower ``name``'s prepared features, for a batch in which no image is routed to it.
        Found by running a copy of the tower built on the meta device (shapes only: no weights, no compute, nothing
        cached), once per model."""
        memo = self.__dict__.setdefault("_prepared_shape_memo", {})
        if name not in memo:
            spec = self.tower_specs[name]
            with torch.device("meta"):
                tower = AutoModel.from_config(vision_sub_config(spec.config))
            size = spec.facts.image_size
            with torch.no_grad():
                hs = run_tower(tower.eval(), torch.zeros(1, 3, size, size, device="meta"), spec.facts)
                selected = select_features(hs, self.connector.tower_layers()[name], spec.select_strategy, spec.facts)
                memo[name] = [tuple(t.shape[1:]) for t in self.connector.prepare_tower(name, selected)]
        return memo[name]

    def get_image_features(
        self,
        pixel_values: torch.Tensor | Mapping[str, torch.Tensor] | None = None,
        vision_features: Mapping[str, list[torch.Tensor]] | list[torch.Tensor] | None = None,
        context: VlweaveContext | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Visual tokens [N_images, T, D_text] and the connector's auxiliary losses."""
        if pixel_values is None and vision_features is None:
            raise ValueError("get_image_features needs pixel_values or vision_features")
        out = self.connector(self.tower_features(pixel_values, vision_features, context), context)
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
        pixel_values: torch.Tensor | Mapping[str, torch.Tensor] | None = None,
        vision_features: Mapping[str, list[torch.Tensor]] | list[torch.Tensor] | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        context: VlweaveContext | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """LM input embeddings with the visual tokens (of images, or of videos) scattered into the ``<image>`` slots.

        Images belong to the rows that have ``<image>`` tokens, in row order; a ``context`` with ``image_rows``
        must say the same (it is what connectors use to pair an image with its sample's text)."""
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
            if context is not None and context.image_rows is not None:
                rows = image_mask.any(dim=1).nonzero().flatten()
                if not torch.equal(rows.cpu(), context.image_rows.cpu()):
                    raise ImageTokenMismatchError(
                        f"context.image_rows {context.image_rows.tolist()} does not match the rows that have image "
                        f"tokens {rows.tolist()}")
            tokens, aux = self.get_image_features(pixel_values, vision_features, context)
        n_feats = tokens.shape[0] * tokens.shape[1]
        if n_slots != n_feats:
            raise ImageTokenMismatchError(
                f"image tokens do not match: the text has {n_slots} image tokens, the connector produced "
                f"{tokens.shape[0]} image(s) x {tokens.shape[1]} tokens = {n_feats} (expand <image> to "
                f"model.num_image_tokens = {self.num_image_tokens} per image)"
            )
        embeds = embeds.masked_scatter(image_mask.unsqueeze(-1), tokens.to(embeds.dtype))
        return embeds, aux

    # ---- prefill hooks ---------------------------------------------------------------------------------
    def register_prefill_hook(self, name: str, hook: PrefillHook) -> None:
        """``hook(model, context, inputs_embeds, attention_mask)`` runs on every full-sequence forward (training,
        and the prefill of generation) before the LM, and may store per-sample state in ``context.guidance``;
        cached decode steps receive the same context, so the state lives as long as the KV cache."""
        if name in self._prefill_hooks:
            raise ValueError(f"prefill hook {name!r} registered twice")
        self._prefill_hooks[name] = hook

    def _run_prefill_hooks(self, context: VlweaveContext | None, embeds: torch.Tensor,
                           attention_mask: torch.Tensor | None) -> None:
        if not self._prefill_hooks:
            return
        if context is None:
            raise ValueError("this model has prefill hooks; pass a VlweaveContext (generate() makes one)")
        for hook in self._prefill_hooks.values():
            hook(self, context, embeds, attention_mask)

    # ---- forward ---------------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | Mapping[str, torch.Tensor] | None = None,
        vision_features: Mapping[str, list[torch.Tensor]] | list[torch.Tensor] | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: Any = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        context: VlweaveContext | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        past_key_values: Any = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        cache = cache if cache is not None else past_key_values
        if context is None and self._prefill_hooks:
            # A lone forward (no generate(), no collator) still gets a place for per-sequence state.
            context = (VlweaveContext() if input_ids is None else
                       VlweaveContext.for_batch((input_ids == self.config.image_token_id).any(dim=1).tolist()))
        previous, self.active_context = self.active_context, context
        try:
            return self._forward(input_ids, attention_mask, pixel_values, vision_features, pixel_values_videos,
                                 labels, position_ids, cache, inputs_embeds, use_cache, context, logits_to_keep,
                                 **kwargs)
        finally:
            self.active_context = previous

    def _forward(self, input_ids, attention_mask, pixel_values, vision_features, pixel_values_videos, labels,
                 position_ids, cache, inputs_embeds, use_cache, context, logits_to_keep, **kwargs: Any
                 ) -> CausalLMOutputWithPast:
        aux: dict[str, torch.Tensor] = {}
        if labels is not None and context is not None:
            context.prompt_mask = prompt_mask(labels, attention_mask)
        if inputs_embeds is None:
            if input_ids is None:
                raise ValueError("forward needs input_ids or inputs_embeds")
            inputs_embeds, aux = self.embed_inputs(input_ids, pixel_values, vision_features, pixel_values_videos,
                                                   context)
        if cache is None or cache.get_seq_length() == 0:
            self._run_prefill_hooks(context, inputs_embeds, attention_mask)
        if labels is None:
            return self.language_model(
                inputs_embeds=inputs_embeds,
                attention_mask=attention_mask,
                position_ids=position_ids,
                cache=cache,
                use_cache=use_cache,
                logits_to_keep=logits_to_keep,
                **kwargs,
            )
        # Training path: run the decoder, then the LM head only where the next token is supervised.
        decoder = self.language_model.get_decoder()
        hidden = decoder(
            inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        ).last_hidden_state
        targets = labels[:, 1:]
        keep = targets != IGNORE_INDEX
        if not bool(keep.any()):
            raise ValueError(f"batch has no supervised token (all labels are IGNORE_INDEX = {IGNORE_INDEX})")
        logits = self.get_output_embeddings()(hidden[:, :-1][keep])
        loss = F.cross_entropy(logits.float(), targets[keep])
        if self.word_tie and input_ids is not None:
            tie = self.word_tie_loss(input_ids, inputs_embeds, labels)
            if tie is not None:
                aux["word_tie"] = self.word_tie * tie
        for value in aux.values():
            loss = loss + value
        return CausalLMOutputWithPast(loss=loss, logits=logits)

    def word_tie_loss(self, input_ids: torch.Tensor, inputs_embeds: torch.Tensor,
                      labels: torch.Tensor) -> torch.Tensor | None:
        """The align objective of ``stages[].word_tie``: how far each image's visual tokens are from the LM input
        embeddings of its answer's tokens (visual token ``j`` <-> answer token ``j mod len``, the answer's last
        supervised token - the end of the turn - left out), as the mean squared error over the mean squared norm of
        those embeddings; the targets are not trained.  None when no image row has an answer word.  Why: a
        caption's words in place of the image are what the LM compares questions with best (docs/demo.md, text
        oracle), so visual tokens near those words could carry that skill over."""
        image_mask = input_ids == self.config.image_token_id
        embed = self.get_input_embeddings()
        losses = []
        for b in image_mask.any(dim=1).nonzero().flatten().tolist():
            answer = labels[b][labels[b] != IGNORE_INDEX][:-1]
            if answer.numel() == 0:
                continue
            visual = inputs_embeds[b][image_mask[b]].float()
            target = embed(answer[torch.arange(visual.shape[0], device=answer.device) % answer.numel()])
            target = target.detach().float()
            losses.append(((visual - target) ** 2).sum(-1).mean() / (target ** 2).sum(-1).mean())
        return torch.stack(losses).mean() if losses else None

    # ---- generation ------------------------------------------------------------------------------------
    def prepare_inputs_for_generation(self, input_ids: torch.Tensor, *args: Any, is_first_iteration: bool = False,
                                      **kwargs: Any) -> dict[str, Any]:
        """HF llava's rule: the visual inputs go in at prefill only (or on every step without a KV cache)."""
        visual = {k: kwargs.pop(k, None) for k in ("pixel_values", "vision_features", "pixel_values_videos")}
        inputs = super().prepare_inputs_for_generation(input_ids, *args, is_first_iteration=is_first_iteration,
                                                       **kwargs)
        if is_first_iteration or not kwargs.get("use_cache", True):
            inputs.update({k: v for k, v in visual.items() if v is not None})
        return inputs

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | Mapping[str, torch.Tensor] | None = None,
        vision_features: Mapping[str, list[torch.Tensor]] | list[torch.Tensor] | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        context: VlweaveContext | None = None,
        **generate_kwargs: Any,
    ) -> torch.Tensor:
        """Greedy/sampled generation with KV cache through this model's forward; returns only the new tokens.
        Use LEFT padding for batches.  Without a ``context`` one is made (images belong to the rows with image
        tokens), so prefill hooks always have a place to keep their state."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if attention_mask.shape[0] > 1 and bool((attention_mask[:, -1] == 0).any()):
            raise ValueError("batched generation needs left padding (tokenizer.padding_side = 'left')")
        if context is None:
            context = VlweaveContext.for_batch((input_ids == self.config.image_token_id).any(dim=1).tolist())
        visual = {"pixel_values": pixel_values, "vision_features": vision_features,
                  "pixel_values_videos": pixel_values_videos}
        # The <image> placeholder is not text: generating it would make the next step ask for an image that does
        # not exist (an untrained or perturbed model can pick it).
        generate_kwargs.setdefault("suppress_tokens", [int(self.config.image_token_id)])
        out = super().generate(input_ids=input_ids, attention_mask=attention_mask, context=context,
                               **{k: v for k, v in visual.items() if v is not None}, **generate_kwargs)
        return out[:, input_ids.shape[1]:]


def prompt_mask(labels: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """``[B, L]`` bool: the attended tokens before each row's first supervised label (the prompt a generation
    would see at prefill); a row without supervised labels is all prompt."""
    supervised = labels != IGNORE_INDEX
    before = supervised.long().cumsum(dim=1) == 0
    return before if attention_mask is None else before & attention_mask.bool()


def _by_tower(value: Any) -> dict[str, Any]:
    """Per-tower inputs: a mapping as is, anything else (a tensor, a list of features) as the base tower's."""
    if value is None:
        return {}
    if isinstance(value, Mapping):
        return dict(value)
    return {BASE_TOWER: value}


# Saved checkpoints keep HF llava's ``vision_tower.*`` for the base tower (and load as before); in memory it is
# ``vision_towers.base``.  The renaming is applied on load and reversed on save.
try:
    register_checkpoint_conversion_mapping(
        VlweaveConfig.model_type,
        [WeightRenaming(source_patterns=r"^vision_tower\.", target_patterns=f"vision_towers.{BASE_TOWER}.")])
except ValueError:
    pass  # already registered (module reloaded)


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
    "connector_spec_for",
    "vision_sub_config",
]

# ``AutoProcessor`` knows ``model_type="vlweave"`` as soon as the model is importable (the processor module imports
# this one; at this point every name it needs is defined).
import vlweave.processor  # noqa: E402,F401
