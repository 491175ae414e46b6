"""Build a model + tokenizer from a run config, and load/save HF-format checkpoints.

Pretrained parts come through ``from_pretrained`` on a local folder (an offline asset) or a hub id; tests build
tiny random parts from configs (``random_init``).  The ``<image>`` token is added to the tokenizer and the LM's
embeddings are resized to fit it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from vlweave import assets
from vlweave.aligned import realign_cpu_tensors
from vlweave.config import LanguageConfig, RunConfig, VisionConfig
from vlweave.modeling import VlweaveConfig, VlweaveForConditionalGeneration
from vlweave.processing import add_image_token
from vlweave.processor import VlweaveProcessor
from vlweave.vision.towers import BASE_TOWER, build_vision_model, load_vision_model, vision_sub_config

# Normalisation constants by tower family, used when the tower folder has no preprocessor_config.json.
_CLIP_MEAN, _CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
_IMAGENET_MEAN, _IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
_FAMILY_STATS = {
    "clip_vision_model": (_CLIP_MEAN, _CLIP_STD),
    "siglip_vision_model": ([0.5, 0.5, 0.5], [0.5, 0.5, 0.5]),
    "siglip2_vision_model": ([0.5, 0.5, 0.5], [0.5, 0.5, 0.5]),
}


def _auto_config(name: str, random_init: bool, overrides: dict) -> PreTrainedConfig:
    """A config from a folder/hub id, or (random_init with an unknown name) ``AutoConfig.for_model(name)``."""
    resolved = assets.resolve(name)
    if random_init and not Path(resolved).exists() and "/" not in name:
        return AutoConfig.for_model(name, **overrides)
    cfg = AutoConfig.from_pretrained(resolved)
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def image_stats(vision: VisionConfig, vcfg: PreTrainedConfig) -> tuple[list[float], list[float]]:
    """The tower's normalisation: the config's own, else its folder's ``preprocessor_config.json``, else its
    family's (CLIP, SigLIP; ImageNet for the rest)."""
    if vision.image_mean is not None or vision.image_std is not None:
        if vision.image_mean is None or vision.image_std is None:
            raise ValueError(f"tower {vision.name!r}: give both image_mean and image_std, or neither")
        return list(vision.image_mean), list(vision.image_std)
    folder = Path(assets.resolve(vision.name))
    pp = folder / "preprocessor_config.json"
    if pp.exists():
        data = json.loads(pp.read_text())
        if "image_mean" in data and "image_std" in data:
            return list(data["image_mean"]), list(data["image_std"])
    return _FAMILY_STATS.get(getattr(vcfg, "model_type", ""), (_IMAGENET_MEAN, _IMAGENET_STD))


def load_tokenizer(language: LanguageConfig) -> PreTrainedTokenizerBase:
    path = assets.resolve(language.tokenizer or language.name)
    return AutoTokenizer.from_pretrained(path)


def build_tower(vision: VisionConfig) -> PreTrainedModel:
    """One vision tower: pretrained weights from a folder/hub id, or random weights from its config."""
    vcfg = vision_sub_config(_auto_config(vision.name, vision.random_init, vision.config_overrides))
    return build_vision_model(vcfg) if vision.random_init else load_vision_model(vision.name)


def _load_named_tower(name: str, vision: VisionConfig) -> PreTrainedModel:
    """:func:`build_tower` with an error that names the tower (e.g. a MoVA expert) and the folder it read."""
    try:
        return build_tower(vision)
    except (OSError, ValueError, KeyError) as err:
        key = "vision" if name == BASE_TOWER else f"towers.{name}"
        raise ValueError(f"tower {name!r} ({key}.name = {vision.name!r}, an asset name, hub id or folder) could "
                         f"not be loaded: {err}") from err


def extra_tower_entry(vision: VisionConfig, tower: PreTrainedModel) -> dict:
    """A ``VlweaveConfig.extra_vision_towers`` entry for a built tower."""
    mean, std = image_stats(vision, tower.config)
    vcfg = tower.config.to_dict()
    for key in ("_attn_implementation_autoset", "transformers_version", "architectures", "dtype"):
        vcfg.pop(key, None)
    return {"vision_config": vcfg, "image_size": vision.image_size, "image_mean": mean, "image_std": std,
            "image_aspect": vision.aspect, "vision_feature_layer": vision.select_layer,
            "vision_feature_select_strategy": vision.select_strategy}


