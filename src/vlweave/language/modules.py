"""LM-side modules: what a method adds inside or beside the causal LM (HyperLLaVA's language expert, MoVA's routing
LoRA, a bottleneck adapter after some decoder layers), by registry name.

A module is declared in the model config (``VlweaveConfig.lm_modules``: ``[{"type", "name", "options"}]``, from the
run config's ``language.modules``) and built in ``VlweaveForConditionalGeneration.__init__``, so ``from_pretrained``
rebuilds it before the weights load: what a method injects survives save -> reload.  Its parameters live *beside*
the LM, in ``model.lm_modules[name]`` (``lm_modules.<name>.*`` in the state dict), so the LM keeps the names of its
HF model and LoRA on the LM never reaches them; it acts *inside* the LM through the hooks that :meth:`LMModule.attach`
installs (forward hooks on decoder layers, prefill hooks on the model).  Each module is a trainable component of
the model (``model.components()[name]``; tune key = its name), never merged into the LM on export.

Adding one: a module file in ``language/`` with a class deriving from :class:`LMModule`, decorated
``@register_lm_module("name")``, plus one import line in :func:`_register_builtins` below
(``language/block_adapter.py`` is the example).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from torch import nn

if TYPE_CHECKING:
    from vlweave.modeling import VlweaveForConditionalGeneration

# Tune-policy keys of the model's own components; an LM-side module cannot be named like them.
RESERVED_NAMES = ("vision", "connector", "language")


@dataclass(frozen=True)
class LMModuleSpec:
    """What a factory gets: the module's name and type, the LM's shape facts and the (untyped) options."""

    name: str
    type: str
    hidden_size: int
    num_layers: int
    options: Mapping[str, Any] = field(default_factory=dict)


class LMModule(nn.Module):
    """An LM-side module.  Subclasses build their parameters in ``__init__(spec)`` and install their hooks in
    :meth:`attach`; the model calls ``attach`` once, right after building the LM.

    Keep references to the model or the LM out of module attributes (an ``nn.Module`` attribute would register it
    as a child, and the LM would then be saved twice); hooks close over ``self`` instead."""

    options_class: type | None = None  # a dataclass of typed options (see ``vlweave.connectors.options``)

    def __init__(self, spec: LMModuleSpec) -> None:
        super().__init__()
        self.spec = spec
        self._handles: list[Any] = []  # hook handles (plain list: not state)
        if self.options_class is not None:
            from vlweave.connectors.options import parse_options

            self.options = parse_options(self.options_class, spec.options)
        elif spec.options:
            raise ValueError(f"lm module {spec.name!r} ({spec.type}) takes no options; got {sorted(spec.options)}")

    def attach(self, model: "VlweaveForConditionalGeneration") -> None:
        raise NotImplementedError

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


LMModuleFactory = Callable[[LMModuleSpec], LMModule]
_REGISTRY: dict[str, LMModuleFactory] = {}


def register_lm_module(name: str) -> Callable[[LMModuleFactory], LMModuleFactory]:
    """Class/factory decorator: ``@register_lm_module("block_adapter")``."""

    def deco(factory: LMModuleFactory) -> LMModuleFactory:
        if name in _REGISTRY:
            raise ValueError(f"lm module {name!r} registered twice")
        _REGISTRY[name] = factory
        return factory

    return deco


def _register_builtins() -> None:
    from vlweave.language import block_adapter  # noqa: F401  (registers block_adapter)
    from vlweave.language import hyper_expert  # noqa: F401  (registers hyper_expert: HyperLLaVA's language expert)


def known_lm_modules() -> list[str]:
    _register_builtins()
    return sorted(_REGISTRY)


def lm_module_entries(entries: list[Mapping[str, Any]] | None) -> list[dict[str, Any]]:
    """Normalised ``VlweaveConfig.lm_modules`` entries (``{"type", "name", "options"}``; name defaults to the type),
    checked: a known type, names unique, not a built-in component's name, usable as a module name."""
    known = known_lm_modules()
    out: list[dict[str, Any]] = []
    for i, entry in enumerate(entries or []):
        if not isinstance(entry, Mapping) or "type" not in entry or set(entry) - {"type", "name", "options"}:
            raise ValueError(f"lm_modules[{i}] = {entry!r}: expected a mapping with 'type' and optional 'name', "
                             "'options'")
        type_ = entry["type"]
        if type_ not in _REGISTRY:
            raise ValueError(f"lm_modules[{i}]: unknown LM-side module type {type_!r}; known: {known}")
        name = entry.get("name") or type_
        if not isinstance(name, str) or not name.isidentifier() or name in RESERVED_NAMES:
            raise ValueError(f"lm_modules[{i}]: name {name!r} must be an identifier other than {list(RESERVED_NAMES)}")
        if any(e["name"] == name for e in out):
            raise ValueError(f"lm_modules[{i}]: name {name!r} used twice; give each module its own 'name'")
        out.append({"type": type_, "name": name, "options": dict(entry.get("options") or {})})
    return out


def build_lm_module(spec: LMModuleSpec) -> LMModule:
    _register_builtins()
    factory = _REGISTRY.get(spec.type)
    if factory is None:
        raise ValueError(f"unknown LM-side module type {spec.type!r}; known: {known_lm_modules()}")
    try:
        return factory(spec)
    except ValueError as err:
        msg = str(err)
        raise type(err)(msg if msg.startswith(f"lm module {spec.name!r}") else f"lm module {spec.name!r}: {msg}") \
            from None


def decoder_layers(language_model: nn.Module) -> nn.ModuleList:
    """The decoder blocks of an HF causal LM (``get_decoder().layers``: Llama, Qwen2, Mistral, SmolLM, ...)."""
    decoder = language_model.get_decoder() if hasattr(language_model, "get_decoder") else None
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"{type(language_model).__name__}: no decoder layers found (expected "
                         "get_decoder().layers to be a ModuleList)")
    return layers


__all__ = [
    "LMModule",
    "LMModuleSpec",
    "RESERVED_NAMES",
    "build_lm_module",
    "decoder_layers",
    "known_lm_modules",
    "lm_module_entries",
    "register_lm_module",
]
