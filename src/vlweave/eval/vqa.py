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
from typing import Any, Sequence

import torch
from PIL import Image
from tqdm.auto import tqdm

from vlweave.data.collate import pad_batch
from vlweave.data.questions import ImageSource, Question
from vlweave.hardware import bf16_available
from vlweave.processing import load_image
from vlweave.processor import VlweaveProcessor
from vlweave.vision.cache import FeatureCache

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
) -> list[str]:
    """Greedy answers for ``questions`` (their ``image``: an absolute path, a PIL image or a callable returning
    one; only paths go through the feature ``store``).  Prompts and pixels come from ``processor`` (the
    checkpoint's own, see ``builder.load_processor``; by default one made from ``model`` and ``tokenizer``)."""
    model.eval()
    processor = processor if processor is not None else VlweaveProcessor.from_model(model, tokenizer)
    texts = [q.text + prompt_suffix for q in questions]
    prompts = [processor.encode_question(t, q.has_image, template=template, system_prompt=system_prompt,
                                         sample_id=str(q.question_id)) for t, q in zip(texts, questions)]
    if store is not None:
        store.ensure([q.image for q in questions if q.has_image and isinstance(q.image, str)], progress)
    order = sorted(range(len(questions)), key=lambda i: len(prompts[i]))
    answers: list[str] = [""] * len(questions)
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
                                  texts=[[texts[i]] for i in idx], pixel_values=not cached)
        kwargs: dict[str, Any] = {"context": batch["context"]}
        present = [p for p in images if p is not None]
        if present and cached:
            kwargs["vision_features"] = {t: [f.to(device) for f in feats] for t, feats in store.batch(present).items()}
        elif present:
            kwargs["pixel_values"] = {t: v.to(device) for t, v in batch["pixel_values"].items()}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16 and bf16_available()):
            out = model.generate(batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                                 max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stops,
                                 pad_token_id=pad_id, **kwargs)
        for r, i in enumerate(idx):
            answers[i] = tokenizer.decode(out[r], skip_special_tokens=True).strip()
        bar.update(len(idx))
    bar.close()
    return answers


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


def save_predictions(path: str | Path, questions: Sequence[Question], answers: Sequence[str]) -> None:
    with open(path, "w") as fh:
        for q, a in zip(questions, answers):
            gold = "" if q.answer is None else q.answer
            row = {"question_id": q.question_id, "question": q.text, "prediction": a,
                   "answer": q.answer, "correct": normalize_answer(a) == normalize_answer(gold)}
            fh.write(json.dumps(row) + "\n")


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
