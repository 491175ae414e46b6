"""Staged training on accelerate: ``align`` then ``finetune`` (or any list of stages), resumable exactly.

Readable top to bottom: build -> per stage (data, tune policy, optimizer, schedule) -> steps -> checkpoints.
Determinism: the order of samples is a pure function of (seed, stage index, epoch), so a run resumed from any
checkpoint sees the same batches and reproduces the uninterrupted loss curve.
Distributed: model, optimizer, data and scheduler go through ``Accelerator.prepare`` each stage, so ``accelerate
launch`` (DDP, FSDP, DeepSpeed) runs the same loop; the plan is the *global* batch (``batch_size`` per process x
processes x ``grad_accum``), sharded by rank; only rank 0 writes.  The decisions around accelerate live in
``train/distributed.py``.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate.utils import gather_object
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from vlweave.assets import resolve_data_path
from vlweave.builder import build_model, save_checkpoint
from vlweave.config import RunConfig, StageConfig
from vlweave.context import VlweaveContext
from vlweave.data.collate import pad_batch
from vlweave.data.llava_json import Sample, load_llava_data
from vlweave.hardware import bf16_available
from vlweave.language.routing import RoutingPool, connector_routes
from vlweave.processing import IGNORE_INDEX, make_transform, pixels_by_tower
from vlweave.processor import VlweaveProcessor
from vlweave.safe_io import atomic_write_text
from vlweave.train import checkpoints as ckpts
from vlweave.train.attention import training_attention, training_kernels
from vlweave.train.distributed import (
    configure_stage,
    enable_gradient_checkpointing,
    engine_inputs,
    gather_rng_states,
    is_sharded,
    make_accelerator,
    planned_loader,
    set_rng_state,
    share_feature_cache,
)
from vlweave.train.guards import (
    DataWarnings,
    NonFiniteGuard,
    NonFiniteLossError,
    assert_finite_tensors,
    check_same_data,
    data_fingerprint,
    total_grad_norm,
    validate_train_config,
)
from vlweave.train.policy import (
    apply_tune_policy,
    component_lr,
    merge_lora,
    parameter_owners,
    resolve_tune,
    trained_tensors,
)
from vlweave.vision.cache import FeatureCache
from vlweave.vision.towers import BASE_TOWER

# A stage's steps are flagged slow when the median of the last SLOW_WINDOW steps takes SLOW_FACTOR times the median
# of its first ones (steps 2..SLOW_WINDOW+1; step 1 pays warm-ups): on a shared CPU that is usually another process
# competing for the cores, and every timing of the run is then suspect.
SLOW_FACTOR = 2.0
SLOW_WINDOW = 5
RUN_CONFIG_NAME = "run_config.yaml"  # the resolved run config, saved inside final/ (what `vlweave eval` reads)


def encode_samples(samples: list[Sample], processor: VlweaveProcessor, template: str, system_prompt: str | None,
                   max_length: int, progress: bool = True,
                   data_warnings: DataWarnings | None = None,
                   num_routing_tokens: int | None = None) -> list[dict[str, Any]]:
    """Training samples through the processor (its image token and token count; the stage's template).
    A sample longer than ``max_length`` is truncated (as LLaVA does) and counted in ``data_warnings``: its last
    answer, end-of-turn token included, is cut, so the model never learns where that answer stops.  A routing
    instruction (``Sample.routing_pass``) gets ``num_routing_tokens`` image tokens, as the routing pass sees."""
    out = []
    for s in tqdm(samples, desc=f"tokenizing ({template})", disable=not progress, unit="sample"):
        if s.routing_pass and num_routing_tokens is None:
            raise ValueError(f"record {s.id!r} is a routing instruction (routing_pass) but the connector does not "
                             "route between experts")
        n_image = num_routing_tokens if s.routing_pass else None
        enc = processor.encode_conversation(s.conversations, has_image=bool(s.image), template=template,
                                            system_prompt=system_prompt, max_length=None, sample_id=s.id,
                                            num_image_tokens=n_image)
        if max_length is not None and len(enc["input_ids"]) > max_length:
            if data_warnings is not None:
                data_warnings.add("truncated_answer", s.id, f"longer than language.max_length={max_length}: answer "
                                  "truncated, its end-of-turn lost")
            enc = processor.encode_conversation(s.conversations, has_image=bool(s.image), template=template,
                                                system_prompt=system_prompt, max_length=max_length, sample_id=s.id,
                                                num_image_tokens=n_image)
        out.append({"input_ids": enc["input_ids"], "labels": enc["labels"], "image": s.image, "id": s.id,
                    "texts": s.user_texts(), "routing": s.routing, "routing_pass": s.routing_pass})
    return out


def step_start(ckpt, index: int, start_stage: int, start_step: int, stage: StageConfig, world: int = 1) -> int:
    """First (global) micro-batch a stage will run: after the resumed step when resuming into this stage, else 0."""
    return start_step * stage.grad_accum * world if ckpt is not None and index == start_stage else 0


def plan_batches(n: int, stage: StageConfig, seed: int, index: int, world: int = 1) -> tuple[int, list[list[int]]]:
    """Deterministic micro-batch index lists for a stage: epochs of seeded permutations, concatenated.
    One optimizer step takes ``grad_accum * world`` consecutive micro-batches (``world`` processes; the prepared
    loader gives micro-batch ``j`` to rank ``j % world``), so the plan depends on the global batch only."""
    per_step = stage.batch_size * stage.grad_accum * world
    total = max(1, math.ceil(n * stage.epochs / per_step))
    if stage.max_steps is not None:
        total = min(total, stage.max_steps)
    need = total * per_step
    order: list[int] = []
    epoch = 0
    while len(order) < need:
        g = torch.Generator().manual_seed(seed * 1_000_003 + index * 1009 + epoch)
        order += torch.randperm(n, generator=g).tolist()
        epoch += 1
    order = order[:need]
    mbs = [order[i : i + stage.batch_size] for i in range(0, need, stage.batch_size)]
    return total, mbs


class Trainer:
    """Owns the model, tokenizer, feature store and run folder for one run config."""

    def __init__(self, cfg: RunConfig, *, progress: bool = True) -> None:
        validate_train_config(cfg)
        self.cfg = cfg
        self.progress = progress
        self.run_dir = Path(cfg.train.output_dir)
        self.guard = NonFiniteGuard(cfg.train.on_nonfinite)
        self.data_warnings = DataWarnings()
        self._stage_data: dict[int, list[Sample]] = {}
        self.data_fingerprints: dict[str, dict[str, Any]] = {}  # stage index (str) -> data_fingerprint
        self.preflight()  # every stage's records and images, before the (slow) model build
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._seed_all(cfg.train.seed)
        self.model, self.tokenizer = build_model(cfg)
        self.processor = VlweaveProcessor.from_model(self.model, self.tokenizer)
        self.transforms = self.processor.transforms
        self.accelerator = make_accelerator(cfg.train.mixed_precision, cfg.train.bf16,
                                            find_unused_parameters=cfg.train.find_unused_parameters)
        self.is_main = self.accelerator.is_main_process  # only rank 0 writes checkpoints, logs, plots, exports
        self.progress = progress and self.is_main  # one set of progress bars
        self.model.to(self.accelerator.device)
        if cfg.train.gradient_checkpointing:
            enable_gradient_checkpointing(self.model, cfg.train.gradient_checkpointing)
        self._engine = None  # the model as prepared by accelerate for the current stage (DDP/FSDP/DeepSpeed wrapper)
        self.store: FeatureCache | None = None
        # Routed connectors (MoVA): records' routing names -> bits in expert order; routing instructions' tokens.
        self.pool = RoutingPool.from_connector(self.model.connector) if connector_routes(self.model) else None
        if self.pool is not None:
            self._stage_data.clear()  # reloaded with the pool: routing bits validated against the experts
        # Cache the towers that stay frozen in every stage (MoVA trains the base tower and keeps the experts frozen:
        # the experts, the expensive part, are still cached); a trained tower runs from pixels.
        components = self.model.components()
        trained_towers = {c.removeprefix("vision.") for s in cfg.train.stages
                          for c, p in resolve_tune(s, components).items() if c.startswith("vision.") and p != "frozen"}
        if self.pool is not None:  # MoVA: the experts are frozen in every stage (methods.md §2c)
            trained_experts = sorted(trained_towers & set(self.pool.experts))
            if trained_experts:
                raise ValueError(f"train.stages: expert tower(s) {trained_experts} would be trained; MoVA's experts "
                                 f"stay frozen (tune them 'frozen', e.g. tune: {{vision: frozen, vision.base: full}})")
        self.cached_towers = [n for n in self.model.needed_towers() if n not in trained_towers]
        if cfg.train.cache_features and self.cached_towers:
            self.store = FeatureCache(self.model, towers=self.cached_towers)
        self.metrics: list[dict[str, Any]] = []
        # What training has changed so far, by component: {component: {"full" | "lora" | "buffers"}}; checkpoints
        # store exactly these tensors (``trained_names``).
        self.trained: dict[str, set[str]] = {}
        self._legacy_trained: set[str] = set()  # tensor names from a checkpoint saved before components
        self.stage_times: list[dict[str, Any]] = []  # seconds per stage and part (this process's stages)
        self.warnings: list[str] = []
        self._slow_stages: set[int] = set()
        if self.is_main:
            cfg.save(self.run_dir / "config.yaml")

    # ---- helpers --------------------------------------------------------------------------------------
    @staticmethod
    def _seed_all(seed: int) -> None:
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)

    def preflight(self) -> None:
        """Load and validate every stage's records and decode every image they name (in parallel, cached by
        content), so bad data fails in seconds, naming data file, record and image, not after the model build."""
        from vlweave.data.images import verify_sample_images

        for index, stage in enumerate(self.cfg.train.stages):
            samples = self.stage_samples(index, stage)
            verify_sample_images(samples, self.data_fingerprints[str(index)]["path"], progress=self.progress)

    def stage_samples(self, index: int, stage: StageConfig) -> list[Sample]:
        """The validated records of a stage (validation covers the whole file, even if a capped stage uses part)."""
        if index not in self._stage_data:
            self._stage_data[index] = self._load_stage_samples(index, stage)
        return self._stage_data[index]

    def _load_stage_samples(self, index: int, stage: StageConfig) -> list[Sample]:
        d = self.cfg.data
        spec = stage.data or (d.align if stage.name == "align" and d.align else d.train)
        if not spec:
            raise ValueError(f"stage {stage.name!r}: no data (set data.train or stages[{index}].data)")
        path, root = resolve_data_path(spec)
        # The preflight runs before the model (and its routing pool) exists; a routed model reloads the records
        # once its pool is known, turning routing names into bits and checking their length.
        pool = getattr(self, "pool", None)
        experts = list(pool.experts) if pool is not None else None
        samples = load_llava_data(path, d.image_folder or root, routing_experts=experts)
        self.data_fingerprints[str(index)] = data_fingerprint(Path(path).expanduser().resolve(), len(samples))
        if d.max_samples is not None:
            samples = samples[: d.max_samples]
        return samples + self.mixed_samples(index, stage, len(samples), experts)

    def mixed_samples(self, index: int, stage: StageConfig, n_main: int,
                      experts: list[str] | None) -> list[Sample]:
        """The stage's ``mix`` sources (e.g. MoVA's routing instructions): ``round(ratio * n_main)`` records from
        each, a seeded sample (with repetition only when the source is smaller), ids made unique by source."""
        out: list[Sample] = []
        for k, mix in enumerate(stage.mix):
            path, root = resolve_data_path(mix.path)
            source = load_llava_data(path, mix.image_folder or root, routing_experts=experts)
            if not source:
                raise ValueError(f"stages[{index}].mix[{k}]: {path} has no records")
            want = round(mix.ratio * n_main)
            rng = random.Random(self.cfg.train.seed * 7919 + index * 101 + k)
            picks: list[int] = []
            while len(picks) < want:
                picks += rng.sample(range(len(source)), min(len(source), want - len(picks)))
            for r, i in enumerate(picks):
                s = source[i]
                out.append(Sample(id=f"mix{k}:{s.id}#{r}", conversations=s.conversations, image=s.image,
                                  routing=s.routing, routing_pass=s.routing_pass))
        return out

    def encode_used(self, stage: StageConfig, samples: list[Sample], used: set[int]) -> dict[int, dict[str, Any]]:
        """Tokenize only the records the planned batches will visit (a capped stage may touch a few percent)."""
        template = stage.template or self.cfg.language.template
        order = sorted(used)
        encoded = encode_samples([samples[i] for i in order], self.processor, template,
                                 self.cfg.language.system_prompt, self.cfg.language.max_length, self.progress,
                                 self.data_warnings,
                                 num_routing_tokens=self.pool.num_routing_tokens if self.pool is not None else None)
        return dict(zip(order, encoded))

    def collate(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = pad_batch(
            [{"input_ids": e["input_ids"], "labels": e["labels"]} for e in examples],
            self.tokenizer.pad_token_id,
            padding_side="right",
            pad_to_multiple_of=self.cfg.data.pad_to_multiple_of,
            trim_unsupervised_tail=True,  # exact: nothing after the last label reaches the loss (~4 % fewer tokens)
            image_token_id=self.processor.image_token_id,
        )
        images = [e["image"] for e in examples if e["image"]]
        texts = [e.get("texts", []) for e in examples]
        routing_pass = any(e.get("routing_pass") for e in examples)
        routing = [e.get("routing") for e in examples]
        if routing_pass:  # the routing pass sees every bit 0 (methods.md §2a step 2)
            routing = [[0] * self.pool.num_experts if e["image"] else None for e in examples]
        context = VlweaveContext.for_batch([bool(e["image"]) for e in examples], texts=texts, routing=routing,
                                           text_input_ids=self.text_ids(texts), routing_pass=routing_pass)
        batch["context"] = context
        if images:
            rows = self.model.tower_rows(context)  # routed towers run (and are read from the cache) on those rows
            cached = self.store.batch(images, rows) if self.store is not None else {}
            if cached:
                batch["vision_features"] = cached
            rest = {n: t for n, t in self.processor.transforms.items()
                    if (self.store is None or n not in self.store.stores)
                    and not (rows.get(n) is not None and not len(rows[n]))}
            if rest:
                batch["pixel_values"] = pixels_by_tower(rest, images)
        return batch

    def collate_parts(self, examples: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """A micro-batch as batches that each run in one forward: routing instructions (routing-pass input) apart
        from the other samples.  The loss of the whole is their supervised-token-weighted mean (exact)."""
        groups = [[e for e in examples if not e.get("routing_pass")], [e for e in examples if e.get("routing_pass")]]
        return [self.collate(g) for g in groups if g]

    def text_ids(self, texts: list[list[str]]) -> list[list[int]] | None:
        """Token ids of each sample's user texts for a connector that reads text (else None): the processor's
        tokenization of what the live connector asks for (:meth:`Connector.text_input`)."""
        return self.processor.text_ids(texts, self.model.connector.text_input())

    @property
    def trained_names(self) -> set[str]:
        """The tensors training has changed so far (what a checkpoint stores), from ``self.trained``."""
        return set(trained_tensors(self.model, self.trained)) | self._legacy_trained

    def _mark_trained(self, stage: StageConfig) -> None:
        for comp, policy in resolve_tune(stage, self.model.components()).items():
            if policy != "frozen":
                self.trained.setdefault(comp, set()).add(policy)

    def _optimizer(self, stage: StageConfig) -> torch.optim.Optimizer:
        """One parameter group per trained component (``name``: the component), with its lr
        (``policy.component_lr``).  The connector's group comes first, then the others in ``model.components()``
        order, so with ``connector_lr`` set the logged ``lr`` (the last group's) is still the other components'."""
        owners = parameter_owners(self.model)
        by_comp: dict[str, list[torch.nn.Parameter]] = {}
        for name, p in self.model.named_parameters():
            if p.requires_grad:
                by_comp.setdefault(owners[name], []).append(p)
        order = ["connector", *(c for c in self.model.components() if c != "connector")]
        groups = [{"params": by_comp[c], "lr": component_lr(stage, c), "name": c} for c in order if c in by_comp]
        if not groups:
            raise ValueError(f"stage {stage.name!r} trains nothing: every component is frozen")
        return torch.optim.AdamW(groups, weight_decay=stage.weight_decay)

    # ---- checkpoints ----------------------------------------------------------------------------------
    def save_state(self, stage_index: int, step: int, optimizer, scheduler) -> Path:
        """Atomic checkpoint (``checkpoints.publish_folder``): trained tensors, optimizer, scheduler, RNG, metrics
        so far, the data fingerprints; then the oldest beyond ``train.keep_checkpoints`` are deleted.
        Every rank calls it (RNG states are gathered); only rank 0 writes, except that a sharded engine (FSDP,
        DeepSpeed) also saves its own state through ``accelerator.save_state`` (each rank its shards)."""
        acc = self.accelerator
        name = f"ckpt-s{stage_index}-{step:06d}"
        final = self.run_dir / "checkpoints" / name
        rngs = gather_rng_states(acc)  # every rank's, so that each resumed rank continues its own stream
        sharded = is_sharded(acc)
        if sharded:  # full tensors gathered from the shards (a collective), the engine's own state beside them
            tensors = acc.get_state_dict(self._engine)
            engine_dir = final.with_name(name + ".engine")
            if self.is_main:
                shutil.rmtree(engine_dir, ignore_errors=True)
            acc.wait_for_everyone()
            acc.save_state(str(engine_dir))
            acc.wait_for_everyone()
        else:
            tensors = dict(self.model.named_parameters()) | dict(self.model.named_buffers())
        if not self.is_main:
            acc.wait_for_everyone()
            return final
        stage = self.cfg.train.stages[stage_index]
        names = self.trained_names
        state = {n: t.detach().cpu().contiguous() for n, t in tensors.items() if n in names}
        assert_finite_tensors(state, str(final))

        def write(tmp: Path) -> None:
            save_file(state, str(tmp / "trained.safetensors"))
            # (a sharded engine's optimizer and scheduler are in engine/, saved by accelerate)
            engine_state = {} if sharded else {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}
            torch.save({**engine_state, **rngs[0], **({"ranks": rngs} if len(rngs) > 1 else {})}, tmp / "state.pt")
            if sharded:
                os.replace(engine_dir, tmp / "engine")
            (tmp / "progress.json").write_text(json.dumps(
                {"stage_index": stage_index, "step": step, "trained": sorted(names),
                 "components": {c: sorted(k) for c, k in self.trained.items()}, "metrics": self.metrics,
                 "data": self.data_fingerprints, "nonfinite_skipped": self.guard.skipped,
                 "checksums": ckpts.checksums(tmp),
                 "world_size": acc.num_processes, "batch_size": stage.batch_size,
                 "global_batch": stage.batch_size * stage.grad_accum * acc.num_processes}))

        final.parent.mkdir(parents=True, exist_ok=True)
        ckpts.publish_folder(final, write, "checkpoint", kept=ckpts.describe_kept(self.run_dir))
        ckpts.prune_checkpoints(self.run_dir, self.cfg.train.keep_checkpoints)
        acc.wait_for_everyone()  # (if rank 0 fails to write, the launcher ends the other processes)
        return final

    @staticmethod
    def latest_checkpoint(path: str | Path) -> Path:
        """The checkpoint a resume starts from (``checkpoints.latest_checkpoint``: falls back past damaged ones)."""
        return ckpts.latest_checkpoint(path)

    # ---- the loop -------------------------------------------------------------------------------------
    def train(self, resume: str | Path | None = None) -> dict[str, Any]:
        cfg = self.cfg
        start_stage, start_step, ckpt, point = 0, 0, None, None
        if resume is not None:
            # Loaded (and checked) completely here, so a damaged checkpoint falls back to the previous one.
            point = ckpts.load_resume_checkpoint(resume)
            ckpt, prog = point.path, point.progress
            start_stage, start_step = prog["stage_index"], prog["step"]
            self.metrics = prog["metrics"]
            self.guard.skipped = list(prog.get("nonfinite_skipped", []))
            saved_data = prog.get("data", {})
            if str(start_stage) in self.data_fingerprints:
                check_same_data(saved_data.get(str(start_stage)), self.data_fingerprints[str(start_stage)],
                                f"{start_stage} ({cfg.train.stages[start_stage].name!r})", ckpt)
            if "components" in prog:
                self.trained = {c: set(k) for c, k in prog["components"].items()}
            else:  # saved before components: the tensor names themselves
                self._legacy_trained = set(prog["trained"])
        acc = self.accelerator
        world = acc.num_processes
        if ckpt is not None:
            self._check_resume_batch(ckpt, prog, start_stage, world)
        t0 = time.time()
        stopped_early = False
        for index, stage in enumerate(cfg.train.stages):
            if index < start_stage:
                apply_tune_policy(self.model, stage, cfg.train.lora)  # same structure (LoRA) as the original run
                continue
            t_stage = time.time()
            apply_tune_policy(self.model, stage, cfg.train.lora)
            self._mark_trained(stage)
            if point is not None and index == start_stage:
                self._load_trained(ckpt, point.trained)
            samples = self.stage_samples(index, stage)
            total, mbs = plan_batches(len(samples), stage, cfg.train.seed, index, world)
            first = step_start(ckpt, index, start_stage, start_step, stage, world)
            examples = self.encode_used(stage, samples, {i for mb in mbs[first:] for i in mb})
            t_data = time.time()
            if self.store is not None:
                # Only the images this stage will actually see, for a routed tower only those routed to it; built
                # once, by rank 0.
                make_cache = lambda: FeatureCache(self.model, towers=self.cached_towers)  # noqa: E731
                self.store = share_feature_cache(acc, self.store, make_cache,
                                                 [e["image"] for e in examples.values() if e["image"]],
                                                 self.progress,
                                                 paths_by_tower=self.routed_paths(list(examples.values())))
            t_features = time.time()
            optimizer = self._optimizer(stage)
            scheduler = get_cosine_schedule_with_warmup(optimizer, math.ceil(stage.warmup_ratio * total), total)
            step = 0
            resuming = point is not None and index == start_stage
            if resuming:
                state, point = point.state, None  # nothing of the checkpoint is held past this point
                if "optimizer" in state:  # (sharded engines: loaded by accelerate after prepare)
                    optimizer.load_state_dict(state["optimizer"])
                    scheduler.load_state_dict(state["scheduler"])
                ranks = state.get("ranks")
                set_rng_state(ranks[acc.process_index] if ranks and len(ranks) == world else state)
                step = start_step
            if ckpt is None and index == 0:
                self.calibrate_connector(examples)
            optimizer, loader, scheduler = self._prepare(stage, optimizer, planned_loader(examples, mbs[first:],
                                                                                          self.collate_parts),
                                                         scheduler)
            if resuming and is_sharded(acc):
                acc.load_state(str(ckpt / "engine"))
            t_steps = time.time()
            steps_before = step
            if step < total:
                kernel = training_attention(cfg.train.attn_implementation, acc.device)
                self.model.word_tie = stage.word_tie  # the align objective, this stage's steps only
                try:
                    with training_kernels(self.model, self.model.language_model, kernel):
                        self._run_stage(index, stage, loader, total, step, optimizer, scheduler)
                except NonFiniteLossError as exc:  # keep the log of what happened beside the finite checkpoints
                    if self.is_main:
                        self._write_metrics({"train_seconds": time.time() - t0, "steps": len(self.metrics),
                                             "stopped": str(exc)})
                    raise
                finally:
                    self.model.word_tie = 0.0
            t_save = time.time()
            last = self.save_state(index, total, optimizer, scheduler)
            self._unprepare()
            self.stage_times.append({"stage": stage.name, "stage_index": index, "steps": total - steps_before,
                                     "data_seconds": t_data - t_stage, "feature_seconds": t_features - t_data,
                                     "step_seconds": t_save - t_steps, "save_seconds": time.time() - t_save,
                                     "seconds": time.time() - t_stage})
            if is_sharded(acc) and index + 1 < len(cfg.train.stages):
                # FSDP/DeepSpeed wrap the model in place: a second stage (other trained parameters) cannot be
                # prepared in the same process.  The stage-end checkpoint is there; --resume runs the next stage.
                stopped_early = True
                if self.is_main:
                    print(f"stage {index} done under {acc.distributed_type.value}; run again with --resume "
                          f"{self.run_dir} for stage {index + 1} (one stage per launch with sharded engines)")
                break
        summary: dict[str, Any] = {"train_seconds": time.time() - t0, "steps": len(self.metrics),
                                   "nonfinite_skipped": len(self.guard.skipped), "processes": world}
        if self.is_main:
            self.data_warnings.announce()
            t_export = time.time()
            if not stopped_early:
                # A sharded engine leaves shards (FSDP) or placeholders (ZeRO-3) in the model: export rebuilds a
                # plain one from the checkpoint that just gathered every trained tensor.
                self.export_from_checkpoint(last) if is_sharded(acc) else self.export()
            self.plot_loss()
            summary["export_seconds"] = time.time() - t_export
            summary["stages"] = self.stage_times
            summary["feature_cache"] = None if self.store is None else self.store.hit_rate()
            summary["warnings"] = self.warnings
            self._write_metrics(summary)
        acc.wait_for_everyone()
        return summary

    def _write_metrics(self, summary: dict[str, Any]) -> None:
        """``train_metrics.json``: the summary, the counted data warnings, the skipped steps and the step log."""
        atomic_write_text(self.run_dir / "train_metrics.json",
                          json.dumps({"summary": summary, "warnings": self.data_warnings.as_dict(),
                                      "nonfinite_skipped": self.guard.skipped, "log": self.metrics}, indent=1),
                          "training metrics")

    def _prepare(self, stage: StageConfig, optimizer, loader, scheduler):
        """Model, optimizer, data and scheduler through ``accelerator.prepare`` for one stage.  The model is
        re-prepared per stage because DDP registers gradient hooks for the parameters trained when it is built
        (a later stage's LoRA would otherwise never be synchronised).  ``self.model`` stays the plain model;
        ``self._engine`` is the wrapper the forward runs through."""
        acc = self.accelerator
        configure_stage(acc, stage.batch_size, stage.grad_accum)
        self._engine, optimizer, loader, scheduler = acc.prepare(self.model, optimizer, loader, scheduler)
        return optimizer, loader, scheduler

    def _unprepare(self) -> None:
        """Drop accelerate's wrappers after a stage; the plain model keeps its (trained) parameters and its own
        forward (accelerate patches ``forward`` with autocast under mixed precision)."""
        acc = self.accelerator
        if self._engine is not None and not is_sharded(acc):
            acc.unwrap_model(self._engine, keep_fp32_wrapper=False)
        acc.free_memory()
        self._engine = None

    def _check_resume_batch(self, ckpt: Path, prog: dict[str, Any], stage_index: int, world: int) -> None:
        """A resumed stage must keep its per-process batch and global batch (the plan is a function of both);
        the number of processes may change if ``grad_accum`` makes up for it."""
        if "global_batch" not in prog or stage_index >= len(self.cfg.train.stages):
            return  # saved before distributed runs: one process
        stage = self.cfg.train.stages[stage_index]
        now = (stage.batch_size, stage.batch_size * stage.grad_accum * world)
        then = (prog["batch_size"], prog["global_batch"])
        if now != then:
            raise ValueError(
                f"{ckpt}: saved with batch_size {then[0]} and global batch {then[1]} ({prog['world_size']} "
                f"process(es)); resuming with batch_size {now[0]} x grad_accum {stage.grad_accum} x {world} "
                f"process(es) = {now[1]} would change the batch plan. Keep batch_size and set grad_accum so that "
                f"batch_size x grad_accum x processes = {then[1]}")

    def routed_paths(self, examples: list[dict[str, Any]]) -> dict[str, list[str]]:
        """Per needed tower, the image paths of these examples it runs on (all of them unless the connector routes
        it: ``Connector.tower_rows``); routing instructions count with their routing-pass input."""
        out: dict[str, list[str]] = {}
        for routing_pass in (False, True):
            group = [e for e in examples if e["image"] and bool(e.get("routing_pass")) == routing_pass]
            if not group:
                continue
            routing = ([[0] * self.pool.num_experts] * len(group) if routing_pass
                       else [e.get("routing") for e in group])
            ctx = VlweaveContext.for_batch([True] * len(group), routing=routing, routing_pass=routing_pass)
            for name, rows in self.model.tower_rows(ctx).items():
                picked = group if rows is None else [group[int(i)] for i in rows]
                out.setdefault(name, []).extend(e["image"] for e in picked)
        return out

    @torch.no_grad()
    def calibrate_connector(self, examples: dict[int, dict[str, Any]], max_images: int = 512) -> None:
        """Let a connector measure input statistics (e.g. ``standardize``) on training images before step 1.
        The measured buffers are saved with the model, so resumed runs and exports reuse them."""
        calibrate = getattr(self.model.connector, "calibrate", None)
        images = sorted({e["image"] for e in examples.values() if e["image"]})[:max_images]
        if calibrate is None or not images or BASE_TOWER not in self.model.needed_towers():
            return
        if self.store is not None and BASE_TOWER in self.store.stores:
            feats = self.store.batch(images)[BASE_TOWER]
        else:
            feats = self.model.vision_features(self.processor.pixel_values(images)[BASE_TOWER])
        calibrate(feats)
        self.trained.setdefault("connector", set()).add("buffers")

    def _load_trained(self, ckpt: Path, state: dict[str, torch.Tensor] | None = None) -> None:
        state = load_file(str(ckpt / "trained.safetensors")) if state is None else state
        params = dict(self.model.named_parameters()) | dict(self.model.named_buffers())
        missing = set(state) - set(params)
        if missing:
            raise ValueError(f"{ckpt}: checkpoint has tensors the model lacks: {sorted(missing)[:5]}")
        with torch.no_grad():
            for n, t in state.items():
                params[n].copy_(t)

    def _run_stage(self, index, stage, loader, total, step, optimizer, scheduler) -> None:
        """Steps ``step..total`` of a stage.  ``loader`` is this rank's shard of the remaining planned micro-batches
        (already on the device); accelerate scales the loss by ``grad_accum`` and synchronises gradients only
        on the last micro-batch of a step."""
        acc = self.accelerator
        model, engine = self.model, self._engine
        world = acc.num_processes
        engine.train()
        # No dropout (and no batch-norm statistics updates) in the towers; LM dropout follows its config.
        model.vision_towers.eval()
        # Sharded engines clip over their own (flat/sharded) parameters; accelerate maps this to the engine's clip.
        params = list(engine.parameters()) if is_sharded(acc) else [p for p in model.parameters() if p.requires_grad]
        bar = tqdm(total=total, initial=step, desc=f"stage {index} {stage.name}",
                   disable=not self.progress, unit="step")
        save_every = self.cfg.train.save_every
        batches = iter(loader)
        while step < total:
            t_step = time.time()
            loss_sum, n_tok = 0.0, 0
            micro_losses: list[float] = []
            for k in range(stage.grad_accum):
                parts = next(batches)  # routing instructions apart from the other samples (collate_parts)
                counts = [int((part["labels"][:, 1:] != IGNORE_INDEX).sum()) for part in parts]
                with acc.accumulate(engine):
                    with acc.autocast():
                        outs = [engine(**engine_inputs(part, acc.distributed_type, acc.mixed_precision))
                                for part in parts]
                    # One part: exactly the plain step; several: the token-weighted mean is the whole batch's loss.
                    loss = outs[0].loss if len(parts) == 1 else sum(o.loss * (c / sum(counts))
                                                                    for o, c in zip(outs, counts))
                    acc.backward(loss)
                micro_losses.append(float(loss.detach()))
                loss_sum += micro_losses[-1]
                n_tok += sum(counts)
            if world > 1:
                # Every rank sees the global step's losses and token count: the logged loss is the global batch's
                # (as in a 1-process run) and the non-finite guard decides the same on every rank.
                per_rank = gather_object([(micro_losses, n_tok)])
                micro_losses = [x for losses_r, _ in per_rank for x in losses_r]
                loss_sum, n_tok = sum(micro_losses), sum(n for _, n in per_rank)
            if is_sharded(acc):  # the engine's own clip (DeepSpeed clips in its step and reports no norm)
                grad_norm = acc.clip_grad_norm_(params, stage.max_grad_norm) if stage.max_grad_norm else None
            else:
                acc.unscale_gradients()  # fp16: the loss scaler's factor out before the norm (a no-op otherwise)
                grad_norm = total_grad_norm(params, stage.max_grad_norm)
            ok = self.guard.step_ok(stage.name, index, step + 1, micro_losses,
                                    None if grad_norm is None else float(grad_norm),
                                    lambda: ckpts.describe_kept(self.run_dir))
            if ok:
                optimizer.step()
            scheduler.step()  # a skipped batch still counts as a step: the schedule and batch plan stay aligned
            optimizer.zero_grad(set_to_none=True)
            step += 1
            rec = {"stage": stage.name, "stage_index": index, "step": step,
                   "loss": loss_sum / len(micro_losses) if ok else None,
                   "lr": scheduler.get_last_lr()[-1], "tokens": n_tok, "seconds": time.time() - t_step}
            if not ok:
                rec["skipped"] = self.guard.skipped[-1]["reason"]
            if stage.max_grad_norm and ok and grad_norm is not None:
                rec["grad_norm"] = float(grad_norm)
            self.metrics.append(rec)
            self._check_speed(stage, index)
            bar.set_postfix(loss=f"{rec['loss']:.3f}" if ok else "skipped")
            bar.update(1)
            if save_every and step % save_every == 0 and step < total:
                self.save_state(index, step, optimizer, scheduler)
        # Finish the iteration (accelerate unregisters a loader only then); the plan gave each rank exactly its steps.
        if next(batches, None) is not None:
            raise RuntimeError(f"stage {index}: the planned loader has micro-batches left after step {total}")
        bar.close()

    def _check_speed(self, stage: StageConfig, index: int) -> None:
        """Warn once per stage when its recent steps run :data:`SLOW_FACTOR` times slower than its first ones."""
        if index in self._slow_stages or self.metrics[-1]["step"] % SLOW_WINDOW:
            return
        times = [m["seconds"] for m in self.metrics if m["stage_index"] == index]
        if len(times) < 3 * SLOW_WINDOW + 1:
            return
        reference = float(np.median(times[1 : 1 + SLOW_WINDOW]))
        recent = float(np.median(times[-SLOW_WINDOW:]))
        if reference > 0 and recent > SLOW_FACTOR * reference:
            msg = (f"stage {index} ({stage.name}): steps now take {recent:.2f}s, {recent / reference:.1f}x the "
                   f"{reference:.2f}s of its first steps (step {len(times)}); another process may be competing "
                   f"for the CPU cores, so this run's timings are not comparable")
            self.warnings.append(msg)
            self._slow_stages.add(index)
            tqdm.write(f"warning: {msg}")

    # ---- outputs --------------------------------------------------------------------------------------
    def export_from_checkpoint(self, ckpt: str | Path) -> Path:
        """``export()`` of a checkpoint rather than of the live model: a freshly built model (same seed, so the
        same untrained weights), the LoRA structure of every stage up to the checkpoint's, its trained tensors."""
        ckpt = self.latest_checkpoint(ckpt)
        prog = json.loads((ckpt / "progress.json").read_text())
        self._seed_all(self.cfg.train.seed)
        model, _ = build_model(self.cfg)
        for stage in self.cfg.train.stages[: prog["stage_index"] + 1]:
            apply_tune_policy(model, stage, self.cfg.train.lora)
        self.model = model
        self._load_trained(ckpt)
        return self.export()

    def export(self) -> Path:
        """HF-format checkpoint at ``run_dir/final``, component by component: LoRA is folded into the base weights
        of the component that holds it (the LM, a tower); what cannot be merged -- the LM-side modules -- is saved
        unmerged as its own weights (``lm_modules.<name>.*``) and rebuilt from ``config.lm_modules`` on load."""
        for module in self.model.components().values():
            merge_lora(module)
        left = [n for n, _ in self.model.named_parameters() if "lora_" in n]
        if left:  # nothing on load would rebuild these adapters: refuse rather than drop them silently
            raise RuntimeError(f"export: LoRA parameters outside every component survived the merge: {left[:5]}")
        self.model.requires_grad_(False)
        def write(tmp: Path) -> None:
            save_checkpoint(self.model, self.tokenizer, tmp, processor=self.processor)
            # The run config travels with the checkpoint: `vlweave eval` takes its eval settings (data, image
            # folder, max new tokens, prompt suffix) and its training data (the blind baselines) from here.
            self.cfg.save(tmp / RUN_CONFIG_NAME)

        return ckpts.publish_folder(self.run_dir / "final", write, "final model",
                                    kept=ckpts.describe_kept(self.run_dir))

    def plot_loss(self) -> Path | None:
        if not self.metrics:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        x0 = 0
        for name in dict.fromkeys(m["stage"] + f"#{m['stage_index']}" for m in self.metrics):
            pts = [m for m in self.metrics if m["stage"] + f"#{m['stage_index']}" == name and m["loss"] is not None]
            if not pts:
                continue
            xs = [x0 + m["step"] for m in pts]
            ax.plot(xs, [m["loss"] for m in pts], label=name.split("#")[0])
            x0 = xs[-1]
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss (supervised tokens)")
        ax.set_title(f"vlweave training loss — {self.run_dir.name}")
        ax.legend()
        ax.grid(alpha=0.3)
        path = self.run_dir / "loss.png"
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path


__all__ = ["Trainer", "bf16_available", "make_transform", "resolve_data_path", "train"]  # (re-exported names)


def train(cfg: RunConfig, *, resume: str | Path | None = None, progress: bool = True) -> Trainer:
    trainer = Trainer(cfg, progress=progress)
    trainer.train(resume=resume)
    return trainer
