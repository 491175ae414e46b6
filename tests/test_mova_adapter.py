"""The MoV-Adapter (``mova`` connector, methods.md §2a): equal to a direct re-computation from the spec, identity at
initialisation, unrouted experts cannot change the output, top-k gating, the reference preset's names/shapes and
``vlweave convert mova``, the derived preset on odd sizes, the gate's text ids from the processor, save -> reload,
bad options.

The model: a tiny CLIP base (32 wide, 4x4 grid) and two experts of other widths and grids (a DINOv2 48 wide on a
6x6 grid, a SigLIP 16 wide on a 2x2 grid, both aligned to 4x4), a tiny BERT gate encoder saved to a folder with its
WordPiece tokenizer (16 wide, so the derived preset adds ``text_proj``).
"""

from __future__ import annotations

import copy
import dataclasses
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from helpers import isolated_env, make_run
from vlweave.builder import build_model, load_checkpoint, load_processor, save_checkpoint
from vlweave.cli import main
from vlweave.config import StageConfig, VisionConfig
from vlweave.connectors import ConnectorSpec, OptionsError, build_connector
from vlweave.connectors.base import TowerInput
from vlweave.connectors.mova import AdapterBlock, MoVAConnector
from vlweave.context import VlweaveContext
from vlweave.mova_convert import convert_state_dict, load_converted
from vlweave.processing import tower_pixels
from vlweave.processor import TEXT_TOKENIZER_DIR, VlweaveProcessor
from vlweave.train.policy import apply_tune_policy
from vlweave.vision.towers import TowerFacts

EXPERTS = {
    "doc": VisionConfig(name="dinov2", image_size=84, random_init=True, select_layer=-1,
                        config_overrides={"hidden_size": 48, "mlp_ratio": 2, "num_hidden_layers": 2,
                                          "num_attention_heads": 2, "patch_size": 14, "image_size": 84}),
    "scene": VisionConfig(name="siglip_vision_model", image_size=16, random_init=True, select_layer=-2,
                          config_overrides={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2,
                                            "num_attention_heads": 2, "patch_size": 8, "image_size": 16}),
}
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "question", "0", "1", ":", "what", "colour", "color", "is", "this",
         "?", "the", "shape", "and", "say", "hi", "."]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    with isolated_env(tmp_path_factory.mktemp("vlweave-cache")):
        yield


