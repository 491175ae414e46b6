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
from vlweave.processing import IGNORE_INDEX, make_transform
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

# A stage's steps are flagged slow when the median of the last SLOW_WINDOW steps takes SLOW_FACTOR times the median
# of its first ones (steps 2..SLOW_WINDOW+1; step 1 pays warm-ups): on a shared CPU that is usually another process
# competing for the cores, and every timing of the run is then suspect.
SLOW_FACTOR = 2.0
SLOW_WINDOW = 5
RUN_CONFIG_NAME = "run_config.yaml"  # the resolved run config, saved inside final/ (what `vlweave eval` reads)


def encode_samples(samples: list[Sample], processor: VlweaveProcessor, template: str, system_prompt: str | None,
                   max_length: int, progress: bool = True) -> list[dict[str, Any]]:
    """Training samples through the processor (its image token and token count; the stage's template)."""
    out = []
    for s in tqdm(samples, desc=f"tokenizing ({template})", disable=not progress, unit="sample"):
        enc = processor.encode_conversation(s.conversations, has_image=bool(s.image), template=template,
                                            system_prompt=system_prompt, max_length=max_length, sample_id=s.id)
        out.append({"input_ids": enc["input_ids"], "labels": enc["labels"], "image": s.image, "id": s.id,
                    "texts": s.user_texts(), "routing": s.routing})
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
        vision_trained = any(p != "frozen" for s in cfg.train.stages for c, p in s.tune.items()
                             if c == "vision" or c.startswith("vision."))
        if cfg.train.cache_features and not vision_trained:
            self.store = FeatureCache(self.model)
        self.metrics: list[dict[str, Any]] = []
        # What training has changed so far, by component: {component: {"full" | "lora" | "buffers"}}; checkpoints
        # store exactly these tensors (``trained_names``).
        self.trained: dict[str, set[str]] = {}
        self._legacy_trained: set[str] = set()  # tensor names from a checkpoint saved before components
        self.stage_times: list[dict[str, Any]] = []  # seconds per stage and part (this process's stages)
        self.warnings: list[str] = []
        self._slow_stages: set[int] = set()
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
        samples = load_llava_data(path, d.image_folder or root)
        if d.max_samples is not None:
            samples = samples[: d.max_samples]
        return samples

    def encode_used(self, stage: StageConfig, samples: list[Sample], used: set[int]) -> dict[int, dict[str, Any]]:
        """Tokenize only the records the planned batches will visit (a capped stage may touch a few percent)."""
        template = stage.template or self.cfg.language.template
        order = sorted(used)
        encoded = encode_samples([samples[i] for i in order], self.processor, template,
                                 self.cfg.language.system_prompt, self.cfg.language.max_length, self.progress)
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
        batch["context"] = VlweaveContext.for_batch([bool(e["image"]) for e in examples], texts=texts,
                                                    routing=[e.get("routing") for e in examples],
                                                    text_input_ids=self.text_ids(texts))
        if images:
            if self.store is not None:
                batch["vision_features"] = self.store.batch(images)
            else:
                batch["pixel_values"] = self.processor.pixel_values(images)
        return batch

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
            t_stage = time.time()
            apply_tune_policy(self.model, stage, cfg.train.lora)
            self._mark_trained(stage)
            if ckpt is not None and index == start_stage:
                self._load_trained(ckpt)
            samples = self.stage_samples(index, stage)
            total, mbs = plan_batches(len(samples), stage, cfg.train.seed, index)
            first = step_start(ckpt, index, start_stage, start_step, stage)
            examples = self.encode_used(stage, samples, {i for mb in mbs[first:] for i in mb})
            t_data = time.time()
            if self.store is not None:
                # Only the images this stage will actually see.
                self.store.ensure([e["image"] for e in examples.values() if e["image"]], self.progress)
            t_features = time.time()
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
            t_steps = time.time()
            steps_before = step
            if step < total:
                self._run_stage(index, stage, examples, mbs, total, step, optimizer, scheduler)
            t_save = time.time()
            self.save_state(index, total, optimizer, scheduler)
            self.stage_times.append({"stage": stage.name, "stage_index": index, "steps": total - steps_before,
                                     "data_seconds": t_data - t_stage, "feature_seconds": t_features - t_data,
                                     "step_seconds": t_save - t_steps, "save_seconds": time.time() - t_save,
                                     "seconds": time.time() - t_stage})
        summary: dict[str, Any] = {"train_seconds": time.time() - t0, "steps": len(self.metrics)}
        t_export = time.time()
        self.export()
        self.plot_loss()
        summary["export_seconds"] = time.time() - t_export
        summary["stages"] = self.stage_times
        summary["feature_cache"] = None if self.store is None else self.store.hit_rate()
        summary["warnings"] = self.warnings
        (self.run_dir / "train_metrics.json").write_text(json.dumps({"summary": summary, "log": self.metrics}, indent=1))
        return summary

    @torch.no_grad()
    def calibrate_connector(self, examples: dict[int, dict[str, Any]], max_images: int = 512) -> None:
        """Let a connector measure input statistics (e.g. ``standardize``) on training images before step 1.
        The measured buffers are saved with the model, so resumed runs and exports reuse them."""
        calibrate = getattr(self.model.connector, "calibrate", None)
        images = sorted({e["image"] for e in examples.values() if e["image"]})[:max_images]
        if calibrate is None or not images or BASE_TOWER not in self.model.needed_towers():
            return
        if self.store is not None:
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
                batch = self.collate([examples[i] for i in mbs[step * stage.grad_accum + k]])
                batch = send_to_device(batch, acc.device)  # nested per-layer feature lists included
                with acc.autocast():
                    out = model(**batch)
                acc.backward(out.loss / stage.grad_accum)
                loss_sum += float(out.loss.detach())
                n_tok += int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
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
            self._check_speed(stage, index)
            bar.set_postfix(loss=f"{rec['loss']:.3f}")
            bar.update(1)
            if save_every and step % save_every == 0 and step < total:
                self.save_state(index, step, optimizer, scheduler)
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
        final = save_checkpoint(self.model, self.tokenizer, self.run_dir / "final", processor=self.processor)
        # The run config travels with the checkpoint: `vlweave eval` takes its eval settings (data, image folder,
        # max new tokens, prompt suffix) and its training data (the blind baselines) from here.
        self.cfg.save(Path(final) / RUN_CONFIG_NAME)
        return final

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
