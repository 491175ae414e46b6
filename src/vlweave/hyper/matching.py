"""Parameter matching for HyperLLaVA's missing baselines (issue 14 item 5): the same adapters with static weights
(``dynamic: false``) and LoRA, sized to the dynamic experts' trainable parameter count, so that a comparison
separates "dynamic" from "more parameters".

- Static adapter, same places: the expert module with ``dynamic: false`` has ``r_s * (in + out)`` parameters per
  site; :func:`matched_static_bottleneck` picks ``r_s`` closest to the dynamic expert's count (encoders +
  HyperNetwork + static weights).
- LoRA: on the LM's linear layers (``train.lora.target_modules``) of the language expert's blocks
  (``lora.top_layers`` = the posterior half by default); :func:`matched_lora_rank` picks the rank whose
  ``r * sum(in + out)`` is closest to the language expert's count.  The connector cannot take LoRA in vlweave
  (its tune policy is full or frozen), so the visual expert's counterpart is the static adapter only.

``python -m vlweave.hyper.matching CONFIG [--set k=v ...]`` builds the config's model and prints the sizes (JSON).
"""

from __future__ import annotations

import argparse
import json
import re
from typing import Any

from torch import nn


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def matched_static_bottleneck(target: int, sites: dict[str, tuple[int, int]]) -> int:
    """The static bottleneck whose adapters at ``sites`` (no biases) have the parameter count closest to
    ``target``."""
    per_rank = sum(i + o for i, o in sites.values())
    return max(1, round(target / per_rank))


def lora_parameters_per_rank(language_model: nn.Module, target_regex: str, layers: list[int],
                             prefix: str = "language_model.") -> int:
    """``sum(in + out)`` over the LoRA targets (``target_regex`` on ``prefix + module name``) inside the decoder
    blocks ``layers``: LoRA of rank r adds ``r`` times this."""
    total = 0
    for name, module in language_model.named_modules():
        m = re.search(r"\.layers\.(\d+)\.", name)
        if isinstance(module, nn.Linear) and m and int(m.group(1)) in layers and \
                re.fullmatch(target_regex, prefix + name):
            total += module.in_features + module.out_features
    return total


def matched_lora_rank(target: int, per_rank: int) -> int:
    if per_rank <= 0:
        raise ValueError("LoRA targets nothing in the expert blocks (check train.lora.target_modules)")
    return max(1, round(target / per_rank))


def matched_sizes(model: Any, lora_target: str) -> dict[str, Any]:
    """Sizes of the baselines matched to ``model``'s HyperLLaVA experts (a model with a ``hyper_<inner>`` connector
    and/or a ``hyper_expert`` LM-side module)."""
    from vlweave.connectors.hyper import HyperVisualConnector
    from vlweave.language.hyper_expert import LanguageExpert

    out: dict[str, Any] = {}
    conn = model.connector
    if isinstance(conn, HyperVisualConnector):
        n = count_parameters(conn.expert)
        out["visual_expert"] = {"parameters": n, "sites": conn.expert.sites,
                                "generated_per_image": conn.expert.generated_numel(),
                                "static_bottleneck": matched_static_bottleneck(n, conn.expert.sites)}
    for name, module in model.lm_modules.items():
        if isinstance(module, LanguageExpert):
            n = count_parameters(module.expert)
            per_rank = lora_parameters_per_rank(model.language_model, lora_target, module.layer_indices)
            out[name] = {"parameters": n, "layers": module.layer_indices,
                         "guidance_layer": module.guidance_index,
                         "generated_per_sample": module.expert.generated_numel(),
                         "static_bottleneck": matched_static_bottleneck(n, module.expert.sites),
                         "lora_rank": matched_lora_rank(n, per_rank), "lora_parameters_per_rank": per_rank,
                         "lora_top_layers": module.spec.num_layers - min(module.layer_indices)}
    return out


def main(argv: list[str] | None = None) -> int:
    from vlweave.builder import build_model
    from vlweave.config import RunConfig

    ap = argparse.ArgumentParser(prog="python -m vlweave.hyper.matching", description=__doc__.splitlines()[0])
    ap.add_argument("config")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args(argv)
    from vlweave.presets import preset_path

    cfg = RunConfig.load(preset_path(args.config), args.overrides)
    model, _ = build_model(cfg)
    print(json.dumps(matched_sizes(model, cfg.train.lora.target_modules), indent=2))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
