#!/usr/bin/env python
"""MoV-Adapter cost (the adapter part of issue 13 item 9): training-step time against ``mlp2x_gelu`` on the same
tokens, and adapter forward time with 0 / 1 / all experts routed.

The models (built once, in this process, sharing the base tower and LM weights; only the connector differs):

* base: the demo's DINOv2-S/14 at ``--image-size`` (224 px -> a 16x16 grid of 384-d tokens), hs[-2];
* experts (MoVA only): DINOv2-S/14 at twice the resolution (448 px -> 32x32, aligned bilinearly to 16x16) and
  EfficientNet-Lite0 at 224 px (1280 x 7x7, aligned to 16x16);
* gate text encoder: all-MiniLM-L6-v2 (the offline asset), trained with the adapter;
* LM: SmolLM2-135M-Instruct, frozen (the align stage: connector only).

Variants, all fed the *same* prepared features (computed once, as the feature cache does, so the frozen towers
are not timed) and the same easy-vqa questions:

* ``mlp2x_gelu pool 2``: the LLaVA projector on the 2x2-pooled base grid = 64 visual tokens, the same count the
  MoV-Adapter gives the LM (its down-sampler halves the grid) -- the like-for-like baseline;
* ``mlp2x_gelu``: the projector on the full grid (256 tokens);
* ``mova``: 3 blocks, top-k 2 of 2 experts, every expert routed.

Timed (median of ``--reps`` after one warm-up, variants interleaved round-robin so load changes hit all alike):
train step = forward with labels + backward + AdamW over the connector; then, for the MoV-Adapter alone, the
connector forward (no grad) with 0, 1 and 2 experts routed per image (routing bits in the context; unrouted
experts' cross-attentions are skipped).

    .venv/bin/python bench/bench_mova.py                 # 224 px, batch 8, 3 timed repetitions
    .venv/bin/python bench/bench_mova.py --image-size 112 --batch-size 4 --reps 2 --threads 1
"""

from __future__ import annotations

import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from _common import bench_parser, easyvqa_samples, parse  # noqa: I001 (bench/_common.py)
from vlweave.builder import build_model
from vlweave.config import RunConfig, StageConfig, VisionConfig
from vlweave.context import VlweaveContext
from vlweave.presets import preset_path
from vlweave.processor import VlweaveProcessor
from vlweave.train.policy import apply_tune_policy
from vlweave.vision.cache import load_image


def experts(image_size: int) -> dict[str, VisionConfig]:
    return {
        "hires": VisionConfig(name="dinov2-small", image_size=2 * image_size, select_layer=-2),
        "cnn": VisionConfig(name="efficientnet-lite0", image_size=224, select_layer=-1, aspect="square"),
    }


VARIANTS = {
    "mlp2x_gelu pool 2": ("mlp2x_gelu", {"pool": 2}, False),
    "mlp2x_gelu": ("mlp2x_gelu", {}, False),
    "mova": ("mova", {"experts": ["hires", "cnn"], "top_k": 2, "num_blocks": 3}, True),
}


def build_variants(image_size: int, seed: int = 0):
    models, tokenizer, shared = {}, None, None
    for label, (ctype, options, with_experts) in VARIANTS.items():
        cfg = RunConfig.load(preset_path("demo"), [f"connector.type={ctype}", f"vision.image_size={image_size}",
                                                     f"train.seed={seed}"])
        cfg.connector.options = dict(options)
        cfg.towers = experts(image_size) if with_experts else {}
        model, tok = build_model(cfg)
        tokenizer = tokenizer or tok
        if shared is None:
            shared = (model.vision_tower, model.language_model)
        else:  # the same base tower and LM weights: only the connector (and MoVA's experts) differ
            model.vision_towers["base"], model.language_model = shared
        models[label] = model
    return models, tokenizer


def step(model, batch, opt) -> float:
    t0 = time.perf_counter()
    model(**batch).loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


@torch.no_grad()
def connector_forward(model, feats, ctx) -> float:
    t0 = time.perf_counter()
    model.connector(feats, ctx)
    return time.perf_counter() - t0


def main(argv=None) -> int:
    args = parse(bench_parser(__doc__, image_size=224), argv)
    torch.manual_seed(0)
    models, tokenizer = build_variants(args.image_size)
    samples = easyvqa_samples(args.batch_size)
    images = [load_image(s.image) for s in samples]
    convs = [s.conversations[:2] for s in samples]
    stage = StageConfig(name="align", tune={"vision": "frozen", "connector": "full", "language": "frozen"})
    lora = RunConfig.load(preset_path("demo")).train.lora
    batches, opts, feats = {}, {}, {}
    for label, model in models.items():
        proc = VlweaveProcessor.from_model(model, tokenizer)
        batch = proc(text=convs, images=images)
        with torch.no_grad():
            feats[label] = model.tower_features(batch.pop("pixel_values"))
        batch["vision_features"] = feats[label]
        batches[label] = batch
        apply_tune_policy(model, stage, lora)
        opts[label] = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    mova = models["mova"]
    n = args.batch_size
    routings = {"0 experts": [[0, 0]] * n, "1 expert": [[1, 0]] * n, "2 experts": [[1, 1]] * n}
    ctx_base = batches["mova"]["context"]
    contexts = {}
    for k, bits in routings.items():
        ctx = VlweaveContext(image_rows=ctx_base.image_rows, texts=ctx_base.texts,
                             text_input_ids=ctx_base.text_input_ids, routing=bits)
        contexts[k] = ctx
    times: dict[str, list[float]] = {k: [] for k in [*models, *(f"mova fwd, {r}" for r in routings)]}
    for rep in range(args.reps + 1):  # rep 0 = warm-up, interleaved like the rest
        for label, model in models.items():
            gc.collect()
            model.train()
            t = step(model, batches[label], opts[label])
            if rep:
                times[label].append(t)
        mova.eval()
        for r, ctx in contexts.items():
            t = connector_forward(mova, feats["mova"], ctx)
            if rep:
                times[f"mova fwd, {r}"].append(t)
        print(f"rep {rep}/{args.reps} done", file=sys.stderr)

    med = {k: statistics.median(v) for k, v in times.items()}
    base = med["mlp2x_gelu pool 2"]
    print(f"\nMoV-Adapter bench: DINOv2-S/14 @ {args.image_size}px base (+ DINOv2-S @ {2 * args.image_size}px, "
          f"EfficientNet-Lite0 @ 224px experts), MiniLM-L6 gate encoder, SmolLM2-135M frozen; batch {n}, "
          f"{torch.get_num_threads()} threads, median of {args.reps} after 1 warm-up\n")
    head = f"{'train step (connector trained)':<34} {'tokens':>6} {'conn. params':>12} {'s':>7} {'ratio':>6}"
    print(head)
    print("-" * len(head))
    rows = {}
    for label, model in models.items():
        params = sum(p.numel() for p in model.connector.parameters())
        rows[label] = {"tokens": model.num_image_tokens, "params": params, "s": times[label],
                       "ratio": med[label] / base}
        print(f"{label:<34} {model.num_image_tokens:>6} {params / 1e6:>11.1f}M {med[label]:>7.3f} "
              f"{med[label] / base:>6.2f}")
    print(f"\n{'MoV-Adapter forward (no grad)':<34} {'s':>7} {'ratio to all':>12}")
    full = med["mova fwd, 2 experts"]
    for r in routings:
        key = f"mova fwd, {r}"
        rows[key] = {"s": times[key], "ratio_to_all": med[key] / full}
        print(f"{r:<34} {med[key]:>7.3f} {med[key] / full:>12.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