def check_quantization(cfg: RunConfig, *, cuda: bool | None = None, bnb: bool | None = None) -> None:
    """Refuse ``language.load_in_4bit`` where it cannot work, naming the fix: it needs CUDA and bitsandbytes, a
    pretrained LM (not ``random_init``), and stages that train the LM through LoRA only (4-bit weights take no
    gradient steps)."""
    if not cfg.language.load_in_4bit:
        return
    if cuda is None:
        cuda = torch.cuda.is_available()
    if bnb is None:
        import importlib.util

        bnb = importlib.util.find_spec("bitsandbytes") is not None
    if not cuda:
        raise ValueError("language.load_in_4bit (QLoRA) needs a CUDA GPU: bitsandbytes' 4-bit kernels do not run "
                         "on this machine's CPU; set language.load_in_4bit=false")
    if not bnb:
        raise ValueError("language.load_in_4bit (QLoRA) needs bitsandbytes: pip install 'vlweave[qlora]'")
    if cfg.language.random_init:
        raise ValueError("language.load_in_4bit quantizes pretrained weights; it cannot go with language.random_init")
    full = [s.name for s in cfg.train.stages if s.tune.get("language") == "full"]
    if full:
        raise ValueError(f"language.load_in_4bit: stage(s) {full} train the LM fully; a 4-bit LM trains through "
                         "LoRA only (tune.language: lora)")


def _load_lm(language: LanguageConfig) -> PreTrainedModel:
    path = assets.resolve(language.name)
    if not language.load_in_4bit:
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    from peft import prepare_model_for_kbit_training
    from transformers import BitsAndBytesConfig

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16)
    lm = AutoModelForCausalLM.from_pretrained(path, quantization_config=quant, device_map={"": 0},
                                              dtype=torch.bfloat16)
    return prepare_model_for_kbit_training(lm, use_gradient_checkpointing=False)


def build_model(cfg: RunConfig) -> tuple[VlweaveForConditionalGeneration, PreTrainedTokenizerBase]:
    """Assemble towers + connector + LM as the run config says; returns the model and its tokenizer."""
    vision, language = cfg.vision, cfg.language
    check_quantization(cfg)
    if BASE_TOWER in cfg.towers:
        raise ValueError(f"towers.{BASE_TOWER}: the base tower is `vision`; name the extra towers otherwise")
    tcfg = _auto_config(language.name, language.random_init, language.config_overrides)
    tower = _load_named_tower(BASE_TOWER, vision)
    vcfg = tower.config
    extra = {name: _load_named_tower(name, v) for name, v in cfg.towers.items()}
    if language.random_init:
        lm = AutoModelForCausalLM.from_config(tcfg)
    else:
        lm = _load_lm(language)
    tokenizer = load_tokenizer(language)
    image_token_id = add_image_token(tokenizer)
    if len(tokenizer) > lm.get_input_embeddings().num_embeddings:
        # A multiple of 64 keeps the (tied) output matmul on friendly shapes.
        lm.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=64, mean_resizing=False)
    mean, std = image_stats(vision, vcfg)
    config = VlweaveConfig(
        vision_config=tower.config,
        text_config=lm.config,
        connector_type=cfg.connector.type,
        connector_options=dict(cfg.connector.options),
        image_token_id=image_token_id,
        image_size=vision.image_size,
        vision_feature_layer=vision.select_layer,
        vision_feature_select_strategy=vision.select_strategy,
        image_mean=mean,
        image_std=std,
        image_aspect=vision.aspect,
        chat_template_name=language.template,
        system_prompt=language.system_prompt,
        tie_word_embeddings=bool(getattr(lm.config, "tie_word_embeddings", False)),
        extra_vision_towers={name: extra_tower_entry(cfg.towers[name], t) for name, t in extra.items()},
        lm_modules=[{"type": m.type, "name": m.name or m.type, "options": dict(m.options)} for m in language.modules],
    )
    torch.manual_seed(cfg.train.seed)  # connector init is part of the seeded run
    model = VlweaveForConditionalGeneration(config, vision_tower=tower, language_model=lm, extra_towers=extra)
    model.vision_towers.requires_grad_(False)
    model.connector.load_pretrained()  # pretrained parts the connector owns (MoVA's gate text encoder)
    # The loaded LM and towers off their files' memory maps: the same kernels as after a reload (vlweave/aligned.py).
    realign_cpu_tensors(model)
    # Facts the connector read from local files (an encoder's config) go into config.json, so a checkpoint
    # rebuilds without them.
    config.connector_options = {**config.connector_options, **model.connector.resolved_options()}
    return model, tokenizer


