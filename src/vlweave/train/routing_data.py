"""MoVA routing data (methods.md §2a "Routing data"; ``vlweave mova routing-data``).

For every training sample with an image: its LM loss (mean over supervised tokens) with the base encoder alone
(every routing bit 0) and with the base plus each single expert (one bit on).  Expert ``j`` is *useful* for the
sample iff its loss is lower than the base-only loss; at most ``max_experts`` (3) useful experts are kept, the
lowest losses first.  Written to the output folder:

* ``routed.json`` -- the input records, unchanged except for a ``routing`` field (0/1 bits in expert order);
  text-only records are copied as they are;
* ``routing_instructions.json`` -- one LLaVA record per image sample: the routing prompt (the connector's pool
  and the sample's first question) answered by the useful experts' letters (``"A, C"``) or ``"none"``, marked
  ``routing_pass: true`` so that training shows it the routing-pass input (mix it into fine-tuning with
  ``stages[i].mix``);
* ``summary.json`` -- how often each expert was useful (also printed as a table);
* ``losses.partial.jsonl`` -- the per-sample losses, appended batch by batch: a rerun skips the ids already there
  (resumable; a line cut short by a crash is ignored).

The paper scores each sample with separately trained LLaVA-1.5 variants (base alone; base + expert j).  With one
trained MoVA model, "base + expert j" is that model with only bit ``j`` set -- the natural reading here and the
default; ``expert_models`` gives separate models per expert instead (each scored with its own connector and only
its expert's bit on; the main model gives the base-only loss).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from vlweave.data.llava_json import Sample, _read_records, load_llava_data
from vlweave.language.routing import RoutingPool, connector_routes
from vlweave.processing import IGNORE_INDEX
from vlweave.processor import VlweaveProcessor
from vlweave.vision.towers import BASE_TOWER

PARTIAL = "losses.partial.jsonl"
BASE_KEY = "base"  # the base-only loss in a partial-file line's "losses"


def useful_experts(losses: Mapping[str, float], experts: Sequence[str], max_experts: int = 3) -> list[int]:
    """Routing bits: expert ``j`` on iff ``losses[j] < losses["base"]``, at most ``max_experts`` (lowest first)."""
    base = losses[BASE_KEY]
    better = sorted((losses[e], j) for j, e in enumerate(experts) if losses[e] < base)
    keep = {j for _, j in better[:max_experts]}
    return [int(j in keep) for j in range(len(experts))]


def _read_partial(path: Path) -> dict[str, dict[str, float]]:
    done: dict[str, dict[str, float]] = {}
    if not path.exists():
        return done
    lines = path.read_text().splitlines()
    for k, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if k == len(lines) - 1:  # cut short by an interruption: recomputed
                continue
            raise ValueError(f"{path}: line {k + 1} is not JSON; delete the file to start over") from None
        done[str(row["id"])] = row["losses"]
    return done


@torch.no_grad()
def per_sample_losses(model: Any, batch: Mapping[str, Any]) -> list[float]:
    """Mean LM loss over each row's supervised tokens (the training loss, per sample)."""
    out = model(**batch)
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE_INDEX
    token_loss = F.cross_entropy(out.logits.float(), targets[keep].to(out.logits.device), reduction="none")
    counts = keep.sum(dim=1).tolist()
    return [float(chunk.mean()) for chunk in torch.split(token_loss, counts)]


def _one_hot(j: int | None, n: int) -> list[int]:
    return [int(i == j) for i in range(n)]


