"""``vlweave export CHECKPOINT --format llava OUT``: a vlweave model as an HF ``LlavaForConditionalGeneration``.

HF llava computes ``lm(embed(text) with projector(concat(hs[l] for l in vision_feature_layer)[:, strategy]))``:
one ViT tower, a list of hidden states concatenated on channels, CLS dropped or kept, then ``linear_1 -> act ->
linear_2``.  A vlweave model is expressible exactly when its connector is that computation:

* one tower, ViT-like (its hidden states are token sequences the model runs at its own image size, or DINOv2,
  which always interpolates its position embeddings), the prefix strategy HF's (``default`` drops exactly one
  CLS token; ``full`` keeps all);
* the fusion is a plain channel concatenation of an ordered layer list -- a single layer, a ``select_layer`` list,
  or Dense Connector SCI (final + extra layers, in ``final_first`` order) -- without ``pool``;
* the head is ``mlp2x_gelu`` (``linear_1``, GELU, ``linear_2``), ``linear`` (``linear_1``; ``act = "linear"`` and an
  identity ``linear_2``) or ``identity`` (both identity matrices), without ``input_norm`` or ``efficient_grid``;
  ``standardize`` (a per-channel affine map) is folded into ``linear_1``;
* no LM-side modules.

Multiplying by an identity matrix and adding a zero bias is exact in floating point, so ``linear`` and
``identity`` give the same numbers as vlweave's.  Anything else (STI's extra tokens, DCI's group means, pooling,
MoV-Adapter, several towers...) is refused with the reason; such checkpoints stay in the native format, which
``AutoModelForImageTextToText`` loads once ``vlweave`` is imported.

Before writing, the export runs one random image and prompt through both models and refuses to write a checkpoint
whose visual tokens or logits differ.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

from vlweave.connectors.mlp import ProjectorConnector
from vlweave.vision.towers import BASE_TOWER

NATIVE_HINT = ("keep the native vlweave checkpoint: transformers' AutoModelForImageTextToText/AutoProcessor load it "
               "once `import vlweave` has run (see the folder's README.md)")


LLAVA_USAGE = """## Use (HF llava format: no vlweave needed)

```python
from transformers import AutoModelForImageTextToText, AutoProcessor

model = AutoModelForImageTextToText.from_pretrained(FOLDER)  # LlavaForConditionalGeneration
processor = AutoProcessor.from_pretrained(FOLDER)            # LlavaProcessor
inputs = processor(images=image, text=PROMPT, return_tensors="pt")   # PROMPT below, with one <image>
out = model.generate(**inputs, max_new_tokens=32)
```

Written by `vlweave export --format llava`; the export checked that this model gives the same visual tokens and
logits as the vlweave model it came from. Tools that read HF llava checkpoints (vLLM, SGLang, llama.cpp's
converter) can read it."""


class ExportRefused(ValueError):
    """The model cannot be expressed in the requested format (the message says why)."""


def llava_layers(model) -> list[int]:
    """The hidden-state indices HF llava must concatenate, in vlweave's concatenation order."""
    fusion = model.connector.fusion
    if fusion.kind == "layers":
        return list(fusion.layers)
    plan = fusion.plan
    return [plan.final, *plan.extras] if plan.final_first else [*plan.extras, plan.final]


def llava_problems(model) -> list[str]:
    """Why ``model`` is not expressible as HF llava ([] = it is)."""
    cfg = model.config
    problems: list[str] = []
    conn = model.connector
    if cfg.lm_modules:
        problems.append(f"LM-side modules {[m['name'] for m in cfg.lm_modules]} have no llava counterpart")
    towers = model.needed_towers()
    if towers != [BASE_TOWER]:
        problems.append(f"the connector reads towers {towers}; llava has one vision tower")
    if not isinstance(conn, ProjectorConnector):
        problems.append(f"connector {cfg.connector_type!r} is not a LLaVA projector (llava's projector is "
                        "linear -> activation -> linear)")
        return problems
    fusion = conn.fusion
    if fusion.kind not in ("layers", "sci"):
        what = {"sti": "adds pooled tokens of extra layers (STI)", "dci": "averages groups of layers (DCI)"}
        problems.append(f"the Dense Connector fusion {what.get(fusion.kind, fusion.kind)}; llava only concatenates "
                        "a layer list on channels")
    if fusion.pool != 1:
        problems.append(f"pool={fusion.pool} average-pools the patch grid; llava does not pool")
    opts = conn.options
    if getattr(opts, "input_norm", False):
        problems.append("input_norm (a LayerNorm before the projector) has no llava counterpart")
    if getattr(opts, "efficient_grid", None):
        problems.append("efficient_grid (Efficient-DC resizing) has no llava counterpart")
    depth = _depth(conn)
    if depth is None or depth > 2:
        problems.append(f"a {depth}-layer projector; llava's has two linears (mlp2x_gelu), or one with identities")
    spec = model.tower_specs[BASE_TOWER]
    facts = spec.facts
    if getattr(facts, "layer_shapes", None):
        problems.append(f"tower {spec.model_type!r} is not a ViT (its hidden states are feature maps)")
    if spec.select_strategy == "default" and facts.num_prefix_tokens != 1:
        problems.append(f"select_strategy 'default' drops {facts.num_prefix_tokens} prefix token(s) here, llava "
                        "drops exactly one (use 'full' for a tower without CLS)")
    native = getattr(model.vision_tower.config, "image_size", facts.image_size)
    if native != facts.image_size and spec.model_type != "dinov2":
        problems.append(f"the tower runs at {facts.image_size} px with interpolated position embeddings (trained at "
                        f"{native} px); llava runs it at its own size")
    return problems


