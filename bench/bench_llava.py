#!/usr/bin/env python
"""vlweave vs Hugging Face ``LlavaForConditionalGeneration``: training samples/s and generation tokens/s.

Both models are built from the same parts (DINOv2-S/14 at 112 px -> 8x8 = 64 patch tokens, penultimate block,
CLS dropped; ``mlp2x_gelu`` projector; SmolLM2-135M-Instruct) and carry the same weights, so they compute the same
function.  This is checked (logits and loss on one batch) before anything is timed, and every timed variant reports
its losses / generated tokens so that any divergence shows up next to the numbers.

Variants, all on the same batches in one process:

* training (forward with labels + backward + AdamW step; projector + LoRA r=16 on the LM's attention/MLP
  projections are trainable in both models, with identical initial values):
    1. ``HF llava``            pixel_values, full-vocabulary logits at every position (the HF loss)
    2. ``vlweave pixels``      pixel_values (the frozen tower runs every step)
    3. ``vlweave cached``      frozen-feature cache (``FeatureCache``, built before timing; build time printed)
  (plus bf16-autocast versions of the three where ``vlweave.train.trainer.bf16_available()``)
* generation (greedy, left-padded batch, exactly ``max_new_tokens`` new tokens each, KV cache), on the models
  before LoRA is injected (i.e. a merged checkpoint):
    1. ``HF llava``            ``generate(input_ids, attention_mask, pixel_values)``
    2. ``vlweave pixels``      ``generate(..., pixel_values=...)``
    3. ``vlweave cached``      ``generate(..., vision_features=...)``

Usage::

    .venv/bin/python bench/bench_llava.py                  # 6 timed steps of batch 16, 8 prompts x 16 tokens
    .venv/bin/python bench/bench_llava.py --quick          # smoke check: 2 steps, batch 4, 4 prompts x 4 tokens
    .venv/bin/python bench/bench_llava.py --steps 10 --batch-size 8 --threads 2 --json /tmp/bench.json

Exit status: 1 if the HF/vlweave logits do not match (nothing is timed then), 2 if they matched but a later
equality check (training losses or generated tokens) failed; the table is printed in that case anyway.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

import transformers
from peft import LoraConfig as PeftLoraConfig
from peft import inject_adapter_in_model
from transformers import LlavaConfig, LlavaForConditionalGeneration

from vlweave import assets
from vlweave.builder import build_model
from vlweave.config import RunConfig
from vlweave.data.collate import pad_batch
from vlweave.data.llava_json import load_llava_data
from vlweave.eval.vqa import stop_token_ids
from vlweave.processing import IGNORE_INDEX, encode_conversation, encode_prompt
from vlweave.train.trainer import bf16_available, make_transform
from vlweave.vision.cache import FeatureCache, load_image

IMAGE_SIZE = 112
LORA_R, LORA_ALPHA = 16, 32
# LM attention + MLP projections only (Dinov2 also has q/k/v-like names, so anchor on the LM's layers).
LORA_TARGET = re.compile(r"language_model\.model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)")


# ---------------------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------------------


def hf_name(name: str) -> str:
    """vlweave parameter/module name -> the name of the same tensor/module in ``LlavaForConditionalGeneration``."""
    rules = (
        ("vision_tower.", "model.vision_tower."),
        ("vision_towers.base.", "model.vision_tower."),  # in memory the base tower lives in a ModuleDict
        ("connector.projector.0.", "model.multi_modal_projector.linear_1."),
        ("connector.projector.2.", "model.multi_modal_projector.linear_2."),
        ("language_model.model.", "model.language_model."),
        ("language_model.lm_head.", "lm_head."),
    )
    for src, dst in rules:
        if name.startswith(src):
            return dst + name[len(src):]
        if name + "." == src:  # a module name without the trailing dot
            return dst[:-1]
    raise KeyError(f"no HF llava counterpart for vlweave name {name!r}")


def build_vlweave(seed: int):
    cfg = RunConfig()
    cfg.vision.name = "dinov2-small"
    cfg.vision.image_size = IMAGE_SIZE
    cfg.vision.select_layer = -2
    cfg.vision.select_strategy = "default"
    cfg.connector.type = "mlp2x_gelu"
    cfg.connector.options = {}
    cfg.language.name = "smollm2-135m-instruct"
    cfg.language.template = "tokenizer"
    cfg.language.system_prompt = ""
    cfg.train.seed = seed
    return build_model(cfg)


def build_hf(vl) -> LlavaForConditionalGeneration:
    """An HF llava of the same parts, with every weight copied from the vlweave model."""
    # Copies: LlavaConfig's __post_init__ resets _attn_implementation on its sub-configs, and vlweave's modules
    # share their config objects with the VlweaveConfig.
    vcfg = copy.deepcopy(vl.vision_tower.config)
    tcfg = copy.deepcopy(vl.language_model.config)
    config = LlavaConfig(
        vision_config=vcfg,
        text_config=tcfg,
        image_token_id=vl.config.image_token_id,
        image_seq_length=vl.num_image_tokens,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )
    hf = LlavaForConditionalGeneration(config)
    state = {hf_name(k): v for k, v in vl.state_dict().items()}
    missing, unexpected = hf.load_state_dict(state, strict=False)
    # Tied lm_head/embed_tokens may be listed under one name only on one side; anything else is a real gap.
    missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise RuntimeError(f"weight copy incomplete: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if vl.config.tie_word_embeddings and hf.lm_head.weight.data_ptr() != hf.model.language_model.embed_tokens.weight.data_ptr():
        hf.lm_head.weight = hf.model.language_model.embed_tokens.weight
    hf.requires_grad_(False)
    return hf


def attn_impls(vl, hf) -> dict[str, str]:
    return {
        "vlweave tower": str(vl.vision_tower.config._attn_implementation),
        "vlweave LM": str(vl.language_model.config._attn_implementation),
        "HF tower": str(hf.model.vision_tower.config._attn_implementation),
        "HF LM": str(hf.model.language_model.config._attn_implementation),
    }


def add_lora(vl, hf, seed: int) -> tuple[int, int]:
    """Same LoRA (r=16, alpha=32, no dropout) on the same LM modules of both; projector + LoRA trainable.

    LoRA A matrices are random: seeded identically, then the HF adapters are overwritten with the vlweave ones so
    that both models start from bit-identical trainable tensors.  Returns (n LoRA'd modules, n trainable params).
    """
    vl_targets = [n for n, _ in vl.named_modules() if LORA_TARGET.fullmatch(n)]
    hf_targets = [hf_name(n) for n in vl_targets]
    hf_modules = dict(hf.named_modules())
    assert all(n in hf_modules for n in hf_targets), "LoRA target missing in HF llava"
    for model, targets in ((vl, vl_targets), (hf, hf_targets)):
        torch.manual_seed(seed)
        inject_adapter_in_model(
            PeftLoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0, target_modules=targets), model
        )
    vl.requires_grad_(False)
    hf.requires_grad_(False)
    hf_params = dict(hf.named_parameters())
    with torch.no_grad():
        for name, p in vl.named_parameters():
            if "lora_" in name or name.startswith("connector."):
                p.requires_grad_(True)
                q = hf_params[hf_name(name)]
                q.copy_(p)
                q.requires_grad_(True)
    n_vl = sum(p.numel() for p in vl.parameters() if p.requires_grad)
    n_hf = sum(p.numel() for p in hf.parameters() if p.requires_grad)
    assert n_vl == n_hf, f"trainable parameter counts differ: vlweave {n_vl}, HF {n_hf}"
    return len(vl_targets), n_vl


def trainable_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def restore(model, state: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n, t in state.items():
            params[n].copy_(t)


# ---------------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------------


def load_data(vl, tokenizer, batch_size: int, n_batches: int, n_prompts: int):
    """Training batches (right-padded to one fixed length) and one left-padded generation batch."""
    root = Path(assets.resolve("easy-vqa"))
    samples = load_llava_data(root / "train.json", root)
    need = batch_size * n_batches
    if need + n_prompts > len(samples):
        raise SystemExit(f"easy-vqa has {len(samples)} records; {need} + {n_prompts} requested")
    img_id, n_img = vl.config.image_token_id, vl.num_image_tokens
    encoded = []
    for s in samples[:need]:
        enc = encode_conversation(s.conversations[:2], tokenizer, "tokenizer", image_token_id=img_id,
                                  num_image_tokens=n_img, system_prompt="", sample_id=s.id)
        encoded.append({**enc, "image": s.image})
    length = max(len(e["input_ids"]) for e in encoded)
    length = -(-length // 16) * 16  # one fixed length for every batch
    transform = make_transform(vl)
    batches = []
    for b in range(n_batches):
        rows = encoded[b * batch_size : (b + 1) * batch_size]
        batch = pad_batch([{"input_ids": e["input_ids"], "labels": e["labels"]} for e in rows],
                          tokenizer.pad_token_id, padding_side="right", max_length=length)
        batch["images"] = [e["image"] for e in rows]
        batch["pixel_values"] = torch.stack([transform(load_image(p)) for p in batch["images"]])
        batches.append(batch)
    prompts, gen_images = [], []
    for s in samples[need : need + n_prompts]:
        prompts.append(encode_prompt(s.conversations[:1], tokenizer, "tokenizer", image_token_id=img_id,
                                     num_image_tokens=n_img, system_prompt="", sample_id=s.id))
        gen_images.append(s.image)
    gen = {**pad_batch([{"input_ids": p} for p in prompts], tokenizer.pad_token_id, padding_side="left"),
           "images": gen_images, "pixel_values": torch.stack([transform(load_image(p)) for p in gen_images])}
    return batches, gen, length


# ---------------------------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------------------------


def autocast(bf16: bool):
    return torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def train_variant(model, tower, batches, inputs_fn: Callable[[dict], dict], lr: float, bf16: bool) -> dict[str, Any]:
    """batches[0] is the warm-up step (not timed); the rest are timed.  Returns times, losses."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    model.train()
    tower.eval()  # frozen tower: no dropout/drop-path (both are 0 for DINOv2-S anyway)
    times, cpu, losses = [], [], []
    for batch in batches:
        gc.collect()
        t0, c0 = time.perf_counter(), time.process_time()
        inputs = inputs_fn(batch)
        with autocast(bf16):
            out = model(**inputs)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        losses.append(float(out.loss.detach()))
    model.eval()
    del opt
    return {"warmup_s": times[0], "step_s": times[1:], "step_cpu_s": cpu[1:], "loss": losses}


@torch.no_grad()
def gen_variant(generate_fn: Callable[[], torch.Tensor], runs: int, bf16: bool) -> dict[str, Any]:
    with autocast(bf16):
        tokens = generate_fn()  # warm-up
    times, cpu = [], []
    for _ in range(runs):
        gc.collect()
        t0, c0 = time.perf_counter(), time.process_time()
        with autocast(bf16):
            out = generate_fn()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return {"warmup_tokens": tokens, "tokens": out, "run_s": times, "run_cpu_s": cpu}


# ---------------------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--steps", type=int, default=None, help="timed training steps per variant (default 6; after 1 warm-up)")
    ap.add_argument("--batch-size", type=int, default=None, help="training batch size (default 16)")
    ap.add_argument("--prompts", type=int, default=None, help="generation batch size (default 8)")
    ap.add_argument("--new-tokens", type=int, default=None, help="tokens generated per prompt (default 16)")
    ap.add_argument("--gen-runs", type=int, default=3, help="timed generate() calls per variant, after 1 warm-up (default 3: one run varied by 15 %% here)")
    ap.add_argument("--quick", action="store_true", help="smoke check: 2 steps, batch 4, 4 prompts x 4 tokens")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    ap.add_argument("--atol", type=float, default=1e-4, help="logits tolerance for the HF/vlweave equality check")
    ap.add_argument("--skip-train", action="store_true")
    ap.add_argument("--skip-gen", action="store_true")
    ap.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    args = ap.parse_args(argv)
    q = args.quick
    args.steps = args.steps if args.steps is not None else (2 if q else 6)
    args.batch_size = args.batch_size if args.batch_size is not None else (4 if q else 16)
    args.prompts = args.prompts if args.prompts is not None else (4 if q else 8)
    args.new_tokens = args.new_tokens if args.new_tokens is not None else (4 if q else 16)
    return args


def log(msg: str) -> None:
    print(msg, flush=True)


def print_table(rows: list[dict[str, Any]], title: str) -> None:
    headers = ["variant", "samples/s (train)", "median step s", "tokens/s (gen)", "ratio vs HF", "ratio (CPU time)",
               "check"]
    body = [[r["variant"], r.get("samples_s", ""), r.get("median_step_s", ""), r.get("tokens_s", ""),
             r.get("ratio", ""), r.get("cpu_ratio", ""), r.get("check", "")] for r in rows]
    fmt = lambda v: f"{v:.3f}" if isinstance(v, float) else str(v)  # noqa: E731
    try:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=title)
        for i, h in enumerate(headers):
            table.add_column(h, justify="left" if i in (0, 6) else "right")
        for row in body:
            table.add_row(*[fmt(v) for v in row])
        Console(width=140).print(table)
    except ImportError:
        widths = [max(len(h), *(len(fmt(r[i])) for r in body)) for i, h in enumerate(headers)]
        log(title)
        log("  ".join(h.ljust(w) for h, w in zip(headers, widths)))
        for row in body:
            log("  ".join(fmt(v).ljust(w) for v, w in zip(row, widths)))


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    status = 0
    precisions = [False] + ([True] if bf16_available() else [])
    info: dict[str, Any] = {
        "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
        "bf16_available": bf16_available(), "steps": args.steps, "batch_size": args.batch_size,
        "prompts": args.prompts, "new_tokens": args.new_tokens, "gen_runs": args.gen_runs, "image_size": IMAGE_SIZE,
    }
    log(f"torch {torch.__version__}, transformers {transformers.__version__}, {torch.get_num_threads()} threads, "
        f"bf16_available={bf16_available()}")
    load = os.getloadavg()[0]
    info["loadavg_start"] = load
    if load > 0.5:
        log(f"WARNING: load average {load:.2f} before start: other processes are using the CPU, so wall-clock "
            "numbers (and, with oversubscribed OpenMP threads, CPU times too) are not reliable")

    # ---- models --------------------------------------------------------------------------------------------
    t0 = time.perf_counter()
    vl, tokenizer = build_vlweave(args.seed)
    hf = build_hf(vl)
    vl.eval()
    hf.eval()
    log(f"built both models in {time.perf_counter() - t0:.1f}s: {vl.num_image_tokens} image tokens "
        f"({IMAGE_SIZE}px / patch {vl.facts.patch_size}), image_token_id={vl.config.image_token_id}, "
        f"vocab={vl.language_model.config.vocab_size}, tied lm_head={vl.config.tie_word_embeddings}")
    impls = attn_impls(vl, hf)
    info["attn_implementation"] = impls
    log("attention: " + ", ".join(f"{k}={v}" for k, v in impls.items()))

    # ---- data ----------------------------------------------------------------------------------------------
    batches, gen, seq_len = load_data(vl, tokenizer, args.batch_size, args.steps + 1, args.prompts)
    sup = [int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in batches]
    info["seq_len"] = seq_len
    log(f"data: {len(batches)} batches x {args.batch_size} (1 warm-up + {args.steps} timed), right-padded to "
        f"{seq_len} tokens, {sum(sup) / len(sup):.0f} supervised tokens/batch; generation: {args.prompts} prompts, "
        f"left-padded to {gen['input_ids'].shape[1]}")

    # ---- equality check ------------------------------------------------------------------------------------
    b0 = batches[0]
    with torch.no_grad():
        common = {"input_ids": b0["input_ids"], "attention_mask": b0["attention_mask"],
                  "pixel_values": b0["pixel_values"]}
        lv = vl(**common).logits
        lh = hf(**common, use_cache=False).logits
        valid = b0["attention_mask"].bool()
        diff = float((lv - lh).abs()[valid].max())
        loss_vl = float(vl(**common, labels=b0["labels"]).loss)
        loss_hf = float(hf(**common, labels=b0["labels"], use_cache=False).loss)
    ok = diff <= args.atol
    info["logits_check"] = {"max_abs_diff": diff, "atol": args.atol, "ok": ok, "loss_vlweave": loss_vl,
                            "loss_hf": loss_hf}
    log(f"check: logits HF vs vlweave on batch 0 {tuple(lh.shape)}: max |diff| = {diff:.2e} "
        f"(atol {args.atol:g}) -> {'MATCH' if ok else 'MISMATCH'}; loss vlweave {loss_vl:.6f} vs HF {loss_hf:.6f}")
    if not ok:
        log("logits do not match: not timing anything")
        return 1
    del lv, lh

    # ---- frozen-feature cache ------------------------------------------------------------------------------
    paths = [p for b in batches for p in b["images"]] + gen["images"]
    store = FeatureCache(vl, persist=False)
    t0 = time.perf_counter()
    store.ensure(paths, progress=False)
    t_cache = time.perf_counter() - t0
    n_img = len(set(paths))
    info["cache_build"] = {"images": n_img, "seconds": t_cache}
    with torch.no_grad():
        lc = vl(input_ids=b0["input_ids"], attention_mask=b0["attention_mask"],
                vision_features=store.batch(b0["images"])).logits
        lp = vl(**common).logits
        cdiff = float((lc - lp).abs()[valid].max())
    del lc, lp
    info["cache_check_max_abs_diff"] = cdiff
    log(f"feature cache: {n_img} images in {t_cache:.2f}s ({1000 * t_cache / n_img:.1f} ms/image, includes "
        f"image decode + transform); cached vs pixel logits max |diff| = {cdiff:.2e}")

    results: list[dict[str, Any]] = []

    # ---- generation (before LoRA: the models as a merged checkpoint) ----------------------------------------
    if not args.skip_gen:
        stops = stop_token_ids(tokenizer)
        gkw = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False, num_beams=1,
                   eos_token_id=stops, pad_token_id=tokenizer.pad_token_id)
        ids, mask = gen["input_ids"], gen["attention_mask"]
        n_tok = args.prompts * args.new_tokens
        gvariants = {
            "HF llava": lambda: hf.generate(input_ids=ids, attention_mask=mask, pixel_values=gen["pixel_values"],
                                            **gkw)[:, ids.shape[1]:],
            "vlweave pixels": lambda: vl.generate(ids, attention_mask=mask, pixel_values=gen["pixel_values"], **gkw),
            "vlweave cached": lambda: vl.generate(ids, attention_mask=mask,
                                                  vision_features=store.batch(gen["images"]), **gkw),
        }
        for bf16 in precisions:
            ref = None
            for name, fn in gvariants.items():
                label = name + (" bf16" if bf16 else "")
                r = gen_variant(fn, args.gen_runs, bf16)
                toks = r["tokens"]
                assert toks.shape == (args.prompts, args.new_tokens), f"{label}: generated shape {tuple(toks.shape)}"
                secs = sum(r["run_s"])
                row = {"kind": "generate", "variant": label, "tokens_s": n_tok * args.gen_runs / secs,
                       "seconds": r["run_s"], "cpu_seconds": r["run_cpu_s"], "bf16": bf16}
                if ref is None:
                    ref = row
                    row["check"] = "reference"
                    ref_tokens = toks
                else:
                    same = bool(torch.equal(toks, ref_tokens))
                    row["tokens_match_hf"] = same
                    row["check"] = f"tokens match HF: {'yes' if same else 'NO'}"
                    if not same and not bf16:
                        status = 2
                    row["ratio"] = row["tokens_s"] / ref["tokens_s"]
                    row["cpu_ratio"] = sum(ref["cpu_seconds"]) / sum(row["cpu_seconds"])
                row["sample"] = tokenizer.decode(toks[0], skip_special_tokens=False)
                results.append(row)
                log(f"generate  {label:<22} {row['tokens_s']:8.2f} tok/s  ({n_tok} tokens x {args.gen_runs} in "
                    f"{secs:.2f}s wall, {sum(r['run_cpu_s']):.2f}s CPU)  {row['check']}  first: {row['sample']!r}")
            ref = None

    # ---- training ------------------------------------------------------------------------------------------
    if not args.skip_train:
        n_mod, n_train = add_lora(vl, hf, args.seed)
        info["lora"] = {"modules": n_mod, "trainable_params": n_train, "r": LORA_R, "alpha": LORA_ALPHA}
        log(f"LoRA r={LORA_R} on {n_mod} LM modules in each model; trainable (projector + LoRA): {n_train:,} params")
        vl_init, hf_init = trainable_state(vl), trainable_state(hf)

        def lab(b):
            return {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"], "labels": b["labels"]}

        tvariants = {
            "HF llava": (hf, hf.model.vision_tower, hf_init,
                         lambda b: {**lab(b), "pixel_values": b["pixel_values"], "use_cache": False}),
            "vlweave pixels": (vl, vl.vision_tower, vl_init, lambda b: {**lab(b), "pixel_values": b["pixel_values"]}),
            "vlweave cached": (vl, vl.vision_tower, vl_init,
                               lambda b: {**lab(b), "vision_features": store.batch(b["images"])}),
        }
        for bf16 in precisions:
            ref = None
            for name, (model, tower, init, fn) in tvariants.items():
                label = name + (" bf16" if bf16 else "")
                restore(model, init)
                r = train_variant(model, tower, batches, fn, args.lr, bf16)
                restore(model, init)
                secs = sum(r["step_s"])
                row = {"kind": "train", "variant": label, "samples_s": args.batch_size * args.steps / secs,
                       "median_step_s": statistics.median(r["step_s"]), "step_s": r["step_s"],
                       "step_cpu_s": r["step_cpu_s"],
                       "warmup_s": r["warmup_s"], "loss": r["loss"], "bf16": bf16}
                if ref is None:
                    ref = row
                    row["check"] = "reference"
                else:
                    dl = max(abs(a - b) for a, b in zip(r["loss"], ref["loss"]))
                    row["max_loss_diff_vs_hf"] = dl
                    tol = 5e-2 if bf16 else 1e-3
                    row["check"] = f"max |loss - HF| {dl:.1e}" + ("" if dl <= tol else " (!)")
                    if dl > tol and not bf16:
                        status = 2
                    row["ratio"] = row["samples_s"] / ref["samples_s"]
                    row["cpu_ratio"] = sum(ref["step_cpu_s"]) / sum(r["step_cpu_s"])
                results.append(row)
                log(f"train     {label:<22} {row['samples_s']:8.2f} samples/s  (steps "
                    f"{', '.join(f'{t:.2f}' for t in r['step_s'])} s wall, "
                    f"{', '.join(f'{t:.2f}' for t in r['step_cpu_s'])} s CPU; warm-up {r['warmup_s']:.2f} s)  losses "
                    f"{', '.join(f'{x:.4f}' for x in r['loss'])}")

    # ---- report --------------------------------------------------------------------------------------------
    log("")
    table_rows = []
    for kind in ("train", "generate"):
        for r in results:
            if r["kind"] == kind:
                table_rows.append({**r, "variant": f"{kind}: {r['variant']}"})
    print_table(table_rows, f"vlweave vs HF llava — DINOv2-S@{IMAGE_SIZE} + mlp2x_gelu + SmolLM2-135M, fp32"
                + (" (+bf16)" if len(precisions) > 1 else "") + f", {torch.get_num_threads()} threads")
    load_end = os.getloadavg()[0]
    info["loadavg_end"] = load_end
    log(f"load average: {load:.2f} at start, {load_end:.2f} at end (this process adds ~{torch.get_num_threads()}); "
        "'ratio (CPU time)' = HF CPU seconds / variant CPU seconds over the timed part")
    if args.quick:
        log("(--quick: smoke-check sizes; these numbers are not the benchmark)")
    if args.json:
        out = {"info": info, "results": results}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=1, default=str))
        log(f"wrote {args.json}")
    if status:
        log(f"an equality check failed (exit status {status})")
    return status


if __name__ == "__main__":
    sys.exit(main())
