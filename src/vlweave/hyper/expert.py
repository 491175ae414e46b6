"""HyperLLaVA's dynamic expert (methods.md §3a, Eqs. 2-5): one core shared by the visual expert
(:mod:`vlweave.connectors.hyper`) and the language expert (:mod:`vlweave.language.hyper_expert`).

For every *site* ``n`` (a place an expert acts: the projector's first Linear, a decoder block's FFN) and a batch
of per-sample guidance vectors ``g`` ``[B, G]``::

    e_n    = E_n(g)                              [B, embed_dim]   layer-specific encoder (a Linear)
    w_n    = fc2(act_h(fc1(e_n)))                [B, P]           HyperNetwork H: two affine maps (Eq. 4; act_h
                                                                  is the identity unless ``hyper_activation``)
    K_n    = w_n + b_n                           [B, P]           b_n: the site's static adapter weights
    W_down = K_n[:, :r*in].view(B, r, in)                          r = ``bottleneck``
    W_up   = K_n[:, r*in:].view(B, out, r)
    E_n(x) = W_up . act(W_down . x)              [B, T, out]      two batched matmuls (no loop over samples)

``P = r * (in + out)``.  One ``H`` serves every site of the same shape (``share_hypernetwork``; the natural
HyperFormer reading of "layer-specific encoder, one HyperNetwork" -- the paper does not say, methods.md §3e.3:
unshared, ``H``'s output layer alone is ``hyper_hidden x P`` per site).  The generated part starts at zero
(``fc2`` zero-initialised) and so does the static up-projection, so a fresh expert adds exactly zero: the model
with experts is the static model at initialisation (methods.md §3b, ASSUMPTION; ``zero_init: false`` draws both
small and random instead, e.g. for an ablation or a test that needs every parameter to move on step one).

``dynamic: false`` keeps only the static weights (no encoder, no HyperNetwork, no guidance): the same adapter in the
same places, the baseline that separates "dynamic" from "more parameters" (:mod:`vlweave.hyper.matching`).

The adapter has no biases (Eq. 5 writes none).  Its activation is SiLU/Swish by default: the paper's text says
"SwiGLU", describes GELU and cites Swish (Ramachandran et al.); an elementwise activation is the only reading that
needs no third generated matrix (``activation`` picks another).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

Activation = Literal["silu", "gelu", "relu", "tanh", "none"]

_ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu, "relu": F.relu, "tanh": torch.tanh, "none": lambda x: x}


@dataclass(frozen=True)
class HyperExpertOptions:
    """Options of the dynamic expert, shared by the visual and the language expert (their option classes add
    where it acts and what guides it)."""

    embed_dim: int = field(default=64, metadata={"min": 1})  # e_n: "expert input dimension" (Fig. 4a: 64 best)
    bottleneck: int = field(default=16, metadata={"min": 1})  # r: "downsampling dimension" (Fig. 4b: 16 best)
    hyper_hidden: int = field(default=64, metadata={"min": 1})  # width between H's two affine maps (unstated)
    hyper_activation: Activation = "none"  # between H's two maps: Eq. 4 has none
    activation: Activation = "silu"  # inside the generated adapter (see the module docstring)
    share_hypernetwork: bool = True  # one H per adapter shape, shared by the sites of that shape
    zero_init: bool = True  # generated shift and static up-projection start at zero: a no-op expert
    scale: float = 1.0  # multiplies the expert's output
    # False: the same adapter in the same places with static weights only (no encoder, no HyperNetwork, no
    # guidance): the "same parameter count, not dynamic" baseline (vlweave.hyper.matching sizes its bottleneck).
    dynamic: bool = True
    # The guidance as E_n reads it: "none" (as given) or "layer" (LayerNorm without affine: zero mean, unit
    # variance per vector).  The paper is silent; the language expert's guidance is an LLM residual stream whose
    # norm grows with depth (SmolLM2's middle block: gradient norm 2,124 at the first step vs 5.4 for the static
    # model, loss 4.1 -> 29 at step 3, NaN at 7 in hyper-compare-language), so its default is "layer".
    guidance_norm: Literal["none", "layer"] = "none"


@dataclass(frozen=True)
class GeneratedAdapters:
    """Per-sample adapter weights of one site: ``down`` ``[B, r, in]``, ``up`` ``[B, out, r]``."""

    down: torch.Tensor
    up: torch.Tensor

    @property
    def numel_per_sample(self) -> int:
        return int(self.down[0].numel() + self.up[0].numel())


class HyperNetwork(nn.Module):
    """``H(e) = fc2(act(fc1(e)))``: embedding ``[B, embed_dim]`` -> flat adapter shift ``[B, P]``."""

    def __init__(self, embed_dim: int, hidden: int, out_features: int, activation: str, zero_init: bool) -> None:
        super().__init__()
        self.fc1 = nn.Linear(embed_dim, hidden)
        self.fc2 = nn.Linear(hidden, out_features)
        self.activation = activation
        if zero_init:
            nn.init.zeros_(self.fc2.weight)
            nn.init.zeros_(self.fc2.bias)
        else:
            nn.init.normal_(self.fc2.weight, std=1e-2)
            nn.init.zeros_(self.fc2.bias)

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        return self.fc2(_ACTIVATIONS[self.activation](self.fc1(embedding)))


class DynamicExpert(nn.Module):
    """The experts of a set of sites guided by one guidance vector per sample.

    ``sites``: site name -> ``(in_features, out_features)``; ``guidance_dim``: width of the guidance vector.
    Parameters: ``encoders.<site>`` (E_n), ``static_down.<site>`` ``[r, in]``, ``static_up.<site>`` ``[out, r]``
    (b_n), and ``hypernets.<shape key>`` (H; one per site when not shared)."""

    def __init__(self, sites: Mapping[str, tuple[int, int]], guidance_dim: int, options: HyperExpertOptions) -> None:
        super().__init__()
        if not sites:
            raise ValueError("a dynamic expert needs at least one site")
        self.options = options
        self.sites = {name: (int(i), int(o)) for name, (i, o) in sites.items()}
        r = options.bottleneck
        self.encoders = nn.ModuleDict({n: nn.Linear(guidance_dim, options.embed_dim) for n in self.sites}
                                      if options.dynamic else {})
        self.static_down = nn.ParameterDict()
        self.static_up = nn.ParameterDict()
        for name, (i, o) in self.sites.items():
            down = torch.empty(r, i)
            nn.init.kaiming_uniform_(down, a=math.sqrt(5))  # nn.Linear's default init
            up = torch.zeros(o, r)
            if not options.zero_init:
                nn.init.kaiming_uniform_(up, a=math.sqrt(5))
            self.static_down[name] = nn.Parameter(down)
            self.static_up[name] = nn.Parameter(up)
        self.hypernet_of = {n: self._hyper_key(n) for n in self.sites} if options.dynamic else {}
        self.hypernets = nn.ModuleDict()
        for name, key in self.hypernet_of.items():
            if key not in self.hypernets:
                i, o = self.sites[name]
                self.hypernets[key] = HyperNetwork(options.embed_dim, options.hyper_hidden, r * (i + o),
                                                   options.hyper_activation, options.zero_init)

    def _hyper_key(self, site: str) -> str:
        if not self.options.share_hypernetwork:
            return site
        i, o = self.sites[site]
        return f"shape_{i}x{o}"

    # ---- facts -----------------------------------------------------------------------------------------
    def generated_numel(self, site: str | None = None) -> int:
        """Generated adapter weights per sample (one site, or all): ``r * (in + out)`` each; 0 when static."""
        if not self.options.dynamic:
            return 0
        names = [site] if site is not None else list(self.sites)
        return sum(self.options.bottleneck * sum(self.sites[n]) for n in names)

    # ---- the computation -------------------------------------------------------------------------------
    @property
    def dynamic(self) -> bool:
        return self.options.dynamic

    def generate(self, site: str, guidance: torch.Tensor | None) -> GeneratedAdapters:
        """Per-sample adapter weights of ``site`` from guidance ``[B, guidance_dim]`` (Eqs. 2-4); a static expert
        (``dynamic: false``) returns its weights with a batch axis of 1 and needs no guidance."""
        i, o = self.sites[site]
        r = self.options.bottleneck
        if not self.options.dynamic:
            return GeneratedAdapters(down=self.static_down[site].unsqueeze(0), up=self.static_up[site].unsqueeze(0))
        if guidance is None:
            raise ValueError("a dynamic expert needs guidance")
        encoder = self.encoders[site]
        guidance = guidance.to(encoder.weight.dtype)
        if self.options.guidance_norm == "layer":
            guidance = F.layer_norm(guidance.float(), guidance.shape[-1:]).to(encoder.weight.dtype)
        e = encoder(guidance)
        theta = self.hypernets[self.hypernet_of[site]](e)  # [B, r*(i+o)]
        shift_down, shift_up = theta.split([r * i, o * r], dim=-1)
        b = guidance.shape[0]
        down = self.static_down[site].unsqueeze(0) + shift_down.reshape(b, r, i)
        up = self.static_up[site].unsqueeze(0) + shift_up.reshape(b, o, r)
        return GeneratedAdapters(down=down, up=up)

    def apply(self, weights: GeneratedAdapters, x: torch.Tensor) -> torch.Tensor:
        """``scale * W_up . act(W_down . x)`` per sample: ``x`` ``[B, T, in]`` -> ``[B, T, out]`` (Eq. 5)."""
        down = weights.down.to(x.dtype)
        up = weights.up.to(x.dtype)
        if down.shape[0] == 1 and x.shape[0] != 1:  # static weights: one matmul for the whole batch
            hidden = _ACTIVATIONS[self.options.activation](x @ down[0].t())
            out = hidden @ up[0].t()
        else:
            hidden = _ACTIVATIONS[self.options.activation](torch.bmm(x, down.transpose(1, 2)))
            out = torch.bmm(hidden, up.transpose(1, 2))
        return out if self.options.scale == 1.0 else out * self.options.scale

    def forward(self, site: str, guidance: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.apply(self.generate(site, guidance), x)


def masked_mean(hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over the token axis of ``hidden`` ``[B, L, D]`` at the positions where ``mask`` ``[B, L]`` is set (all
    when None), in fp32; a row without any set position gives zeros."""
    h = hidden.float()
    if mask is None:
        return h.mean(dim=1)
    m = mask.to(device=h.device, dtype=h.dtype).unsqueeze(-1)
    return (h * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)


__all__ = ["DynamicExpert", "GeneratedAdapters", "HyperExpertOptions", "HyperNetwork", "masked_mean"]
