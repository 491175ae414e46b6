"""One generation function for ``vlweave chat`` and ``vlweave serve``: a batch of prompts -> one ``generate`` call.

Every prompt carries its own ``max_new_tokens``, stop strings and (optionally) a token callback; prompts that share
their sampling settings (greedy, or one ``temperature``/``top_p``) go through a single left-padded
``model.generate``.  Per-row limits are a :class:`~transformers.StoppingCriteria` that marks each row done on its
own (end-of-turn token, its ``max_new_tokens``, one of its stop strings), so one long answer does not make the
short ones in its batch run on, and the same object hands each step's new token to a row's callback (what the
server's streaming reads; HF's streamers take batches of one only).

Greedy answers are independent of the batch a prompt lands in (left padding, masked attention), which is what makes
the server's batched answers equal ``vlweave chat``'s one-by-one answers (tests/test_serve.py checks it).

Images go in as pixels (:meth:`VlweaveProcessor.pixel_values`), or as the connector's prepared features when a
:class:`FeatureLRU` is given (an image sent again is not run through the towers again; the features are exactly
what the pixel path computes inside the model, ``model.prepare_tower_features``).

A routed connector (MoVA) with a ``routing`` mode is answered as ``vlweave eval`` answers it: the base tower once,
then the LM's batched routing pass over the image prompts (``"model"``; the question routed is the last user
turn) or the fixed decision, then the answer pass with each expert run on its routed rows only
(:func:`vlweave.eval.vqa.routed_inputs`, the evaluator's own code).  Those prompts bypass the feature cache:
which experts an image needs is only known after its routing pass.  Each completion carries its decision.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image
from transformers import StoppingCriteria, StoppingCriteriaList

from vlweave.eval.vqa import stop_token_ids
from vlweave.processor import VlweaveProcessor

TokenCallback = Callable[[str], None]  # receives text deltas (already safe to show: no partial stop string)


@dataclass
class Prompt:
    """One generation request: encoded prompt ids, its image (``None``: text only) and decoding settings."""

    input_ids: list[int]
    image: Image.Image | None = None
    image_key: str | None = None  # content hash of the image (feature-cache key); computed when None
    texts: list[str] = field(default_factory=list)  # the user-turn texts (the batch context's)
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    on_text: TokenCallback | None = None
    video: torch.Tensor | None = None  # [1, T, 3, H, W] frames (chat only; a video prompt is generated alone)

    def sampling_key(self) -> tuple[bool, float, float]:
        """Prompts with equal keys can share a ``generate`` call."""
        if self.temperature <= 0:
            return (False, 0.0, 1.0)
        return (True, float(self.temperature), float(self.top_p))


@dataclass
class Completion:
    text: str
    finish_reason: str  # "stop" (end-of-turn token or a stop string) | "length"
    prompt_tokens: int
    completion_tokens: int
    routing: dict[str, Any] | None = None  # a routed model's decision for this prompt (RoutingDecision.to_json())


def image_key(image: Image.Image) -> str:
    """A content hash of a decoded RGB image (size + pixels)."""
    h = hashlib.sha256(f"{image.mode}:{image.size}".encode())
    h.update(image.tobytes())
    return h.hexdigest()


class FeatureLRU:
    """Prepared connector input per (image content, tower), least recently used dropped beyond ``max_images``.
    Exact for frozen towers only (which served models are: nothing trains at serving time)."""

    def __init__(self, model, processor: VlweaveProcessor, max_images: int = 256) -> None:
        self.model, self.processor, self.max_images = model, processor, max_images
        self._items: OrderedDict[str, dict[str, list[torch.Tensor]]] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._items)

    @torch.no_grad()
    def features(self, keys: Sequence[str], images: Sequence[Image.Image]) -> dict[str, list[torch.Tensor]]:
        """Per tower: per-layer features [N, T, C] of ``images`` (in order), running the towers only on the images
        not cached yet (as one batch)."""
        with self._lock:
            missing = {}
            for k, im in zip(keys, images):
                if k in self._items:
                    self._items.move_to_end(k)
                    self.hits += 1
                elif k not in missing:
                    missing[k] = im
                    self.misses += 1
            if missing:
                pixels = self.processor.pixel_values(list(missing.values()))
                device = next(self.model.parameters()).device
                fresh = {t: self.model.prepare_tower_features(t, v.to(device)) for t, v in pixels.items()}
                for i, k in enumerate(missing):
                    self._items[k] = {t: [f[i : i + 1] for f in feats] for t, feats in fresh.items()}
            rows = [self._items[k] for k in keys]
            while len(self._items) > self.max_images:
                self._items.popitem(last=False)
        towers = rows[0].keys()
        return {t: [torch.cat([r[t][j] for r in rows]) for j in range(len(rows[0][t]))] for t in towers}


class _RowStops(StoppingCriteria):
    """Per-row end of generation + per-step text callbacks (see the module docstring)."""

    def __init__(self, tokenizer, prompts: Sequence[Prompt], eos_ids: Sequence[int]) -> None:
        self.tokenizer = tokenizer
        self.prompts = list(prompts)
        self.eos = set(int(i) for i in eos_ids)
        self.tokens: list[list[int]] = [[] for _ in prompts]
        self.done = [False] * len(prompts)
        self.finish = ["length"] * len(prompts)
        self.texts = [""] * len(prompts)
        self.emitted = [0] * len(prompts)

    def _text(self, r: int) -> str:
        return self.tokenizer.decode(self.tokens[r], skip_special_tokens=True).lstrip()

    def _cut_stop(self, r: int, text: str) -> tuple[str, bool]:
        hits = [i for i in (text.find(s) for s in self.prompts[r].stop if s) if i >= 0]
        return (text[: min(hits)], True) if hits else (text, False)

    def _emit(self, r: int, final: bool) -> None:
        cb = self.prompts[r].on_text
        if cb is None:
            return
        text = self.texts[r]
        if not final:
            # Hold back what may still change: trailing whitespace (the answer is stripped at the end), a
            # partial multi-byte character, and a possible beginning of a stop string.
            hold = max((len(s) - 1 for s in self.prompts[r].stop), default=0)
            safe = text.rstrip().rstrip("\ufffd")
            safe = safe[: max(len(safe) - hold, self.emitted[r])] if hold else safe
            text = safe
        if len(text) > self.emitted[r]:
            cb(text[self.emitted[r]:])
            self.emitted[r] = len(text)

    def __call__(self, input_ids: torch.LongTensor, scores: Any = None, **kwargs: Any) -> torch.BoolTensor:
        new = input_ids[:, -1].tolist()
        for r, tok in enumerate(new):
            if self.done[r]:
                continue
            p = self.prompts[r]
            if tok in self.eos:
                self.done[r], self.finish[r] = True, "stop"
            else:
                self.tokens[r].append(tok)
                text, stopped = self._cut_stop(r, self._text(r))
                self.texts[r] = text
                if stopped:
                    self.done[r], self.finish[r] = True, "stop"
                elif len(self.tokens[r]) >= p.max_new_tokens:
                    self.done[r], self.finish[r] = True, "length"
            self._emit(r, final=False)
        return torch.tensor(self.done, dtype=torch.bool, device=input_ids.device)


@torch.no_grad()
def generate_batch(model, processor: VlweaveProcessor, prompts: Sequence[Prompt],
                   features: FeatureLRU | None = None, routing: str | None = None,
                   routing_seed: int = 0) -> list[Completion]:
    """Answers for ``prompts`` (one ``generate`` call per sampling setting), in order.  ``routing``: a routed
    model's mode (``model``, ``all``, ``none``, ``random``, letters), see the module docstring."""
    groups: dict[tuple, list[int]] = {}
    for i, p in enumerate(prompts):
        key = ("video", i) if p.video is not None else p.sampling_key()
        groups.setdefault(key, []).append(i)
    out: list[Completion | None] = [None] * len(prompts)
    for idx in groups.values():
        for i, c in zip(idx, _generate_group(model, processor, [prompts[i] for i in idx], features, routing,
                                             routing_seed)):
            out[i] = c
    return out  # type: ignore[return-value]


