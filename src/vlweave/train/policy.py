"""Per-component tune policies (``frozen | full | lora``), TinyLLaVA-Factory style, applied per stage.

The components are the model's own declaration (``model.components()``: ``vision.<tower>`` per tower,
``connector``, ``language``, and every LM-side module by its name); a stage's ``tune`` maps their names to a policy
(``vision`` = every tower unless ``vision.<name>`` says otherwise).  Optimizer groups, checkpoint contents and
export follow the same components (``parameter_owners``, ``trained_tensors``, ``merge_lora``).

LoRA goes through peft; it is injected once (the first stage that asks for it) and stays for later stages.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

from peft import LoraConfig as PeftLoraConfig
from peft import inject_adapter_in_model
from torch import nn

from vlweave.config import LoraConfig, StageConfig

POLICIES = ("frozen", "full", "lora")
VISION = "vision"  # tune key for every tower at once; ``vision.<name>`` overrides it for one tower
CONNECTOR = "connector"  # ``connector.<name>`` (a connector's sub-component) follows it unless named itself


def tune_keys(components: Iterable[str]) -> list[str]:
    """The keys a stage's ``tune`` (and ``component_lr``) accepts for a model with these components."""
    return [VISION, *components]


def resolve_tune(stage: StageConfig, components: Iterable[str]) -> dict[str, str]:
    """Component -> policy for one stage: ``vision`` applies to every ``vision.<name>`` tower unless that tower is
    named itself; any other key must be a declared component; a component not mentioned is frozen."""
    comps = list(components)
    known = tune_keys(comps)
    for what, keys in (("", stage.tune), ("component_lr: ", stage.component_lr)):
        unknown = [k for k in keys if k not in known]
        if unknown:
            raise ValueError(f"stage {stage.name!r}: {what}unknown component(s) {sorted(unknown)}; known: {known}")
    for comp, policy in stage.tune.items():
        if policy not in POLICIES:
            raise ValueError(f"stage {stage.name!r}: tune.{comp} = {policy!r}; known: {list(POLICIES)}")
    out = {c: "frozen" for c in comps}
    for comp in comps:
        if comp.startswith(VISION + ".") and VISION in stage.tune:
            out[comp] = stage.tune[VISION]
        # A connector's sub-component (MoVA's connector.text_encoder) follows the connector unless named.
        if comp.startswith(CONNECTOR + ".") and CONNECTOR in stage.tune:
            out[comp] = stage.tune[CONNECTOR]
    out.update({c: p for c, p in stage.tune.items() if c != VISION})
    for comp, policy in out.items():
        if policy == "lora" and (comp == CONNECTOR or comp.startswith(CONNECTOR + ".")):
            raise ValueError(f"stage {stage.name!r}: LoRA on the connector is not supported; use full or frozen")
        if policy == "lora" and comp != "language" and not comp.startswith(VISION + "."):
            raise ValueError(f"stage {stage.name!r}: LoRA on the LM-side module {comp!r} is not supported; use full "
                             "or frozen")
    return out


def component_lr(stage: StageConfig, component: str) -> float:
    """A component's learning rate in a stage: ``component_lr[component]`` (``component_lr.vision`` for any tower),
    else ``connector_lr`` for the connector, else the stage's ``lr``."""
    table = stage.component_lr
    if component in table:
        return float(table[component])
    if component.startswith(VISION + ".") and VISION in table:
        return float(table[VISION])
    if component.startswith(CONNECTOR + ".") and CONNECTOR in table:
        return float(table[CONNECTOR])
    if (component == CONNECTOR or component.startswith(CONNECTOR + ".")) and stage.connector_lr is not None:
        return float(stage.connector_lr)
    return float(stage.lr)


def component_prefixes(model: nn.Module) -> dict[str, str]:
    """Component -> its module path in ``model`` (``vision.base`` -> ``vision_towers.base``)."""
    paths = {id(m): name for name, m in model.named_modules()}
    return {comp: paths[id(module)] for comp, module in model.components().items()}


