#!/usr/bin/env python
"""HyperLLaVA overhead on the demo model (DINOv2-S/14 + SmolLM2-135M-Instruct): both experts vs the static model.

Goal (issue 14): a training step and generated tokens/s with both experts (visual EV1 on ``mlp2x_gelu``, language
expert on SmolLM2's posterior 15 blocks, guidance from block 14) within 1.15x of the static model; plus the memory
of the weights generated per sample.

Two models are built in this process from the same seed (the static one: the demo; the hyper one: the same with
``hyper_mlp2x_gelu`` and the ``hyper_expert`` LM-side module; the LM is not shared between them, because the
language expert's hooks live on the LM).  The experts are given random weights (a trained-like state, so nothing
is skipped by a zero).  The same batches feed both; repetitions are interleaved round-robin so that the shared
machine's load hits both alike; medians are reported as ratios hyper / static.

* training step: forward with labels + backward + AdamW on connector + LoRA r=16 (+ the experts), from pixels;
* generation: greedy, left-padded batch of prompts, exactly ``--new-tokens`` new tokens (KV cache), from pixels.

    .venv/bin/python bench/bench_hyper.py                       # 112 px (demo: 4 visual tokens), batch 8
    .venv/bin/python bench/bench_hyper.py --image-size 224 --pool 1 --reps 5 --json /tmp/hyper.json
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
from vlweave.config import LMModuleConfig, RunConfig, StageConfig
from vlweave.data.collate import pad_batch
from vlweave.eval.vqa import encode_question
from vlweave.presets import preset_path
from vlweave.train.policy import apply_tune_policy

GOAL = 1.15


def build(kind: str, image_size: int, pool: int):
    cfg = RunConfig.load(preset_path("demo"), [f"vision.image_size={image_size}"])
    cfg.connector.options = {"pool": pool, "standardize": True}
    if kind == "hyper":
        cfg.connector.type = "hyper_mlp2x_gelu"
        cfg.language.modules = [LMModuleConfig(type="hyper_expert", name="language_expert")]
    torch.manual_seed(0)
    model, tok = build_model(cfg)
    if kind == "hyper":
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if ".expert." in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return model, tok, cfg


def train_step(model, batch, opt) -> tuple[float, float]:
    t0, c0 = time.perf_counter(), time.process_time()
    model(**batch).loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t0, time.process_time() - c0


@torch.no_grad()
def generate(model, tok, prompts, pixels, new_tokens: int) -> tuple[float, float]:
    batch = pad_batch([{"input_ids": p} for p in prompts], tok.pad_token_id, padding_side="left")
    t0, c0 = time.perf_counter(), time.process_time()
    model.generate(batch["input_ids"], attention_mask=batch["attention_mask"], pixel_values=pixels,
                   max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                   pad_token_id=tok.pad_token_id)
    return time.perf_counter() - t0, time.process_time() - c0


def main(argv=None) -> int:
    ap = bench_parser(__doc__, image_size=112, reps_help="timed repetitions (after one warm-up)")
    ap.add_argument("--pool", type=int, default=4, help="2-D pooling of the patch grid (demo: 4)")
    ap.add_argument("--new-tokens", type=int, default=16)
    args = parse(ap, argv)
    models = {k: build(k, args.image_size, args.pool) for k in ("static", "hyper")}
    samples = easyvqa_samples(args.batch_size)
    stage = StageConfig(name="finetune", tune={"vision": "frozen", "connector": "full", "language": "lora"})
    batches, opts, prompts, pixels = {}, {}, {}, {}
    for kind, (model, tok, cfg) in models.items():
        batches[kind] = train_batch(model, tok, samples, pad_to_multiple_of=8)
        tune = dict(stage.tune, **({"language_expert": "full"} if kind == "hyper" else {}))
        apply_tune_policy(model, StageConfig(name="finetune", tune=tune), cfg.train.lora)
        opts[kind] = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        prompts[kind] = [encode_question(model, tok, s.conversations[0]["value"].replace("<image>", "").strip(), True)
                         for s in samples]
        pixels[kind] = batches[kind]["pixel_values"]
    # Wall time and process CPU time: on a shared machine the CPU time (one thread: the work this process did) is
    # far less disturbed by other processes; both are reported, the verdict uses CPU time.
    times = {k: {"train_wall": [], "train_cpu": [], "generate_wall": [], "generate_cpu": []} for k in models}
    for rep in range(args.reps + 1):  # rep 0 = warm-up
        for kind, (model, tok, _) in models.items():
            gc.collect()
            model.train()
            tw, tc = train_step(model, batches[kind], opts[kind])
            model.eval()
            gw, gcpu = generate(model, tok, prompts[kind], pixels[kind], args.new_tokens)
            if rep:
                for key, value in (("train_wall", tw), ("train_cpu", tc), ("generate_wall", gw),
                                   ("generate_cpu", gcpu)):
                    times[kind][key].append(value)
        print(f"rep {rep}/{args.reps} done", file=sys.stderr)
    hyper = models["hyper"][0]
    vis = hyper.connector.generated_numel_per_image()
    lang = hyper.lm_modules["language_expert"].generated_numel_per_sample()
    med = {k: {m: statistics.median(v) for m, v in t.items()} for k, t in times.items()}
    n_gen = args.batch_size * args.new_tokens
    ratio = {m: med["hyper"][m] / med["static"][m] for m in med["static"]}
    train_ratio, gen_ratio = ratio["train_cpu"], ratio["generate_cpu"]
    print(f"\nHyperLLaVA bench: DINOv2-S/14 @ {args.image_size}px pool {args.pool} "
          f"({hyper.num_image_tokens} visual tokens) + SmolLM2-135M, batch {args.batch_size}, "
          f"{torch.get_num_threads()} threads, median of {args.reps}; ratio = hyper / static (goal <= {GOAL}x)\n")
    print(f"{'model':<8} {'train wall s':>12} {'train cpu s':>11} {'gen wall s':>10} {'gen cpu s':>9} "
          f"{'gen tok/s (cpu)':>15}")
    for kind in models:
        m = med[kind]
        print(f"{kind:<8} {m['train_wall']:>12.3f} {m['train_cpu']:>11.3f} {m['generate_wall']:>10.3f} "
              f"{m['generate_cpu']:>9.3f} {n_gen / m['generate_cpu']:>15.1f}")
    print(f"\nratios (wall): train {ratio['train_wall']:.3f}x, generation {ratio['generate_wall']:.3f}x")
    print(f"ratios (cpu):  train {train_ratio:.3f}x ({'met' if train_ratio <= GOAL else 'NOT met'}), generation "
          f"time {gen_ratio:.3f}x = tokens/s {1 / gen_ratio:.3f}x ({'met' if gen_ratio <= GOAL else 'NOT met'})")
    print(f"generated weights per sample: visual {vis:,} + language {lang:,} = {vis + lang:,} values "
          f"= {(vis + lang) * 4 / 2**20:.2f} MiB fp32 (batch {args.batch_size}: "
          f"{(vis + lang) * 4 * args.batch_size / 2**20:.2f} MiB)")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "args": vars(args), "times": times, "median": med, "ratios": ratio, "generated_per_sample": {"visual": vis, "language": lang},
            "generated_mib_per_sample_fp32": (vis + lang) * 4 / 2**20}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