def write_tiny_bert(folder: Path) -> Path:
    """A 16-wide one-layer BertModel + a WordPiece tokenizer (lower-casing, [CLS] ... [SEP]) saved as an HF folder."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    tok = Tokenizer(models.WordPiece({w: i for i, w in enumerate(VOCAB)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2),
                                                                                               ("[SEP]", 3)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]")
    torch.manual_seed(7)
    bert = BertModel(BertConfig(vocab_size=len(VOCAB), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=32, max_position_embeddings=64))
    bert.save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder


def mova_run(tmp: Path, bert: Path, **options):
    opts = {"text_encoder": str(bert), "top_k": 2, "num_blocks": 2, "experts": ["doc", "scene"]}
    opts.update(options)
    cfg = make_run(tmp, vision="clip", connector="mova", options=opts, out=f"run-{len(list(tmp.iterdir()))}")
    cfg.towers = copy.deepcopy(EXPERTS)
    return cfg


@pytest.fixture(scope="module")
def setup(env, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mova")
    bert = write_tiny_bert(tmp / "tiny-bert")
    zero_model, tok = build_model(mova_run(tmp, bert))  # paper init (zero-initialised projections)
    cfg = mova_run(tmp, bert, zero_init=False)
    model, _ = build_model(cfg)  # every projection random: the whole computation is exercised
    model.eval(), zero_model.eval()
    images = [Image.new("RGB", (40, 40), c) for c in ("red", "blue", "green")]
    return {"tmp": tmp, "bert": bert, "model": model, "zero": zero_model, "tok": tok, "cfg": cfg, "images": images}


def features(model, images):
    with torch.no_grad():
        return model.tower_features(tower_pixels(model, images))


# ---- a direct re-computation of §2a ----------------------------------------------------------------------------


def ref_rope(x: torch.Tensor, grid: int) -> torch.Tensor:
    """2-D RoPE written from the spec: channel pair (2m, 2m+1) of the first half of a head rotates by
    row * theta^(-2m / (d/2)), the second half by col * theta^(-2m' / (d/2)); rotation of (a, b) -> (a cos - b sin,
    b cos + a sin)."""
    d = x.shape[-1]
    half = d // 2
    out = x.clone()
    for t in range(grid * grid):
        row, col = divmod(t, grid)
        for base_ch, pos in ((0, row), (half, col)):
            for m in range(half // 2):
                angle = pos * 10000.0 ** (-(2 * m) / half)
                c, s = math.cos(angle), math.sin(angle)
                a = x[..., t, base_ch + 2 * m]
                b = x[..., t, base_ch + 2 * m + 1]
                out[..., t, base_ch + 2 * m] = a * c - b * s
                out[..., t, base_ch + 2 * m + 1] = b * c + a * s
    return out


def ref_attention(att, x, kv, heads: int, grid: int) -> torch.Tensor:
    b, n, _ = x.shape
    q = (x @ att.q_proj.weight.T).reshape(b, n, heads, -1).transpose(1, 2)
    k = (kv @ att.k_proj.weight.T).reshape(b, kv.shape[1], heads, -1).transpose(1, 2)
    v = (kv @ att.v_proj.weight.T).reshape(b, kv.shape[1], heads, -1).transpose(1, 2)
    q, k = ref_rope(q, grid), ref_rope(k, grid)
    w = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
    o = (w @ v).transpose(1, 2).reshape(b, n, -1)
    o = F.layer_norm(o, o.shape[-1:], att.inner_attn_ln.weight, att.inner_attn_ln.bias, 1e-5)
    return o @ att.proj.weight.T + att.proj.bias


def ln(x, mod):
    return F.layer_norm(x, x.shape[-1:], mod.weight, mod.bias, mod.eps)


def ref_norm_act2d(x, bn, act: bool):
    y = F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), bn.weight, bn.bias, 1e-5).permute(0, 3, 1, 2)
    return y * torch.sigmoid(y) if act else y


def ref_regblock(x, blk):
    b = blk.b1
    y = ref_norm_act2d(F.conv2d(x, b.conv1.conv.weight), b.conv1.bn, True)
    y = ref_norm_act2d(F.conv2d(y, b.conv2.conv.weight, padding=1, groups=y.shape[1]), b.conv2.bn, True)
    s = F.conv2d(y.mean((2, 3), keepdim=True), b.se.fc1.weight, b.se.fc1.bias)
    s = F.conv2d(s * torch.sigmoid(s), b.se.fc2.weight, b.se.fc2.bias)
    y = y * torch.sigmoid(s)
    y = ref_norm_act2d(F.conv2d(y, b.conv3.conv.weight), b.conv3.bn, False)
    return y + x


def reference_adapter(conn: MoVAConnector, x, experts, text, bits) -> torch.Tensor:
    """methods.md §2a, every expert computed on every image, weights masked: the tokens before the LM MLP."""
    g, heads, k = conn.grid, conn.num_heads, conn.options.top_k
    res = x
    x = x + conn.pos_embed
    for blk in conn.blocks:
        gate = blk.gate
        logits = F.linear(F.gelu(F.linear(torch.cat([text, x.mean(1)], -1), gate[0].weight, gate[0].bias)),
                          gate[2].weight, gate[2].bias)
        p = torch.softmax(logits.float() + (1 - bits) * -1e6, dim=-1)
        top = p.topk(k, dim=-1).indices
        keep = torch.zeros_like(p)
        for i in range(p.shape[0]):
            keep[i, top[i]] = 1
        p = p * keep
        p = p / p.sum(-1, keepdim=True)
        ys = [ref_attention(blk.cross_attn[j], ln(x, blk.norm1[j]), ln(f, blk.norm2[j]), heads, g)
              for j, f in enumerate(experts)]
        mixed = sum(p[:, j, None, None] * y for j, y in enumerate(ys))
        x = x + (bits.sum(-1) > 0).float()[:, None, None] * mixed
        h = ln(x, blk.norm3)
        x = x + ref_attention(blk.self_attn, h, h, heads, g)
        m = blk.mlp
        h = ln(x, blk.norm4)
        inner = F.silu(h @ m.w1.weight.T + m.w1.bias) * (h @ m.w2.weight.T + m.w2.bias)
        x = x + ln(inner, m.ffn_ln) @ m.w3.weight.T + m.w3.bias
    x = (x + res) / 2
    img = x.transpose(1, 2).reshape(x.shape[0], -1, g, g)
    img = ref_regblock(img, conn.downsample[0])
    img = F.adaptive_avg_pool2d(img, g // 2)
    img = ref_regblock(img, conn.downsample[2])
    return img.flatten(2).transpose(1, 2)


def text_feature(conn: MoVAConnector, ctx) -> torch.Tensor:
    with torch.no_grad():
        return conn.text_features(ctx, ctx.num_images, torch.device("cpu"))


ROUTING = [[1, 0], [0, 1], [1, 1]]


def test_adapter_equals_a_direct_recomputation_of_the_spec(setup):
    model = setup["model"]
    conn: MoVAConnector = model.connector
    feats = features(model, setup["images"])
    proc = VlweaveProcessor.from_model(model, setup["tok"])
    batch = proc(text=["What colour is this?", "Say hi.", "What is the shape?"], images=setup["images"])
    ctx = batch["context"]
    ctx.routing = ROUTING
    with torch.no_grad():
        got = model.connector(feats, ctx).tokens
        text = text_feature(conn, ctx)
        x = feats["base"][0]
        want = conn.mlp(reference_adapter(conn, x, [feats["doc"][0], feats["scene"][0]], text,
                                          torch.tensor(ROUTING, dtype=torch.float32)))
    assert got.shape == (3, conn.num_tokens(), model.config.text_config.hidden_size) == (3, 4, 64)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-4), float((got - want).abs().max())
    # the text feature is the encoder's [CLS] of the formatted questions, projected to the base width
    ids = proc.text_tokenizer(["question 0: what colour is this?\n\n"], return_tensors="pt")
    with torch.no_grad():
        cls = conn.text_encoder.model(**ids).last_hidden_state[:, 0]
        assert torch.allclose(text[0], conn.text_proj(cls)[0], atol=1e-6)


def test_expert_features_are_aligned_bilinearly_to_the_base_grid(setup):
    model = setup["model"]
    with torch.no_grad():
        hs = model.vision_towers["doc"](pixel_values=tower_pixels(model, setup["images"][:1])["doc"],
                                        output_hidden_states=True).hidden_states[-1][:, 1:]
    img = hs.transpose(1, 2).reshape(1, 48, 6, 6)
    want = F.interpolate(img, size=(4, 4), mode="bilinear", align_corners=False).flatten(2).transpose(1, 2)
    got = features(model, setup["images"][:1])["doc"][0]
    assert got.shape == (1, 16, 48) and torch.allclose(got, want, atol=1e-6)


def test_at_initialisation_every_block_is_the_identity(setup):
    model = setup["zero"]
    conn: MoVAConnector = model.connector
    feats = features(model, setup["images"])
    x = feats["base"][0]
    text = text_feature(conn, VlweaveContext.for_batch([True] * 3))
    rope = conn.rope(x.device, x.dtype)
    rows = [None, None]
    with torch.no_grad():
        for blk in conn.blocks:
            y = blk(x, [feats["doc"][0], feats["scene"][0]], text, torch.zeros(3, 2), torch.ones(3), rows, rope)
            assert torch.equal(y, x)
        got = conn(feats, VlweaveContext.for_batch([True] * 3)).tokens
        # RegBlocks start as the identity too (zero-initialised last norm): down-sampler = the average pool
        down = conn.downsample(x.transpose(1, 2).reshape(3, 32, 4, 4))
        assert torch.allclose(down, F.adaptive_avg_pool2d(x.transpose(1, 2).reshape(3, 32, 4, 4), 2), atol=1e-6)
        want = conn.mlp(down.flatten(2).transpose(1, 2))
    assert torch.allclose(got, want, atol=1e-6)


def test_an_unrouted_expert_cannot_change_the_output(setup):
    model = setup["model"]
    feats = features(model, setup["images"])
    ctx = VlweaveContext.for_batch([True] * 3, routing=ROUTING)
    with torch.no_grad():
        base = model.connector(feats, ctx).tokens
        changed = {k: [v[0].clone()] for k, v in feats.items()}
        changed["doc"][0][1] = torch.randn_like(changed["doc"][0][1]) * 10  # image 1 is not routed to doc
        changed["scene"][0][0] = torch.randn_like(changed["scene"][0][0]) * 10  # image 0 is not routed to scene
        assert torch.equal(model.connector(changed, ctx).tokens, base)
        routed = {k: [v[0].clone()] for k, v in feats.items()}
        routed["doc"][0][2] += 1.0  # image 2 is routed to doc: its output changes, the others do not
        out = model.connector(routed, ctx).tokens
    assert not torch.allclose(out[2], base[2]) and torch.equal(out[:2], base[:2])
    conn = model.connector
    # what the routing stage reads: the resolved expert order, letters and descriptions
    assert (conn.options.experts, conn.options.letters, conn.options.descriptions) == (
        ("doc", "scene"), ("A", "B"), ("doc", "scene"))
    assert conn.num_routing_tokens == 144
    assert conn.tower_rows("doc", ctx).tolist() == [0, 2] and conn.tower_rows("scene", ctx).tolist() == [1, 2]
    assert conn.tower_rows("base", ctx) is None and conn.tower_rows("doc", VlweaveContext.for_batch([True])) is None


def test_top_k_keeps_k_and_renormalises():
    torch.manual_seed(0)
    blk = AdapterBlock(8, [4, 4, 4, 4], 8, 2, top_k=2, zero_init=False)
    x, text = torch.randn(5, 16, 8), torch.randn(5, 8)
    mask = torch.zeros(5, 4)
    mask[0, 1] = -1e6  # expert 1 not routed for image 0
    with torch.no_grad():
        w = blk.gate_weights(x, text, mask)
        full = torch.softmax(blk.gate(torch.cat([text, x.mean(1)], -1)).float() + mask, -1)
    assert ((w > 0).sum(-1) == 2).all() and torch.allclose(w.sum(-1), torch.ones(5))
    top = full.topk(2, -1)
    for i in range(5):
        assert torch.allclose(w[i, top.indices[i]], top.values[i] / top.values[i].sum())
    assert w[0, 1] == 0 and w.dtype == torch.float32


def test_all_zero_routing_means_no_expert_contribution(setup):
    model = setup["model"]
    feats = features(model, setup["images"])
    with torch.no_grad():
        off = model.connector(feats, VlweaveContext.for_batch([True] * 3, routing=[[0, 0]] * 3)).tokens
        silent = copy.deepcopy(model.connector)
        for blk in silent.blocks:
            for att in blk.cross_attn:
                att.proj.weight.zero_(), att.proj.bias.zero_()
        assert torch.equal(silent(feats, VlweaveContext.for_batch([True] * 3)).tokens, off)
        # routing=None: every expert on (not the reference's crash)
        on = model.connector(feats, VlweaveContext.for_batch([True] * 3)).tokens
        assert torch.equal(on, model.connector(feats, VlweaveContext.for_batch([True] * 3, routing=[[1, 1]] * 3)).tokens)
        assert not torch.allclose(on, off)


def test_routing_pass_pools_to_num_routing_tokens(setup):
    model = setup["model"]
    feats = features(model, setup["images"])
    ctx = VlweaveContext.for_batch([True] * 3, routing=ROUTING)
    ctx.routing_pass = True  # the routing stage's flag (methods.md §2a step 2): bits 0, output pooled
    conn = copy.deepcopy(model.connector)
    object.__setattr__(conn, "options", dataclasses.replace(conn.options, num_routing_tokens=1))
    conn.routing_side = 1
    with torch.no_grad():
        got = conn(feats, ctx).tokens
        zero = conn.adapt(feats["base"][0], [feats["doc"][0], feats["scene"][0]],
                          text_feature(conn, ctx), torch.zeros(3, 2))
        want = conn.mlp(zero.mean(1, keepdim=True))
    assert got.shape == (3, 1, 64) and torch.allclose(got, want, atol=1e-6)
    assert conn.tower_rows("doc", ctx).numel() == 0


def test_bad_routing_names_the_image(setup):
    model = setup["model"]
    feats = features(model, setup["images"][:2])
    for bad in ([[1, 0], [1]], [[1, 0], [2, 0]], [[1, 0], "A"]):
        with pytest.raises(ValueError, match="routing of image 1"):
            model.connector(feats, VlweaveContext.for_batch([True] * 2, routing=bad))


# ---- presets ---------------------------------------------------------------------------------------------------


def hand_spec(width: int, grid: int, experts: dict[str, tuple[int, int]], options: dict, text_hidden: int = 64):
    def tower(c, g):
        return TowerInput(facts=TowerFacts(hidden_size=c, num_layers=2, patch_size=1, image_size=g,
                                           num_prefix_tokens=1), select_layer=-1)

    towers = {"base": tower(width, grid), **{n: tower(c, g) for n, (c, g) in experts.items()}}
    return ConnectorSpec(vision_hidden_size=width, num_vision_layers=2, grid=grid, num_prefix_tokens=1,
                         text_hidden_size=text_hidden, select_layer=-1, options=options, towers=towers)


BERT_LARGE = {"model_type": "bert", "hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16,
              "intermediate_size": 4096, "vocab_size": 30522}
RELEASED_EXPERT_CHANNELS = [1536, 512, 256, 1536, 768, 768, 256]


def released_projector_shapes(channels: list[int], d_text: int) -> dict[str, tuple[int, ...]]:
    """The released MoVAdapter's state dict (TempleX98/MoVA multimodal_projector/builder.py), BERT and RoPE
    buffers aside, written from its module tree: 3 AdapterBlocks, the LM MLP, pos_embed, RegStage/pool/RegStage."""
    c, hidden, e = 1024, int(1024 * 8 / 3), len(channels)
    out: dict[str, tuple[int, ...]] = {"pos_embed": (1, 48 * 48, c), "mlp.0.weight": (d_text, c),
                                       "mlp.0.bias": (d_text,), "mlp.2.weight": (d_text, d_text),
                                       "mlp.2.bias": (d_text,)}

    def attention(prefix: str, kv: int) -> None:
        out.update({f"{prefix}.q_proj.weight": (c, c), f"{prefix}.k_proj.weight": (c, kv),
                    f"{prefix}.v_proj.weight": (c, kv), f"{prefix}.inner_attn_ln.weight": (c,),
                    f"{prefix}.inner_attn_ln.bias": (c,), f"{prefix}.proj.weight": (c, c), f"{prefix}.proj.bias": (c,)})

    for b in range(3):
        p = f"blocks.{b}"
        for j, kv in enumerate(channels):
            attention(f"{p}.cross_attn.{j}", kv)
            out.update({f"{p}.norm1.{j}.weight": (c,), f"{p}.norm1.{j}.bias": (c,), f"{p}.norm2.{j}.weight": (kv,),
                        f"{p}.norm2.{j}.bias": (kv,)})
        attention(f"{p}.self_attn", c)
        out.update({f"{p}.mlp.w1.weight": (hidden, c), f"{p}.mlp.w1.bias": (hidden,),
                    f"{p}.mlp.w2.weight": (hidden, c), f"{p}.mlp.w2.bias": (hidden,),
                    f"{p}.mlp.ffn_ln.weight": (hidden,), f"{p}.mlp.ffn_ln.bias": (hidden,),
                    f"{p}.mlp.w3.weight": (c, hidden), f"{p}.mlp.w3.bias": (c,),
                    f"{p}.norm3.weight": (c,), f"{p}.norm3.bias": (c,), f"{p}.norm4.weight": (c,),
                    f"{p}.norm4.bias": (c,), f"{p}.gate.0.weight": (c, 1024 + c), f"{p}.gate.0.bias": (c,),
                    f"{p}.gate.2.weight": (e, c), f"{p}.gate.2.bias": (e,)})
    for s in (0, 2):
        p = f"downsample.{s}.b1"
        for conv, k, groups in (("conv1", 1, 1), ("conv2", 3, c), ("conv3", 1, 1)):
            out.update({f"{p}.{conv}.conv.weight": (c, c // groups, k, k), f"{p}.{conv}.bn.weight": (c,),
                        f"{p}.{conv}.bn.bias": (c,)})
        out.update({f"{p}.se.fc1.weight": (256, c, 1, 1), f"{p}.se.fc1.bias": (256,),
                    f"{p}.se.fc2.weight": (c, 256, 1, 1), f"{p}.se.fc2.bias": (c,)})
    return out


def test_reference_preset_has_the_released_names_and_shapes():
    from transformers import BertConfig, BertModel

    experts = {f"e{j}": (ch, 37) for j, ch in enumerate(RELEASED_EXPERT_CHANNELS)}
    spec = hand_spec(1024, 48, experts, {"preset": "reference", "text_encoder": None,
                                         "text_encoder_config": BERT_LARGE}, text_hidden=4096)
    with torch.device("meta"):
        conn = build_connector("mova", spec)
        bert = BertModel(BertConfig(**{k: v for k, v in BERT_LARGE.items() if k != "model_type"}),
                         add_pooling_layer=False)
    ours = {k: tuple(v.shape) for k, v in conn.state_dict().items()}
    want = released_projector_shapes(RELEASED_EXPERT_CHANNELS, 4096)
    want.update({f"text_encoder.bert.{k}": tuple(v.shape) for k, v in bert.state_dict().items()})
    assert ours == want
    assert conn.num_tokens() == 576 and conn.head_dim == 64
    # the reference's fixed sizes are enforced, naming the option
    for bad in (hand_spec(512, 48, experts, {"preset": "reference", "text_encoder": None,
                                             "text_encoder_config": BERT_LARGE}),
                hand_spec(1024, 24, experts, {"preset": "reference", "text_encoder": None,
                                              "text_encoder_config": BERT_LARGE})):
        with torch.device("meta"), pytest.raises(OptionsError, match="'preset'"):
            build_connector("mova", bad)


def test_derived_preset_on_odd_widths_and_grids():
    spec = hand_spec(40, 5, {"a": (12, 3), "b": (20, 7)},
                     {"text_encoder": None, "text_blank_ids": [3, 4], "num_heads": 2, "top_k": 1, "num_blocks": 1,
                      "text_encoder_config": {"model_type": "bert", "hidden_size": 24, "num_hidden_layers": 1,
                                              "num_attention_heads": 2, "intermediate_size": 16, "vocab_size": 32}},
                     text_hidden=8)
    torch.manual_seed(0)
    conn = build_connector("mova", spec)
    assert conn.grid == 5 and conn.head_dim == 20 and conn.num_tokens() == 4  # AdaptiveAvgPool2d(5 // 2)
    assert conn.rope(torch.device("cpu"), torch.float32)[0].shape == (25, 20)
    assert conn.text_proj is not None and conn.text_proj.weight.shape == (40, 24)
    assert conn.blocks[0].gate[0].weight.shape == (40, 80)
    a = conn.prepare_tower("a", [torch.randn(2, 1 + 9, 12)])[0]
    b = conn.prepare_tower("b", [torch.randn(2, 1 + 49, 20)])[0]
    base = conn.prepare_tower("base", [torch.randn(2, 25, 40)])[0]
    assert a.shape == (2, 25, 12) and b.shape == (2, 25, 20)
    with torch.no_grad():
        out = conn({"base": [base], "a": [a], "b": [b]}, VlweaveContext.for_batch([True, True], routing=[[1, 0], [1, 1]]))
    assert out.tokens.shape == (2, 4, 8) and torch.isfinite(out.tokens).all()
    # head size must split into 2-D RoPE pairs
    with pytest.raises(OptionsError, match="num_heads"):
        build_connector("mova", dataclasses.replace(spec, options={**spec.options, "num_heads": 4}))


def test_dense_connector_fused_base(setup):
    """The base may be DC-fused (DCI) before the adapter: the adapter's base width is the fused width."""
    cfg = mova_run(setup["tmp"], setup["bert"], base_fusion="dci", base_fusion_options={"groups": 1}, num_heads=2)
    model, _ = build_model(cfg)
    assert model.connector.width == 64 and model.connector.tower_layers()["base"] == [1, 0]
    feats = features(model, setup["images"][:2])
    assert feats["base"][0].shape == (2, 16, 64)
    with torch.no_grad():
        assert model.connector(feats).tokens.shape == (2, 4, 64)


