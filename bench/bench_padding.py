#!/usr/bin/env python
"""Cost of wasted tokens in the demo's finetune step (connector + LoRA on SmolLM2-135M, cached features).

The demo's single-turn easy-vqa samples are 21-27 tokens long (4 visual tokens included).  Rounding every batch up
to a multiple of 8 or 16 (useful for bf16 kernels on CPUs with AMX, where each new shape costs a warm-up) pads them
to 32, i.e. ~25 % of the tokens the CPU computes are padding; padding to the longest sample of the batch wastes
~10 %.  On top, ChatML ends every sample with a newline after the final ``<|im_end|>`` that no label uses
(``trim_unsupervised_tail`` drops it).  The step on this CPU is compute-bound (docs/demo.md), so every token is paid.

Same model, same first ``--steps`` batches of the demo's finetune stage, each variant timed on every batch in turn
(interleaved, so a change of machine load hits all alike); medians are reported as ratios to the first variant
(``pad_to_multiple_of`` 8, no trimming: the demo before this benchmark).  The losses are printed too: padding and
the trimmed tail are masked or unused, so they must agree to float noise.

    .venv/bin/python bench/bench_padding.py                 # 6 batches of 32, 2 threads
    .venv/bin/python bench/bench_padding.py --steps 3 --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from vlweave.config import RunConfig
from vlweave.data.collate import pad_batch
from vlweave.presets import preset_path
from vlweave.train.policy import apply_tune_policy
from vlweave.train.trainer import Trainer, plan_batches


# (label, pad_to_multiple_of, trim_unsupervised_tail); the first is the reference.
VARIANTS = [("multiple of 8", 8, False), ("longest in batch", None, False), ("longest + trimmed tail", None, True)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=6, help="batches timed per variant")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    cfg = RunConfig.load(preset_path("demo"), ["train.output_dir=/tmp/vlweave-bench-padding"])
    trainer = Trainer(cfg, progress=False)
    index, stage = 1, cfg.train.stages[1]  # the finetune stage: connector full, LM LoRA
    apply_tune_policy(trainer.model, stage, cfg.train.lora)
    samples = trainer.stage_samples(index, stage)
    _, mbs = plan_batches(len(samples), stage, cfg.train.seed, index)
    mbs = mbs[: args.steps + 1]  # +1: an untimed warm-up batch
    examples = trainer.encode_used(stage, samples, {i for mb in mbs for i in mb})
    trainer.store.ensure([e["image"] for e in examples.values() if e["image"]], progress=True)
    model = trainer.model
    model.train()
    model.vision_tower.eval()
    params = [p for p in model.parameters() if p.requires_grad]

    seconds: dict[str, list[float]] = {v[0]: [] for v in VARIANTS}
    losses: dict[str, list[float]] = {v[0]: [] for v in VARIANTS}
    tokens: dict[str, int] = {v[0]: 0 for v in VARIANTS}
    real = 0  # tokens of the untrimmed samples
    for b, mb in enumerate(mbs):
        chosen = [examples[i] for i in mb]
        feats = trainer.store.batch([e["image"] for e in chosen])
        for label, multiple, trim in VARIANTS:
            batch = pad_batch([{"input_ids": e["input_ids"], "labels": e["labels"]} for e in chosen],
                              trainer.tokenizer.pad_token_id, pad_to_multiple_of=multiple,
                              trim_unsupervised_tail=trim, image_token_id=model.config.image_token_id)
            batch["vision_features"] = feats
            t0 = time.perf_counter()
            out = model(**batch)
            out.loss.backward()
            elapsed = time.perf_counter() - t0
            for p in params:  # no optimizer step: every variant sees the same weights
                p.grad = None
            if b == 0:
                continue
            seconds[label].append(elapsed)
            losses[label].append(float(out.loss.detach()))
            tokens[label] += batch["input_ids"].numel()
        if b:
            real += sum(len(e["input_ids"]) for e in chosen)

    ref = VARIANTS[0][0]
    ref_median = statistics.median(seconds[ref])
    print(f"\nfinetune step (forward + backward), batch {stage.batch_size}, {args.steps} timed batches, "
          f"{args.threads} threads; {real} sample tokens")
    print(f"{'variant':<24} {'tokens':>7} {'vs samples':>10} {'median s':>9} {'speed-up':>9} {'max |dloss|':>12}")
    for label, _, _ in VARIANTS:
        med = statistics.median(seconds[label])
        dloss = max(abs(a - b) for a, b in zip(losses[label], losses[ref]))
        print(f"{label:<24} {tokens[label]:>7} {tokens[label] / real:>9.2f}x {med:>9.2f} "
              f"{ref_median / med:>8.2f}x {dloss:>12.2e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
