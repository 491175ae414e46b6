"""MoVA's MoV-Adapter (arXiv 2404.13046; methods.md §2a): the ``mova`` connector.

::

    base tower  --(fusion: hs[-2] | Dense Connector sci/dci)-->  X [N, g*g, C]          (prepare_tower, cached)
    expert j    --(its select_layer, bilinear fp32 to g x g)--->  F_j [N, g*g, C_j]     (prepare_tower, cached)
    gate text   --(HF encoder, [CLS] of "question i: <q lower-cased>\\n\\n"...)-->  t [N, C_t]

    res = X ; X = X + pos_embed                                   (zero-init [1, g*g, C])
    L blocks:
        p = top-k renormalised softmax_fp32(gate([t, mean_tokens(X)]) + (1 - r) * -1e6)   (gate's last Linear 0-init)
        X = X + any(r) * sum_j p_j * CrossAttn_j(LN(X), LN(F_j))    (only on the images routed to j)
        X = X + SelfAttn(LN(X)) ; X = X + SwiGLU(LN(X))
    X = (X + res) / 2
    X -> [N, C, g, g] -> RegBlock -> AdaptiveAvgPool2d(g // 2) -> RegBlock -> Linear -> GELU -> Linear (to the LM)

Attention (every cross- and self-attention): separate q/k/v Linears without bias (k/v at the key side's width),
2-D RoPE on q and k (EVA's "fast" vision rotary: half of each head's channels rotate with the row index, half
with the column index, in interleaved pairs), softmax(q k^T / sqrt(d)), a LayerNorm over the concatenated heads
("sub-LN") and an output Linear that starts at zero, so every block is the identity at initialisation.
RegBlock: timm's RegNet ``Bottleneck`` as the released code builds it through ``RegStage`` (1x1 conv -> 3x3
depthwise conv -> squeeze-excite (ratio 0.25 of the input width) -> 1x1 conv, each conv followed by timm's
``LayerNormAct2d`` (eps 1e-5, SiLU inside the norm, none after the last), identity shortcut, last norm weight
zero-initialised), written here without timm (methods.md §2a, the Honeybee C-Abstractor block).

Presets (option ``preset``):

- ``derived`` (default): any base width, head count, grid and text encoder.  RoPE is built for the real grid and
  head size; the gate's text slot is the base width, with a ``text_proj`` Linear when the text encoder's width
  differs (the released code hard-codes 1024 + 1024 because BERT-large and CLIP-L are both 1024 wide).
- ``reference``: parameter names and shapes equal the released ``MoVAdapter`` (TempleX98/MoVA,
  ``mova/model/multimodal_projector/builder.py``), so its projector weights load by name (``vlweave convert mova``,
  :mod:`vlweave.mova_convert`); the reference's fixed sizes are required: base width 1024, 16 heads of 64, a 48 x 48
  grid (its RoPE tables are built for 48 x 48), a 1024-wide text encoder.

Deliberate differences from the released code (docs/mova.md): ``top_k`` is read from this connector's own option
(the reference stores ``config.topk`` but reads ``config.topk_experts``, methods.md §2f.1); ``routing = None`` means
"every expert on" (the reference adds ``None`` to the logits and fails); unrouted experts are skipped per image in
every batch, in training too (the reference skips only at batch 1 in eval), which is exact because their gate
weight is 0.

Routing bits come from ``context.routing`` (one entry per image: ``len(experts)`` 0/1 values, or None = all on).
``context.routing_pass`` (set by MoVA's coarse routing stage) runs the adapter with every bit 0 and average-pools
its output to ``num_routing_tokens``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from vlweave.connectors.base import (
    BASE_TOWER,
    Connector,
    ConnectorOutput,
    ConnectorSpec,
    ContractExample,
    TextInput,
    register,
)
from vlweave.connectors.fusion import build_fusion
from vlweave.connectors.options import OptionsError

DEFAULT_TEXT_ENCODER = "all-minilm-l6-v2"  # the offline asset (vlweave.assets): MiniLM-L6 BERT, 384 wide
QUESTION_TEMPLATE = "question {i}: {text}\n\n"  # per user question, lower-cased, concatenated (the released code)
ROPE_THETA = 10000.0
MASK_VALUE = -1e6  # added to the logits of unrouted experts (the released value)

# The released MoVAdapter's fixed sizes (preset: reference).
REFERENCE_WIDTH = 1024
REFERENCE_HEADS = 16
REFERENCE_GRID = 48
REFERENCE_TEXT_WIDTH = 1024


@dataclass(frozen=True)
class MoVAOptions:
    """Options of the ``mova`` connector (typed; see the module docstring and docs/mova.md)."""

    # Expert tower names (the run config's ``towers:``); this order is the routing-bit order.  None: every tower
    # but the base one, in config order.
    experts: tuple[str, ...] | None = None
    letters: tuple[str, ...] | None = None  # routing letter of each expert (default A, B, C, ...)
    # One routing-pool sentence per expert (read by the routing stage); default: the expert's tower name.
    descriptions: tuple[str, ...] | None = None
    num_blocks: int = field(default=3, metadata={"min": 1})
    top_k: int = field(default=3, metadata={"min": 1})
    num_heads: int | None = field(default=None, metadata={"min": 1})  # None: width // 64 (at least 1)
    preset: Literal["derived", "reference"] = "derived"
    # The gate's text encoder: an asset name or a local folder of any HF encoder with its tokenizer; None: a
    # randomly initialised encoder built from ``text_encoder_config``, reading the LM tokenizer's ids.
    text_encoder: str | None = DEFAULT_TEXT_ENCODER
    # The encoder's HF config as a dict (with ``model_type``).  Filled from the folder when the model is built, so a
    # saved checkpoint reloads without the folder.
    text_encoder_config: Any = None
    # Ids the encoder reads for an image with no text (its tokenizer's encoding of ""; filled at build).
    text_blank_ids: tuple[int, ...] | None = None
    text_max_length: int = field(default=512, metadata={"min": 2})
    num_routing_tokens: int = field(default=144, metadata={"min": 1})  # visual tokens of the routing pass
    # Another wording of the routing prompt's instruction (None: vlweave's default, language/routing.py); read by
    # the routing stage through ``RoutingPool.from_connector``.
    routing_instruction: str | None = None
    # Dense Connector before the adapter: the base tower's hidden states fused by ``build_fusion`` (``sci``/``dci``
    # integrate layers on channels, so the adapter's base width becomes the fused width).
    base_fusion: Literal["layers", "sci", "dci"] = "layers"
    base_fusion_options: Any = None  # that fusion's options, e.g. {"groups": 2, "pool": 2}
    # False: the projections the paper starts at zero get PyTorch's default init instead (an ablation; also lets a
    # first training step reach every parameter).
    zero_init: bool = True


# ---- building blocks -------------------------------------------------------------------------------------------


def rope_tables(grid: int, head_dim: int, theta: float = ROPE_THETA) -> tuple[torch.Tensor, torch.Tensor]:
    """EVA-style 2-D rotary tables ``(cos, sin)`` of shape ``[grid * grid, head_dim]`` for row-major tokens.

    Each axis gets ``head_dim // 2`` channels (first half: the row index, second half: the column index) with
    ``head_dim // 4`` frequencies ``theta ** (-2k / (head_dim // 2))``, each repeated for an interleaved pair."""
    if head_dim % 4:
        raise OptionsError(f"mova: 2-D RoPE needs a head size divisible by 4, got {head_dim} (set num_heads)",
                           key="num_heads")
    axis = head_dim // 2
    freqs = 1.0 / (theta ** (torch.arange(0, axis, 2, dtype=torch.float32) / axis))
    pos = torch.arange(grid, dtype=torch.float32)
    angles = (pos[:, None] * freqs[None, :]).repeat_interleave(2, dim=-1)  # [grid, axis]
    table = torch.cat([angles[:, None, :].expand(grid, grid, axis), angles[None, :, :].expand(grid, grid, axis)],
                      dim=-1).reshape(grid * grid, head_dim)
    return table.cos(), table.sin()


