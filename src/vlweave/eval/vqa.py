"""Batched greedy VQA evaluation with normalised exact-match accuracy; predictions saved as JSONL.

Generation uses LEFT padding (so that every prompt ends at the same position and the KV cache stays aligned) and
stops at the tokenizer's end-of-turn/eos ids.  Prompts are sorted by length so that batches carry little padding;
results are returned in the original question order.
"""

from __future__ import annotations

import json
import re
import string
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from PIL import Image
from tqdm.auto import tqdm

from vlweave.data.collate import pad_batch
from vlweave.data.questions import ImageSource, Question
from vlweave.hardware import bf16_available
from vlweave.language.routing import fixed_routing, route_batch, routing_pool
from vlweave.processing import load_image
from vlweave.processor import VlweaveProcessor
from vlweave.safe_io import atomic_write_text, disk_full_guard
from vlweave.vision.cache import FeatureCache
from vlweave.vision.towers import BASE_TOWER

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans({c: " " for c in string.punctuation})


def normalize_answer(text: str) -> str:
    """Lower-case, drop punctuation and articles, collapse whitespace (VQA-style normalisation, simplified)."""
    text = text.lower().translate(_PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def open_image(source: ImageSource) -> Image.Image:
    """A question's image: a file path, a PIL image, or a zero-argument callable returning one (decoded lazily,
    e.g. MMBench's base64 images)."""
    if isinstance(source, str):
        return load_image(source)
    if isinstance(source, Image.Image):
        return source.convert("RGB")
    return source().convert("RGB")


def encode_question(model, tokenizer, text: str, has_image: bool, *, template: str | None = None,
                    system_prompt: str | None = None, sample_id: str = "?",
                    processor: VlweaveProcessor | None = None) -> list[int]:
    """Generation-prompt token ids for one question: ``<image>`` (expanded to the connector's token count) in front
    of the text when there is an image, in the checkpoint's chat template and system prompt unless overridden.
    The processor does the encoding (the checkpoint's own, or one made from ``model`` and ``tokenizer``)."""
    processor = processor if processor is not None else VlweaveProcessor.from_model(model, tokenizer)
    return processor.encode_question(text, has_image, template=template, system_prompt=system_prompt,
                                     sample_id=sample_id)


def stop_token_ids(tokenizer) -> list[int]:
    ids = {tokenizer.eos_token_id}
    for tok in ("<|im_end|>", "</s>", "<|endoftext|>", "<|eot_id|>"):
        tid = tokenizer.convert_tokens_to_ids(tok)
        # An unknown token maps to unk; keep a real token even when it doubles as unk (SmolLM2's <|endoftext|>).
        if isinstance(tid, int) and tid >= 0 and (tid != tokenizer.unk_token_id or tokenizer.unk_token == tok):
            ids.add(tid)
    return sorted(i for i in ids if i is not None)


def context_length(model) -> int | None:
    """The LM's maximum sequence length (``max_position_embeddings``), if its config states one."""
    text_config = getattr(model.config, "text_config", model.config)
    value = getattr(text_config, "max_position_embeddings", None)
    return int(value) if isinstance(value, int) and value > 0 else None


def check_prompt_lengths(model, lengths: Sequence[tuple[str, int]], max_new_tokens: int) -> None:
    """Refuse prompts that with ``max_new_tokens`` do not fit the LM's context (instead of generating garbage past
    the position table, or allocating a KV cache for a runaway question).  ``lengths``: (what the prompt is --
    "question_id 'q1'", "chat turn 2" --, its token count)."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    limit = context_length(model)
    if limit is None:
        return
    long = [(what, n) for what, n in lengths if n + max_new_tokens > limit]
    if long:
        shown = ", ".join(f"{what} ({n} tokens)" for what, n in long[:5])
        raise ValueError(f"{len(long)} prompt(s) too long for the model's context of {limit} tokens (prompt + "
                         f"max_new_tokens={max_new_tokens}): {shown}{' ...' if len(long) > 5 else ''}")


@torch.no_grad()
def generate_answers(
    model,
    tokenizer,
    questions: Sequence[Question],
    *,
    template: str | None = None,
    system_prompt: str | None = None,
    prompt_suffix: str = "",
    batch_size: int = 32,
    max_new_tokens: int = 8,
    store: FeatureCache | None = None,
    progress: bool = True,
    bf16: bool = False,
    processor: VlweaveProcessor | None = None,
    on_batch: Callable[[list[int], list[str]], None] | None = None,
    routing: str | None = None,
    routing_seed: int = 0,
    decisions: list | None = None,
) -> list[str]:
    """Greedy answers for ``questions`` (their ``image``: an absolute path, a PIL image or a callable returning
    one; only paths go through the feature ``store``).  Prompts and pixels come from ``processor`` (the
    checkpoint's own, see ``builder.load_processor``; by default one made from ``model`` and ``tokenizer``).
    ``on_batch(indices, answers)`` is called after every batch (the callers append them to a partial predictions
    file, so an interrupted run keeps what it generated).  A prompt that with ``max_new_tokens`` exceeds the LM's
    context is refused before anything is generated.

    ``routing`` (a routed connector, e.g. MoVA): ``"model"`` -- the LM routes each image question in a batched
    routing pass first (``vlweave.language.routing``); ``all``/``none``/``random``/``"A,C"`` -- fixed routing for
    ablations.  The base tower's features are computed (or read from the cache) once for both passes; only the
    routed rows of each expert run.  ``decisions``: a list that receives one
    :class:`~vlweave.language.routing.RoutingDecision` (or None for a text-only question) per question, in
    question order."""
    model.eval()
    processor = processor if processor is not None else VlweaveProcessor.from_model(model, tokenizer)
    pool = routing_pool(model, routing) if routing is not None else None
    texts = [q.text + prompt_suffix for q in questions]
    prompts = [processor.encode_question(t, q.has_image, template=template, system_prompt=system_prompt,
                                         sample_id=str(q.question_id)) for t, q in zip(texts, questions)]
    check_prompt_lengths(model, [(f"question_id {q.question_id!r}", len(p)) for q, p in zip(questions, prompts)],
                         max_new_tokens)
    fixed = {i: fixed_routing(routing, pool, str(q.question_id), routing_seed) for i, q in enumerate(questions)
             if pool is not None and routing != "model" and q.has_image}
    if store is not None:
        paths = [q.image for q in questions if q.has_image and isinstance(q.image, str)]
        by_tower = None
        if pool is not None:  # an expert's store computes only the images routed to it
            by_tower = {n: [] for n in store.stores if n in pool.experts}
            for i, d in fixed.items():
                if isinstance(questions[i].image, str):
                    for e in d.experts:
                        if e in by_tower:
                            by_tower[e].append(questions[i].image)
        store.ensure(paths, progress, paths_by_tower=by_tower)
    order = sorted(range(len(questions)), key=lambda i: len(prompts[i]))
    answers: list[str] = [""] * len(questions)
    chosen: list[Any] = [None] * len(questions)
    pad_id = processor.pad_token_id
    stops = stop_token_ids(tokenizer)
    device = next(model.parameters()).device
    bar = tqdm(total=len(questions), desc="generating", disable=not progress, unit="q")
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        images = [questions[i].image if questions[i].has_image else None for i in idx]
        cached = store is not None and all(isinstance(p, str) for p in images if p is not None)
        rows = images if cached else [None if p is None else open_image(p) for p in images]
        batch = processor.collate([{"input_ids": prompts[i]} for i in idx], rows, padding_side="left",
                                  texts=[[texts[i]] for i in idx], pixel_values=not cached and pool is None)
        kwargs: dict[str, Any] = {"context": batch["context"]}
        present = [p for p in images if p is not None]
        if present and pool is not None:
            with_image = [i for i, p in zip(idx, images) if p is not None]
            kwargs.update(routed_inputs(model, processor, pool, routing, store if cached else None,
                                         [p for p in rows if p is not None], [questions[i] for i in with_image],
                                         [fixed.get(i) for i in with_image], batch["context"], device,
                                         template=template, system_prompt=system_prompt, stops=stops, bf16=bf16))
            for i, d in zip(with_image, batch["context"].guidance.pop("routing_decisions")):
                chosen[i] = d
        elif present and cached:
            kwargs["vision_features"] = {t: [f.to(device) for f in feats] for t, feats in store.batch(present).items()}
        elif present:
            kwargs["pixel_values"] = {t: v.to(device) for t, v in batch["pixel_values"].items()}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16 and bf16_available()):
            out = model.generate(batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                                 max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stops,
                                 pad_token_id=pad_id, **kwargs)
        for r, i in enumerate(idx):
            answers[i] = tokenizer.decode(out[r], skip_special_tokens=True).strip()
        if on_batch is not None:
            on_batch(list(idx), [answers[i] for i in idx])
        bar.update(len(idx))
    bar.close()
    if decisions is not None:
        decisions.extend(chosen)
    return answers


def routed_inputs(model, processor, pool, routing: str, store, images: list, questions: list, fixed: list, context,
                   device, *, template, system_prompt, stops, bf16: bool) -> dict[str, Any]:
    """The answer pass's visual inputs of one routed batch: base features once (cache or tower), the routing
    decisions (the LM's routing pass, or the fixed ones) written into ``context.routing``, and each expert's
    features for its routed rows only.  The decisions are handed back in ``context.guidance``."""
    base_cached = store is not None and BASE_TOWER in store.stores
    feats: dict[str, list[torch.Tensor]] = {}
    pixels: dict[str, torch.Tensor] | None = None
    if base_cached:
        feats[BASE_TOWER] = [f.to(device) for f in store.stores[BASE_TOWER].batch(images)]
    else:
        pixels = {t: v.to(device) for t, v in processor.pixel_values(images).items()}
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16 and bf16_available()):
        if not base_cached:
            feats[BASE_TOWER] = model.prepare_tower_features(BASE_TOWER, pixels[BASE_TOWER])
        if routing == "model":
            decided = route_batch(model, processor, pool, [q.text for q in questions], feats[BASE_TOWER],
                                  template=template, system_prompt=system_prompt, stop_ids=stops,
                                  sample_ids=[str(q.question_id) for q in questions])
        else:
            decided = list(fixed)
    context.routing = [list(d.bits) for d in decided]
    context.guidance["routing_decisions"] = decided
    expert_rows = {n: r for n, r in model.tower_rows(context).items() if n != BASE_TOWER}
    # Experts come from the cache for fixed routing (their stores hold exactly the routed images), from pixels
    # after the LM's routing pass (the routed images are only known now).
    if store is not None and routing != "model":
        feats.update({n: [f.to(device) for f in v] for n, v in store.batch(images, expert_rows).items()
                      if n != BASE_TOWER})
    out: dict[str, Any] = {"vision_features": feats}
    missing = [n for n, r in expert_rows.items() if n not in feats and (r is None or len(r))]
    if missing:
        if pixels is None:
            pixels = {t: v.to(device) for t, v in processor.pixel_values(images).items()}
        out["pixel_values"] = {n: pixels[n] for n in missing}
    return out


def exact_match_report(questions: Sequence[Question], answers: Sequence[str],
                       group_key: str | None = None) -> dict[str, Any]:
    """Accuracy of normalised exact match; per-group accuracies by the questions' ``meta[group_key]``."""
    correct = [normalize_answer(a) == normalize_answer(q.answer) for q, a in zip(questions, answers)]
    report: dict[str, Any] = {"accuracy": sum(correct) / max(1, len(correct)), "n": len(correct)}
    if group_key:
        groups: dict[str, list[bool]] = defaultdict(list)
        for q, c in zip(questions, correct):
            groups[str(q.meta.get(group_key, "?"))].append(c)
        report["by_" + group_key] = {k: {"accuracy": sum(v) / len(v), "n": len(v)} for k, v in sorted(groups.items())}
    return report


def prediction_row(q: Question, a: str) -> dict[str, Any]:
    gold = "" if q.answer is None else q.answer
    return {"question_id": q.question_id, "question": q.text, "prediction": a,
            "answer": q.answer, "correct": normalize_answer(a) == normalize_answer(gold)}


def save_predictions(path: str | Path, questions: Sequence[Question], answers: Sequence[str],
                     decisions: Sequence[Any] | None = None) -> None:
    """All predictions, in question order, written atomically (a full disk leaves no half file); with
    ``decisions`` (routed models) each line also carries its ``routing`` (mode, experts, bits and, when the LM
    routed, its raw answer and whether it parsed)."""
    rows = []
    for k, (q, a) in enumerate(zip(questions, answers)):
        row = prediction_row(q, a)
        if decisions is not None:
            row["routing"] = None if decisions[k] is None else decisions[k].to_json()
        rows.append(json.dumps(row) + "\n")
    atomic_write_text(path, "".join(rows), "predictions")


class PartialPredictions:
    """``predictions.partial.jsonl``: rows appended (and flushed) batch by batch while generating, so an
    interrupted evaluation keeps every prediction made so far; removed once the complete file is written."""

    def __init__(self, path: str | Path, row: Callable[[int, str], dict[str, Any]]) -> None:
        self.path = Path(path)
        self.row = row
        self._fh = None  # opened at the first batch: a run refused before generating leaves no file

    def __call__(self, indices: list[int], answers: list[str]) -> None:
        with disk_full_guard(self.path, "partial predictions"):
            if self._fh is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._fh = open(self.path, "w", encoding="utf-8")
            self._fh.write("".join(json.dumps(self.row(i, a), ensure_ascii=False) + "\n"
                                   for i, a in zip(indices, answers)))
            self._fh.flush()

    def close(self, interrupted: bool) -> None:
        """Close the file; when ``interrupted``, say where the predictions made so far are.  The caller removes
        the file once the complete predictions are written."""
        if self._fh is None:
            return
        self._fh.close()
        if interrupted:
            import sys

            print(f"predictions so far: {self.path}", file=sys.stderr)


def majority_baselines(train: Sequence[Question], test: Sequence[Question], template_fn,
                       group_fn=None) -> dict[str, Any]:
    """Blind baselines on ``test``: the overall majority answer and the majority answer per question template,
    both learned from ``train``; with ``group_fn`` also the per-template baseline within each group (e.g. question
    type), which shows whether a model's score on a group is more than the wording alone gives, and the overall
    majority answer's accuracy within each group."""
    overall = Counter(normalize_answer(q.answer) for q in train).most_common(1)[0][0]
    per_t: dict[str, Counter] = defaultdict(Counter)
    for q in train:
        per_t[template_fn(q.text)][normalize_answer(q.answer)] += 1
    maj = {t: c.most_common(1)[0][0] for t, c in per_t.items()}
    n = max(1, len(test))
    blind_right = [normalize_answer(q.answer) == maj.get(template_fn(q.text), overall) for q in test]
    out: dict[str, Any] = {
        "majority": sum(normalize_answer(q.answer) == overall for q in test) / n,
        "majority_per_template": sum(blind_right) / n,
    }
    if group_fn is not None:
        by_group: dict[str, list[bool]] = defaultdict(list)
        majority_right: dict[str, list[bool]] = defaultdict(list)
        for q, ok in zip(test, blind_right):
            by_group[group_fn(q)].append(ok)
            majority_right[group_fn(q)].append(normalize_answer(q.answer) == overall)
        out["majority_per_template_by_group"] = {g: sum(v) / len(v) for g, v in by_group.items()}
        out["majority_by_group"] = {g: sum(v) / len(v) for g, v in majority_right.items()}
    return out
