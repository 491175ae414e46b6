"""``block_adapter``: a bottleneck adapter (Houlsby-style, ``h + scale * up(gelu(down(h)))``) added residually to the
output of chosen decoder layers of the LM, through forward hooks.

The up-projection starts at zero, so a freshly added adapter leaves the LM exactly as it was (the first steps
train ``up``; ``down`` follows once ``up`` is non-zero).  Options: ``layers`` (decoder layer indices, negative ones
count from the top; default the last layer), ``bottleneck`` (width, default 16), ``scale`` (default 1.0).
Parameters: ``lm_modules.<name>.adapters.<layer>.{down,up}.{weight,bias}``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import nn

from vlweave.language.modules import LMModule, LMModuleSpec, decoder_layers, register_lm_module


@dataclass(frozen=True)
class BlockAdapterOptions:
    layers: tuple[int, ...] = (-1,)
    bottleneck: int = field(default=16, metadata={"min": 1})
    scale: float = 1.0


class Bottleneck(nn.Module):
    def __init__(self, hidden: int, width: int) -> None:
        super().__init__()
        self.down = nn.Linear(hidden, width)
        self.act = nn.GELU()
        self.up = nn.Linear(width, hidden)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.up(self.act(self.down(h)))


@register_lm_module("block_adapter")
class BlockAdapter(LMModule):
    options_class = BlockAdapterOptions

    def __init__(self, spec: LMModuleSpec) -> None:
        super().__init__(spec)
        n = spec.num_layers
        bad = [i for i in self.options.layers if not -n <= i < n]
        if bad or not self.options.layers:
            raise ValueError(f"option 'layers' = {list(self.options.layers)}: needs decoder layer indices in "
                             f"[{-n}, {n}) (the LM has {n} layers)")
        self.layer_indices = sorted({i % n for i in self.options.layers})
        self.adapters = nn.ModuleDict({str(i): Bottleneck(spec.hidden_size, self.options.bottleneck)
                                       for i in self.layer_indices})

    def attach(self, model: Any) -> None:
        layers = decoder_layers(model.language_model)
        if len(layers) != self.spec.num_layers:
            raise ValueError(f"lm module {self.spec.name!r}: built for {self.spec.num_layers} decoder layers, the LM "
                             f"has {len(layers)}")
        for i in self.layer_indices:
            self._handles.append(layers[i].register_forward_hook(partial(self._after_layer, str(i))))

    def _after_layer(self, key: str, module: nn.Module, args: Any, output: Any) -> Any:
        hidden = output[0] if isinstance(output, tuple) else output
        adapter = self.adapters[key]
        hidden = hidden + self.options.scale * adapter(hidden).to(hidden.dtype)
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


__all__ = ["BlockAdapter", "BlockAdapterOptions"]