@torch.no_grad()
def score_batch(model: Any, processor: VlweaveProcessor, pool: RoutingPool, samples: Sequence[Sample], *,
                template: str | None = None, system_prompt: str | None = None, max_length: int | None = None,
                expert_models: Mapping[str, tuple[Any, VlweaveProcessor]] | None = None) -> list[dict[str, float]]:
    """Per sample (all with an image): ``{"base": loss, expert: loss, ...}``.  The base tower runs once per image;
    each expert once, on the pass that routes it."""
    encoded = [processor.encode_conversation(s.conversations, has_image=True, template=template,
                                             system_prompt=system_prompt, max_length=max_length, sample_id=s.id)
               for s in samples]
    images = [s.image for s in samples]
    texts = [s.user_texts() for s in samples]
    # Through the processor, so the context carries what it fills for the connector (texts, text-encoder ids).
    batch = processor.collate(encoded, images, padding_side="right", texts=texts, pixel_values=False)
    device = next(model.parameters()).device
    pixels = {n: v.to(device) for n, v in processor.pixel_values(images).items()}
    base = model.prepare_tower_features(BASE_TOWER, pixels[BASE_TOWER])
    ids, mask, labels = (batch[k].to(device) for k in ("input_ids", "attention_mask", "labels"))
    results: list[dict[str, float]] = [{} for _ in samples]
    for j, name in [(None, BASE_KEY), *enumerate(pool.experts)]:
        scorer, scorer_pixels, scorer_base = model, pixels, base
        bits: list[int] | None = _one_hot(j, pool.num_experts)
        if j is not None and expert_models and name in expert_models:
            # A separate base + expert model: its own pixels and base features; its own bit for the expert when
            # its connector routes, else no routing (a plain multi-tower connector runs every tower it has).
            scorer, sproc = expert_models[name]
            scorer_pixels = {n: v.to(device) for n, v in sproc.pixel_values(images).items()}
            scorer_base = scorer.prepare_tower_features(BASE_TOWER, scorer_pixels[BASE_TOWER])
            bits = RoutingPool.from_connector(scorer.connector).bits_from([name]) if connector_routes(scorer) \
                else None
        ctx = copy.copy(batch["context"])
        ctx.routing = None if bits is None else [list(bits) for _ in samples]
        ctx.guidance = {}
        inputs = {"input_ids": ids, "attention_mask": mask, "labels": labels, "context": ctx,
                  "vision_features": {BASE_TOWER: scorer_base},
                  "pixel_values": {n: v for n, v in scorer_pixels.items() if n != BASE_TOWER}}
        for r, loss in enumerate(per_sample_losses(scorer, inputs)):
            results[r][name] = loss
    return results


