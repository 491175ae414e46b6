"""The connector contract and registry.

A connector is built from shape facts (:class:`ConnectorSpec`), declares which tower hidden states it needs
(:meth:`Connector.feature_layers`), turns them into its input with a parameter-free :meth:`Connector.prepare`
(pooling, multi-layer fusion: what the frozen-feature cache stores, keyed by :meth:`prepare_signature`), reports how many visual tokens it emits per image as a pure function of the
grid (:meth:`Connector.num_tokens`; the processor expands ``<image>`` to exactly that many tokens) and maps the
selected features to LM-space tokens (:meth:`Connector.forward`).  ``context`` carries text/guidance for
connectors that need it (MoVA gating, HyperLLaVA); plain projectors ignore it.

Registry keys are exact; aliases are explicit; patterns (``mlpNx_gelu``) are regexes anchored on the whole name.
Nothing ever dispatches on substrings of paths.

Named towers.  A model may hold several vision towers (``base`` first, then e.g. MoVA's experts); the spec lists
them all (:attr:`ConnectorSpec.towers`) while its scalar fields describe ``base``, so single-tower connectors read
them as before.  A connector says which layers of which tower it needs (:meth:`Connector.tower_layers`; towers
it does not name are never run), prepares each tower's selected hidden states without parameters
(:meth:`Connector.prepare_tower`, cached per (image, tower)) and receives the prepared tensors keyed by tower name
in :meth:`Connector.forward`, together with the batch's :class:`~vlweave.context.VlweaveContext`.

Options are typed: a connector sets :attr:`Connector.options_class` (a frozen dataclass,
:mod:`vlweave.connectors.options`) and reads ``self.options``; unknown keys and mistyped values fail at build
time, naming the key, its expected type and the allowed keys.  Parameter-free fusions (layer concat, Dense
Connector, pooling) are reusable objects of their own (:func:`vlweave.connectors.fusion.build_fusion`), so any
trainable module can sit behind one (:class:`vlweave.connectors.fusion.FusedConnector`).

Every registered connector is checked by ``tests/test_connector_contract.py`` (built from facts, token count,
cached == uncached, save -> reload, one training step, bad options); :class:`ContractExample` says how to build
one there.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import nn

from vlweave.connectors.options import OptionsError, parse_options

if TYPE_CHECKING:
    from vlweave.vision.towers import TowerFacts

BASE_TOWER = "base"


@dataclass(frozen=True)
class TowerInput:
    """What a connector knows of one named tower: its shape facts and the model config's feature selection."""

    facts: "TowerFacts"
    select_layer: int | list[int] = -2
    select_strategy: str = "default"
    model_type: str = ""

    @property
    def tokens_per_layer(self) -> int:
        """Tokens of the final hidden state after the prefix strategy."""
        keep_prefix = self.facts.num_prefix_tokens if self.select_strategy == "full" else 0
        return self.facts.grid * self.facts.grid + keep_prefix


@dataclass(frozen=True)
class ConnectorSpec:
    vision_hidden_size: int
    num_vision_layers: int  # blocks; hidden_states has num_vision_layers + 1 entries
    grid: int  # patches per side
    num_prefix_tokens: int  # CLS/registers present in the tower output
    text_hidden_size: int
    select_layer: int | list[int] = -2
    select_strategy: str = "default"
    options: dict[str, Any] = field(default_factory=dict)
    vision_model_type: str = ""  # HF model_type of the tower (e.g. "clip_vision_model"); reference presets need it
    towers: Mapping[str, TowerInput] = field(default_factory=dict)  # every named tower, "base" first (may be empty
    # for a spec written by hand: then only the base tower described by the scalar fields exists)

    @property
    def tokens_per_layer(self) -> int:
        """Tokens of one selected hidden state after the prefix strategy."""
        keep_prefix = self.num_prefix_tokens if self.select_strategy == "full" else 0
        return self.grid * self.grid + keep_prefix