def _depth(conn) -> int | None:
    proj = conn.projector
    if isinstance(proj, torch.nn.Identity):
        return 0
    linears = [m for m in proj if isinstance(m, torch.nn.Linear)]
    return len(linears)


def _lm_prefix(lm) -> str:
    prefix = getattr(lm, "base_model_prefix", "model")
    if not hasattr(lm, prefix):
        raise ExportRefused(f"the LM {type(lm).__name__} has no base model at .{prefix}; {NATIVE_HINT}")
    return prefix


def build_llava(model) -> LlavaForConditionalGeneration:
    """An HF llava with ``model``'s weights (raises :class:`ExportRefused` with every reason it cannot)."""
    problems = llava_problems(model)
    if problems:
        raise ExportRefused("this model cannot be written as HF llava: " + "; ".join(problems) + f". {NATIVE_HINT}")
    vcfg = copy.deepcopy(model.vision_tower.config)
    tcfg = copy.deepcopy(model.language_model.config)
    spec = model.tower_specs[BASE_TOWER]
    layers = llava_layers(model)
    conn = model.connector
    depth = _depth(conn)
    tied = bool(getattr(tcfg, "tie_word_embeddings", False))
    config = LlavaConfig(
        vision_config=vcfg, text_config=tcfg, image_token_id=model.config.image_token_id,
        image_seq_length=model.num_image_tokens, vision_feature_layer=layers[0] if len(layers) == 1 else layers,
        vision_feature_select_strategy=spec.select_strategy,
        projector_hidden_act="gelu" if depth == 2 else "linear", multimodal_projector_bias=True,
        tie_word_embeddings=tied,
    )
    hf = LlavaForConditionalGeneration(config).eval()
    state: dict[str, torch.Tensor] = {}
    for name, t in model.vision_tower.state_dict().items():
        state[f"model.vision_tower.{name}"] = t
    lm = model.language_model
    prefix = _lm_prefix(lm)
    for name, t in lm.state_dict().items():
        if name.startswith(prefix + "."):
            state["model.language_model." + name[len(prefix) + 1:]] = t
        else:
            state[name] = t  # the LM head
    d_in = conn.fusion.out_channels
    d_out = int(tcfg.hidden_size)
    eye = torch.eye(d_out)
    linears = [] if depth == 0 else [m for m in conn.projector if isinstance(m, torch.nn.Linear)]
    if depth == 0:
        linears = [(torch.eye(d_in, d_out).T.contiguous(), torch.zeros(d_out)), (eye, torch.zeros(d_out))]
    elif depth == 1:
        linears = [(linears[0].weight, linears[0].bias), (eye, torch.zeros(d_out))]
    else:
        linears = [(m.weight, m.bias) for m in linears]
    if getattr(conn, "standardize", False):
        # (x - mean) / std followed by W x + b is the linear map (W / std) x + (b - (W / std) mean): folded into
        # linear_1 (exact algebra; the self-check below bounds the rounding).
        w, b = linears[0]
        w = w.detach().double() / conn.feature_std.double()
        linears[0] = (w.float(), (b.detach().double() - w @ conn.feature_mean.double()).float())
    for i, (w, b) in enumerate(linears, start=1):
        state[f"model.multi_modal_projector.linear_{i}.weight"] = w.detach()
        state[f"model.multi_modal_projector.linear_{i}.bias"] = b.detach()
    missing, unexpected = hf.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (tied and k == "lm_head.weight")]
    if missing or unexpected:
        raise ExportRefused(f"weight mapping incomplete (missing {missing[:5]}, unexpected {unexpected[:5]}); "
                            f"{NATIVE_HINT}")
    if tied:
        hf.tie_weights()
    return hf