# ---- conversion of released weights --------------------------------------------------------------------------


def test_convert_round_trips_a_released_state_dict(setup, tmp_path, capsys):
    model = setup["model"]
    conn = model.connector
    released = {}
    for k, v in conn.state_dict().items():
        if k.startswith("text_encoder.encoder."):
            k = "text_encoder.bert." + k[len("text_encoder.encoder."):]
        released["model.mm_projector." + k] = v.clone() + 0.5  # different from the model's own values
    cos, sin = conn.rope(torch.device("cpu"), torch.float32)
    released["model.mm_projector.blocks.0.self_attn.rope.freqs_cos"] = cos
    released["model.mm_projector.blocks.0.self_attn.rope.freqs_sin"] = sin
    released["model.mm_projector.text_encoder.bert.pooler.dense.weight"] = torch.zeros(16, 16)
    released["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(2, 2)
    conv = convert_state_dict(released, text_encoder_attr="encoder", rope_reference={"cos": cos, "sin": sin})
    assert set(conv.tensors) == set(conn.state_dict())
    assert [k for k, _ in conv.skipped] == ["model.mm_projector.blocks.0.self_attn.rope.freqs_cos",
                                            "model.mm_projector.blocks.0.self_attn.rope.freqs_sin",
                                            "model.mm_projector.text_encoder.bert.pooler.dense.weight"]
    assert dict(conv.outside) == {"model.layers": 1}
    # a RoPE table for another grid is refused
    with pytest.raises(ValueError, match="RoPE"):
        convert_state_dict(released, text_encoder_attr="encoder", rope_reference={"cos": cos[:4], "sin": sin[:4]})

    # the CLI: convert a file, check it against a saved checkpoint's connector, load it
    from safetensors.torch import save_file

    src = tmp_path / "released.safetensors"
    save_file({k: v.contiguous() for k, v in released.items()}, str(src))
    ckpt = save_checkpoint(model, setup["tok"], tmp_path / "ckpt")
    out = tmp_path / "mova-projector.safetensors"
    assert main(["convert", "mova", str(src), str(out), "--check", str(ckpt)]) == 0
    printed = capsys.readouterr().out
    assert "rope.freqs_cos: RoPE table" in printed and "pooler.dense.weight" in printed and "model.layers" in printed
    loaded = copy.deepcopy(model)
    load_converted(loaded, out)
    for k, v in loaded.connector.state_dict().items():
        assert torch.equal(v, released["model.mm_projector." + k.replace("text_encoder.encoder.",
                                                                          "text_encoder.bert.")]), k
    # a state dict that does not fit is refused with the tensors named
    bad = dict(released)
    bad["model.mm_projector.pos_embed"] = torch.zeros(1, 9, 32)
    save_file({k: v.contiguous() for k, v in bad.items()}, str(src))
    assert main(["convert", "mova", str(src), str(out), "--check", str(ckpt)]) == 2
    assert "pos_embed" in capsys.readouterr().err


# ---- text ids, tune policy, save -> reload -------------------------------------------------------------------


def test_processor_makes_the_gate_text_ids_and_saves_its_tokenizer(setup, tmp_path):
    model = setup["model"]
    proc = VlweaveProcessor.from_model(model, setup["tok"])
    conv = [{"from": "human", "value": "<image>\nWhat Colour?"}, {"from": "gpt", "value": "red"},
            {"from": "human", "value": "And the SHAPE?"}, {"from": "gpt", "value": "circle"}]
    batch = proc(text=[conv, [{"from": "human", "value": "Say hi."}, {"from": "gpt", "value": "hi"}]],
                 images=[setup["images"][0], None])
    text_tok = proc.text_tokenizer
    want = text_tok("question 0: what colour?\n\nquestion 1: and the shape?\n\n")["input_ids"]
    assert want[0] == 2 and want[-1] == 3  # [CLS] ... [SEP]
    assert batch["context"].text_input_ids == [want, text_tok("question 0: say hi.\n\n")["input_ids"]]
    proc.save_pretrained(tmp_path / "p")
    assert (tmp_path / "p" / TEXT_TOKENIZER_DIR / "tokenizer.json").exists()
    again = VlweaveProcessor.from_pretrained(tmp_path / "p")
    assert again.text_ids([["What Colour?", "And the SHAPE?"]]) == [want]
    # right truncation at text_max_length, special tokens kept
    long = proc.text_ids([["what " * 800]])[0]
    assert len(long) == 512 and long[0] == 2 and long[-1] == 3


def test_text_encoder_is_a_component_loaded_from_its_folder(setup):
    from transformers import AutoModel

    model = copy.deepcopy(setup["model"])
    assert "connector.text_encoder" in model.components()
    pretrained = AutoModel.from_pretrained(setup["bert"])
    ours = model.connector.text_encoder.model.state_dict()
    assert all(torch.equal(v, ours[k]) for k, v in pretrained.state_dict().items() if not k.startswith("pooler."))
    stage = StageConfig(name="s", tune={"connector": "full", "connector.text_encoder": "frozen"})
    apply_tune_policy(model, stage, setup["cfg"].train.lora)
    train = {n for n, p in model.named_parameters() if p.requires_grad}
    assert train and all(n.startswith("connector.") and ".text_encoder." not in n for n in train)
    apply_tune_policy(model, StageConfig(name="s", tune={"connector": "full"}), setup["cfg"].train.lora)
    assert all(p.requires_grad for p in model.connector.text_encoder.parameters())  # follows `connector`


def test_save_reload_identical_logits(setup, tmp_path):
    model = setup["model"]
    proc = VlweaveProcessor.from_model(model, setup["tok"])
    batch = proc(text=["What colour is this?", "Say hi.", "What is the shape?"], images=setup["images"])
    batch["context"].routing = ROUTING
    with torch.no_grad():
        logits = model(**batch).logits
    folder = save_checkpoint(model, setup["tok"], tmp_path / "ckpt", processor=proc)
    cfg_text = (folder / "config.json").read_text()
    assert '"text_encoder_config"' in cfg_text and '"experts"' in cfg_text  # reloads without the BERT folder
    again, tok = load_checkpoint(folder)
    proc2 = load_processor(folder, tok)
    batch2 = proc2(text=["What colour is this?", "Say hi.", "What is the shape?"], images=setup["images"])
    batch2["context"].routing = ROUTING
    assert batch2["context"].text_input_ids == batch["context"].text_input_ids
    with torch.no_grad():
        assert torch.equal(again(**batch2).logits, logits)


def test_bad_options_name_the_option(setup):
    spec = setup["model"].connector_spec()
    for options, key in (({"experts": ["doc", "nope"]}, "experts"), ({"experts": ["base", "doc"]}, "experts"),
                         ({"top_k": 3}, "top_k"), ({"top_k": 0}, "top_k"), ({"letters": ["A", "A"]}, "letters"),
                         ({"num_routing_tokens": 10}, "num_routing_tokens"), ({"descriptions": ["x"]}, "descriptions")):
        with pytest.raises(OptionsError, match=f"'{key}'") as err:
            build_connector("mova", dataclasses.replace(spec, options={**spec.options, **options}))
        assert err.value.key == key
    with pytest.raises(OptionsError, match="'text_encoder'"):
        build_connector("mova", dataclasses.replace(spec, options={**spec.options, "text_encoder_config": None,
                                                                   "text_encoder": str(setup["tmp"] / "missing")}))


def test_trains_with_the_text_encoder_frozen_and_reloads(setup, tmp_path):
    from vlweave.train.trainer import Trainer

    cfg = mova_run(setup["tmp"], setup["bert"], num_blocks=1)
    cfg.data.max_samples = 4
    cfg.train.output_dir = str(tmp_path / "run")
    cfg.train.stages = [StageConfig(name="finetune", tune={"connector": "full", "connector.text_encoder": "frozen",
                                                           "language": "full"},
                                    max_steps=6, epochs=6, batch_size=4, lr=1e-3, warmup_ratio=0.0)]
    trainer = Trainer(cfg, progress=False)
    encoder_before = copy.deepcopy(trainer.model.connector.text_encoder.state_dict())
    gate_before = trainer.model.connector.blocks[0].gate[0].weight.detach().clone()
    samples = trainer.stage_samples(0, cfg.train.stages[0])
    examples = list(trainer.encode_used(cfg.train.stages[0], samples, {0, 1}).values())
    ids = trainer.collate(examples)["context"].text_input_ids
    assert ids == [trainer.processor.text_tokenizer("question 0: what color is this?\n\n")["input_ids"]] * 2
    trainer.train()
    losses = [m["loss"] for m in trainer.metrics]
    assert len(losses) == 6 and losses[-1] < losses[0]
    conn = trainer.model.connector
    assert all(torch.equal(v, conn.text_encoder.state_dict()[k]) for k, v in encoder_before.items())
    assert not torch.equal(gate_before, conn.blocks[0].gate[0].weight)
    model, tok = load_checkpoint(tmp_path / "run" / "final")
    assert all(torch.equal(v, model.connector.state_dict()[k]) for k, v in conn.state_dict().items())
    assert load_processor(tmp_path / "run" / "final", tok).text_ids([["What color is this?"]]) == [ids[0]]


def test_training_kernels_switch_the_trained_attention_and_eager_equals_sdpa(setup):
    """``train.attn_implementation`` on a MoVA model: the LM, the trained base tower, the gate's text encoder and
    the adapter's own attention layers train on eager attention; frozen experts keep theirs; everything gets its own
    kernel back; the adapter's eager attention computes what SDPA does."""
    from vlweave.connectors.mova import Attention
    from vlweave.train.attention import training_kernels

    model, _ = build_model(setup["cfg"])
    model.eval()
    apply_tune_policy(model, StageConfig(name="s", tune={"vision": "frozen", "vision.base": "full",
                                                         "connector": "full", "language": "frozen"}),
                      setup["cfg"].train.lora)
    feats = features(model, setup["images"])
    proc = VlweaveProcessor.from_model(model, setup["tok"])
    ctx = proc(text=["What colour is this?", "Say hi.", "What is the shape?"], images=setup["images"])["context"]
    ctx.routing = ROUTING

    def kernels():
        return {"lm": model.language_model.config._attn_implementation,
                "text": model.connector.text_encoder.model.config._attn_implementation,
                **{name: t.config._attn_implementation for name, t in model.vision_towers.items()},
                "adapter": {m.attn_implementation for m in model.modules() if isinstance(m, Attention)}}

    before = kernels()
    assert before["adapter"] == {"sdpa"} and before["lm"] == before["base"] == before["text"] == "sdpa"
    with torch.no_grad():
        want = model.connector(feats, ctx).tokens
    with training_kernels(model, model.language_model, "eager"):
        during = kernels()
        with torch.no_grad():
            got = model.connector(feats, ctx).tokens
    assert during == {**before, "lm": "eager", "text": "eager", "base": "eager", "adapter": {"eager"}}
    assert kernels() == before
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-4), float((got - want).abs().max())