def rotate_pairs(x: torch.Tensor) -> torch.Tensor:
    """Interleaved-pair rotation: ``(x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...)``."""
    pairs = x.unflatten(-1, (-1, 2))
    return torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + rotate_pairs(x) * sin


class Attention(nn.Module):
    """Multi-head attention of the MoV-Adapter (names as the released ``Attention``): ``q_proj`` (query width),
    ``k_proj``/``v_proj`` (key width), no biases; RoPE on q and k; ``inner_attn_ln`` (sub-LN); ``proj``."""

    def __init__(self, dim: int, kv_dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        # "sdpa" (PyTorch's kernel) or "eager" (the same softmax written out: its CPU backward is a few matmuls,
        # not the slow SDPA one); the trainer switches it with the LM's (train.attn_implementation).
        self.attn_implementation = "sdpa"
        inner = dim  # head_dim * num_heads = dim (head_dim = dim // num_heads)
        self.q_proj = nn.Linear(dim, inner, bias=False)
        self.k_proj = nn.Linear(kv_dim, inner, bias=False)
        self.v_proj = nn.Linear(kv_dim, inner, bias=False)
        self.inner_attn_ln = nn.LayerNorm(inner)
        self.proj = nn.Linear(inner, dim)

    def forward(self, x: torch.Tensor, kv: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        b, n, _ = x.shape
        h = self.num_heads
        q = self.q_proj(x).unflatten(-1, (h, -1)).transpose(1, 2)  # [B, H, N, d]
        k = self.k_proj(kv).unflatten(-1, (h, -1)).transpose(1, 2)
        v = self.v_proj(kv).unflatten(-1, (h, -1)).transpose(1, 2)
        cos, sin = rope
        q = apply_rope(q, cos, sin).to(v.dtype)
        k = apply_rope(k, cos, sin).to(v.dtype)
        if self.attn_implementation == "eager":
            weights = torch.softmax((q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5, dim=-1, dtype=torch.float32)
            out = weights.to(v.dtype) @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v)  # scale 1/sqrt(d), as the reference
        return self.proj(self.inner_attn_ln(out.transpose(1, 2).reshape(b, n, -1)))


class SwiGLU(nn.Module):
    """``w3(LN(SiLU(w1 x) * w2 x))`` (the released ``SwiGLU`` with its inner ``ffn_ln``)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden)
        self.w2 = nn.Linear(dim, hidden)
        self.ffn_ln = nn.LayerNorm(hidden)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w3(self.ffn_ln(F.silu(self.w1(x)) * self.w2(x)))


class AdapterBlock(nn.Module):
    """One MoV-Adapter block: dynamic gating, one cross-attention per expert, self-attention, SwiGLU FFN."""

    def __init__(self, dim: int, expert_dims: Sequence[int], text_dim: int, num_heads: int, top_k: int,
                 zero_init: bool) -> None:
        super().__init__()
        self.top_k = top_k
        self.cross_attn = nn.ModuleList(Attention(dim, c, num_heads) for c in expert_dims)
        self.norm1 = nn.ModuleList(nn.LayerNorm(dim) for _ in expert_dims)  # query side, per expert
        self.norm2 = nn.ModuleList(nn.LayerNorm(c) for c in expert_dims)  # expert side
        self.mlp = SwiGLU(dim, int(dim * 8 / 3))
        self.self_attn = Attention(dim, dim, num_heads)
        self.norm3 = nn.LayerNorm(dim)
        self.norm4 = nn.LayerNorm(dim)
        self.gate = nn.Sequential(nn.Linear(text_dim + dim, dim), nn.GELU(), nn.Linear(dim, len(expert_dims)))
        if zero_init:
            zeros = [self.self_attn.proj, self.mlp.w3, self.gate[-1], *(a.proj for a in self.cross_attn)]
            for lin in zeros:
                nn.init.zeros_(lin.weight)
                nn.init.zeros_(lin.bias)

    def gate_weights(self, x: torch.Tensor, text: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``[N, E]`` fp32 expert weights: softmax over routed experts, top-k kept and renormalised."""
        logits = self.gate(torch.cat([text, x.mean(1)], dim=-1))
        probs = torch.softmax(logits.float() + mask, dim=-1)
        k = min(self.top_k, probs.shape[-1])
        keep = torch.zeros_like(probs).scatter_(1, probs.topk(k, dim=-1).indices, 1.0)
        probs = probs * keep
        return probs / probs.sum(-1, keepdim=True)

    def forward(self, x: torch.Tensor, experts: Sequence[torch.Tensor | None], text: torch.Tensor,
                mask: torch.Tensor, any_routed: torch.Tensor, rows: Sequence[torch.Tensor | None],
                rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        weights = self.gate_weights(x, text, mask).to(x.dtype)
        mixed = torch.zeros_like(x)
        for j, feat in enumerate(experts):
            r = rows[j]
            if r is None:  # every image routed to expert j
                y = self.cross_attn[j](self.norm1[j](x), self.norm2[j](feat), rope)
                mixed = mixed + weights[:, j, None, None] * y
            elif r.numel():  # only the routed images; the others contribute exactly 0 (their weight is 0)
                y = self.cross_attn[j](self.norm1[j](x[r]), self.norm2[j](feat[r]), rope)
                mixed = mixed.index_add(0, r, weights[r, j, None, None] * y)
        x = x + any_routed.to(x.dtype)[:, None, None] * mixed
        x = x + self.self_attn(self.norm3(x), self.norm3(x), rope)
        return x + self.mlp(self.norm4(x))


class LayerNormAct2d(nn.LayerNorm):
    """timm's ``LayerNormAct2d``: LayerNorm over the channels of an NCHW map (eps 1e-5), then the activation."""

    def __init__(self, channels: int, act: bool = True) -> None:
        super().__init__(channels, eps=1e-5)
        self.act = nn.SiLU() if act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps)
        return self.act(x.permute(0, 3, 1, 2))


class ConvNormAct(nn.Module):
    """timm's ``ConvNormAct`` (conv without bias -> ``bn`` = LayerNormAct2d); names ``conv``, ``bn``."""

    def __init__(self, cin: int, cout: int, kernel: int, groups: int = 1, act: bool = True) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, padding=kernel // 2, groups=groups, bias=False)
        self.bn = LayerNormAct2d(cout, act=act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


class SqueezeExcite(nn.Module):
    """timm's ``SEModule``: global mean -> 1x1 conv ``fc1`` -> SiLU -> 1x1 conv ``fc2`` -> sigmoid gate."""

    def __init__(self, channels: int, reduced: int) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(channels, reduced, 1)
        self.fc2 = nn.Conv2d(reduced, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.fc2(F.silu(self.fc1(x.mean((2, 3), keepdim=True))))
        return x * torch.sigmoid(s)


class RegBottleneck(nn.Module):
    """timm's RegNet ``Bottleneck`` as MoVA/Honeybee configure it (bottle ratio 1, group size 1 = depthwise 3x3,
    SE ratio 0.25 of the input width, linear output, identity shortcut)."""

    def __init__(self, channels: int, zero_init: bool) -> None:
        super().__init__()
        self.conv1 = ConvNormAct(channels, channels, 1)
        self.conv2 = ConvNormAct(channels, channels, 3, groups=channels)
        self.se = SqueezeExcite(channels, max(1, int(round(channels * 0.25))))
        self.conv3 = ConvNormAct(channels, channels, 1, act=False)
        if zero_init:
            nn.init.zeros_(self.conv3.bn.weight)  # timm's zero_init_last: the block starts as the identity

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv3(self.se(self.conv2(self.conv1(x)))) + x


class RegBlock(nn.Module):
    """A one-block timm ``RegStage`` (its only child is ``b1``, as in the released state dict)."""

    def __init__(self, channels: int, zero_init: bool) -> None:
        super().__init__()
        self.b1 = RegBottleneck(channels, zero_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b1(x)


class GateTextEncoder(nn.Module):
    """Holds the HF text encoder under ``bert`` (reference names: the released code keeps a ``BertLMHeadModel``
    whose head is removed, so its weights are ``text_encoder.bert.*``) or ``encoder`` (derived)."""

    def __init__(self, model: nn.Module, attr: str) -> None:
        super().__init__()
        self.attr = attr
        setattr(self, attr, model)

    @property
    def model(self) -> nn.Module:
        return getattr(self, self.attr)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The first token's last hidden state (BERT's [CLS]) ``[B, hidden]``."""
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, return_dict=True)
        return out.last_hidden_state[:, 0]


def _encoder_config(options: MoVAOptions):
    """The text encoder's HF config: the option's dict, else the folder's ``config.json``."""
    from transformers import AutoConfig

    if options.text_encoder_config is not None:
        data = dict(options.text_encoder_config)
        if "model_type" not in data:
            raise OptionsError("mova: option 'text_encoder_config' needs a 'model_type'", key="text_encoder_config")
        return AutoConfig.for_model(data.pop("model_type"), **data)
    if options.text_encoder is None:
        raise OptionsError("mova: give option 'text_encoder' (an HF encoder folder or asset name) or "
                           "'text_encoder_config' (a config dict for a randomly initialised encoder)",
                           key="text_encoder")
    folder = _resolve(options.text_encoder)
    try:
        return AutoConfig.from_pretrained(folder)
    except Exception as err:  # noqa: BLE001  (a missing or broken folder: name the option and the path)
        raise OptionsError(f"mova: option 'text_encoder' = {options.text_encoder!r}: no HF encoder config at "
                           f"{folder} ({type(err).__name__}: {err})", key="text_encoder") from None


def _resolve(name: str) -> str:
    from vlweave import assets

    try:
        return assets.resolve(name)
    except Exception as err:  # noqa: BLE001  (name the option and the path in whatever went wrong)
        raise OptionsError(f"mova: text_encoder {name!r} could not be prepared: {err}", key="text_encoder") from None


def _clean_config_dict(cfg) -> dict[str, Any]:
    data = cfg.to_dict()
    for key in ("_attn_implementation_autoset", "transformers_version", "architectures", "dtype", "torch_dtype",
                "_name_or_path", "_commit_hash"):
        data.pop(key, None)
    return data


# ---- the connector ---------------------------------------------------------------------------------------------


class MoVAConnector(Connector):
    """The MoV-Adapter as a vlweave connector (see the module docstring)."""

    options_class = MoVAOptions
    options: MoVAOptions

    # ``Connector.text_encoder`` is a class attribute (a tokenization mode) there; here it is the encoder module,
    # whose reference name is ``text_encoder``.  A property (a data descriptor) makes the module win the lookup.
    @property
    def text_encoder(self) -> "GateTextEncoder":  # type: ignore[override]
        return self._modules["text_encoder"]  # type: ignore[return-value]

    def __init__(self, spec: ConnectorSpec) -> None:
        super().__init__(spec)
        o = self.options
        if not spec.towers:
            raise OptionsError("mova needs the model's named towers (a base tower and at least one expert)")
        others = [n for n in spec.towers if n != BASE_TOWER]
        self.experts: list[str] = list(o.experts) if o.experts is not None else others
        unknown = [n for n in self.experts if n not in others]
        if unknown or not self.experts or len(set(self.experts)) != len(self.experts):
            raise OptionsError(f"mova: option 'experts' {self.experts} must name distinct towers of the model other "
                               f"than {BASE_TOWER!r} (unknown: {unknown}; expert towers: {others})", key="experts")
        n_exp = len(self.experts)
        self.letters = list(o.letters) if o.letters is not None else [chr(ord("A") + i) for i in range(n_exp)]
        if len(self.letters) != n_exp or len(set(self.letters)) != n_exp or not all(self.letters):
            raise OptionsError(f"mova: option 'letters' {self.letters} must give {n_exp} distinct non-empty letters, "
                               f"one per expert {self.experts}", key="letters")
        if o.descriptions is not None and len(o.descriptions) != n_exp:
            raise OptionsError(f"mova: option 'descriptions' has {len(o.descriptions)} entries for {n_exp} experts "
                               f"{self.experts}", key="descriptions")
        if o.top_k > n_exp:
            raise OptionsError(f"mova: option 'top_k' = {o.top_k} is out of range: 1 <= top_k <= {n_exp} (the number "
                               f"of experts)", key="top_k")
        side = math.isqrt(o.num_routing_tokens)
        if side * side != o.num_routing_tokens:
            raise OptionsError(f"mova: option 'num_routing_tokens' = {o.num_routing_tokens} must be a square (the "
                               f"routing pass pools the output grid to n x n)", key="num_routing_tokens")
        self.routing_side = side
        # The resolved lists, so that readers of ``connector.options`` (the routing stage) see what is used.
        descriptions = tuple(o.descriptions) if o.descriptions is not None else tuple(self.experts)
        self.options = dataclasses.replace(o, experts=tuple(self.experts), letters=tuple(self.letters),
                                           descriptions=descriptions)
        o = self.options

        # Base input: a fusion of the base tower's hidden states (plain hs[select_layer], or Dense Connector).
        self.fusion = build_fusion(o.base_fusion, spec, dict(o.base_fusion_options or {}))
        layout = self.fusion.layout()
        if layout.extra:
            raise OptionsError("mova: the base fusion must keep a plain patch grid (no extra tokens)", key="base_fusion")
        self.grid = layout.grid
        self.num_prefix = layout.prefix
        if self.grid < 2:
            raise OptionsError(f"mova: the base grid must be at least 2 x 2 (the down-sampler halves it); got "
                               f"{self.grid} x {self.grid}", key="base_fusion_options")
        width = self.fusion.out_channels
        self.width = width

        from vlweave.vision.towers import normalize_layers

        self.expert_layers: dict[str, int] = {}
        self.expert_shapes: dict[str, tuple[int, int, int]] = {}
        for name in self.experts:
            t = spec.towers[name]
            layers = normalize_layers(t.select_layer, t.facts.num_layers)
            if len(layers) != 1:
                raise OptionsError(f"mova: expert {name!r} must select one hidden state; its select_layer is "
                                   f"{t.select_layer!r}", key="experts")
            self.expert_layers[name] = layers[0]
            self.expert_shapes[name] = tuple(t.facts.layer_shape(layers[0]))  # type: ignore[assignment]
        expert_dims = [self.expert_shapes[n][0] for n in self.experts]

        heads = o.num_heads if o.num_heads is not None else max(1, width // 64)
        if width % heads:
            raise OptionsError(f"mova: option 'num_heads' = {heads} must divide the base width {width}",
                               key="num_heads")
        self.num_heads = heads
        self.head_dim = width // heads
        if self.head_dim % 4:
            raise OptionsError(f"mova: 2-D RoPE needs a head size divisible by 4; width {width} / num_heads {heads} "
                               f"= {self.head_dim} (set option 'num_heads')", key="num_heads")

        enc_cfg = _encoder_config(o)
        text_width = int(enc_cfg.hidden_size)
        if o.preset == "reference":
            problems = []
            if width != REFERENCE_WIDTH:
                problems.append(f"base width {width} (needs {REFERENCE_WIDTH})")
            if heads != REFERENCE_HEADS:
                problems.append(f"num_heads {heads} (needs {REFERENCE_HEADS})")
            if self.grid != REFERENCE_GRID:
                problems.append(f"grid {self.grid} x {self.grid} (its RoPE is built for {REFERENCE_GRID} x "
                                f"{REFERENCE_GRID})")
            if text_width != REFERENCE_TEXT_WIDTH:
                problems.append(f"text encoder width {text_width} (needs {REFERENCE_TEXT_WIDTH}, BERT-large)")
            if problems:
                raise OptionsError("mova: option 'preset' = 'reference' has the released adapter's fixed sizes; "
                                   "this model has " + "; ".join(problems) + ". Use preset: derived.", key="preset")
        text_slot = text_width if o.preset == "reference" or text_width == width else width
        self.text_width = text_width

        # Creation order follows the released MoVAdapter (blocks, mlp, text encoder, pos_embed, downsample).
        self.blocks = nn.ModuleList(AdapterBlock(width, expert_dims, text_slot, heads, o.top_k, o.zero_init)
                                    for _ in range(o.num_blocks))
        d_text = spec.text_hidden_size
        self.mlp = nn.Sequential(nn.Linear(width, d_text), nn.GELU(), nn.Linear(d_text, d_text))
        self.text_encoder = GateTextEncoder(self._build_encoder(enc_cfg), "bert" if o.preset == "reference"
                                            else "encoder")
        self.text_proj = nn.Linear(text_width, width) if text_slot != text_width else None
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid * self.grid, width))
        self.downsample = nn.Sequential(RegBlock(width, o.zero_init), nn.AdaptiveAvgPool2d(self.grid // 2),
                                        RegBlock(width, o.zero_init))
        self._blank_ids = list(o.text_blank_ids) if o.text_blank_ids is not None else None
        self._rope_cache: dict[tuple[str, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}

    # ---- the text encoder ----------------------------------------------------------------------------------
    @staticmethod
    def _build_encoder(cfg) -> nn.Module:
        from transformers import AutoModel

        model = AutoModel.from_config(cfg)
        if getattr(model, "pooler", None) is not None:
            model.pooler = None  # only the first token's hidden state is read (the released BertLMHeadModel has none)
        return model

    def text_source(self) -> str:
        """``encoder`` (the text encoder's own tokenizer) or ``language`` (the LM's, for a config-only encoder)."""
        return "encoder" if self.options.text_encoder is not None else "language"

    def text_input(self) -> TextInput:
        folder = _resolve(self.options.text_encoder) if self.options.text_encoder is not None else None
        return TextInput(source=self.text_source(), tokenizer_path=folder, template=QUESTION_TEMPLATE,
                         separator="", lowercase=True, max_length=self.options.text_max_length,
                         add_special_tokens=self.text_source() == "encoder")

    def load_pretrained(self) -> None:
        """The text encoder's pretrained weights from its folder (a fresh build; a reload takes the checkpoint's)."""
        if self.options.text_encoder is None or self.pos_embed.is_meta:
            return  # nothing to load into (a config-only encoder, or a model built on the meta device for shapes)
        from transformers import AutoModel

        folder = _resolve(self.options.text_encoder)
        try:
            pretrained = AutoModel.from_pretrained(folder, dtype=torch.float32)
        except Exception as err:  # noqa: BLE001
            raise OptionsError(f"mova: text_encoder {self.options.text_encoder!r} ({folder}) failed to load: {err}",
                               key="text_encoder") from None
        state = {k: v for k, v in pretrained.state_dict().items() if not k.startswith("pooler.")}
        missing, unexpected = self.text_encoder.model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise OptionsError(f"mova: text_encoder {folder}: weights do not fit its config (missing {missing[:5]}, "
                               f"unexpected {unexpected[:5]})", key="text_encoder")

    def resolved_options(self) -> dict[str, Any]:
        """The expert order (config.json sorts the towers' keys, and the order is the routing-bit order), the
        encoder's config and blank ids (so the saved config reloads without the encoder's folder)."""
        out: dict[str, Any] = {"experts": list(self.experts)}
        if self.options.text_encoder is None:
            return out
        out["text_encoder_config"] = _clean_config_dict(self.text_encoder.model.config)
        out["text_blank_ids"] = list(self.blank_ids())
        return out

    def blank_ids(self) -> list[int]:
        """What the encoder reads for an image whose sample has no text: the tokenizer's encoding of ""."""
        if self._blank_ids is None:
            ids: list[int] = []
            if self.options.text_encoder is not None:
                from transformers import AutoTokenizer

                ids = AutoTokenizer.from_pretrained(_resolve(self.options.text_encoder))("")["input_ids"]
            self._blank_ids = list(ids) or [0]
        return self._blank_ids

    def text_features(self, context: Any, n_images: int, device: torch.device) -> torch.Tensor:
        """``[N_images, C_t]``: the encoder's first-token state for each image's sample (``context.text_input_ids``
        is per batch row; ``context.image_rows`` maps images to rows)."""
        ids_by_row = getattr(context, "text_input_ids", None)
        rows = getattr(context, "image_rows", None)
        if ids_by_row is None:
            seqs = [self.blank_ids()] * n_images
        else:
            if rows is None:
                rows = torch.arange(n_images)
            if int(rows.numel()) != n_images:
                raise ValueError(f"mova: context.image_rows lists {int(rows.numel())} images, the features have "
                                 f"{n_images}")
            seqs = [list(ids_by_row[int(r)]) or self.blank_ids() for r in rows.tolist()]
        limit = self.options.text_max_length
        seqs = [s[:limit] for s in seqs]
        longest = max(len(s) for s in seqs)
        ids = torch.zeros(n_images, longest, dtype=torch.long)
        mask = torch.zeros(n_images, longest, dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
            mask[i, : len(s)] = 1
        enc = self.text_encoder
        trains = any(p.requires_grad for p in enc.parameters())
        with torch.set_grad_enabled(torch.is_grad_enabled() and trains):
            feats = enc(ids.to(device), mask.to(device))
        return feats if self.text_proj is None else self.text_proj(feats.to(self.text_proj.weight.dtype))

    # ---- routing -------------------------------------------------------------------------------------------
    def routing_bits(self, context: Any, n_images: int) -> torch.Tensor | None:
        """``[N_images, E]`` float 0/1 routing bits, or None when every expert is on for every image
        (``context.routing`` absent).  All zeros on the routing pass."""
        e = len(self.experts)
        if bool(getattr(context, "routing_pass", False)):
            return torch.zeros(n_images, e)
        routing = getattr(context, "routing", None)
        if routing is None:
            return None
        if len(routing) != n_images:
            raise ValueError(f"mova: context.routing has {len(routing)} entries for {n_images} images")
        out = torch.ones(n_images, e)
        for i, bits in enumerate(routing):
            if bits is None:
                continue  # no routing information for this image: every expert on
            ok = isinstance(bits, (list, tuple)) and len(bits) == e and all(
                isinstance(b, (bool, int)) and int(b) in (0, 1) for b in bits)
            if not ok:
                raise ValueError(f"mova: routing of image {i} is {bits!r}; expected {e} bits (0/1), one per expert "
                                 f"{self.experts}")
            out[i] = torch.tensor([float(b) for b in bits])
        return out

    def tower_rows(self, tower: str, context: Any) -> torch.Tensor | None:
        """The images an expert must run on (its routing bit is 1); None = every image (the base tower, or no
        routing information)."""
        if tower not in self.experts:
            return None
        n = getattr(context, "num_images", None)
        if n is None:
            rows = getattr(context, "image_rows", None)
            routing = getattr(context, "routing", None)
            n = int(rows.numel()) if rows is not None else (len(routing) if routing is not None else None)
        if n is None:
            return None
        bits = self.routing_bits(context, n)
        if bits is None:
            return None
        return bits[:, self.experts.index(tower)].nonzero().flatten()

    # ---- facts ---------------------------------------------------------------------------------------------
    @property
    def num_routing_tokens(self) -> int:
        return self.options.num_routing_tokens

    def tower_layers(self) -> dict[str, list[int]]:
        return {BASE_TOWER: list(self.fusion.layers), **{n: [self.expert_layers[n]] for n in self.experts}}

    def feature_layers(self) -> list[int]:
        return list(self.fusion.layers)

    def prepare_signature(self, tower: str = BASE_TOWER) -> dict[str, Any]:
        if tower == BASE_TOWER:
            return {"mova_base": self.fusion.signature()}
        return {"align": "bilinear", "grid": self.grid}

    def num_tokens(self, grid: int | None = None) -> int:
        g = self.fusion.layout(grid).grid // 2
        return g * g

    # ---- parameter-free part (cached per tower) ------------------------------------------------------------
    def prepare_tower(self, tower: str, features: list[torch.Tensor]) -> list[torch.Tensor]:
        if tower == BASE_TOWER:
            return [self.fusion(features)]
        if tower not in self.experts:
            return features
        (x,) = features
        channels, gh, gw = self.expert_shapes[tower]
        x = x[:, x.shape[1] - gh * gw:]  # patch tokens only
        if (gh, gw) == (self.grid, self.grid):
            return [x]
        img = x.transpose(1, 2).reshape(x.shape[0], channels, gh, gw).float()
        img = F.interpolate(img, size=(self.grid, self.grid), mode="bilinear", align_corners=False)
        return [img.flatten(2).transpose(1, 2).to(x.dtype)]

    # ---- trained part --------------------------------------------------------------------------------------
    def rope(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        key = (str(device), dtype)
        if key not in self._rope_cache:
            cos, sin = rope_tables(self.grid, self.head_dim)
            self._rope_cache[key] = (cos.to(device=device, dtype=dtype), sin.to(device=device, dtype=dtype))
        return self._rope_cache[key]

    def adapt(self, x: torch.Tensor, experts: Sequence[torch.Tensor | None], text: torch.Tensor,
              bits: torch.Tensor | None) -> torch.Tensor:
        """The adapter on base tokens ``x`` [N, g*g, C] -> ``[N, (g//2)^2, C]`` before the MLP."""
        n = x.shape[0]
        e = len(self.experts)
        if bits is None:
            mask = torch.zeros(n, e, device=x.device)
            any_routed = torch.ones(n, device=x.device)
            rows: list[torch.Tensor | None] = [None] * e
        else:
            bits = bits.to(x.device)
            mask = (1.0 - bits) * MASK_VALUE
            any_routed = (bits.sum(-1) > 0).float()
            rows = [bits[:, j].nonzero().flatten() for j in range(e)]
            rows = [None if int(r.numel()) == n else r for r in rows]
        for j, name in enumerate(self.experts):
            if experts[j] is None and (rows[j] is None or rows[j].numel()):
                raise ValueError(f"mova: expert {name!r} is routed for some images but has no features")
        rope = self.rope(x.device, x.dtype)
        res = x
        x = x + self.pos_embed.to(x.dtype)
        for blk in self.blocks:
            x = blk(x, experts, text.to(x.dtype), mask, any_routed, rows, rope)
        x = (x + res) / 2
        g = self.grid
        img = x.transpose(1, 2).reshape(n, x.shape[-1], g, g)
        return self.downsample(img).flatten(2).transpose(1, 2)

    def forward(self, prepared: Mapping[str, list[torch.Tensor]] | list[torch.Tensor],
                context: Any = None) -> ConnectorOutput:
        if not isinstance(prepared, Mapping) or BASE_TOWER not in prepared:
            raise ValueError(f"mova needs features keyed by tower ({[BASE_TOWER, *self.experts]})")
        (x,) = prepared[BASE_TOWER]
        x = x[:, self.num_prefix: self.num_prefix + self.grid * self.grid]
        experts = [prepared[n][0] if n in prepared else None for n in self.experts]
        n = x.shape[0]
        bits = self.routing_bits(context, n)
        text = self.text_features(context, n, x.device)
        out = self.adapt(x, experts, text, bits)
        if bool(getattr(context, "routing_pass", False)):
            g = self.grid // 2
            img = out.transpose(1, 2).reshape(n, out.shape[-1], g, g)
            out = F.adaptive_avg_pool2d(img, self.routing_side).flatten(2).transpose(1, 2)
        return ConnectorOutput(tokens=self.mlp(out))

    def sub_components(self) -> dict[str, nn.Module]:
        """Components a tune policy can set apart from the connector: ``connector.text_encoder``."""
        return {"text_encoder": self.text_encoder}

    def projector_head(self) -> nn.Sequential:
        """The final MLP to the LM (``mlp``, the released name): where ``hyper_mova`` puts its visual expert."""
        return self.mlp


# A tiny randomly initialised BERT for the contract suite (no folder, reads the LM tokenizer's ids).
_TINY_BERT = {"model_type": "bert", "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
              "intermediate_size": 32, "vocab_size": 1024, "max_position_embeddings": 512}


@register("mova", examples=(
    ContractExample(towers={"dino": "dinov2", "clip": "clip"},
                    options={"text_encoder": None, "text_encoder_config": _TINY_BERT, "text_blank_ids": [3, 4, 5],
                             "zero_init": False, "top_k": 2, "num_blocks": 1}),
    ContractExample(vision="siglip", vision_overrides={"num_hidden_layers": 4}, towers={"a": "clip", "b": "dinov2"},
                    options={"text_encoder": None, "text_encoder_config": _TINY_BERT, "text_blank_ids": [3, 4],
                             "zero_init": False, "num_heads": 2, "top_k": 2, "num_blocks": 2, "base_fusion": "dci",
                             "base_fusion_options": {"groups": 2}},
                    bad_options=({"experts": ["nope"]}, {"top_k": 3}, {"preset": "reference"})),
))
def _mova(spec: ConnectorSpec, name: str) -> Connector:
    return MoVAConnector(spec)


__all__ = ["MoVAConnector", "MoVAOptions", "rope_tables", "apply_rope", "rotate_pairs", "DEFAULT_TEXT_ENCODER",
           "QUESTION_TEMPLATE"]
