"""One rank of the multi-process trainer test (see tests/test_distributed.py).

``run(REPORT_DIR, CONFIG, ...)`` in each process of ``accelerate.debug_launcher`` (fork, gloo on the CPU), or
``accelerate launch ... distributed_worker.py REPORT_DIR CONFIG [CONFIG...]``: train each config in turn (``--resume`` from its own
output folder when the config file's name ends in ``.resume.yaml``), and write ``REPORT_DIR/<run>.rank<r>.json``
with what this rank did: the sample ids of each micro-batch it collated, how often it ran a tower for the feature
cache, and how many files the trainer wrote.  A config whose ``train.output_dir`` ends in ``-kill`` is killed with
SIGKILL (no cleanup, like a lost node) on the first micro-batch after checkpoint ``ckpt-s1-000002`` was written;
one ending in ``-nan`` gets a NaN loss on rank 1's second training forward only.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import torch

from vlweave.config import RunConfig
from vlweave.modeling import VlweaveForConditionalGeneration
from vlweave.train import trainer as trainer_mod
from vlweave.train.trainer import Trainer

KILL_AFTER = "ckpt-s1-000002"


def run(report: str, *configs: str) -> None:
    if os.environ.get("FORK_LAUNCHED"):
        # Forked from a process that already used accelerate: its single-process state must not carry over.
        from accelerate.state import AcceleratorState, GradientState

        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    report = Path(report)
    counts = {"tower_calls": 0, "files_written": 0, "plots": 0, "exports": 0}
    seen: list[list[str]] = []
    state = {"armed": False, "kill": False, "nan": False}

    tower = VlweaveForConditionalGeneration.prepare_tower_features
    forward = VlweaveForConditionalGeneration.forward
    forwards = {"n": 0}

    def nan_forward(self, *a, **k):
        out = forward(self, *a, **k)
        if state["nan"] and self.training and torch.distributed.get_rank() == 1:
            forwards["n"] += 1
            if forwards["n"] == 2:
                out.loss = out.loss * float("nan")
        return out

    def counting_tower(self, *a, **k):
        counts["tower_calls"] += 1
        return tower(self, *a, **k)

    save_file = trainer_mod.save_file

    def counting_save(*a, **k):
        counts["files_written"] += 1
        return save_file(*a, **k)

    collate, save_state = Trainer.collate, Trainer.save_state
    plot, export = Trainer.plot_loss, Trainer.export

    def recording_collate(self, examples):
        if state["armed"]:
            os.kill(os.getpid(), signal.SIGKILL)
        seen.append([e["id"] for e in examples])
        return collate(self, examples)

    def arming_save(self, stage_index, step, *a, **k):
        out = save_state(self, stage_index, step, *a, **k)
        state["armed"] = state["kill"] and out.name == KILL_AFTER
        return out

    def counting_plot(self):
        counts["plots"] += 1
        return plot(self)

    def counting_export(self):
        counts["exports"] += 1
        return export(self)

    VlweaveForConditionalGeneration.prepare_tower_features = counting_tower
    VlweaveForConditionalGeneration.forward = nan_forward
    trainer_mod.save_file = counting_save
    Trainer.collate, Trainer.save_state = recording_collate, arming_save
    Trainer.plot_loss, Trainer.export = counting_plot, counting_export

    for path in configs:
        for key in counts:
            counts[key] = 0
        seen.clear()
        cfg = RunConfig.load(path)
        resume = cfg.train.output_dir if path.endswith(".resume.yaml") else None
        state["kill"] = cfg.train.output_dir.endswith("-kill") and resume is None
        state["nan"], forwards["n"] = cfg.train.output_dir.endswith("-nan"), 0
        trainer = Trainer(cfg, progress=False)
        trainer.train(resume=resume)
        rank = trainer.accelerator.process_index
        name = Path(path).name.removesuffix(".yaml")
        (report / f"{name}.rank{rank}.json").write_text(json.dumps(
            {"rank": rank, "world": trainer.accelerator.num_processes, "is_main": trainer.is_main,
             "seen": seen, "metrics": trainer.metrics, "skipped": trainer.guard.skipped,
             "connector": [float(p.detach().double().sum()) for p in trainer.model.connector.parameters()],
             **counts}))


if __name__ == "__main__":
    run(sys.argv[1], *sys.argv[2:])
