"""HyperLLaVA's visual expert (methods.md §3a, Eq. 6) as a wrapping connector: ``hyper_<inner>``.

``hyper_mlp2x_gelu``, ``hyper_dense_dci``, ``hyper_mova`` ...: the inner connector named after the prefix is built
with every option that is not the expert's, and the expert is installed on its projector -- the ``nn.Sequential``
``Linear, GELU, Linear, ...`` that a :class:`~vlweave.connectors.projector.ProjectorHead` holds (at the inner
connector's root as ``projector``, or on a child as ``<child>.projector``; exactly one must exist).  Why a wrapper
keyed by the inner type rather than a ``hyper`` option on each family: the expert needs nothing of the inner
connector but its projector, so one class covers plain features, Dense Connector fusions and any later connector
with a LLaVA head (the MoV-Adapter's) without touching them; the inner's fusion, cache signature, token count and
calibration are the inner's own, so the frozen-feature cache and the processor see the inner connector unchanged.

Placement (``placement``; the paper's Eq. 6 and Table 2):

- ``ev1`` (default, the paper's choice): the expert reads the first Linear's input ``f`` (after the head's
  standardisation / input norm) and its output is added to the first Linear's output, i.e. before the GELU and
  the second Linear: ``L2(GELU(L1(f) + E1(f)))``;
- ``ev2``: the expert reads ``u = L1(f)`` and its output is added after the last Linear: ``L2(GELU(u)) + E2(u)``;
- ``both``: the two (``E2`` then reads ``L1(f) + E1(f)``, the tensor that actually flows on).

Guidance: the projector input pooled over tokens per image (``guidance_pool``: ``mean``, the paper being silent,
or ``max``).  The expert's parameters are ``connector.expert.*``; the inner connector's keep their names under
``connector.inner.*``.  Options: those of :class:`HyperVisualOptions` (the expert's, see
:class:`vlweave.hyper.expert.HyperExpertOptions`) plus every option of the inner connector.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from vlweave.connectors.base import (
    BASE_TOWER,
    Connector,
    ConnectorOutput,
    ConnectorSpec,
    ContractExample,
    TextInput,
    build_connector,
    register,
)
from vlweave.connectors.options import OptionsError, option_names
from vlweave.hyper.expert import DynamicExpert, HyperExpertOptions

PREFIX = "hyper_"


@dataclass(frozen=True)
class HyperVisualOptions(HyperExpertOptions):
    """The visual expert's options (the inner connector's are passed through to it)."""

    placement: Literal["ev1", "ev2", "both"] = "ev1"
    guidance_pool: Literal["mean", "max"] = "mean"


HYPER_OPTIONS = option_names(HyperVisualOptions)


def find_projector(inner: nn.Module, label: str) -> nn.Sequential:
    """The inner connector's LLaVA projector: its :meth:`Connector.projector_head` (by default the one
    ``nn.Sequential`` named ``projector``; MoVA's ``mlp``); a clear error when it has none."""
    head = inner.projector_head() if isinstance(inner, Connector) else None
    if head is not None:
        return head
    found = [(name, m) for name, m in inner.named_modules()
             if (name == "projector" or name.endswith(".projector")) and isinstance(m, nn.Sequential)]
    if len(found) != 1:
        names = [n for n, _ in found]
        raise OptionsError(f"{label}: the visual expert wraps a LLaVA projector (an nn.Sequential named "
                           f"'projector': Linear, GELU, Linear, ...); the inner connector has "
                           f"{len(found)} ({names})")
    return found[0][1]


