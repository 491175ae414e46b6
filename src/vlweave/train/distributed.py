"""What the trainer needs from accelerate to run the same config on 1 CPU process or N GPUs (DDP, FSDP, DeepSpeed).

Everything engine-specific goes through accelerate (``Accelerator.prepare``, ``accumulate``, ``backward``,
``clip_grad_norm_``, ``get_state_dict``, ``save_state``/``load_state``); this module only holds the few decisions
vlweave makes around it, so the trainer reads top to bottom and a single-process run computes exactly what it
computed before accelerate prepared anything:

* the accelerator itself (:func:`make_accelerator`): mixed precision from the config or the launcher, the scheduler
  stepped once per optimizer step (accelerate's default steps it ``num_processes`` times, which would shorten the
  cosine schedule by the number of processes);
* the data (:func:`planned_loader`): the trainer's deterministic micro-batch plan as a ``DataLoader`` whose batch
  sampler *is* the plan; ``accelerate.prepare`` shards it by rank (micro-batch ``j`` goes to rank ``j % world``),
  so every planned micro-batch is run exactly once by exactly one process;
* rank-0 duties: the frozen-feature cache (:func:`share_feature_cache`: rank 0 builds, the others wait and read the
  file it wrote) and the RNG states of every rank for exact resume (:func:`gather_rng_states`);
* gradient checkpointing by component (:func:`enable_gradient_checkpointing`).

Global batch of a stage = ``batch_size`` (per process) x processes x ``grad_accum``: a 1-process run with
``grad_accum = N * a`` and an N-process run with ``grad_accum = a`` see the same micro-batches and the same
averaged gradient (tests/test_distributed.py checks it on 2 gloo processes).
"""

from __future__ import annotations

import os
import random
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, DistributedType, gather_object
from torch.utils.data import DataLoader

from vlweave.hardware import bf16_available

MIXED_PRECISION = ("auto", "no", "bf16", "fp16")
# Engines that shard parameters/optimizer state: their state is gathered or saved through accelerate.
SHARDED = (DistributedType.FSDP, DistributedType.DEEPSPEED)


def resolve_mixed_precision(setting: str, bf16: bool, *, cuda: bool, launcher: str | None) -> str:
    """``train.mixed_precision`` -> what ``Accelerator(mixed_precision=...)`` gets.

    ``auto`` (default): the launcher's bf16/fp16 under ``accelerate launch`` (its config's ``mixed_precision``,
    passed as ``ACCELERATE_MIXED_PRECISION``), else bf16 where it is native and ``train.bf16`` allows it (the
    behaviour before accelerate prepared anything), else no.  A launcher's ``no`` counts as unset: accelerate
    launch always passes a value, so it cannot say "no" on purpose; ``train.mixed_precision: no`` can.  ``fp16`` needs CUDA (a loss scaler; CPU autocast has no fp16
    speed-up) and ``bf16`` needs native support, each refused with the reason.
    """
    if setting not in MIXED_PRECISION:
        raise ValueError(f"train.mixed_precision: {setting!r} is not one of {list(MIXED_PRECISION)}")
    if setting == "auto":
        if launcher and launcher != "no":
            setting = launcher
        else:
            return "bf16" if bf16 and bf16_available() else "no"
    if setting == "fp16" and not cuda:
        raise ValueError("train.mixed_precision: fp16 needs CUDA (use bf16 where native, or no)")
    if setting == "bf16" and not bf16_available():
        raise ValueError("train.mixed_precision: bf16 is not native on this device (see vlweave.hardware)")
    return setting


def make_accelerator(mixed_precision: str, bf16: bool, *, find_unused_parameters: bool = False) -> Accelerator:
    """The run's accelerator (the distributed setup comes from ``accelerate launch``'s environment, if any)."""
    cuda = torch.cuda.is_available()
    mp = resolve_mixed_precision(mixed_precision, bf16, cuda=cuda,
                                 launcher=os.environ.get("ACCELERATE_MIXED_PRECISION"))
    kwargs = [DistributedDataParallelKwargs(find_unused_parameters=True)] if find_unused_parameters else []
    # step_scheduler_with_optimizer=False: the trainer's schedule counts optimizer steps of the *global* batch, so
    # it must advance once per step, not once per process (accelerate's convention for per-process schedules).
    return Accelerator(mixed_precision=mp, cpu=not cuda, step_scheduler_with_optimizer=False, kwargs_handlers=kwargs)


def is_sharded(acc: Accelerator) -> bool:
    """FSDP or DeepSpeed: parameters (and optimizer state) may live in shards, so a plain state_dict is not enough."""
    return acc.distributed_type in SHARDED


def configure_stage(acc: Accelerator, batch_size: int, grad_accum: int) -> None:
    """Before ``prepare``: the stage's accumulation for accelerate (``accumulate``/``backward`` read it), and for
    DeepSpeed, whose config needs the micro-batch size (the planned loader has no ``batch_size`` attribute to
    infer it from) and its own accumulation count, which would otherwise win over the stage's."""
    acc.gradient_accumulation_steps = grad_accum
    if acc.distributed_type == DistributedType.DEEPSPEED:
        ds = acc.state.deepspeed_plugin.deepspeed_config
        ds["train_micro_batch_size_per_gpu"] = batch_size
        ds["gradient_accumulation_steps"] = grad_accum
        ds["train_batch_size"] = batch_size * grad_accum * acc.num_processes


