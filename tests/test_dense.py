"""Dense Connector (methods.md §1): layer plans per depth, token counts, the ``reference`` preset against an
independent re-computation from the hidden states, projector sizes, Efficient-DC, and tiny end-to-end training."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import isolated_env, losses, make_run
from vlweave.builder import build_model, load_checkpoint
from vlweave.connectors import ConnectorSpec, build_connector
from vlweave.connectors.dense import derived_extra_layers, derived_groups, paper_layer
from vlweave.train.trainer import Trainer

CLIP_L = dict(vision_hidden_size=1024, num_vision_layers=24, grid=24, num_prefix_tokens=1,
              vision_model_type="clip_vision_model")
SIGLIP_SO = dict(vision_hidden_size=1152, num_vision_layers=27, grid=27, num_prefix_tokens=0,
                 vision_model_type="siglip_vision_model")
DINOV2_S_112 = dict(vision_hidden_size=384, num_vision_layers=12, grid=8, num_prefix_tokens=1,
                    vision_model_type="dinov2")


@pytest.fixture(autouse=True, scope="module")
def _env(tmp_path_factory):
    with isolated_env(tmp_path_factory.mktemp("vlweave-cache")):
        yield


def spec(facts: dict, text: int = 4096, **kw) -> ConnectorSpec:
    return ConnectorSpec(text_hidden_size=text, **{**facts, **kw})


# ---- layer plans -----------------------------------------------------------------------------------------


def test_paper_layer_convention():
    assert paper_layer(1) == 0 and paper_layer(24) == 23  # stem = layer 1; "24th layer" = hs[23] = hs[-2] of CLIP-L
    with pytest.raises(ValueError, match="count from 1"):
        paper_layer(0)


@pytest.mark.parametrize("blocks,extras,groups2,groups3", [
    (24, [7, 15], [(0, 11), (12, 23)], [(0, 7), (8, 15), (16, 23)]),  # CLIP-L: the paper's (1-12),(13-24) / thirds
    (12, [3, 7], [(0, 5), (6, 11)], [(0, 3), (4, 7), (8, 11)]),  # DINOv2-S
    (26, [8, 16], [(0, 12), (13, 25)], [(0, 8), (9, 16), (17, 25)]),  # SigLIP-so400m truncated to 26 blocks
    (6, [1, 3], [(0, 2), (3, 5)], [(0, 1), (2, 3), (4, 5)]),
])
def test_derived_layers_scale_with_depth(blocks, extras, groups2, groups3):
    assert derived_extra_layers(blocks) == extras
    assert derived_groups(blocks, 2) == groups2
    assert derived_groups(blocks, 3) == groups3
    covered = [i for lo, hi in derived_groups(blocks, 2) for i in range(lo, hi + 1)]
    assert covered == list(range(blocks))  # contiguous, no gap, no overlap


# ---- token counts and widths -------------------------------------------------------------------------


@pytest.mark.parametrize("kind,facts,select,tokens,in_dim", [
    ("sti", CLIP_L, -2, 576 + 72 + 72, 1024),
    ("sci", CLIP_L, -2, 576, 3072),
    ("dci", CLIP_L, -2, 576, 3072),
    ("sti", SIGLIP_SO, -2, 729 + 91 + 91, 1152),  # 729 // 8 = 91: the last token dropped, as AvgPool1d does
    ("sci", SIGLIP_SO, -2, 729, 3456),
    ("dci", SIGLIP_SO, -2, 729, 3456),
    ("sti", DINOV2_S_112, -2, 64 + 8 + 8, 384),
    ("dci", DINOV2_S_112, -2, 64, 1152),
])
def test_token_counts_and_projector_width(kind, facts, select, tokens, in_dim):
    conn = build_connector(f"dense_{kind}", spec(facts, text=64, select_layer=select, options={"preset": "derived"}))
    assert conn.num_tokens() == tokens
    assert conn.projector[0].in_features == in_dim


def test_reference_projector_parameter_counts():
    """DCI/7B projector: 3072*4096 + 4096*4096 + biases ~ 29.4M; LLaVA-1.5's mlp2x_gelu: ~21.0M."""
    dci = build_connector("dense_dci", spec(CLIP_L, options={"preset": "reference"}))
    mlp = build_connector("mlp2x_gelu", spec(CLIP_L))
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(dci) == 3072 * 4096 + 4096 + 4096 * 4096 + 4096 == 29_368_320
    assert count(mlp) == 1024 * 4096 + 4096 + 4096 * 4096 + 4096 == 20_979_712


def test_sti_options_two_d_pool_pool_and_efficient():
    s = spec(DINOV2_S_112, text=64, options={"sti_pool": "2d", "alpha": 2})
    assert build_connector("dense_sti", s).num_tokens() == 64 + 2 * 16
    # pool first (8x8 -> 2x2 = 4 tokens), then 1-D alpha over the 4 pooled tokens
    s = spec(DINOV2_S_112, text=64, options={"pool": 4, "alpha": 4})
    assert build_connector("dense_sti", s).num_tokens() == 4 + 1 + 1
    s = spec(CLIP_L, text=64, options={"efficient_grid": 12})
    for kind, n in (("dci", 144), ("sci", 144), ("sti", 144 + 144)):
        assert build_connector(f"dense_{kind}", s).num_tokens() == n
    assert build_connector("mlp2x_gelu", s).num_tokens() == 144