@dataclass(frozen=True)
class TextInput:
    """How a context-aware connector wants each sample's user-turn texts as token ids (``context.text_input_ids``,
    filled by the processor and the trainer): user turn ``i`` becomes ``template.format(i=i, text=...)``
    (lower-cased when ``lowercase``), the turns are joined by ``separator`` and tokenized with the LM's tokenizer
    (``source: language``) or the connector's own encoder's (``source: encoder``, loaded from ``tokenizer_path``
    and saved with the processor), with or without special tokens, truncated on the right to ``max_length``."""

    source: str = "language"  # "language" | "encoder"
    tokenizer_path: str | None = None
    template: str = "{text}"
    separator: str = "\n"
    lowercase: bool = False
    max_length: int | None = None
    add_special_tokens: bool = False

    def __post_init__(self) -> None:
        if self.source not in ("language", "encoder"):
            raise ValueError(f"TextInput.source must be 'language' or 'encoder', got {self.source!r}")
        if self.source == "encoder" and not self.tokenizer_path:
            raise ValueError("TextInput(source='encoder') needs the encoder's tokenizer_path")

    def format(self, texts: list[str]) -> str:
        return self.separator.join(self.template.format(i=i, text=t.lower() if self.lowercase else t)
                                   for i, t in enumerate(texts))

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "template": self.template, "separator": self.separator,
                "lowercase": self.lowercase, "max_length": self.max_length,
                "add_special_tokens": self.add_special_tokens}


@dataclass
class ConnectorOutput:
    tokens: torch.Tensor  # [B, T, D_text]
    aux_losses: dict[str, torch.Tensor] = field(default_factory=dict)


def base_features(prepared: "Mapping[str, list[torch.Tensor]] | list[torch.Tensor]") -> list[torch.Tensor]:
    """The base tower's prepared tensors from :meth:`Connector.forward`'s input (a plain list means base only)."""
    if isinstance(prepared, Mapping):
        if BASE_TOWER not in prepared:
            raise ValueError(f"the connector needs the {BASE_TOWER!r} tower's features; got {sorted(prepared)}")
        return list(prepared[BASE_TOWER])
    return list(prepared)