def build_routing_data(model: Any, processor: VlweaveProcessor, data: str | Path, out_dir: str | Path, *,
                       image_folder: str | Path | None = None, batch_size: int = 8, limit: int | None = None,
                       max_experts: int = 3, template: str | None = None, system_prompt: str | None = None,
                       max_length: int | None = None, progress: bool = True,
                       expert_models: Mapping[str, tuple[Any, VlweaveProcessor]] | None = None) -> dict[str, Any]:
    """Score ``data``'s records and write the outputs (see the module docstring); returns the summary."""
    pool = RoutingPool.from_connector(model.connector)
    unknown = sorted(set(expert_models or {}) - set(pool.experts))
    if unknown:
        raise ValueError(f"expert checkpoints for {unknown}: not experts of this model ({list(pool.experts)})")
    path = Path(data)
    samples = load_llava_data(path, image_folder, routing_experts=list(pool.experts))
    raw = [r for _, _, r in _read_records(path.expanduser().resolve())]
    if limit is not None:
        samples, raw = samples[:limit], raw[:limit]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    partial = out / PARTIAL
    done = _read_partial(partial)
    todo = [s for s in samples if s.image and s.id not in done]
    model.eval()
    bar = tqdm(total=sum(1 for s in samples if s.image), initial=sum(1 for s in samples if s.image) - len(todo),
               desc="routing data (losses)", disable=not progress, unit="sample")
    with partial.open("a") as fh:
        for start in range(0, len(todo), batch_size):
            chunk = todo[start : start + batch_size]
            scored = score_batch(model, processor, pool, chunk, template=template, system_prompt=system_prompt,
                                 max_length=max_length, expert_models=expert_models)
            for s, losses in zip(chunk, scored):
                fh.write(json.dumps({"id": s.id, "losses": losses}) + "\n")
                done[s.id] = losses
            fh.flush()
            bar.update(len(chunk))
    bar.close()

    routed, instructions = [], []
    useful = {e: 0 for e in pool.experts}
    n_none = 0
    for s, record in zip(samples, raw):
        record = dict(record)
        if s.image:
            bits = useful_experts(done[s.id], pool.experts, max_experts)
            record["routing"] = bits
            if isinstance(record.get("image"), str):
                # The resolved path, as the instructions carry: routed.json is read from its own folder (the
                # routed preset has no image_folder), where a path relative to the source data would not exist.
                record["image"] = str(s.image)
            for e, b in zip(pool.experts, bits):
                useful[e] += b
            n_none += int(not any(bits))
            question = (s.user_texts() or [""])[0]
            instructions.append({
                "id": f"route:{s.id}", "image": s.image, "routing_pass": True,
                "conversations": [{"from": "human", "value": "<image>\n" + pool.prompt(question)},
                                  {"from": "gpt", "value": pool.answer_for(bits)}]})
        routed.append(record)
    (out / "routed.json").write_text(json.dumps(routed, indent=1))
    (out / "routing_instructions.json").write_text(json.dumps(instructions, indent=1))
    n = len(instructions)
    table = [{"expert": e, "letter": x, "useful": useful[e], "fraction": useful[e] / n if n else 0.0}
             for e, x in zip(pool.experts, pool.letters)]
    summary = {"samples": len(samples), "with_image": n, "no_expert_useful": n_none, "max_experts": max_experts,
               "table": table, "routed": str(out / "routed.json"),
               "instructions": str(out / "routing_instructions.json")}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    if progress:
        _print_table(summary)
    return summary


def _print_table(summary: Mapping[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"routing data: {summary['with_image']} image samples, "
                        f"{summary['no_expert_useful']} with no useful expert")
    for col in ("letter", "expert", "useful", "fraction"):
        table.add_column(col)
    for row in summary["table"]:
        table.add_row(row["letter"], row["expert"], str(row["useful"]), f"{row['fraction']:.3f}")
    Console(stderr=True).print(table)


def routing_data_from_checkpoint(checkpoint: str | Path, data: str, out_dir: str | Path, *,
                                 image_folder: str | None = None, expert_checkpoints: Sequence[str] = (),
                                 batch_size: int = 8, limit: int | None = None, max_experts: int = 3
                                 ) -> dict[str, Any]:
    """The CLI's entry: load the checkpoint (and ``EXPERT=FOLDER`` expert checkpoints), then
    :func:`build_routing_data`."""
    from vlweave.assets import resolve_data_path
    from vlweave.builder import load_checkpoint, load_processor

    path, root = resolve_data_path(data)
    model, tokenizer = load_checkpoint(checkpoint)
    if not connector_routes(model):
        raise ValueError(f"{checkpoint}: connector {model.config.connector_type!r} does not route between experts; "
                         "routing data needs a MoVA checkpoint (connector type 'mova')")
    processor = load_processor(checkpoint, tokenizer)
    experts: dict[str, tuple[Any, VlweaveProcessor]] = {}
    for item in expert_checkpoints:
        name, sep, folder = item.partition("=")
        if not sep or not name or not folder:
            raise ValueError(f"--expert-checkpoint {item!r}: expected EXPERT=FOLDER")
        m, t = load_checkpoint(folder)
        experts[name] = (m, load_processor(folder, t))
    return build_routing_data(model, processor, path, out_dir, image_folder=image_folder or root,
                              batch_size=batch_size, limit=limit, max_experts=max_experts,
                              expert_models=experts or None)


__all__ = ["build_routing_data", "per_sample_losses", "routing_data_from_checkpoint", "score_batch",
           "useful_experts"]