@torch.no_grad()
def check_llava(model, hf: LlavaForConditionalGeneration, atol: float = 1e-4) -> dict[str, float]:
    """Visual tokens and logits of ``model`` and ``hf`` on one random image + prompt; raises if they differ."""
    gen = torch.Generator().manual_seed(0)
    size = model.tower_specs[BASE_TOWER].facts.image_size
    pixels = torch.randn(1, 3, size, size, generator=gen)
    n = model.num_image_tokens
    ids = torch.cat([torch.randint(0, model.config.image_token_id, (3,), generator=gen),
                     torch.full((n,), model.config.image_token_id),
                     torch.randint(0, model.config.image_token_id, (5,), generator=gen)]).unsqueeze(0)
    ids = ids.clamp(max=model.get_input_embeddings().num_embeddings - 1)
    ours, _ = model.get_image_features(pixels)
    theirs = torch.stack(list(hf.get_image_features(pixel_values=pixels).pooler_output))
    logits_a = model(input_ids=ids, pixel_values=pixels).logits
    logits_b = hf(input_ids=ids, pixel_values=pixels).logits
    diffs = {"visual_tokens": float((ours - theirs).abs().max()) if ours.shape == theirs.shape else float("inf"),
             "logits": float((logits_a - logits_b).abs().max())}
    if not all(v <= atol for v in diffs.values()):
        raise ExportRefused(f"the llava model does not compute the same function (max |diff| {diffs}); "
                            f"{NATIVE_HINT}")
    return diffs


def llava_processor(model, processor) -> LlavaProcessor:
    """An HF ``LlavaProcessor`` whose ``<image>`` expansion and pixels match ``processor`` (vlweave's).

    The image processor pads to a square with the mean colour and resizes (bicubic) as vlweave's ``pad`` aspect
    does; HF rounds the padding colour down (``int(mean * 255)``) where vlweave rounds to nearest, so padded
    borders of non-square images can differ by 1/255 in a channel; square images give identical pixels."""
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    spec = model.tower_specs[BASE_TOWER]
    facts = spec.facts
    size = facts.image_size
    image_processor = LlavaImageProcessorPil(
        do_pad=spec.aspect == "pad", size={"shortest_edge": size}, crop_size={"height": size, "width": size},
        do_center_crop=True, image_mean=list(spec.image_mean), image_std=list(spec.image_std))
    patch = facts.patch_size
    extra = facts.num_prefix_tokens
    return LlavaProcessor(image_processor=image_processor, tokenizer=processor.tokenizer, patch_size=patch,
                          vision_feature_select_strategy=spec.select_strategy, image_token=processor.image_token,
                          num_additional_image_tokens=extra)


def example_prompt(processor, question: str = "What is in the image?") -> str:
    """The prompt string vlweave's template gives ``question`` with an image, with one ``<image>`` (the HF llava
    processor expands it): what an HF user passes as ``text``."""
    ids = processor.encode_question(question, True)
    image_id = processor.image_token_id
    collapsed = [t for i, t in enumerate(ids) if t != image_id or i == 0 or ids[i - 1] != image_id]
    return processor.tokenizer.decode(collapsed, skip_special_tokens=False)


def export_llava(model, processor, out: str | Path, *, atol: float = 1e-4) -> dict[str, Any]:
    """Write ``out`` (HF llava weights, config, processor); returns the equivalence check's numbers."""
    hf = build_llava(model)
    diffs = check_llava(model, hf, atol)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(out)
    hp = llava_processor(model, processor)
    expected = model.num_image_tokens
    size = model.tower_specs[BASE_TOWER].facts.image_size
    got = (size // hp.patch_size) ** 2 + hp.num_additional_image_tokens - (hp.vision_feature_select_strategy
                                                                          == "default")
    if got != expected:
        raise ExportRefused(f"the llava processor would expand <image> to {got} tokens, the model makes {expected}; "
                            f"{NATIVE_HINT}")
    hp.save_pretrained(out)
    return diffs


__all__ = ["LLAVA_USAGE", "ExportRefused", "build_llava", "check_llava", "export_llava", "llava_problems", "llava_processor"]