def _generate_group(model, processor: VlweaveProcessor, prompts: Sequence[Prompt],
                    features: FeatureLRU | None, routing: str | None = None,
                    routing_seed: int = 0) -> list[Completion]:
    tokenizer = processor.tokenizer
    images = [p.image for p in prompts]
    routed = routing is not None and any(im is not None for im in images) and prompts[0].video is None
    batch = processor.collate([{"input_ids": p.input_ids} for p in prompts], images, padding_side="left",
                              texts=[p.texts for p in prompts], pixel_values=features is None and not routed)
    device = next(model.parameters()).device
    kwargs: dict[str, Any] = {"context": batch["context"]}
    present = [(p.image_key or image_key(p.image), p.image) for p in prompts if p.image is not None]
    decisions: list[Any] = [None] * len(prompts)
    eos = stop_token_ids(tokenizer)
    if routed:
        kwargs.update(_routed_kwargs(model, processor, prompts, routing, routing_seed, batch["context"], device, eos,
                                     decisions))
    elif present and features is not None:
        kwargs["vision_features"] = features.features([k for k, _ in present], [im for _, im in present])
    elif present:
        kwargs["pixel_values"] = {t: v.to(device) for t, v in batch["pixel_values"].items()}
    if prompts[0].video is not None:
        kwargs["pixel_values_videos"] = prompts[0].video.to(device)
    sample = prompts[0].sampling_key()
    if sample[0]:
        kwargs.update(do_sample=True, temperature=sample[1], top_p=sample[2], top_k=0)
    else:
        kwargs.update(do_sample=False)
    ids = batch["input_ids"]
    stops = _RowStops(tokenizer, prompts, eos)
    model.generate(ids.to(device), attention_mask=batch["attention_mask"].to(device),
                   max_new_tokens=max(p.max_new_tokens for p in prompts), eos_token_id=eos,
                   pad_token_id=processor.pad_token_id, stopping_criteria=StoppingCriteriaList([stops]), **kwargs)
    results = []
    for r, p in enumerate(prompts):
        stops.texts[r] = stops.texts[r].strip()
        stops._emit(r, final=True)
        results.append(Completion(text=stops.texts[r], finish_reason=stops.finish[r],
                                  prompt_tokens=len(p.input_ids), completion_tokens=len(stops.tokens[r]),
                                  routing=None if decisions[r] is None else decisions[r].to_json()))
    return results


