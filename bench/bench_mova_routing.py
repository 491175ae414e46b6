#!/usr/bin/env python
"""MoVA's coarse routing cost and what skipping unrouted experts saves, on the embedded MoVA setup
(``configs/mova-synthetic.yaml``: DINOv2-S 112 px base, DINOv2-S 224 px "docs" expert, EfficientNet-Lite0 224 px
"scenes" expert, SmolLM2-135M-Instruct; real offline weights).

Paper claim (methods.md §2d): the routing step takes 0.14 s against 10.24 s for a 405-token answer (A100) -- the
coarse stage is cheap next to answering.  Measured here, in one process, interleaved round-robin, medians:

* ``routing pass``: :func:`vlweave.language.routing.route_batch` on cached base features (the routing prompt with
  ``num_routing_tokens`` visual tokens, greedy, at most 16 tokens, stopping at end-of-turn) -- and the same forced
  to all 16 tokens (the worst case);
* ``answer (64 tokens)``: the answer pass with every expert routed, exactly 64 new tokens;
* ``towers``: the prepared input of every tower for a batch (what ``tower_features`` runs) with both experts
  routed for every image, with half the images routed to one expert, and with no expert routed -- the saving of
  running experts on routed rows only (``Connector.tower_rows``).

The connector is the real ``mova`` (MoV-Adapter) of the preset.  Untrained weights: the routing answer's *content* is meaningless here, its cost is
not (forced to 16 tokens, it is the upper bound).

    .venv/bin/python bench/bench_mova_routing.py                    # batch 4, 3 timed repetitions
    .venv/bin/python bench/bench_mova_routing.py --batch-size 1 --reps 5 --json /tmp/mova.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def build(seed: int = 0):
    from vlweave.builder import build_model
    from vlweave.config import RunConfig
    from vlweave.presets import preset_path

    cfg = RunConfig.load(preset_path("mova-synthetic"), [f"train.seed={seed}"])
    model, tok = build_model(cfg)
    return model, tok, "mova (MoV-Adapter: 3 blocks, 2 experts, top-k 2, MiniLM gate encoder)"


def timed(fn, reps: int) -> tuple[float, object]:
    out = None
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--answer-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"load average at start: {os.getloadavg()}", file=sys.stderr)

    from vlweave.context import VlweaveContext
    from vlweave.eval.vqa import stop_token_ids
    from vlweave.language.routing import RoutingPool, route_batch
    from vlweave.processor import VlweaveProcessor
    from PIL import Image

    model, tok, kind = build()
    model.eval()
    processor = VlweaveProcessor.from_model(model, tok)
    pool = RoutingPool.from_connector(model.connector)
    b = args.batch_size
    images = [Image.new("RGB", (96, 96), c) for c in ("red", "green", "blue", "white", "black", "gray", "pink",
                                                       "cyan")[:b]] * max(1, b // 8 + 1)
    images = images[:b]
    questions = ["What is written in the top left corner of the document?"] * b
    pixels = processor.pixel_values(images)
    stops = stop_token_ids(tok)
    with torch.no_grad():
        base = model.prepare_tower_features("base", pixels["base"])

    def route(force: bool):
        kw = {"max_new_tokens": 16}
        if force:
            real = model.generate

            def forced(*a, **k):
                k["min_new_tokens"] = 16
                return real(*a, **k)

            model.generate = forced
        try:
            return route_batch(model, processor, pool, questions, base, stop_ids=stops, **kw)
        finally:
            if force:
                del model.generate

    prompts = [processor.encode_question(q, True) for q in questions]
    batch = processor.collate([{"input_ids": p} for p in prompts], images, padding_side="left",
                              texts=[[q] for q in questions], pixel_values=False)

    def answer():
        ctx = batch["context"]  # the questions' gate-text ids for the adapter's encoder, from the processor
        ctx.routing = [[1, 1]] * b
        with torch.no_grad():
            return model.generate(batch["input_ids"], attention_mask=batch["attention_mask"],
                                  vision_features={"base": base}, pixel_values={k: v for k, v in pixels.items()
                                                                                if k != "base"},
                                  context=ctx, max_new_tokens=args.answer_tokens, min_new_tokens=args.answer_tokens,
                                  do_sample=False, pad_token_id=processor.pad_token_id)

    def towers(routing):
        ctx = VlweaveContext.for_batch([True] * b, routing=routing)
        with torch.no_grad():
            return model.tower_features(pixels, None, ctx)

    half = [[1, 0] if i % 2 == 0 else [0, 0] for i in range(b)]
    cases = {
        "routing pass (stops at end-of-turn)": lambda: route(False),
        "routing pass (forced 16 tokens)": lambda: route(True),
        f"answer ({args.answer_tokens} tokens, all experts)": answer,
        "towers: both experts, every image": lambda: towers([[1, 1]] * b),
        "towers: docs expert on half the images": lambda: towers(half),
        "towers: no expert routed": lambda: towers([[0, 0]] * b),
    }
    for name, fn in cases.items():  # warm-up
        t, _ = timed(fn, 1)
        print(f"warm-up {name}: {t:.2f} s", file=sys.stderr, flush=True)
    results: dict[str, list[float]] = {k: [] for k in cases}
    for rep in range(args.reps):  # round-robin: machine-load changes hit every case alike
        for name, fn in cases.items():
            t, _ = timed(fn, 1)
            results[name].append(t)
        print(f"rep {rep + 1}/{args.reps} done", file=sys.stderr, flush=True)
    med = {k: statistics.median(v) for k, v in results.items()}
    ans = med[f"answer ({args.answer_tokens} tokens, all experts)"]
    full = med["towers: both experts, every image"]
    print(f"\nMoVA routing bench: connector {kind}, batch {b}, {args.reps} reps, torch threads "
          f"{torch.get_num_threads()}")
    print(f"{'case':48s} {'median s':>10s} {'ratio':>8s}  reference")
    for name, t in med.items():
        ref = ans if name.startswith("routing") or name.startswith("answer") else full
        label = f"answer" if ref is ans else "both experts"
        print(f"{name:48s} {t:10.3f} {t / ref:8.3f}  / {label}")
    print(f"\npaper: routing 0.14 s / 405-token answer 10.24 s = {0.14 / 10.24:.3f} (A100, bf16)")
    print(f"load average at end: {os.getloadavg()}", file=sys.stderr)
    decisions = route(False)
    print(f"routing answers (untrained model): {[d.answer for d in decisions][:2]}")
    if args.json:
        Path(args.json).write_text(json.dumps({"connector": kind, "batch_size": b, "reps": args.reps,
                                               "median_seconds": med, "all_seconds": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