class Connector(nn.Module):
    """Base class. Subclasses set ``allowed_options`` and implement ``num_tokens`` and ``forward``."""

    allowed_options: frozenset[str] = frozenset()
    # The text a context-aware connector reads as token ids (context.text_input_ids): None (none), or "language"
    # (the LM's own tokenizer, over the sample's user-turn texts joined by newlines).
    text_encoder: str | None = None

    def __init__(self, spec: ConnectorSpec) -> None:
        super().__init__()
        self.spec = spec
        if self.options_class is not None:
            self.options = parse_options(self.options_class, spec.options)
        else:
            unknown = set(spec.options) - set(self.allowed_options)
            if unknown:
                raise OptionsError(f"{type(self).__name__}: unknown option(s) {sorted(unknown)}; allowed: "
                                   f"{sorted(self.allowed_options)}")

    # Typed options (:mod:`vlweave.connectors.options`): a frozen dataclass; when set, ``__init__`` parses
    # ``spec.options`` into ``self.options`` (unknown keys and mistyped values fail naming the key, its type and the
    # allowed keys) and the contract suite derives its bad-option checks from its fields.
    options_class: type | None = None
    # How the contract suite (tests/test_connector_contract.py) builds this connector: see :class:`ContractExample`.
    contract_examples: tuple["ContractExample", ...] = ()

    def text_input(self) -> TextInput | None:
        """The text this connector reads as token ids (:class:`TextInput`), or None.  Default: from the
        ``text_encoder`` class attribute (None, or ``"language"``: the LM's tokenizer over the user texts joined by
        newlines)."""
        encoder = getattr(type(self), "text_encoder", None)
        if encoder is None or not isinstance(encoder, str):
            return None
        if encoder != "language":
            raise ValueError(f"connector text_encoder {encoder!r}: only 'language' (the LM's tokenizer) is supported "
                             "as a class attribute; override text_input() for an encoder of its own")
        return TextInput(source="language")

    def load_pretrained(self) -> None:
        """Load pretrained weights of parts the connector owns (e.g. MoVA's gate text encoder).  Called once by
        :func:`vlweave.builder.build_model` on a fresh build (a reload gets them from the checkpoint)."""

    def resolved_options(self) -> dict[str, Any]:
        """Option values resolved from local files at build time (an encoder's config, ...) that the builder
        writes into the model config, so that a saved checkpoint rebuilds without those files."""
        return {}

    def sub_components(self) -> dict[str, nn.Module]:
        """Child modules a tune policy can set apart from the rest of the connector: ``{name: module}``, tune key
        ``connector.<name>`` (it follows ``connector`` unless named)."""
        return {}

    def projector_head(self) -> nn.Sequential | None:
        """The LLaVA projector that maps this connector's tokens to the LM width (``Linear, GELU, Linear, ...``),
        or None.  HyperLLaVA's visual expert (``hyper_<inner>``) is installed on it.  Default: the one
        ``nn.Sequential`` named ``projector`` (at the root or on a child; None if there is none or several); a
        connector whose head has another name overrides this (MoVA's ``mlp``, the released parameter name)."""
        found = [m for name, m in self.named_modules()
                 if (name == "projector" or name.endswith(".projector")) and isinstance(m, nn.Sequential)]
        return found[0] if len(found) == 1 else None

    def feature_layers(self) -> list[int]:
        """Absolute indices of the base tower's hidden states this connector consumes."""
        from vlweave.vision.towers import normalize_layers

        return normalize_layers(self.spec.select_layer, self.spec.num_vision_layers)

    def tower_layers(self) -> dict[str, list[int]]:
        """Which hidden states of which named tower the connector needs; towers not named here are never run.
        Default: the base tower's :meth:`feature_layers`."""
        return {BASE_TOWER: self.feature_layers()}

    def tower_rows(self, tower: str, context: Any) -> torch.Tensor | None:
        """Which images of the batch ``tower`` must run on: a 1-D long tensor of image indices (positions in the
        batch's stacked images, sorted, possibly empty), or None for every image (the default).

        The model runs the tower (or reads the feature cache) on those rows only and hands the connector zeros of
        the prepared shape for the others, so a connector returning rows must not let the other rows' features
        change its output (MoVA: an expert whose routing bit is 0 for an image).  It may read only the context's
        ``routing`` and ``routing_pass`` (the trainer and the evaluator ask it once for a whole data set, to know
        which images each tower's feature cache needs)."""
        return None

    def prepare(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        """Parameter-free, deterministic preprocessing of the base tower's selected hidden states (cacheable)."""
        return features

    def prepare_tower(self, tower: str, features: list[torch.Tensor]) -> list[torch.Tensor]:
        """Parameter-free preprocessing of one named tower's selected hidden states (cached per image and tower).
        Default: :meth:`prepare` for the base tower, nothing for the others."""
        return self.prepare(features) if tower == BASE_TOWER else features

    def prepare_signature(self, tower: str = BASE_TOWER) -> dict[str, Any]:
        """Everything that changes :meth:`prepare_tower`'s output for ``tower`` (part of the feature-cache key)."""
        return {}

    def num_tokens(self, grid: int | None = None) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, prepared: Mapping[str, list[torch.Tensor]] | list[torch.Tensor],
                context: Any = None) -> ConnectorOutput:
        """Visual tokens ``[N_images, T, D_text]`` from the prepared tensors keyed by tower name (a plain list is
        the base tower's) and the batch context (:class:`vlweave.context.VlweaveContext`, or None)."""
        raise NotImplementedError  # pragma: no cover - abstract


@dataclass(frozen=True)
class ContractExample:
    """One setup in which the connector contract suite (``tests/test_connector_contract.py``) builds and checks a
    connector: a tiny random model (``tests/helpers.py`` ``make_run``) with this base tower, extra towers and
    connector options.  Declare them as ``contract_examples`` on the connector class, or with
    ``@register(..., examples=(...))`` (needed for a pattern, which has no single name).  Without any, the suite
    uses ``ContractExample()``: the registered name, no options, a tiny CLIP base tower.

    Tower kinds are the tiny test towers of ``tests/helpers.py`` (``clip``, ``siglip``, ``dinov2``: hidden 32,
    2 blocks, a 4x4 patch grid; change them with ``vision_overrides``, e.g. ``{"num_hidden_layers": 6}``).
    """

    name: str | None = None  # the connector type to build (required for a pattern entry)
    options: Mapping[str, Any] = field(default_factory=dict)
    vision: str = "clip"  # base tower kind
    vision_overrides: Mapping[str, Any] = field(default_factory=dict)  # config overrides of the base tower
    select_layer: int | list[int] = -2
    select_strategy: str = "default"
    towers: Mapping[str, str] = field(default_factory=dict)  # extra towers: name -> tower kind
    # Option sets that must be refused, beyond what the suite derives from ``options_class``'s fields (a connector
    # without ``options_class`` must give at least one with a mistyped value).
    bad_options: tuple[Mapping[str, Any], ...] = ()