def save_checkpoint(model: VlweaveForConditionalGeneration, tokenizer: PreTrainedTokenizerBase, folder: str | Path,
                    processor: VlweaveProcessor | None = None) -> Path:
    """Model weights + config, the processor (``processor_config.json`` and the tokenizer files; made from the
    model and tokenizer unless one is given) and a model card (``README.md``, :mod:`vlweave.export.card`)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    if processor is None:
        processor = VlweaveProcessor.from_model(model, tokenizer)
    elif processor.tokenizer is not tokenizer:
        raise ValueError("save_checkpoint: the processor holds a different tokenizer from the one given")
    processor.save_pretrained(folder)  # writes the tokenizer too
    from vlweave.export.card import write_model_card  # lazy: the card module reads run folders, not models

    write_model_card(model.config, folder)
    return folder


def check_checkpoint_folder(folder: Path, weights: bool = False) -> None:
    """A vlweave checkpoint folder; with ``weights`` its safetensors files are also checked to be complete, so a
    truncated copy is reported by file name instead of failing deep inside the loader."""
    from vlweave.safe_io import verify_safetensors

    if not (folder / "config.json").exists():
        old = folder.with_name(folder.name + ".old")
        if not folder.exists() and (old / "config.json").is_file():  # a crash mid-way through re-saving it
            raise FileNotFoundError(f"{folder}: missing, but {old.name} beside it is its previous complete copy (a "
                                    f"write was interrupted between its two renames): rename {old.name} back to "
                                    f"{folder.name}, or resume the run (--resume restores it)")
        raise FileNotFoundError(f"{folder}: not a checkpoint folder (no config.json)")
    try:
        model_type = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("model_type")
    except (ValueError, AttributeError) as exc:
        raise ValueError(f"{folder / 'config.json'}: damaged config file ({exc})") from None
    if model_type != "vlweave":
        raise ValueError(f"{folder}: config.json has model_type {model_type!r}, expected 'vlweave'")
    if not weights:
        return
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{index}: damaged weights index ({exc})") from None
    else:
        shards = ["model.safetensors"]
    for shard in shards:
        verify_safetensors(folder / shard)


def load_checkpoint(folder: str | Path, dtype: torch.dtype = torch.float32):
    """Load a saved vlweave checkpoint (model + tokenizer) from a folder; dispatches on ``config.json``, not the path.
    Its processor: :func:`load_processor`."""
    folder = Path(folder)
    check_checkpoint_folder(folder, weights=True)
    model = _from_pretrained_checked(folder, dtype)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model.eval()
    return model, tokenizer


def _from_pretrained_checked(folder: Path, dtype: torch.dtype) -> VlweaveForConditionalGeneration:
    """``from_pretrained`` with damage reported by file: a safetensors error names the weights file, and weights
    that load but hold NaN/inf (garbage bytes under an intact header; the trainer never exports non-finite
    weights) are refused naming the file and the first tensors, instead of generating nonsense."""
    from safetensors import SafetensorError

    from vlweave.safe_io import DamagedFileError

    weights = folder / ("model.safetensors.index.json" if (folder / "model.safetensors.index.json").is_file()
                        else "model.safetensors")
    try:
        model = VlweaveForConditionalGeneration.from_pretrained(folder, dtype=dtype)
    except SafetensorError as exc:
        raise DamagedFileError(f"{weights}: damaged weights file ({exc})") from None
    with torch.no_grad():
        bad = [n for n, p in model.named_parameters() if p.is_floating_point() and not bool(torch.isfinite(p).all())]
    if bad:
        raise DamagedFileError(f"{weights}: damaged weights file ({len(bad)} tensor(s) hold NaN/inf values, "
                               f"first {', '.join(bad[:3])})")
    return model


def load_processor(folder: str | Path, tokenizer: PreTrainedTokenizerBase | None = None) -> VlweaveProcessor:
    """A checkpoint's processor, without loading the model: the saved ``processor_config.json``, or, for a
    checkpoint saved before processors, one built from its ``config.json`` and tokenizer.  ``tokenizer``: the one
    :func:`load_checkpoint` returned, so the processor shares it instead of loading another."""
    folder = Path(folder)
    check_checkpoint_folder(folder)
    return VlweaveProcessor.from_pretrained(folder, tokenizer=tokenizer)