def test_bad_options_give_clear_errors():
    with pytest.raises(ValueError, match="preset 'reference' reproduces the released code"):
        build_connector("dense_dci", spec(DINOV2_S_112, options={"preset": "reference"}))
    with pytest.raises(ValueError, match=re.escape("unknown option(s) ['alfa']")):
        build_connector("dense_sti", spec(CLIP_L, options={"alfa": 4}))
    with pytest.raises(ValueError, match="select_layer must be one int"):
        build_connector("dense_sci", spec(CLIP_L, select_layer=[-2, -1]))
    with pytest.raises(ValueError, match="groups <= 12"):
        build_connector("dense_dci", spec(DINOV2_S_112, options={"groups": 13}))
    with pytest.raises(ValueError, match="projector must be identity, linear or mlpNx_gelu"):
        build_connector("dense_dci", spec(DINOV2_S_112, options={"projector": "conv"}))
    with pytest.raises(ValueError, match="use select_strategy 'default'"):
        build_connector("dense_sti", spec(CLIP_L, select_strategy="full"))


# ---- reference preset == direct re-computation from the hidden states ------------------------------------


def _hidden_states(facts: dict, batch: int = 2, width: int = 16) -> list[torch.Tensor]:
    g, p = facts["grid"], facts["num_prefix_tokens"]
    torch.manual_seed(0)
    return [torch.randn(batch, p + g * g, width) for _ in range(facts["num_vision_layers"] + 1)]


def _prepared(kind: str, facts: dict, hs: list[torch.Tensor], **opts) -> torch.Tensor:
    conn = build_connector(f"dense_{kind}", spec({**facts, "vision_hidden_size": hs[0].shape[-1]}, text=8,
                                                 options={"preset": "reference", **opts}))
    p = facts["num_prefix_tokens"]
    (x,) = conn.prepare([hs[i][:, p:] for i in conn.feature_layers()])
    return x


def test_reference_clip_l_equals_direct_computation():
    hs = _hidden_states(CLIP_L)
    f = lambda i: hs[i][:, 1:]  # noqa: E731  (CLIP: drop CLS)
    # STI: 1-D average pooling of 8 consecutive row-major tokens of hs[7] and hs[15], appended after hs[23].
    pool8 = lambda x: x.reshape(x.shape[0], 72, 8, x.shape[-1]).mean(2)  # noqa: E731
    expected = torch.cat([f(23), pool8(f(7)), pool8(f(15))], dim=1)
    torch.testing.assert_close(_prepared("sti", CLIP_L, hs), expected)
    # SCI: channels [hs[23], hs[7], hs[15]].
    torch.testing.assert_close(_prepared("sci", CLIP_L, hs), torch.cat([f(23), f(7), f(15)], dim=-1))
    # DCI: channels [hs[23], mean hs[0..11], mean hs[12..23]].
    g1 = sum(f(i) for i in range(0, 12)) / 12
    g2 = sum(f(i) for i in range(12, 24)) / 12
    torch.testing.assert_close(_prepared("dci", CLIP_L, hs), torch.cat([f(23), g1, g2], dim=-1))
    # The paper's equation order (final last) is an option.
    torch.testing.assert_close(_prepared("dci", CLIP_L, hs, final_first=False), torch.cat([g1, g2, f(23)], dim=-1))


def test_reference_siglip_equals_direct_computation():
    hs = _hidden_states(SIGLIP_SO)  # 28 states: stem + 27 blocks; select -2 -> hs[26]
    pool8 = lambda x: x[:, :728].reshape(x.shape[0], 91, 8, x.shape[-1]).mean(2)  # noqa: E731
    torch.testing.assert_close(_prepared("sti", SIGLIP_SO, hs),
                               torch.cat([hs[26], pool8(hs[7]), pool8(hs[15])], dim=1))
    g1 = sum(hs[i] for i in range(0, 13)) / 13
    g2 = sum(hs[i] for i in range(13, 26)) / 13
    torch.testing.assert_close(_prepared("dci", SIGLIP_SO, hs), torch.cat([hs[26], g1, g2], dim=-1))
    # The 26-block truncated tower with select_layer -1 is the same preset.
    trunc = {**SIGLIP_SO, "num_vision_layers": 26}
    conn = build_connector("dense_dci", spec({**trunc, "vision_hidden_size": 16}, text=8, select_layer=-1,
                                             options={"preset": "reference"}))
    torch.testing.assert_close(conn.prepare([hs[i] for i in conn.feature_layers()])[0],
                               torch.cat([hs[26], g1, g2], dim=-1))