def engine_inputs(batch: dict[str, Any], distributed_type, mixed_precision: str) -> dict[str, Any]:
    """DeepSpeed runs bf16/fp16 by converting the weights, without autocast, so floating-point inputs (pixels,
    cached tower features) must be converted too; every other engine autocasts and gets the batch unchanged."""
    if distributed_type != DistributedType.DEEPSPEED or mixed_precision not in ("bf16", "fp16"):
        return batch
    from accelerate.utils.operations import recursively_apply

    dtype = torch.bfloat16 if mixed_precision == "bf16" else torch.float16
    return recursively_apply(lambda t: t.to(dtype) if t.is_floating_point() else t, batch)


class _Planned(torch.utils.data.Dataset):
    """Tokenized examples by sample index (the plan's indices), as a map-style dataset."""

    def __init__(self, examples: Mapping[int, dict[str, Any]]) -> None:
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.examples[index]


def planned_loader(examples: Mapping[int, dict[str, Any]], micro_batches: Sequence[Sequence[int]],
                   collate: Callable[[list[dict[str, Any]]], dict[str, Any]]) -> DataLoader:
    """A DataLoader that yields exactly ``micro_batches`` in order (the batch sampler is the plan itself).
    ``Accelerator.prepare`` turns it into each rank's shard: micro-batch ``j`` on rank ``j % world``."""
    # A private generator: a DataLoader iterator draws its base seed from it, not from torch's global RNG, whose
    # stream (dropout) must continue across a resume exactly as in the uninterrupted run.
    return DataLoader(_Planned(examples), batch_sampler=[list(mb) for mb in micro_batches], collate_fn=collate,
                      num_workers=0, generator=torch.Generator())


def share_feature_cache(acc: Accelerator, cache, make_cache: Callable[[], Any], images: Sequence[str],
                        progress: bool, **ensure_kwargs: Any):
    """Build the frozen-feature cache once: rank 0 runs the towers and writes the store files, the other ranks wait
    and then read those files (a fresh ``FeatureCache`` loads what is on disk).  Returns the cache to use.

    On another node whose cache folder is not the same filesystem, that node's local rank 0 finds nothing on disk
    and builds its own copy (one writer per node) before the node's other ranks read it; with shared storage it
    finds rank 0's files and computes nothing.  ``ensure_kwargs`` go to every ``cache.ensure`` (e.g.
    ``paths_by_tower``: the images each routed tower runs on)."""
    if acc.num_processes == 1:
        cache.ensure(images, progress, **ensure_kwargs)
        return cache
    if acc.is_main_process:
        cache.ensure(images, progress, **ensure_kwargs)
    acc.wait_for_everyone()
    if acc.is_local_main_process and not acc.is_main_process:
        cache = make_cache()
        cache.ensure(images, False, **ensure_kwargs)
    acc.wait_for_everyone()
    if not acc.is_local_main_process:
        cache = make_cache()
        cache.ensure(images, False, **ensure_kwargs)  # everything is on this node's disk by now: nothing is computed or written
    return cache


def rng_state() -> dict[str, Any]:
    return {"rng": torch.get_rng_state(), "np_rng": np.random.get_state(), "py_rng": random.getstate()}


def set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["rng"])
    np.random.set_state(state["np_rng"])
    random.setstate(state["py_rng"])


def gather_rng_states(acc: Accelerator) -> list[dict[str, Any]]:
    """Every rank's RNG state, in rank order (a collective: every rank must call it)."""
    own = rng_state()
    return [own] if acc.num_processes == 1 else gather_object([own])


def enable_gradient_checkpointing(model, components: Sequence[str]) -> list[str]:
    """Recompute activations in backward for the named components (``language``, ``vision`` = every tower,
    ``vision.<name>``), through each HF model's own activation checkpointing (non-reentrant, so frozen
    inputs and LoRA need no ``enable_input_require_grads``).  Returns the components it was enabled on."""
    known = model.components()
    targets: dict[str, Any] = {}
    for comp in components:
        if comp == "vision":
            targets.update({c: m for c, m in known.items() if c.startswith("vision.")})
        elif comp in known and (comp == "language" or comp.startswith("vision.")):
            targets[comp] = known[comp]
        else:
            allowed = ["language", "vision", *(c for c in known if c.startswith("vision."))]
            raise ValueError(f"train.gradient_checkpointing: {comp!r} is not one of {allowed}")
    for comp, module in targets.items():
        if not getattr(module, "supports_gradient_checkpointing", False):
            raise ValueError(f"train.gradient_checkpointing: {comp} ({type(module).__name__}) does not support it")
        enable = getattr(module, "activation_checkpointing_enable", None)  # transformers 5's name
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            module.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return sorted(targets)


__all__ = [
    "MIXED_PRECISION",
    "configure_stage",
    "enable_gradient_checkpointing",
    "engine_inputs",
    "gather_rng_states",
    "is_sharded",
    "make_accelerator",
    "planned_loader",
    "resolve_mixed_precision",
    "rng_state",
    "set_rng_state",
    "share_feature_cache",
]