class HyperVisualConnector(Connector):
    """The inner connector with HyperLLaVA's visual expert on its projector (see the module docstring)."""

    options_class = HyperVisualOptions
    options: HyperVisualOptions

    def __init__(self, spec: ConnectorSpec, inner_type: str) -> None:
        label = f"{PREFIX}{inner_type}"
        own = {k: v for k, v in spec.options.items() if k in HYPER_OPTIONS}
        rest = {k: v for k, v in spec.options.items() if k not in HYPER_OPTIONS}
        super().__init__(dataclasses.replace(spec, options=own))  # parses self.options (the expert's)
        self.spec = spec
        if inner_type.startswith(PREFIX) or not inner_type:
            raise OptionsError(f"{label}: the inner connector must be a non-hyper connector type (got "
                               f"{inner_type!r})")
        try:
            self.inner = build_connector(inner_type, dataclasses.replace(spec, options=rest))
        except OptionsError as err:
            msg = str(err)
            if "unknown option" in msg:
                msg += f"; the visual expert's own options: {sorted(HYPER_OPTIONS)}"
            raise OptionsError(f"{label}: {msg}", key=err.key) from None
        projector = find_projector(self.inner, label)
        linears = [m for m in projector if isinstance(m, nn.Linear)]
        if not isinstance(projector[0], nn.Linear) or len(linears) < 2:
            raise OptionsError(
                f"{label}: option 'placement' = {self.options.placement!r} needs a projector of depth >= 2 "
                f"(mlpNx_gelu with N >= 2: the expert acts between the first and the second Linear); the inner "
                f"connector's projector has {len(linears)} Linear layer(s)", key="placement")
        first, last = projector[0], projector[-1]
        if not isinstance(last, nn.Linear):
            raise OptionsError(f"{label}: the projector must end with a Linear (got {type(last).__name__})")
        sites: dict[str, tuple[int, int]] = {}
        if self.options.placement in ("ev1", "both"):
            sites["ev1"] = (first.in_features, first.out_features)
        if self.options.placement in ("ev2", "both"):
            sites["ev2"] = (first.out_features, last.out_features)
        self.expert = DynamicExpert(sites, guidance_dim=first.in_features, options=self.options)
        # Hooks on the inner projector: per-call state lives in a plain dict between them (not module state).
        self._call: dict[str, Any] = {}
        first.register_forward_pre_hook(self._before_first)
        first.register_forward_hook(self._after_first)
        last.register_forward_hook(self._after_last)

    # ---- delegated facts and parameter-free part -------------------------------------------------------
    # Everything the model, processor, trainer and routing stage ask a connector is the inner connector's: its
    # gate text (MoVA's encoder and tokenizer), pretrained parts, resolved options, sub-components, the rows each
    # tower runs on (MoVA's routing) and the routing-pass token count (RoutingPool reads ``inner``'s options).
    def text_input(self) -> TextInput | None:
        return self.inner.text_input()

    def load_pretrained(self) -> None:
        self.inner.load_pretrained()

    def resolved_options(self) -> dict[str, Any]:
        return self.inner.resolved_options()

    def sub_components(self) -> dict[str, nn.Module]:
        return self.inner.sub_components()

    def tower_rows(self, tower: str, context: Any) -> torch.Tensor | None:
        return self.inner.tower_rows(tower, context)

    def projector_head(self) -> nn.Sequential | None:
        return self.inner.projector_head()

    def feature_layers(self) -> list[int]:
        return self.inner.feature_layers()

    def tower_layers(self) -> dict[str, list[int]]:
        return self.inner.tower_layers()

    def prepare(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        return self.inner.prepare(features)

    def prepare_tower(self, tower: str, features: list[torch.Tensor]) -> list[torch.Tensor]:
        return self.inner.prepare_tower(tower, features)

    def prepare_signature(self, tower: str = BASE_TOWER) -> dict[str, Any]:
        return self.inner.prepare_signature(tower)

    def num_tokens(self, grid: int | None = None) -> int:
        return self.inner.num_tokens(grid)

    @torch.no_grad()
    def calibrate(self, prepared: list[torch.Tensor]) -> None:
        calibrate = getattr(self.inner, "calibrate", None)
        if calibrate is not None:
            calibrate(prepared)

    # ---- the expert, through hooks on the inner projector ----------------------------------------------
    def guidance(self, x: torch.Tensor) -> torch.Tensor:
        """Per-image guidance ``[N, C]`` from the projector input ``[N, T, C]``."""
        return x.amax(dim=1) if self.options.guidance_pool == "max" else x.mean(dim=1)

    def _before_first(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        if not self._call.get("active"):
            return
        (x,) = args[:1]
        g = self.guidance(x) if self.expert.dynamic else None
        self._call["weights"] = {site: self.expert.generate(site, g) for site in self.expert.sites}
        self._call["x"] = x

    def _after_first(self, module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor | None:
        if not self._call.get("active"):
            return None
        if "ev1" in self.expert.sites:
            output = output + self.expert.apply(self._call["weights"]["ev1"], self._call["x"]).to(output.dtype)
        self._call["u"] = output
        return output

    def _after_last(self, module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor | None:
        if not self._call.get("active") or "ev2" not in self.expert.sites:
            return None
        return output + self.expert.apply(self._call["weights"]["ev2"], self._call["u"]).to(output.dtype)

    def forward(self, prepared: Mapping[str, list[torch.Tensor]] | list[torch.Tensor],
                context: Any = None) -> ConnectorOutput:
        self._call = {"active": True}
        try:
            return self.inner(prepared, context)
        finally:
            self._call = {}

    def generated_numel_per_image(self) -> int:
        """Generated adapter weights per image (both sites when ``placement`` is ``both``)."""
        return self.expert.generated_numel()


# Contract examples: zero_init false so that one training step moves every expert parameter (with a zero-init
# up-projection the down-projection's first gradient is exactly zero, as in LoRA).
_DEEP = {"num_hidden_layers": 6}


@register(pattern=r"hyper_(.+)", examples=(
    ContractExample(name="hyper_mlp2x_gelu", options={"zero_init": False, "bottleneck": 4, "embed_dim": 8}),
    ContractExample(name="hyper_dense_dci", vision_overrides=_DEEP,
                    options={"zero_init": False, "placement": "both", "groups": 2, "standardize": True,
                             "bottleneck": 4, "embed_dim": 8, "share_hypernetwork": False, "guidance_pool": "max",
                             "hyper_activation": "gelu"}),
))
def _hyper(spec: ConnectorSpec, name: str) -> Connector:
    inner = re.fullmatch(r"hyper_(.+)", name).group(1)  # type: ignore[union-attr]
    return HyperVisualConnector(spec, inner)


__all__ = ["HYPER_OPTIONS", "HyperVisualConnector", "HyperVisualOptions", "find_projector"]
