"""``vlweave convert mova``: a released MoVA checkpoint's projector weights -> the ``mova`` connector's names.

The released model (TempleX98/MoVA, e.g. ``zongzhuofan/llama3-mova-8b``) keeps its MoV-Adapter under
``model.mm_projector.``; with ``preset: reference`` our connector has the same parameter names and shapes, so the
conversion is a prefix change plus what we do not keep:

- ``*.rope.freqs_cos`` / ``*.rope.freqs_sin``: RoPE tables (buffers of the released code; ours are recomputed from
  the grid and head size, so they are checked against ours when a target is given, and dropped);
- ``text_encoder.cls.*``, ``text_encoder.bert.pooler.*``: the BERT LM head / pooler (replaced by an identity in the
  released code, never read);
- ``*.position_ids`` / ``*.token_type_ids``: HF buffers, rebuilt by transformers;
- every key outside ``model.mm_projector.`` (the LLM, the vision towers): counted by prefix, not converted.

``text_encoder.bert.*`` maps to ``text_encoder.bert.*`` for the reference preset (``text_encoder.encoder.*`` for a
derived connector holding a BERT).  The output is a safetensors file of ``connector.<name>`` tensors, which
``model.load_state_dict(load_file(out), strict=False)`` (or :func:`load_converted`) puts into a vlweave model
built with ``connector: {type: mova, options: {preset: reference, ...}}``.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

PREFIX = "model.mm_projector."
_ROPE = re.compile(r".*\.rope\.freqs_(cos|sin)$")
_DROPPED = (
    (re.compile(r"^text_encoder\.cls\."), "BERT LM head (an identity in the released code)"),
    (re.compile(r"^text_encoder\.bert\.pooler\."), "BERT pooler (never read)"),
    (re.compile(r".*\.(position_ids|token_type_ids)$"), "HF buffer (rebuilt)"),
)


@dataclass
class Conversion:
    tensors: dict[str, torch.Tensor]  # connector-relative names (no "connector." prefix)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (released key, why)
    outside: Counter = field(default_factory=Counter)  # keys outside the projector, by their first two name parts

    def report(self) -> str:
        lines = [f"converted {len(self.tensors)} projector tensors"]
        for key, why in self.skipped:
            lines.append(f"skipped {key}: {why}")
        for prefix, count in sorted(self.outside.items()):
            lines.append(f"skipped {count} tensor(s) under {prefix}.* (not the projector)")
        return "\n".join(lines)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from a ``.safetensors`` / ``.bin`` / ``.pt`` file, or every shard of a checkpoint folder."""
    p = Path(path)
    if p.is_dir():
        files = sorted(p.glob("*.safetensors")) or sorted(p.glob("*.bin"))
        if not files:
            raise FileNotFoundError(f"{p}: no *.safetensors or *.bin files (a MoVA checkpoint folder or a state "
                                    f"dict file is expected)")
        out: dict[str, torch.Tensor] = {}
        for f in files:
            out.update(read_state_dict(f))
        return out
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such file")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(p))
    state = torch.load(p, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{p}: not a state dict (name -> tensor)")
    return state


def convert_state_dict(state: dict[str, torch.Tensor], text_encoder_attr: str = "bert",
                       rope_reference: dict[str, torch.Tensor] | None = None) -> Conversion:
    """Map released names onto the ``mova`` connector's.  Keys without the ``model.mm_projector.`` prefix are
    taken as projector-relative when no key has it (a projector-only state dict).  ``rope_reference``: our RoPE
    tables ``{"cos": [N, d], "sin": [N, d]}``; a released table that differs raises (the grid or head size do
    not match the connector's)."""
    has_prefix = any(k.startswith(PREFIX) for k in state)
    conv = Conversion(tensors={})
    for key, value in state.items():
        if has_prefix and not key.startswith(PREFIX):
            conv.outside[".".join(key.split(".")[:2])] += 1
            continue
        name = key[len(PREFIX):] if has_prefix else key
        if _ROPE.fullmatch(name):
            which = name.rsplit("_", 1)[1]
            ref = None if rope_reference is None else rope_reference[which]
            if ref is not None and (value.shape != ref.shape or not torch.allclose(value.float(), ref.float(),
                                                                                   atol=1e-5)):
                raise ValueError(f"{key}: the released RoPE table {tuple(value.shape)} differs from this connector's "
                                 f"{tuple(ref.shape)} (grid or head size differ)")
            conv.skipped.append((key, "RoPE table (recomputed from the grid and head size)"))
            continue
        why = next((w for pat, w in _DROPPED if pat.match(name)), None)
        if why is not None:
            conv.skipped.append((key, why))
            continue
        if name.startswith("text_encoder.bert."):
            name = f"text_encoder.{text_encoder_attr}." + name[len("text_encoder.bert."):]
        conv.tensors[name] = value
    if not conv.tensors:
        raise ValueError(f"no projector tensors found (expected keys under {PREFIX!r})")
    return conv


def check_against(conv: Conversion, expected: dict[str, tuple[int, ...]]) -> None:
    """Raise naming the tensors that are missing, unexpected or of another shape than ``expected``
    (connector-relative name -> shape)."""
    expected = {k: v for k, v in expected.items() if not _DROPPED[2][0].match(k)}  # HF buffers: never converted
    missing = sorted(set(expected) - set(conv.tensors))
    unexpected = sorted(set(conv.tensors) - set(expected))
    shapes = sorted(k for k in set(expected) & set(conv.tensors) if tuple(conv.tensors[k].shape) != expected[k])
    if missing or unexpected or shapes:
        detail = [f"missing {missing[:8]}{' ...' if len(missing) > 8 else ''}" if missing else "",
                  f"unexpected {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}" if unexpected else "",
                  "shape mismatch " + ", ".join(f"{k}: {tuple(conv.tensors[k].shape)} vs {expected[k]}"
                                                for k in shapes[:8]) if shapes else ""]
        raise ValueError("the converted projector does not fit the connector: " + "; ".join(d for d in detail if d))


def connector_of_checkpoint(folder: str | Path):
    """The ``mova`` connector of a vlweave checkpoint's ``config.json``, built on the meta device (no weights)."""
    from vlweave.connectors import build_connector
    from vlweave.modeling import VlweaveConfig, connector_spec_for

    config = VlweaveConfig.from_pretrained(folder)
    if config.connector_type != "mova":
        raise ValueError(f"{folder}: its connector is {config.connector_type!r}, not 'mova'")
    with torch.device("meta"):
        return build_connector("mova", connector_spec_for(config))


def convert(source: str | Path, out: str | Path, check: str | Path | None = None) -> Conversion:
    """Read ``source``, convert, check against ``check``'s connector (a vlweave checkpoint folder) if given, and
    write ``out`` (safetensors, ``connector.<name>`` keys)."""
    from safetensors.torch import save_file

    attr, expected, rope = "bert", None, None
    if check is not None:
        conn = connector_of_checkpoint(check)
        attr = conn.text_encoder.attr
        expected = {k: tuple(v.shape) for k, v in conn.state_dict().items()}
        from vlweave.connectors.mova import rope_tables

        cos, sin = rope_tables(conn.grid, conn.head_dim)
        rope = {"cos": cos, "sin": sin}
    conv = convert_state_dict(read_state_dict(source), text_encoder_attr=attr, rope_reference=rope)
    if expected is not None:
        check_against(conv, expected)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({f"connector.{k}": v.contiguous() for k, v in conv.tensors.items()}, str(out),
              metadata={"converted_from": str(source), "format": "vlweave mova connector"})
    (out.with_suffix(".skipped.json")).write_text(json.dumps(
        {"skipped": conv.skipped, "outside": dict(conv.outside)}, indent=1))
    return conv


def load_converted(model, path: str | Path) -> None:
    """Load a converted file into a vlweave model with a ``mova`` connector; raise naming what does not fit."""
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    conv = Conversion(tensors={k[len("connector."):]: v for k, v in tensors.items()})
    check_against(conv, {k: tuple(v.shape) for k, v in model.connector.state_dict().items()})
    missing, unexpected = model.connector.load_state_dict(conv.tensors, strict=False)
    left = [k for k in missing if not _DROPPED[2][0].match(k)]
    if left or unexpected:
        raise ValueError(f"{path}: did not load {left[:8]} / unexpected {unexpected[:8]}")


__all__ = ["Conversion", "PREFIX", "check_against", "convert", "convert_state_dict", "load_converted",
           "read_state_dict"]
