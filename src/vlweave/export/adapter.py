"""LoRA runs as adapter-only folders (peft format), and merging them back into a full checkpoint.

``vlweave export RUN --format adapter OUT`` takes a run's last training checkpoint (which stores exactly the
tensors training changed: LoRA matrices, the connector, LM-side modules, calibrated buffers), rebuilds the base
model the run started from, and writes it through peft itself (``get_peft_model`` + ``save_pretrained``):
``adapter_config.json`` and ``adapter_model.safetensors`` with the LoRA matrices and, as peft's
``modules_to_save``, the fully trained components.  No frozen base weight is written.  Beside them,
``vlweave_adapter.json`` records the run config the base is rebuilt from and a fingerprint of the base weights,
plus the processor files, so the folder is self-describing.

``vlweave export ADAPTER --merge OUT`` rebuilds that base (or takes ``--base CHECKPOINT``), checks the fingerprint
(a base with other weights would silently give another model), loads the adapter with
``PeftModel.from_pretrained`` and folds it in (``merge_and_unload``), then saves a native checkpoint -- the same
model the run's ``final/`` holds.

Why the base is rebuilt rather than referenced: vlweave's base is towers + LM + a connector, assembled from
assets or hub ids by the run config (``builder.build_model``, seeded like the trainer), not one hub id that peft's
``base_model_name_or_path`` could name.
"""

from __future__ import annotations

import copy
import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file

from vlweave.builder import build_model, load_checkpoint, save_checkpoint
from vlweave.config import RunConfig
from vlweave.processor import VlweaveProcessor
from vlweave.train.policy import apply_tune_policy, component_prefixes
from vlweave.vision.cache import weights_fingerprint

ADAPTER_META = "vlweave_adapter.json"


def latest_training_checkpoint(path: str | Path) -> Path:
    """A training checkpoint folder (``progress.json``) itself, or the last one of a run folder."""
    from vlweave.train.trainer import Trainer

    return Trainer.latest_checkpoint(path)


def _base(cfg: RunConfig):
    """The model the run started from, built exactly as the trainer built it (same seeds, same order) -- in full
    precision: a QLoRA run's adapter is exported and merged onto the unquantized LM, as QLoRA adapters are."""
    cfg = copy.deepcopy(cfg)
    cfg.language.load_in_4bit = False
    random.seed(cfg.train.seed)
    np.random.seed(cfg.train.seed)
    torch.manual_seed(cfg.train.seed)
    return build_model(cfg)


def _base_fingerprint(model) -> str:
    return weights_fingerprint(model.language_model) + ":" + ",".join(
        weights_fingerprint(t) for t in model.vision_towers.values())