def test_serve_and_the_lmms_plugin_route_a_mova_checkpoint_as_eval_does(setup, tmp_path):
    """`vlweave serve --routing` (one batch of image and text-only requests, and over HTTP) and the lmms-eval
    plugin's ``routing`` give exactly the evaluator's one-by-one answers and routing decisions."""
    from test_serve import KEY, LiveServer, data_url  # the live uvicorn server of tests/test_serve.py

    from vlweave.data.questions import Question
    from vlweave.eval.vqa import generate_answers
    from vlweave.integrations import lmms_eval as plugin
    from vlweave.language.routing import RoutingError
    from vlweave.serve.generation import Prompt, generate_batch
    from vlweave.serve.protocol import ServeLimits

    model, tok = setup["model"], setup["tok"]
    folder = save_checkpoint(model, tok, tmp_path / "ckpt", processor=VlweaveProcessor.from_model(model, tok))
    paths = []
    for k, image in enumerate(setup["images"]):
        paths.append(tmp_path / f"img{k}.png")
        image.save(paths[-1])
    texts = ["What colour is this?", "What is the shape?", "Say hi.", "What colour is this?"]
    qs = [Question(question_id=f"q{k}", text=t, image=None if k == 2 else str(paths[k % 3])) for k, t in enumerate(texts)]
    loaded, ltok = load_checkpoint(folder)
    proc = load_processor(folder, ltok)
    want = {}
    for mode in ("model", "A", "none"):
        decisions: list = []
        want[mode] = generate_answers(loaded, ltok, qs, batch_size=1, max_new_tokens=3, progress=False,
                                      processor=proc, routing=mode, decisions=decisions)
        prompts = [Prompt(input_ids=proc.encode_question(q.text, q.has_image, sample_id=str(q.question_id)),
                          image=Image.open(q.image).convert("RGB") if q.has_image else None, texts=[q.text],
                          max_new_tokens=3) for q in qs]
        got = generate_batch(loaded, proc, prompts, routing=mode)  # one batch: routed rows and a text-only row
        assert [c.text for c in got] == want[mode], mode
        assert [c.routing for c in got] == [None if d is None else d.to_json() for d in decisions], mode
    assert want["A"] != want["none"]  # the routing changes the answers, so the equalities above can fail

    # the lmms-eval plugin: generation requests routed as `vlweave eval --routing A`
    docs = [{"id": k, "image": None if q.image is None else q.image, "question": q.text} for k, q in enumerate(qs)]
    lm = plugin.VlweaveLMM(pretrained=str(folder), routing="A", batch_size=2)
    lm.task_dict = {"tiny": {"test": docs}}
    visual = (lambda d: [Image.open(d["image"]).convert("RGB")] if d["image"] else [])
    requests = [type("I", (), {"args": (d["question"], {"max_new_tokens": 3}, visual, d["id"], "tiny", "test")})()
                for d in docs]
    assert lm.generate_until(requests) == want["A"]
    with pytest.raises(RoutingError, match="'Q'"):
        plugin.VlweaveLMM(pretrained=str(folder), routing="Q")

    # over HTTP: the answer and, as vlweave's extension field, its routing
    srv = LiveServer(folder, ServeLimits(), routing="A")
    try:
        content = [{"type": "image_url", "image_url": {"url": data_url(paths[0].read_bytes())}},
                   {"type": "text", "text": texts[0]}]
        reply = srv.client(KEY).chat.completions.create(model="tiny", messages=[{"role": "user", "content": content}],
                                                        max_tokens=3, temperature=0)
        assert reply.choices[0].message.content == want["A"][0]
        assert reply.model_extra["routing"]["experts"] == ["doc"] and reply.model_extra["routing"]["bits"] == [1, 0]
    finally:
        srv.close()
