"""Connector parts: fusions as reusable objects (``build_fusion``), the trainable ``ProjectorHead``, typed options
with errors that name the key, its type and the allowed keys, and the state-dict / cache-key forms that existing
checkpoints and feature caches depend on."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from vlweave.connectors import (
    ConnectorOutput,
    ConnectorSpec,
    FusedConnector,
    OptionsError,
    ProjectorHead,
    TokenLayout,
    base_features,
    build_connector,
    build_fusion,
    fusion_kinds,
    parse_options,
)
from vlweave.connectors.dense import DenseFusionOptions
from vlweave.connectors.mlp import DenseOptions, ProjectorOptions
from vlweave.connectors.options import describe_type

LEGACY = Path(__file__).parent / "fixtures" / "legacy-v0"

CLIP6 = dict(vision_hidden_size=16, num_vision_layers=6, grid=4, num_prefix_tokens=1,
             vision_model_type="clip_vision_model")


def spec(text: int = 8, **kw) -> ConnectorSpec:
    return ConnectorSpec(text_hidden_size=text, **{**CLIP6, **kw})


def hidden_states(s: ConnectorSpec, batch: int = 2) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    n = s.grid * s.grid + s.num_prefix_tokens
    return [torch.randn(batch, n, s.vision_hidden_size, generator=g) for _ in range(s.num_vision_layers + 1)]


def selected(s: ConnectorSpec, hs: list[torch.Tensor], layers) -> list[torch.Tensor]:
    start = s.num_prefix_tokens if s.select_strategy == "default" else 0
    return [hs[i][:, start:] for i in layers]


# ---- fusions -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind,options,channels,extra", [
    ("layers", {}, 16, 0),
    ("layers", {"pool": 2}, 16, 0),
    ("sti", {}, 16, 2 + 2),  # 16 patch tokens // alpha 8 = 2 per extra layer
    ("sti", {"sti_pool": "2d", "alpha": 2}, 16, 4 + 4),
    ("sci", {}, 48, 0),
    ("dci", {"groups": 3}, 64, 0),
])
def test_build_fusion_api(kind, options, channels, extra):
    s = spec()
    fusion = build_fusion(kind, s, options)
    assert fusion.kind == kind and fusion.out_channels == channels and fusion.extra_tokens() == extra
    hs = hidden_states(s)
    fused = fusion(selected(s, hs, fusion.layers))
    layout = fusion.layout()
    assert tuple(fused.shape) == (2, layout.total, channels) and layout.extra == extra
    json.dumps(fusion.signature())  # JSON-friendly: part of the feature-cache key
    # The dense_* / mlp connectors run exactly this fusion in prepare (what the cache stores).
    name = "mlp2x_gelu" if kind == "layers" else f"dense_{kind}"
    conn = build_connector(name, spec(options=options))
    assert list(fusion.layers) == conn.feature_layers() and fusion.signature() == conn.prepare_signature()
    (prepared,) = conn.prepare(selected(s, hs, conn.feature_layers()))
    assert torch.equal(prepared, fused)


def test_fusion_kinds_and_errors():
    assert fusion_kinds() == ["dci", "layers", "sci", "sti"]
    with pytest.raises(ValueError, match="unknown fusion 'moe'; known: dci, layers, sci, sti"):
        build_fusion("moe", spec())
    with pytest.raises(OptionsError, match=re.escape("unknown option(s) ['standardize']; allowed: ['pool']")):
        build_fusion("layers", spec(), {"standardize": True})  # a head option is not the fusion's
    with pytest.raises(OptionsError, match=re.escape("pool=3 must be >= 1 and divide the grid (4)")):
        build_fusion("dci", spec(), {"pool": 3})


@dataclass(frozen=True)
class ToyAdapterOptions(DenseFusionOptions):
    """A future connector's options: the DC fusion's, plus its own."""

    experts: int = field(default=2, metadata={"min": 1})


class ToyAdapterConnector(FusedConnector):
    """A stand-in for a MoV-Adapter on DC-fused input: experts mixed by a gate, then a LLaVA head as a child."""

    options_class = ToyAdapterOptions
    fusion_kind = "dci"

    def __init__(self, s: ConnectorSpec) -> None:
        super().__init__(s)
        d = self.fusion.out_channels
        self.experts = nn.ModuleList(nn.Linear(d, d) for _ in range(self.options.experts))
        self.gate = nn.Linear(d, self.options.experts)
        self.out = ProjectorHead(d, s.text_hidden_size, depth=2)

    def forward(self, prepared, context: Any = None) -> ConnectorOutput:
        (x,) = base_features(prepared)
        weights = self.gate(x).softmax(-1)
        mixed = sum(w.unsqueeze(-1) * e(x) for w, e in zip(weights.unbind(-1), self.experts))
        return ConnectorOutput(tokens=self.out(mixed, self.fusion.layout()))


def test_a_fusion_feeds_any_trainable_module():
    s = spec(options={"groups": 2, "experts": 3})
    toy = ToyAdapterConnector(s)
    dci = build_connector("dense_dci", spec(options={"groups": 2}))
    hs = hidden_states(s)
    (x,) = toy.prepare(selected(s, hs, toy.feature_layers()))
    (y,) = dci.prepare(selected(s, hs, dci.feature_layers()))
    assert torch.equal(x, y)  # the same DC-fused input ...
    assert toy.prepare_signature() == dci.prepare_signature()  # ... so the same cache entries
    assert toy.num_tokens() == 16 and toy([x]).tokens.shape == (2, 16, 8)
    assert {"out.projector.0.weight", "gate.weight", "experts.2.bias"} <= set(toy.state_dict())
    with pytest.raises(OptionsError, match="option 'experts' must be >= 1, got 0"):
        ToyAdapterConnector(spec(options={"experts": 0}))
    with pytest.raises(OptionsError, match=re.escape("option 'experts' must be int, got '3' (str)")):
        ToyAdapterConnector(spec(options={"experts": "3"}))


# ---- the trainable head --------------------------------------------------------------------------------------


def test_projector_head_standalone_matches_the_connector():
    s = spec(options={"input_norm": True, "efficient_grid": 2})
    conn = build_connector("mlp2x_gelu", s)
    head = ProjectorHead(16, 8, 2, parse_options(ProjectorOptions, {"input_norm": True, "efficient_grid": 2}))
    head.load_state_dict(conn.state_dict())
    x = torch.randn(2, 16, 16)
    layout = TokenLayout(prefix=0, grid=4)
    assert torch.equal(head(x, layout), conn([x]).tokens)
    assert head.head_layout(layout) == TokenLayout(prefix=0, grid=2) and conn.num_tokens() == 4
    with pytest.raises(ValueError, match="give all of in_dim, out_dim, depth"):
        ProjectorHead(16)


@pytest.mark.parametrize("name,options,keys", [
    ("identity", {}, []),
    ("linear", {}, ["projector.0.bias", "projector.0.weight"]),
    ("mlp2x_gelu", {}, ["projector.0.bias", "projector.0.weight", "projector.2.bias", "projector.2.weight"]),
    ("mlp2x_gelu", {"input_norm": True, "standardize": True, "pool": 2},
     ["feature_mean", "feature_std", "input_norm.bias", "input_norm.weight", "projector.0.bias", "projector.0.weight",
      "projector.2.bias", "projector.2.weight"]),
    ("dense_dci", {"projector": "mlp3x_gelu"},
     [f"projector.{i}.{p}" for i in (0, 2, 4) for p in ("bias", "weight")]),
    ("dense_sti", {"standardize": True}, ["feature_mean", "feature_std", "projector.0.bias", "projector.0.weight",
                                          "projector.2.bias", "projector.2.weight"]),
])
def test_state_dict_keys_are_the_checkpoint_names(name, options, keys):
    """Checkpoints store ``connector.<these>``; the refactor into fusion + head must not move them."""
    text = 16 if name == "identity" else 8
    conn = build_connector(name, spec(text=text, options=options))
    assert sorted(conn.state_dict()) == sorted(keys)


def test_cache_signatures_keep_their_form():
    """``prepare_signature`` is part of the on-disk feature-cache key: the forms caches were written with."""
    assert build_connector("mlp2x_gelu", spec(options={"pool": 2})).prepare_signature() == {"pool": 2, "dense": None}
    sig = build_connector("dense_dci", spec()).prepare_signature()
    assert sig == {"pool": 1, "dense": {"kind": "dci", "final": 5, "extras": (), "groups": ((0, 2), (3, 5)),
                                        "alpha": 8, "sti_pool": "1d", "final_first": True}}


def test_legacy_checkpoint_connector_keys_load():
    from vlweave.modeling import VlweaveForConditionalGeneration

    golden = json.loads((LEGACY / "golden.json").read_text())
    inputs = torch.load(LEGACY / "golden_inputs.pt")
    model, info = VlweaveForConditionalGeneration.from_pretrained(LEGACY, output_loading_info=True)
    assert not [k for k in (*info["missing_keys"], *info["unexpected_keys"]) if "connector" in k]
    assert sorted(model.connector.state_dict()) == ["projector.0.bias", "projector.0.weight", "projector.2.bias",
                                                   "projector.2.weight"]
    with torch.no_grad():
        logits = model.eval()(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                              pixel_values=inputs["pixel_values"]).logits
    torch.testing.assert_close(logits[:, -1, :8], torch.tensor(golden["logits_last"]), atol=1e-5, rtol=0)


# ---- typed options ---------------------------------------------------------------------------------------------


PROJECTOR_KEYS = "['efficient_grid', 'input_norm', 'pool', 'standardize']"


@pytest.mark.parametrize("name,options,message", [
    ("mlp2x_gelu", {"pool": "2"},
     f"mlp2x_gelu: option 'pool' must be int, got '2' (str); allowed options: {PROJECTOR_KEYS}"),
    ("linear", {"pool": True}, "option 'pool' must be int, got True (bool)"),
    ("linear", {"standardize": "yes"}, "option 'standardize' must be bool (true/false), got 'yes' (str)"),
    ("linear", {"input_norm": 1}, "option 'input_norm' must be bool (true/false), got 1 (int)"),
    ("linear", {"efficient_grid": 2.0}, "option 'efficient_grid' must be int or null, got 2.0 (float)"),
    ("linear", {"efficient_grid": 0}, "option 'efficient_grid' must be >= 1, got 0"),
    ("linear", {"pool": 0}, "option 'pool' must be >= 1, got 0"),
    ("dense_sti", {"alpha": 1.5},
     "dense_sti: option 'alpha' must be int, got 1.5 (float); allowed options: ['alpha', "),
    ("dense_sti", {"sti_pool": "3d"}, "option 'sti_pool' must be one of '1d', '2d', got '3d' (str)"),
    ("dense_sci", {"preset": "paper"}, "option 'preset' must be one of 'derived', 'reference', got 'paper'"),
    ("dense_sci", {"layers": [3, "7"]}, "option 'layers' must be int or list[int] or null, got [3, '7'] (list)"),
    ("dense_dci", {"groups": [[0, 2, 3]]}, "option 'groups' must be int or list[[int, int]] or null"),
    ("dense_dci", {"final_first": "false"}, "option 'final_first' must be bool (true/false), got 'false'"),
    ("dense_dci", {"projector": 2}, "option 'projector' must be str, got 2 (int)"),
    ("dense_dci", {"preset": "reference", "groups": 3}, "option 'groups' as a count applies to preset 'derived'"),
])
def test_mistyped_options_name_the_key_type_and_allowed_keys(name, options, message):
    facts = dict(vision_hidden_size=16, num_vision_layers=24, grid=24, num_prefix_tokens=1,
                 vision_model_type="clip_vision_model")
    with pytest.raises(OptionsError, match=re.escape(message)) as err:
        build_connector(name, ConnectorSpec(text_hidden_size=8, options=options, **facts))
    assert isinstance(err.value, ValueError)
    assert err.value.key == ("groups" if "groups" in options else next(iter(options)))


def test_unknown_options_list_the_allowed_keys():
    with pytest.raises(OptionsError) as err:
        build_connector("dense_dci", spec(options={"alfa": 4, "pool": 1}))
    assert str(err.value) == ("dense_dci: unknown option(s) ['alfa']; allowed: ['alpha', 'efficient_grid', "
                              "'final_first', 'groups', 'input_norm', 'layers', 'pool', 'preset', 'projector', "
                              "'standardize', 'sti_pool']")
    assert err.value.key == "alfa"


def test_parse_options_conversions():
    opts = parse_options(DenseOptions, {"groups": [[0, 2], [3, 5]], "layers": [1, 3], "pool": 2})
    assert opts.groups == ((0, 2), (3, 5)) and opts.layers == (1, 3) and opts.pool == 2
    assert opts.projector == "mlp2x_gelu" and hash(opts)  # stored as tuples: hashable
    assert parse_options(DenseOptions, opts) is opts
    with pytest.raises(OptionsError, match="options must be a mapping"):
        parse_options(ProjectorOptions, [("pool", 2)])
    with pytest.raises(OptionsError, match="option 'pool' must be >= 1"):
        parse_options(ProjectorOptions, ProjectorOptions(pool=0))  # instances are checked too
    assert describe_type(int | None) == "int or null"