ConnectorFactory = Callable[[ConnectorSpec, str], Connector]

_REGISTRY: dict[str, ConnectorFactory] = {}
_PATTERNS: list[tuple[re.Pattern[str], ConnectorFactory]] = []
ALIASES: dict[str, str] = {}
_EXAMPLES: dict[str, tuple[ContractExample, ...]] = {}  # registry key or pattern -> contract examples


def register(name: str | None = None, *, pattern: str | None = None, aliases: tuple[str, ...] = (),
             examples: tuple[ContractExample, ...] = ()):
    """Class/factory decorator: ``@register("linear")`` or ``@register(pattern=r"mlp(\\d+)x_gelu")``;
    ``examples``: how the contract suite builds it (see :class:`ContractExample`)."""

    def deco(factory):
        if name is not None:
            if name in _REGISTRY:
                raise ValueError(f"connector {name!r} registered twice")
            _REGISTRY[name] = factory
            for alias in aliases:
                ALIASES[alias] = name
        if pattern is not None:
            _PATTERNS.append((re.compile(pattern), factory))
        if examples:
            _EXAMPLES[name if name is not None else pattern] = tuple(examples)
        return factory

    return deco


@dataclass(frozen=True)
class RegistryEntry:
    """One registry entry: an exact name or an anchored pattern, its factory and declared contract examples
    (from ``register(examples=...)``, else the factory's ``contract_examples`` attribute when it is a class)."""

    key: str
    is_pattern: bool
    factory: ConnectorFactory
    examples: tuple[ContractExample, ...]


def registry_entries() -> list[RegistryEntry]:
    """Every registered connector (exact names sorted, then patterns in registration order); aliases excluded."""
    from vlweave import connectors as _  # noqa: F401  (importing the package registers the built-ins)

    def examples(key: str, factory: ConnectorFactory) -> tuple[ContractExample, ...]:
        return _EXAMPLES.get(key) or tuple(getattr(factory, "contract_examples", ()) or ())

    out = [RegistryEntry(k, False, f, examples(k, f)) for k, f in sorted(_REGISTRY.items())]
    out += [RegistryEntry(p.pattern, True, f, examples(p.pattern, f)) for p, f in _PATTERNS]
    return out


def known_connectors() -> list[str]:
    return sorted(_REGISTRY) + [p.pattern for p, _ in _PATTERNS] + [f"{a} (= {t})" for a, t in ALIASES.items()]


def build_connector(type_name: str, spec: ConnectorSpec) -> Connector:
    from vlweave import connectors as _  # noqa: F401  (importing the package registers the built-ins)

    key = ALIASES.get(type_name, type_name)
    factory = _REGISTRY.get(key)
    if factory is None:
        factory = next((f for pat, f in _PATTERNS if pat.fullmatch(key)), None)
    if factory is None:
        raise ValueError(f"unknown connector type {type_name!r}; known: {', '.join(known_connectors())}")
    try:
        return factory(spec, key)
    except OptionsError as err:  # name the connector the user wrote in front of the option's problem
        msg = str(err)
        if msg.startswith(f"{type_name}: ") or msg.startswith(f"{key}: "):
            raise
        raise OptionsError(f"{type_name}: {msg}", key=err.key) from None


def pool_grid(x: torch.Tensor, grid: int, kernel: int, num_prefix: int = 0) -> torch.Tensor:
    """2-D average pooling of the patch grid (row-major tokens) by ``kernel``; prefix tokens pass through."""
    if kernel == 1:
        return x
    prefix, patches = x[:, :num_prefix], x[:, num_prefix:]
    b, n, c = patches.shape
    if n != grid * grid:
        raise ValueError(f"expected {grid}x{grid}={grid * grid} patch tokens, got {n}")
    img = patches.transpose(1, 2).reshape(b, c, grid, grid)
    img = nn.functional.avg_pool2d(img, kernel_size=kernel, stride=kernel, ceil_mode=False)
    return torch.cat([prefix, img.flatten(2).transpose(1, 2)], dim=1)