def _owner(name: str, prefixes: dict[str, str]) -> str | None:
    """The innermost component whose module holds the tensor ``name`` (longest path prefix)."""
    best, best_len = None, -1
    for comp, prefix in prefixes.items():
        if (name.startswith(prefix + ".") or not prefix) and len(prefix) > best_len:
            best, best_len = comp, len(prefix)
    return best


def parameter_owners(model: nn.Module) -> dict[str, str]:
    """Parameter name (as ``model.named_parameters()`` gives it) -> the component it belongs to."""
    prefixes = component_prefixes(model)
    return {n: comp for n, _ in model.named_parameters() if (comp := _owner(n, prefixes)) is not None}


TRAINED_KINDS = ("full", "lora", "buffers")


def trained_tensors(model: nn.Module, trained: Mapping[str, Iterable[str]]) -> list[str]:
    """Names of the state tensors that training changed, from ``{component: kinds}``: ``full`` -> the component's
    parameters (LoRA ones excepted) and persistent buffers; ``lora`` -> its LoRA parameters; ``buffers`` -> its
    persistent buffers (statistics a connector measures before step 1).  What a checkpoint stores."""
    prefixes = component_prefixes(model)
    unknown = sorted(set(trained) - set(prefixes))
    bad = sorted({k for kinds in trained.values() for k in kinds} - set(TRAINED_KINDS))
    if unknown or bad:
        raise ValueError(f"trained component(s) {unknown} / kind(s) {bad}: known components {list(prefixes)}, "
                         f"kinds {list(TRAINED_KINDS)}")
    state = model.state_dict(keep_vars=True)
    out = []
    for name, _ in model.named_parameters():
        kinds = trained.get(_owner(name, prefixes) or "", ())
        if ("lora" in kinds and "lora_" in name) or ("full" in kinds and "lora_" not in name):
            out.append(name)
    for name, _ in model.named_buffers():
        kinds = trained.get(_owner(name, prefixes) or "", ())
        if name in state and ("full" in kinds or "buffers" in kinds):
            out.append(name)
    return out


def has_lora(model: nn.Module) -> bool:
    return any("lora_" in n for n, _ in model.named_parameters())


def lora_target_regex(model: nn.Module, policies: dict[str, str]) -> str:
    """An anchored regex of the module paths of the components put under LoRA ("" if none)."""
    prefixes = component_prefixes(model)
    paths = [re.escape(prefixes[c]) for c, p in policies.items() if p == "lora"]
    return rf"^(?:{'|'.join(paths)})\..*" if paths else ""


def apply_tune_policy(model: nn.Module, stage: StageConfig, lora: LoraConfig) -> list[str]:
    """Set ``requires_grad`` per component of ``model.components()``; inject LoRA where asked (once: the first
    stage that asks for it).  Returns the names of the trainable parameters."""
    policies = resolve_tune(stage, model.components())
    wants_lora = [c for c, p in policies.items() if p == "lora"]
    if wants_lora and not has_lora(model):
        component_re = lora_target_regex(model, policies)
        target = lora.target_modules
        names = [n for n, _ in model.named_modules() if re.fullmatch(target, n) and re.fullmatch(component_re, n)]
        if not names:
            raise ValueError(f"LoRA target regex {target!r} matches no module of {wants_lora}")
        if lora.top_layers is not None:
            names = _top_layers(names, lora.top_layers)
        cfg = PeftLoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=names)
        inject_adapter_in_model(cfg, model)
    owners = parameter_owners(model)
    for name, param in model.named_parameters():
        policy = policies.get(owners.get(name, ""), "frozen")
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
    """Fold LoRA deltas into the base weights and remove the adapter layers (for export).  Only peft's LoRA layers
    are touched: LM-side modules are not LoRA and stay as their own weights."""
    from peft.tuners.lora import LoraLayer

    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, LoraLayer):
                child.merge()
                setattr(parent, child_name, child.get_base_layer())
    return model