def export_adapter(run: str | Path, out: str | Path) -> dict[str, Any]:
    """Write the adapter-only folder for a LoRA run (see the module docstring); returns its description."""
    ckpt = latest_training_checkpoint(run)
    run_dir = ckpt.parent.parent
    cfg_path = run_dir / "config.yaml"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{run_dir}: no config.yaml beside the checkpoints (needed to rebuild the base)")
    cfg = RunConfig.load(cfg_path)
    progress = json.loads((ckpt / "progress.json").read_text())
    components: dict[str, list[str]] = progress.get("components") or {}
    if not any("lora" in kinds for kinds in components.values()):
        raise ValueError(f"{ckpt}: this run trained no LoRA ({components or 'no component record'}); its final/ "
                         "checkpoint is the model -- there is no adapter to export")
    full = [c for c, kinds in components.items() if "full" in kinds and c == "language"]
    if full:
        raise ValueError(f"{ckpt}: the LM was trained fully (not only LoRA); an adapter-only folder would have to "
                         "carry the whole LM -- use the run's final/ checkpoint instead")

    model, tokenizer = _base(cfg)
    fingerprint = _base_fingerprint(model)
    for stage in cfg.train.stages[: progress["stage_index"] + 1]:
        apply_tune_policy(model, stage, cfg.train.lora)  # the run's structure: LoRA where and as it was injected
    lora_targets = sorted({n.rsplit(".lora_", 1)[0] for n, _ in model.named_parameters() if ".lora_" in n})
    prefixes = component_prefixes(model)
    to_save = sorted(prefixes[c] for c, kinds in components.items() if ({"full", "buffers"} & set(kinds)))
    trained = load_file(str(ckpt / "trained.safetensors"))

    # A fresh base, wrapped by peft, receives the trained values under peft's own names.
    base, _ = _base(cfg)
    lcfg = cfg.train.lora
    peft_model = get_peft_model(base, PeftLoraConfig(r=lcfg.r, lora_alpha=lcfg.alpha, lora_dropout=lcfg.dropout,
                                                     target_modules=lora_targets, modules_to_save=to_save or None))
    targets = dict(peft_model.named_parameters()) | dict(peft_model.named_buffers())
    placed = set()
    with torch.no_grad():
        for name, tensor in trained.items():
            peft_name = _peft_name(name, to_save)
            if peft_name not in targets:
                raise ValueError(f"{ckpt}: trained tensor {name!r} has no place in the peft model ({peft_name!r})")
            targets[peft_name].copy_(tensor)
            placed.add(name)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(out)
    VlweaveProcessor.from_model(model, tokenizer).save_pretrained(out)
    meta = {"format": "vlweave-lora-adapter", "run_config": cfg.to_dict(), "checkpoint": str(ckpt),
            "stage_index": progress["stage_index"], "step": progress["step"], "base_fingerprint": fingerprint,
            "lora_targets": len(lora_targets), "modules_to_save": to_save, "tensors": len(placed)}
    (out / ADAPTER_META).write_text(json.dumps(meta, indent=1, default=str))
    (out / "README.md").write_text(
        f"# LoRA adapter ({len(lora_targets)} modules) + trained components {to_save}\n\n"
        f"peft format, trained by vlweave (run `{run_dir}`, checkpoint `{ckpt.name}`). The base model is rebuilt "
        "from the run config in `vlweave_adapter.json`. Merge into a full checkpoint with\n\n"
        f"    vlweave export {out} --merge MERGED\n")
    return meta


def _peft_name(name: str, to_save: list[str]) -> str:
    """A vlweave tensor name -> its name in the ``get_peft_model`` wrapper (adapter ``default``)."""
    if ".lora_A." in name or ".lora_B." in name:  # injected LoRA already names its adapter: x.lora_A.default.w
        return f"base_model.model.{name}"
    for prefix in to_save:
        if name.startswith(prefix + "."):
            return f"base_model.model.{prefix}.modules_to_save.default.{name[len(prefix) + 1:]}"
    return f"base_model.model.{name}"


def merge_adapter(adapter: str | Path, out: str | Path, base: str | Path | None = None) -> Path:
    """Fold an adapter folder into its base and save a native checkpoint at ``out``."""
    adapter = Path(adapter)
    meta_path = adapter / ADAPTER_META
    if not (adapter / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{adapter}: not an adapter folder (no adapter_config.json)")
    if base is not None:
        model, tokenizer = load_checkpoint(base)
    elif meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        model, tokenizer = _base(RunConfig.from_dict(meta["run_config"]))
        if _base_fingerprint(model) != meta["base_fingerprint"]:
            raise ValueError(f"{adapter}: the base rebuilt from the run config has other weights than the one this "
                             "adapter was trained on (a changed asset, or a random-init LM built differently); "
                             "give the right base with --base CHECKPOINT")
    else:
        raise FileNotFoundError(f"{adapter}: no {ADAPTER_META}; give the base model with --base CHECKPOINT")
    merged = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    merged.requires_grad_(False)
    return save_checkpoint(merged, tokenizer, out)


__all__ = ["export_adapter", "latest_training_checkpoint", "merge_adapter"]
