"""Per-component tune policies (``frozen | full | lora``), TinyLLaVA-Factory style, applied per stage.

LoRA goes through peft; it is injected once (the first stage that asks for it) and stays for later stages.
"""

from __future__ import annotations

import re

from peft import LoraConfig as PeftLoraConfig
from peft import inject_adapter_in_model
from torch import nn

from vlweave.config import LoraConfig, StageConfig

POLICIES = ("frozen", "full", "lora")
COMPONENTS = {"vision": "vision_tower", "connector": "connector", "language": "language_model"}


def _check(stage: StageConfig) -> None:
    unknown = set(stage.tune) - set(COMPONENTS)
    if unknown:
        raise ValueError(f"stage {stage.name!r}: unknown component(s) {sorted(unknown)}; known: {sorted(COMPONENTS)}")
    for comp, policy in stage.tune.items():
        if policy not in POLICIES:
            raise ValueError(f"stage {stage.name!r}: tune.{comp} = {policy!r}; known: {list(POLICIES)}")
    if stage.tune.get("connector") == "lora":
        raise ValueError(f"stage {stage.name!r}: LoRA on the connector is not supported; use full or frozen")


def has_lora(model: nn.Module) -> bool:
    return any("lora_" in n for n, _ in model.named_parameters())


def lora_target_regex(stage: StageConfig, lora: LoraConfig) -> str:
    """The configured target regex restricted to the components the stage puts under LoRA."""
    prefixes = [COMPONENTS[c] for c, p in stage.tune.items() if p == "lora"]
    return rf"^(?:{'|'.join(prefixes)})\..*" if prefixes else ""


def apply_tune_policy(model: nn.Module, stage: StageConfig, lora: LoraConfig) -> list[str]:
    """Set ``requires_grad`` per component; inject LoRA where asked. Returns the names of trainable parameters."""
    _check(stage)
    wants_lora = [c for c, p in stage.tune.items() if p == "lora"]
    if wants_lora and not has_lora(model):
        component_re = lora_target_regex(stage, lora)
        target = lora.target_modules
        names = [n for n, _ in model.named_modules() if re.fullmatch(target, n) and re.fullmatch(component_re, n)]
        if not names:
            raise ValueError(f"LoRA target regex {target!r} matches no module of {wants_lora}")
        if lora.top_layers is not None:
            names = _top_layers(names, lora.top_layers)
        cfg = PeftLoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=names)
        inject_adapter_in_model(cfg, model)
    for comp, attr in COMPONENTS.items():
        policy = stage.tune.get(comp, "frozen")
        module: nn.Module = getattr(model, attr)
        for name, param in module.named_parameters():
            is_lora = "lora_" in name
            param.requires_grad = (policy == "full" and not is_lora) or (policy == "lora" and is_lora)
    return [n for n, p in model.named_parameters() if p.requires_grad]


def _top_layers(names: list[str], top: int) -> list[str]:
    """The LoRA targets inside the top ``top`` decoder layers (``...layers.<i>....``) of the language model."""
    index = {n: int(m.group(1)) for n in names if (m := re.search(r"language_model\..*?\.layers\.(\d+)\.", n))}
    if top < 1 or not index:
        raise ValueError(f"lora.top_layers={top}: needs a positive count and LM targets inside numbered decoder "
                         "layers (module names like language_model.model.layers.<i>.self_attn.q_proj)")
    first = max(index.values()) + 1 - top
    return [n for n in names if index.get(n, -1) >= first]


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold LoRA deltas into the base weights and remove the adapter layers (for export)."""
    from peft.tuners.lora import LoraLayer

    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, LoraLayer):
                child.merge()
                setattr(parent, child_name, child.get_base_layer())
    return model