def _routed_kwargs(model, processor: VlweaveProcessor, prompts: Sequence[Prompt], routing: str, routing_seed: int,
                   context, device, eos: Sequence[int], decisions: list[Any]) -> dict[str, Any]:
    """The answer pass's visual inputs for the image prompts of a routed batch (the evaluator's two passes); their
    decisions are written into ``decisions`` (by prompt position)."""
    from types import SimpleNamespace

    from vlweave.eval.vqa import routed_inputs
    from vlweave.language.routing import RoutingPool, fixed_routing

    pool = RoutingPool.from_connector(model.connector)
    with_image = [r for r, p in enumerate(prompts) if p.image is not None]
    questions = [SimpleNamespace(text=(prompts[r].texts or [""])[-1], question_id=f"request:{r}") for r in with_image]
    fixed = [None if routing == "model" else
             fixed_routing(routing, pool, prompts[r].image_key or image_key(prompts[r].image), routing_seed)
             for r in with_image]
    out = routed_inputs(model, processor, pool, routing, None, [prompts[r].image for r in with_image], questions,
                         fixed, context, device, template=None, system_prompt=None, stops=eos, bf16=False)
    for r, d in zip(with_image, context.guidance.pop("routing_decisions")):
        decisions[r] = d
    return out


__all__ = ["Completion", "FeatureLRU", "Prompt", "generate_batch", "image_key"]
