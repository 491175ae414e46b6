#!/usr/bin/env python
"""Dense Connector overhead and Efficient-DC speed-up on the demo model (DINOv2-S/14 + SmolLM2-135M-Instruct).

Paper claims checked (arXiv 2405.13800): DC adds minimal overhead (goal: DCI/SCI <= 1.05x, STI <= 1.25x the
``mlp2x_gelu`` baseline) and Efficient-DC (bilinear 2x down-sampling of the projected grid, -75 % visual tokens)
speeds inference up ~3x (goal >= 2.5x prefill).

Every variant is the demo model with another connector, built once, in this process, from the same tower and LM
weights; the same batches feed every variant and the timed repetitions are interleaved round-robin (so a change
of machine load hits all variants alike); medians are reported as ratios to ``mlp2x_gelu``.

* training step: forward with labels + backward + AdamW on connector + LoRA r=16 (the demo's finetune policy),
  from pixels (the frozen tower and the parameter-free DC fusion run every step);
* prefill: one forward of the whole prompt (images + question) with ``use_cache=True``, from pixels.

The demo itself pools 8x8 patches to 4 tokens, where neither claim can show; the bench uses no pooling and a
larger input so that the visual tokens dominate as in LLaVA-1.5 (224 px -> 16x16 = 256 tokens; Efficient-DC ->
8x8 = 64), configurable with ``--image-size``.

    .venv/bin/python bench/bench_dense.py                 # 224 px, batch 8, 3 timed repetitions
    .venv/bin/python bench/bench_dense.py --image-size 112 --reps 5
"""

from __future__ import annotations

import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from _common import bench_parser, easyvqa_samples, parse, train_batch  # noqa: I001 (bench/_common.py)
from vlweave.builder import build_model
from vlweave.config import RunConfig, StageConfig
from vlweave.presets import preset_path
from vlweave.train.policy import apply_tune_policy

VARIANTS = {
    "mlp2x_gelu": ("mlp2x_gelu", {}),
    "DCI": ("dense_dci", {}),
    "SCI": ("dense_sci", {}),
    "STI": ("dense_sti", {}),
    "Efficient-DC (DCI)": ("dense_dci", {"efficient_grid": None}),  # filled in: grid // 2
}
GOALS = {"DCI": ("train", 1.05), "SCI": ("train", 1.05), "STI": ("train", 1.25), "Efficient-DC (DCI)": ("prefill", 1 / 2.5)}


def build_variants(image_size: int, seed: int = 0):
    models, tokenizer = {}, None
    shared = None
    for label, (ctype, options) in VARIANTS.items():
        opts = dict(options)
        if "efficient_grid" in opts:
            opts["efficient_grid"] = image_size // 14 // 2
        cfg = RunConfig.load(preset_path("demo"), [f"connector.type={ctype}", f"vision.image_size={image_size}",
                                                     f"train.seed={seed}"])
        cfg.connector.options = opts
        if shared is None:
            model, tokenizer = build_model(cfg)
            shared = (model.vision_tower, model.language_model)
        else:  # same tower and LM weights: only the connector differs
            model, _ = build_model(cfg)
            model.vision_tower, model.language_model = shared
        models[label] = model
    return models, tokenizer


def train_step(model, batch, opt) -> float:
    t0 = time.perf_counter()
    out = model(**batch)
    out.loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


@torch.no_grad()
def prefill(model, batch) -> float:
    t0 = time.perf_counter()
    model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], pixel_values=batch["pixel_values"],
          use_cache=True)
    return time.perf_counter() - t0


def main(argv=None) -> int:
    args = parse(bench_parser(__doc__, image_size=224), argv)
    torch.manual_seed(0)
    models, tokenizer = build_variants(args.image_size)
    samples = easyvqa_samples(args.batch_size)
    lora = RunConfig.load(preset_path("demo")).train.lora
    stage = StageConfig(name="finetune", tune={"vision": "frozen", "connector": "full", "language": "lora"})
    batches, opts = {}, {}
    for label, model in models.items():
        batches[label] = train_batch(model, tokenizer, samples, pad_to_multiple_of=8)
    # LoRA is injected into the shared LM once; each variant's optimizer holds its connector + the shared LoRA.
    for label, model in models.items():
        apply_tune_policy(model, stage, lora)
        opts[label] = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    times: dict[str, dict[str, list[float]]] = {k: {"train": [], "prefill": []} for k in models}
    for rep in range(args.reps + 1):  # rep 0 = warm-up, interleaved like the rest
        for label, model in models.items():
            gc.collect()
            model.train()
            t_train = train_step(model, batches[label], opts[label])
            model.eval()
            t_pre = prefill(model, batches[label])
            if rep:
                times[label]["train"].append(t_train)
                times[label]["prefill"].append(t_pre)
        print(f"rep {rep}/{args.reps} done", file=sys.stderr)
    base = {k: statistics.median(times["mlp2x_gelu"][k]) for k in ("train", "prefill")}
    print(f"\nDense Connector bench: DINOv2-S/14 @ {args.image_size}px + SmolLM2-135M, batch {args.batch_size}, "
          f"{torch.get_num_threads()} threads, median of {args.reps} (after 1 warm-up); ratio = variant / mlp2x_gelu\n")
    head = f"{'variant':<20} {'tokens':>6} {'seq':>5} {'train s':>8} {'ratio':>6} {'prefill s':>9} {'ratio':>6} {'speed-up':>8}  goal"
    print(head)
    print("-" * len(head))
    rows = {}
    for label, model in models.items():
        tr, pf = (statistics.median(times[label][k]) for k in ("train", "prefill"))
        goal = GOALS.get(label)
        verdict = ""
        if goal:
            kind, bound = goal
            ratio = (tr / base["train"]) if kind == "train" else (pf / base["prefill"])
            verdict = (f"{kind} <= {bound:.2f}x" if kind == "train" else f"prefill speed-up >= {1 / bound:.1f}x")
            verdict += ": " + ("met" if ratio <= bound else "NOT met")
        seq = batches[label]["input_ids"].shape[1]
        rows[label] = {"tokens": model.num_image_tokens, "seq": seq, "train_s": times[label]["train"],
                       "prefill_s": times[label]["prefill"], "train_ratio": tr / base["train"],
                       "prefill_ratio": pf / base["prefill"]}
        print(f"{label:<20} {model.num_image_tokens:>6} {seq:>5} {tr:>8.2f} {tr / base['train']:>6.2f} {pf:>9.3f} "
              f"{pf / base['prefill']:>6.2f} {base['prefill'] / pf:>7.2f}x  {verdict}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
