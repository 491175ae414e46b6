"""Staged training on accelerate: ``align`` then ``finetune`` (or any list of stages), resumable exactly.

Readable top to bottom: build -> per stage (data, tune policy, optimizer, schedule) -> steps -> checkpoints.
Determinism: the order of samples is a pure function of (seed, stage index, epoch), so a run resumed from any
checkpoint sees the same batches and reproduces the uninterrupted loss curve.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import send_to_device
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


def encode_samples(samples: list[Sample], processor: VlweaveProcessor, template: str, system_prompt: str | None,
                   max_length: int, progress: bool = True,
                   num_routing_tokens: int | None = None) -> list[dict[str, Any]]:
    """Training samples through the processor (its image token and token count; the stage's template).  A routing
    instruction (``Sample.routing_pass``) gets ``num_routing_tokens`` image tokens, as the routing pass sees."""
    out = []
    for s in tqdm(samples, desc=f"tokenizing ({template})", disable=not progress, unit="sample"):
        if s.routing_pass and num_routing_tokens is None:
            raise ValueError(f"record {s.id!r} is a routing instruction (routing_pass) but the connector does not "
                             "route between experts")
        enc = processor.encode_conversation(s.conversations, has_image=bool(s.image), template=template,
                                            system_prompt=system_prompt, max_length=max_length, sample_id=s.id,
                                            num_image_tokens=num_routing_tokens if s.routing_pass else None)
        out.append({"input_ids": enc["input_ids"], "labels": enc["labels"], "image": s.image, "id": s.id,
                    "texts": s.user_texts(), "routing": s.routing, "routing_pass": s.routing_pass})
    return out


def step_start(ckpt, index: int, start_stage: int, start_step: int, stage: StageConfig) -> int:
    """First micro-batch a stage will run: after the resumed step when resuming into this stage, else 0."""
    return start_step * stage.grad_accum if ckpt is not None and index == start_stage else 0


def plan_batches(n: int, stage: StageConfig, seed: int, index: int) -> tuple[int, list[list[int]]]:
    """Deterministic micro-batch index lists for a stage: epochs of seeded permutations, concatenated."""
    per_step = stage.batch_size * stage.grad_accum
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
        self.cfg = cfg
        self.progress = progress
        self.run_dir = Path(cfg.train.output_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._seed_all(cfg.train.seed)
        self.model, self.tokenizer = build_model(cfg)
        self.processor = VlweaveProcessor.from_model(self.model, self.tokenizer)
        self.transforms = self.processor.transforms
        bf16 = cfg.train.bf16 and bf16_available()
        self.accelerator = Accelerator(mixed_precision="bf16" if bf16 else "no", cpu=not torch.cuda.is_available())
        self.model.to(self.accelerator.device)
        self.store: FeatureCache | None = None
        # Routed connectors (MoVA): records' routing names -> bits in expert order; routing instructions' tokens.
        self.pool = RoutingPool.from_connector(self.model.connector) if connector_routes(self.model) else None
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
        frozen = [n for n in self.model.needed_towers() if n not in trained_towers]
        if cfg.train.cache_features and frozen:
            self.store = FeatureCache(self.model, towers=frozen)
        self.metrics: list[dict[str, Any]] = []
        # What training has changed so far, by component: {component: {"full" | "lora" | "buffers"}}; checkpoints
        # store exactly these tensors (``trained_names``).
        self.trained: dict[str, set[str]] = {}
        self._legacy_trained: set[str] = set()  # tensor names from a checkpoint saved before components
        cfg.save(self.run_dir / "config.yaml")

    # ---- helpers --------------------------------------------------------------------------------------
    @staticmethod
    def _seed_all(seed: int) -> None:
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)

    def stage_samples(self, index: int, stage: StageConfig) -> list[Sample]:
        """The validated records of a stage (validation covers the whole file, even if a capped stage uses part)."""
        d = self.cfg.data
        spec = stage.data or (d.align if stage.name == "align" and d.align else d.train)
        if not spec:
            raise ValueError(f"stage {stage.name!r}: no data (set data.train or stages[{index}].data)")
        path, root = resolve_data_path(spec)
        experts = list(self.pool.experts) if self.pool is not None else None
        samples = load_llava_data(path, d.image_folder or root, routing_experts=experts)
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
        """Token ids of each sample's user texts for a connector that declares a text encoder (else None)."""
        encoder = getattr(self.model.connector, "text_encoder", None)
        if encoder is None:
            return None
        if encoder != "language":
            raise ValueError(f"connector text_encoder {encoder!r}: only 'language' (the LM's tokenizer) is supported")
        return [self.tokenizer("\n".join(t), add_special_tokens=False)["input_ids"] for t in texts]

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
        """Atomic checkpoint: trained tensors, optimizer, scheduler, RNG, metrics so far."""
        name = f"ckpt-s{stage_index}-{step:06d}"
        final = self.run_dir / "checkpoints" / name
        tmp = final.with_name(name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        tensors = dict(self.model.named_parameters()) | dict(self.model.named_buffers())
        names = self.trained_names
        state = {n: t.detach().cpu().contiguous() for n, t in tensors.items() if n in names}
        save_file(state, str(tmp / "trained.safetensors"))
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "rng": torch.get_rng_state(), "np_rng": np.random.get_state(), "py_rng": random.getstate()},
                   tmp / "state.pt")
        (tmp / "progress.json").write_text(json.dumps(
            {"stage_index": stage_index, "step": step, "trained": sorted(names),
             "components": {c: sorted(k) for c, k in self.trained.items()}, "metrics": self.metrics}))
        if final.exists():  # re-saving a name (a resumed run's stage end): keep a complete copy at every moment
            old = final.with_name(name + ".old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old)
        else:
            os.replace(tmp, final)
        return final

    @staticmethod
    def latest_checkpoint(path: str | Path) -> Path:
        p = Path(path)
        if (p / "progress.json").exists():
            return p
        ckpts = [c for c in (p / "checkpoints").glob("ckpt-s*-*") if re.fullmatch(r"ckpt-s\d+-\d+", c.name)]
        ckpts.sort(key=lambda c: tuple(int(x) for x in re.findall(r"\d+", c.name)))  # (stage, step), numerically
        if not ckpts:
            raise FileNotFoundError(f"{p}: no checkpoint to resume from")
        return ckpts[-1]

    # ---- the loop -------------------------------------------------------------------------------------
    def train(self, resume: str | Path | None = None) -> dict[str, Any]:
        cfg = self.cfg
        start_stage, start_step, ckpt = 0, 0, None
        if resume is not None:
            ckpt = self.latest_checkpoint(resume)
            prog = json.loads((ckpt / "progress.json").read_text())
            start_stage, start_step = prog["stage_index"], prog["step"]
            self.metrics = prog["metrics"]
            if "components" in prog:
                self.trained = {c: set(k) for c, k in prog["components"].items()}
            else:  # saved before components: the tensor names themselves
                self._legacy_trained = set(prog["trained"])
        t0 = time.time()
        for index, stage in enumerate(cfg.train.stages):
            if index < start_stage:
                apply_tune_policy(self.model, stage, cfg.train.lora)  # same structure (LoRA) as the original run
                continue
            apply_tune_policy(self.model, stage, cfg.train.lora)
            self._mark_trained(stage)
            if ckpt is not None and index == start_stage:
                self._load_trained(ckpt)
            samples = self.stage_samples(index, stage)
            total, mbs = plan_batches(len(samples), stage, cfg.train.seed, index)
            first = step_start(ckpt, index, start_stage, start_step, stage)
            examples = self.encode_used(stage, samples, {i for mb in mbs[first:] for i in mb})
            if self.store is not None:
                # Only the images this stage will actually see, and for a routed tower only those routed to it.
                self.store.ensure([e["image"] for e in examples.values() if e["image"]], self.progress,
                                  paths_by_tower=self.routed_paths(list(examples.values())))
            optimizer = self._optimizer(stage)
            scheduler = get_cosine_schedule_with_warmup(optimizer, math.ceil(stage.warmup_ratio * total), total)
            step = 0
            if ckpt is not None and index == start_stage:
                state = torch.load(ckpt / "state.pt", weights_only=False)
                optimizer.load_state_dict(state["optimizer"])
                scheduler.load_state_dict(state["scheduler"])
                torch.set_rng_state(state["rng"])
                np.random.set_state(state["np_rng"])
                random.setstate(state["py_rng"])
                step = start_step
            if ckpt is None and index == 0:
                self.calibrate_connector(examples)
            if step < total:
                self._run_stage(index, stage, examples, mbs, total, step, optimizer, scheduler)
            self.save_state(index, total, optimizer, scheduler)
        summary = {"train_seconds": time.time() - t0, "steps": len(self.metrics)}
        self.export()
        self.plot_loss()
        (self.run_dir / "train_metrics.json").write_text(json.dumps({"summary": summary, "log": self.metrics}, indent=1))
        return summary

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

    def _load_trained(self, ckpt: Path) -> None:
        state = load_file(str(ckpt / "trained.safetensors"))
        params = dict(self.model.named_parameters()) | dict(self.model.named_buffers())
        missing = set(state) - set(params)
        if missing:
            raise ValueError(f"{ckpt}: checkpoint has tensors the model lacks: {sorted(missing)[:5]}")
        with torch.no_grad():
            for n, t in state.items():
                params[n].copy_(t)

    def _run_stage(self, index, stage, examples: dict[int, dict[str, Any]], mbs, total, step, optimizer, scheduler) -> None:
        acc = self.accelerator
        model = self.model
        model.train()
        # No dropout (and no batch-norm statistics updates) in the towers; LM dropout follows its config.
        model.vision_towers.eval()
        params = [p for p in model.parameters() if p.requires_grad]
        bar = tqdm(total=total, initial=step, desc=f"stage {index} {stage.name}", disable=not self.progress,
                   unit="step")
        save_every = self.cfg.train.save_every
        while step < total:
            t_step = time.time()
            loss_sum, n_tok = 0.0, 0
            for k in range(stage.grad_accum):
                parts = self.collate_parts([examples[i] for i in mbs[step * stage.grad_accum + k]])
                counts = [int((p["labels"][:, 1:] != IGNORE_INDEX).sum()) for p in parts]
                for part, count in zip(parts, counts):
                    part = send_to_device(part, acc.device)  # nested per-layer feature lists included
                    with acc.autocast():
                        out = model(**part)
                    # One part: exactly the old step; several: the token-weighted mean is the whole batch's loss.
                    loss = out.loss if len(parts) == 1 else out.loss * (count / sum(counts))
                    acc.backward(loss / stage.grad_accum)
                    loss_sum += float(loss.detach())
                n_tok += sum(counts)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, stage.max_grad_norm) if stage.max_grad_norm else None
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            rec = {"stage": stage.name, "stage_index": index, "step": step, "loss": loss_sum / stage.grad_accum,
                   "lr": scheduler.get_last_lr()[-1], "tokens": n_tok, "seconds": time.time() - t_step}
            if grad_norm is not None:
                rec["grad_norm"] = float(grad_norm)
            self.metrics.append(rec)
            bar.set_postfix(loss=f"{rec['loss']:.3f}")
            bar.update(1)
            if save_every and step % save_every == 0 and step < total:
                self.save_state(index, step, optimizer, scheduler)
        bar.close()

    # ---- outputs --------------------------------------------------------------------------------------
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
        return save_checkpoint(self.model, self.tokenizer, self.run_dir / "final", processor=self.processor)

    def plot_loss(self) -> Path | None:
        if not self.metrics:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        x0 = 0
        for name in dict.fromkeys(m["stage"] + f"#{m['stage_index']}" for m in self.metrics):
            pts = [m for m in self.metrics if m["stage"] + f"#{m['stage_index']}" == name]
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