def test_dci_mean_accumulates_in_fp32():
    hs = [h.to(torch.bfloat16) * 100 + 1000 for h in _hidden_states(CLIP_L, batch=1)]
    x = _prepared("dci", CLIP_L, hs)
    assert x.dtype == torch.bfloat16
    exact = torch.stack([h[:, 1:].double() for h in hs[:12]]).mean(0)
    torch.testing.assert_close(x[..., 16:32].double(), exact.to(torch.bfloat16).double())


def test_released_weights_see_the_final_feature_in_the_first_columns():
    """A released DC projector's first ``width`` input columns belong to the final layer: with the other
    columns zeroed, the output depends on ``hs[23]`` only."""
    hs = _hidden_states(CLIP_L, batch=1, width=16)
    conn = build_connector("dense_dci", spec({**CLIP_L, "vision_hidden_size": 16}, text=8,
                                             options={"preset": "reference"}))
    with torch.no_grad():
        conn.projector[0].weight[:, 16:] = 0
    (x,) = conn.prepare([hs[i][:, 1:] for i in conn.feature_layers()])
    out = conn([x]).tokens
    expected = conn.projector(F.pad(hs[23][:, 1:], (0, 32)))
    torch.testing.assert_close(out, expected)


def test_efficient_dc_is_bilinear_resize_of_the_projected_grid():
    s = spec({**DINOV2_S_112, "vision_hidden_size": 16}, text=8, options={"efficient_grid": 4})
    conn = build_connector("dense_dci", s)
    x = torch.randn(2, 64, 48)
    out = conn([x]).tokens
    assert out.shape == (2, 16, 8) and conn.num_tokens() == 16
    grid = conn.projector(x).transpose(1, 2).reshape(2, 8, 8, 8)
    ref = F.interpolate(grid, size=(4, 4), mode="bilinear", align_corners=False).flatten(2).transpose(1, 2)
    torch.testing.assert_close(out, ref)


# ---- through the model, and training end to end ------------------------------------------------------


TOWER_6 = {"num_hidden_layers": 6}


def _dense_run(tmp_path, kind: str, **options):
    cfg = make_run(tmp_path, vision="clip", connector=f"dense_{kind}", options=options, out=f"run-{kind}")
    cfg.vision.config_overrides = {**cfg.vision.config_overrides, **TOWER_6}
    return cfg


@pytest.mark.parametrize("kind", ["sti", "sci", "dci"])
def test_model_features_match_hidden_states(tmp_path, kind):
    model, _ = build_model(_dense_run(tmp_path, kind))
    model.eval()
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        hs = model.vision_tower(pixel_values=pixels, output_hidden_states=True).hidden_states
        (x,) = model.vision_features(pixels)
    f = lambda i: hs[i][:, 1:]  # noqa: E731
    # 6 blocks: final hs[5]; extras paper layers 2, 4 -> hs[1], hs[3]; groups hs[0..2], hs[3..5]
    if kind == "sti":
        pool = lambda t: F.avg_pool1d(t.transpose(1, 2), 8, 8).transpose(1, 2)  # noqa: E731
        expected = torch.cat([f(5), pool(f(1)), pool(f(3))], dim=1)
    elif kind == "sci":
        expected = torch.cat([f(5), f(1), f(3)], dim=-1)
    else:
        expected = torch.cat([f(5), (f(0) + f(1) + f(2)) / 3, (f(3) + f(4) + f(5)) / 3], dim=-1)
    torch.testing.assert_close(x, expected)
    tokens, _ = model.get_image_features(pixels)
    assert tokens.shape == (2, model.num_image_tokens, 64)


@pytest.mark.parametrize("kind", ["sti", "sci", "dci"])
def test_dense_variants_train_and_round_trip(tmp_path, kind):
    cfg = _dense_run(tmp_path, kind, efficient_grid=2) if kind == "dci" else _dense_run(tmp_path, kind)
    stage = cfg.train.stages[0]
    stage.epochs, stage.max_steps, stage.lr = 100.0, 16, 3e-3
    trainer = Trainer(cfg, progress=False)
    trainer.train()
    curve = losses(trainer.metrics)
    assert sum(curve[-2:]) / 2 < 0.8 * sum(curve[:2]) / 2, curve
    model, _ = load_checkpoint(trainer.run_dir / "final")
    assert model.config.connector_type == f"dense_{kind}"
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        a, _ = trainer.model.eval().get_image_features(pixels)
        b, _ = model.get_image_features(pixels)
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_dense_feature_cache_stores_the_fused_tensor(tmp_path):
    """The cache holds DCI's fused input (one tensor), not the 7 hidden states it reads; training with and
    without the cache gives the same losses."""
    curves = {}
    for cache in (False, True):
        cfg = _dense_run(tmp_path, "dci")
        cfg.train.cache_features = cache
        cfg.train.output_dir = str(tmp_path / f"cache-{cache}")
        trainer = Trainer(cfg, progress=False)
        trainer.train()
        curves[cache] = losses(trainer.metrics)
        if cache:
            store = trainer.store.stores["base"]
            feats = store.batch([next(iter(store._feats))])
            assert [f.shape for f in feats] == [torch.Size([1, 16, 96])]
    assert curves[True] == pytest.approx(curves[False], abs=1e-5)
