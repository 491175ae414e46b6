#!/usr/bin/env python
"""Whole training steps of any preset with ``train.attn_implementation: model`` vs ``auto``, through the trainer.

bench_attention.py times the demo's LM alone; this one times what a run pays: every attention that
``train.attn_implementation`` switches (the LM, trained towers and text encoders, the MoV-Adapter's own layers),
with data, autocast and the optimiser as the trainer runs them.  One process; each round trains a fresh trainer
for ``--steps`` steps of every stage, the two settings alternating (model, auto, model, auto, ...) so that a change
of machine load hits both alike.  The first step of each stage is left out (warm-up).

    .venv/bin/python bench/bench_train_kernels.py                      # mova-synthetic, 4 steps per stage, 2 rounds
    .venv/bin/python bench/bench_train_kernels.py --config demo --steps 6 --threads 1
"""

from __future__ import annotations

import json
import statistics
import tempfile
from pathlib import Path

from _common import bench_parser, parse  # noqa: I001 (bench/_common.py)
from vlweave.config import RunConfig
from vlweave.presets import preset_path
from vlweave.train.trainer import Trainer

SETTINGS = ("model", "auto")


def main(argv=None) -> int:
    ap = bench_parser(__doc__, batch_size=None)  # no --batch-size: each stage's own
    ap.add_argument("--config", default="mova-synthetic")
    ap.add_argument("--steps", type=int, default=4, help="steps per stage per round (the first is a warm-up)")
    ap.add_argument("--rounds", type=int, default=2)
    args = parse(ap, argv)
    base = RunConfig.load(preset_path(args.config))
    steps: dict[str, dict[str, list[float]]] = {s: {} for s in SETTINGS}
    losses: dict[str, list[list[float]]] = {s: [] for s in SETTINGS}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for setting in SETTINGS:
                sets = [f"train.attn_implementation={setting}", f"train.output_dir={Path(tmp) / f'{setting}-{r}'}"]
                sets += [f"train.stages.{i}.max_steps={args.steps}" for i in range(len(base.train.stages))]
                if args.batch_size is not None:
                    sets += [f"train.stages.{i}.batch_size={args.batch_size}" for i in range(len(base.train.stages))]
                trainer = Trainer(RunConfig.load(preset_path(args.config), sets), progress=False)
                trainer.train()
                for stage in base.train.stages:
                    recs = [m for m in trainer.metrics if m["stage"] == stage.name]
                    steps[setting].setdefault(stage.name, []).extend(m["seconds"] for m in recs[1:])
                losses[setting].append([m["loss"] for m in trainer.metrics])
                print(f"round {r} {setting}: " + ", ".join(
                    f"{s}: {statistics.median(v[-(args.steps - 1):]):.2f} s/step" for s, v in steps[setting].items()))
    print(f"\n{args.config}: median training step (s), {args.rounds} rounds x {args.steps - 1} timed steps per stage")
    print(f"{'stage':<12} {'model':>8} {'auto':>8} {'ratio':>7}")
    table = {}
    for stage in steps["model"]:
        a, b = statistics.median(steps["model"][stage]), statistics.median(steps["auto"][stage])
        table[stage] = {"model": a, "auto": b, "ratio": b / a}
        print(f"{stage:<12} {a:>8.2f} {b:>8.2f} {b / a:>6.2f}x")
    first = {s: losses[s][0][0] for s in SETTINGS}  # the same first batch and initialisation
    print(f"first-step loss: model {first['model']:.4f}, auto {first['auto']:.4f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"config": args.config, "steps": steps, "losses": losses,
                                               "table": table}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
