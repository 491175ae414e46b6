#!/usr/bin/env python
"""The LM's attention kernel on CPU: PyTorch SDPA vs eager attention for the demo's training step and generation.

Why: a profile of a MoVA training step (``mova-synthetic``, 1 thread, bf16 autocast) spent 29 % of its time in
``_scaled_dot_product_flash_attention_for_cpu_backward`` - 185 ms per SmolLM2 layer for a [32, 9, 74, 64] batch
whose forward took 22 ms.  This bench measures the whole step both ways on the demo model, in one process,
interleaved (a change of machine load hits both alike), and checks first that both compute the same loss.

* training step: forward with labels + backward + AdamW on connector + LoRA r=16 (the demo's finetune policy),
  from cached-equivalent pixels, at the demo's 4 visual tokens and at 64 (``--pool 1``: a LLaVA-like prompt);
* generation: greedy, 16 new tokens, batch 8, KV cache.

    .venv/bin/python bench/bench_attention.py               # bf16 autocast where native, else fp32
    .venv/bin/python bench/bench_attention.py --no-bf16 --reps 5
"""

from __future__ import annotations

import gc
import json
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from _common import bench_parser, easyvqa_samples, parse, train_batch  # noqa: I001 (bench/_common.py)
from vlweave.builder import build_model
from vlweave.config import RunConfig, StageConfig
from vlweave.data.collate import pad_batch
from vlweave.eval.vqa import encode_question
from vlweave.hardware import bf16_available
from vlweave.presets import preset_path
from vlweave.train.policy import apply_tune_policy
from vlweave.train.trainer import make_transform
from vlweave.vision.cache import load_image

KERNELS = ("sdpa", "eager")


def prompt_batch(model, tokenizer, samples):
    """A generation batch: each sample's question as a left-padded prompt, with its image."""
    rows = [{"input_ids": encode_question(model, tokenizer, s.conversations[0]["value"].replace("<image>", "").strip(),
                                          True, system_prompt="")} for s in samples]
    batch = pad_batch(rows, tokenizer.pad_token_id, padding_side="left")
    transform = make_transform(model)
    batch["pixel_values"] = torch.stack([transform(load_image(s.image)) for s in samples])
    return batch


def set_kernel(model, kernel: str) -> None:
    model.language_model.set_attn_implementation(kernel)


def main(argv=None) -> int:
    ap = bench_parser(__doc__, batch_size=32)
    ap.add_argument("--gen-batch-size", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--no-bf16", action="store_true", help="fp32 even where bf16 is native")
    args = parse(ap, argv)
    bf16 = bf16_available() and not args.no_bf16
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if bf16 else nullcontext
    samples = easyvqa_samples(args.batch_size)
    stage = StageConfig(name="finetune", tune={"vision": "frozen", "connector": "full", "language": "lora"})
    results: dict[str, dict] = {}
    for pool in (4, 1):
        torch.manual_seed(0)
        cfg = RunConfig.load(preset_path("demo"), [f"connector.options.pool={pool}"])
        model, tokenizer = build_model(cfg)
        apply_tune_policy(model, stage, cfg.train.lora)
        batch = train_batch(model, tokenizer, samples)
        prompts = prompt_batch(model, tokenizer, samples[: args.gen_batch_size])
        # Same function both ways: the loss and the gradients of one step from the same weights.
        grads = {}
        for kernel in KERNELS:
            set_kernel(model, kernel)
            model.zero_grad(set_to_none=True)
            with autocast():
                loss = model(**batch).loss
            loss.backward()
            grads[kernel] = (float(loss), torch.cat([p.grad.flatten().float() for p in model.parameters()
                                                     if p.grad is not None]))
        (l0, g0), (l1, g1) = grads["sdpa"], grads["eager"]
        check = {"loss_sdpa": l0, "loss_eager": l1, "grad_rel_diff": float((g0 - g1).norm() / g0.norm())}
        print(f"pool {pool}: loss sdpa {l0:.6f} eager {l1:.6f}, gradient relative difference "
              f"{check['grad_rel_diff']:.2e}", file=sys.stderr)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)
        times = {k: {"train": [], "generate": []} for k in KERNELS}
        for rep in range(args.reps + 1):  # rep 0 = warm-up, interleaved like the rest
            for kernel in KERNELS:
                set_kernel(model, kernel)
                gc.collect()
                model.train()
                t0 = time.perf_counter()
                with autocast():
                    loss = model(**batch).loss
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                t_train = time.perf_counter() - t0
                model.eval()
                t0 = time.perf_counter()
                with torch.no_grad(), autocast():
                    model.generate(**prompts, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                   do_sample=False, pad_token_id=tokenizer.pad_token_id)
                t_gen = time.perf_counter() - t0
                if rep:
                    times[kernel]["train"].append(t_train)
                    times[kernel]["generate"].append(t_gen)
            print(f"pool {pool}: rep {rep}/{args.reps} done", file=sys.stderr)
        results[f"{model.num_image_tokens} visual tokens"] = {"seq": int(batch["input_ids"].shape[1]),
                                                              "check": check, "times": times}
        del model, opt
    print(f"\nLM attention kernel: demo model (DINOv2-S 112 px + SmolLM2-135M, connector + LoRA r16), "
          f"{'bf16 autocast' if bf16 else 'fp32'}, {torch.get_num_threads()} threads, median of {args.reps} "
          f"(after 1 warm-up); ratio = eager / sdpa (lower is faster)\n")
    head = f"{'prompt':<18} {'seq':>4} {'train sdpa s':>12} {'eager s':>8} {'ratio':>6} {'gen sdpa s':>10} {'eager s':>8} {'ratio':>6}"
    print(head)
    print("-" * len(head))
    for label, r in results.items():
        med = {k: {m: statistics.median(v) for m, v in r["times"][k].items()} for k in KERNELS}
        print(f"{label:<18} {r['seq']:>4} {med['sdpa']['train']:>12.2f} {med['eager']['train']:>8.2f} "
              f"{med['eager']['train'] / med['sdpa']['train']:>6.2f} {med['sdpa']['generate']:>10.2f} "
              f"{med['eager']['generate']:>8.2f} {med['eager']['generate'] / med['sdpa']['generate']:>6.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "bf16": bf16, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
