"""lmms-eval model plugin: ``python -m lmms_eval --model vlweave --model_args pretrained=CHECKPOINT ...``.

How lmms-eval 0.7.x finds it: its model registry (``lmms_eval/models/registry_v2.py``) loads every entry point of
the group ``lmms_eval.models`` and expects a ``ModelManifest`` (or a callable returning one); the manifest names
the class by import path.  ``pyproject.toml`` therefore registers :func:`model_manifest`, not the class itself (a
class is callable, so lmms-eval would call it with no arguments and drop every entry-point manifest on the error).

Importing this module never imports lmms-eval.  :class:`VlweaveLMM` holds the whole adapter and works on anything
shaped like lmms-eval's ``Instance`` (an object with ``.args``); ``Vlweave`` -- the class lmms-eval loads -- is
built on first access as ``class Vlweave(VlweaveLMM, lmms_eval.api.model.lmms)``, since lmms-eval checks the
subclass relation.

Request contract (lmms-eval ``ConfigurableTask.construct_requests`` for simple models):

* ``generate_until``: ``args = (context, gen_kwargs, doc_to_visual, doc_id, task, split)``; the visuals are
  ``doc_to_visual(self.task_dict[task][split][doc_id])``.  Decoding is greedy (temperature 0) through the same
  batched runner as ``vlweave eval``; ``max_new_tokens`` and the ``until`` stop strings are honoured (greedy text
  is cut at the first stop string, which equals stopping there).
* ``loglikelihood``: ``args = (context, continuation, doc_to_visual, doc_id, task, split)``; ``continuation`` is a
  string, or (``output_type: loglikelihood``) the task's ``doc_to_target`` function.  Returns
  ``(sum of log-probs of the continuation tokens, whether greedy decoding would produce them)``.  The continuation
  is tokenized on its own (no special tokens) and appended to the generation prompt, as lm-eval's HF models do.

  Pitfall: lmms-eval 0.7.3's ``multiple_choice`` scoring takes ``argmin`` over the returned values, because its
  built-in models return the (mean) token *loss* rather than the log-likelihood its ``lmms.loglikelihood``
  docstring specifies.  With the default ``ll_convention=logprob`` a ``multiple_choice`` task would pick the least
  likely option; pass ``ll_convention=nll`` (the negated sum) for those tasks.

The context is the user turn of the checkpoint's chat template; an image goes in as ``<image>`` in front of it
(one image per request; videos are not supported).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch

MODEL_ID = "vlweave"
CLASS_PATH = f"{__name__}.Vlweave"
DEFAULT_MAX_NEW_TOKENS = 128  # LLaVA's model_vqa_loader.py default

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def model_manifest():
    """The ``lmms_eval.models`` entry point: a ``ModelManifest`` naming :data:`CLASS_PATH` as a simple model."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path=CLASS_PATH)


def cut_at_stop(text: str, until: Sequence[str]) -> str:
    """``text`` up to the first occurrence of any stop string (empty stop strings are ignored)."""
    for stop in until:
        if stop:
            text = text.split(stop, 1)[0]
    return text


class VlweaveLMM:
    """The adapter (see the module docstring); lmms-eval passes ``model_args`` as keyword arguments.

    ``pretrained``: a vlweave checkpoint folder.  ``batch_size``: prompts per generation / scoring batch.
    ``device``: ``cpu`` (default when no GPU), ``cuda``, ``cuda:N``.  ``dtype``: float32 | bfloat16 | float16.
    ``max_new_tokens``: used when a task's ``generation_kwargs`` has none.  ``ll_convention``: ``logprob``
    (default: the summed log-probability) or ``nll`` (its negation, for lmms-eval's ``multiple_choice`` argmin).
    ``routing`` (routed, i.e. MoVA, checkpoints): ``model`` (the LM's routing pass per question, as ``vlweave eval
    --routing model``) or a fixed mode (``all``, ``none``, ``random`` with ``routing_seed``, letters like ``A,C``)
    for generation requests; log-likelihood requests run with every expert (no routing pass).
    ``max_batch_size`` is accepted because lmms-eval always passes it, and unused.
    """

    is_simple = True

    def __init__(self, pretrained: str, batch_size: int | str = 1, device: str | None = None,
                 max_batch_size: int | None = None, dtype: str = "float32",
                 max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, ll_convention: str = "logprob",
                 routing: str | None = None, routing_seed: int = 0, **unknown: Any) -> None:
        super().__init__()
        if unknown:
            raise TypeError(f"vlweave: unknown model_args {sorted(unknown)}; expected pretrained, batch_size, "
                            "device, dtype, max_new_tokens, ll_convention, routing, routing_seed")
        from vlweave.builder import load_checkpoint, load_processor

        if dtype not in _DTYPES:
            raise ValueError(f"vlweave: dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
        if ll_convention not in ("logprob", "nll"):
            raise ValueError(f"vlweave: ll_convention must be logprob or nll, got {ll_convention!r}")
        self.ll_sign = 1.0 if ll_convention == "logprob" else -1.0
        self.batch_size = _batch_size(batch_size)
        self.max_new_tokens = int(max_new_tokens)
        self.model, self.tokenizer = load_checkpoint(pretrained, dtype=_DTYPES[dtype])
        # The checkpoint's processor (prompts, <image> expansion, per-tower pixels); it shares the loaded tokenizer.
        self.processor = load_processor(pretrained, self.tokenizer)
        self.routing, self.routing_seed = routing or None, int(routing_seed)
        if self.routing is not None:
            from vlweave.language.routing import routing_pool

            routing_pool(self.model, self.routing)  # a model that does not route, or a bad mode: refused here
        self._device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model.to(self._device)
        self.pretrained = str(pretrained)
        if not hasattr(self, "task_dict"):  # set by lmms.__init__ when lmms-eval's base class is in the MRO
            self.task_dict: dict[str, Any] = {}
        self._warned: set[str] = set()

    @property
    def device(self) -> torch.device:
        return self._device

    # ---- helpers ---------------------------------------------------------------------------------------------
    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, stacklevel=3)

    def _visual(self, doc_to_visual: Callable[[Any], Any], doc_id: Any, task: str, split: str) -> Any:
        """The request's one image (a PIL image), or ``None``; anything else is a clear error."""
        visuals = doc_to_visual(self.task_dict[task][split][doc_id])
        visuals = [v for v in (visuals or []) if v is not None]
        if not visuals:
            return None
        if len(visuals) > 1:
            raise ValueError(f"vlweave: task {task!r} doc {doc_id}: {len(visuals)} visuals; vlweave takes one image "
                             "per request")
        if isinstance(visuals[0], str) or not hasattr(visuals[0], "convert"):
            raise ValueError(f"vlweave: task {task!r} doc {doc_id}: visual is {type(visuals[0]).__name__}, expected "
                             "a PIL image (videos and audio are not supported)")
        return visuals[0]

    def _image(self, doc_to_visual: Callable[[Any], Any] | None, doc_id: Any, task: str,
               split: str) -> Callable[[], Any] | None:
        """A loader of the request's image (``None`` for a text-only request).  The image is checked now and
        fetched again when its batch runs, so a large task never holds all its decoded images at once."""
        if doc_to_visual is None or self._visual(doc_to_visual, doc_id, task, split) is None:
            return None
        return lambda: self._visual(doc_to_visual, doc_id, task, split)

    def _generation_settings(self, gen_kwargs: dict[str, Any] | None) -> tuple[list[str], int]:
        kwargs = dict(gen_kwargs or {})
        until = kwargs.pop("until", [])
        if isinstance(until, str):
            until = [until]
        if not isinstance(until, (list, tuple)) or not all(isinstance(s, str) for s in until):
            raise ValueError(f"vlweave: gen_kwargs['until'] must be a string or a list of strings, got {until!r}")
        max_new = int(kwargs.pop("max_new_tokens", self.max_new_tokens))
        temperature = float(kwargs.pop("temperature", 0) or 0)
        if temperature > 0 or kwargs.pop("do_sample", False) or int(kwargs.pop("num_beams", 1) or 1) > 1:
            self._warn_once("sampling", "vlweave decodes greedily (temperature 0, one beam); sampling and beam "
                                        "settings in generation_kwargs are ignored")
        return list(until), max_new

    @staticmethod
    def _text(context: str, has_image: bool) -> str:
        # The runner puts the one "<image>" placeholder in front; a context that carries its own is moved there.
        return context.replace("<image>", "").strip() if has_image else context

    # ---- lmms-eval API ---------------------------------------------------------------------------------------
    def generate_until(self, requests: Sequence[Any]) -> list[str]:
        """Greedy continuations, in request order (batched by ``max_new_tokens``)."""
        from vlweave.data.questions import Question
        from vlweave.eval.vqa import generate_answers

        groups: dict[int, list[tuple[int, Question, list[str]]]] = {}
        for i, request in enumerate(requests):
            context, gen_kwargs, doc_to_visual, doc_id, task, split = request.args
            until, max_new = self._generation_settings(gen_kwargs)
            image = self._image(doc_to_visual, doc_id, task, split)
            question = Question(question_id=f"{task}/{split}/{doc_id}", text=self._text(context, image is not None),
                                image=image)
            groups.setdefault(max_new, []).append((i, question, until))
        out = [""] * len(requests)
        for max_new, members in groups.items():
            answers = generate_answers(self.model, self.tokenizer, [q for _, q, _ in members],
                                       batch_size=self.batch_size, max_new_tokens=max_new, progress=False,
                                       processor=self.processor, routing=self.routing,
                                       routing_seed=self.routing_seed)
            for (i, _, until), answer in zip(members, answers):
                out[i] = cut_at_stop(answer, until)
        return out

    def loglikelihood(self, requests: Sequence[Any]) -> list[tuple[float, bool]]:
        """``(log P(continuation | context, image), is_greedy)`` per request, in request order."""
        from vlweave.context import VlweaveContext
        from vlweave.data.collate import pad_batch
        from vlweave.eval.vqa import open_image

        encoded: list[tuple[list[int], list[int], Callable[[], Any] | None]] = []
        for request in requests:
            context, continuation, doc_to_visual, doc_id, task, split = request.args
            if not isinstance(continuation, str):  # output_type loglikelihood: the task's doc_to_target
                continuation = continuation(self.task_dict[task][split][doc_id])
            image = self._image(doc_to_visual, doc_id, task, split)
            prompt = self.processor.encode_question(self._text(context, image is not None), image is not None,
                                                    sample_id=f"{task}/{split}/{doc_id}")
            cont = list(self.tokenizer(str(continuation), add_special_tokens=False)["input_ids"])
            encoded.append((prompt, cont, image))

        results: list[tuple[float, bool]] = []
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.model.eval()
        for start in range(0, len(encoded), self.batch_size):
            chunk = encoded[start:start + self.batch_size]
            # Left padding: every sequence ends at the last position.
            batch = pad_batch([{"input_ids": p + c} for p, c, _ in chunk], pad_id, padding_side="left")
            ids, mask = batch["input_ids"], batch["attention_mask"]
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            images = [image for _, _, image in chunk if image is not None]
            kwargs: dict[str, Any] = {}
            if images:
                pixels = self.processor.pixel_values([open_image(im) for im in images])
                kwargs["pixel_values"] = {t: v.to(self._device) for t, v in pixels.items()}
            keep = max(len(c) for _, c, _ in chunk) + 1
            # The prompt is what a generation would have seen at prefill: per-sequence state computed from "the
            # prompt" (HyperLLaVA's language guidance) must not see the continuation being scored.
            context = VlweaveContext.for_batch([image is not None for _, _, image in chunk])
            prompt_mask = mask.bool().clone()
            for r, (_, c, _) in enumerate(chunk):
                if c:
                    prompt_mask[r, prompt_mask.shape[1] - len(c):] = False
            context.prompt_mask = prompt_mask.to(self._device)
            with torch.no_grad():
                logits = self.model(input_ids=ids.to(self._device), attention_mask=mask.to(self._device),
                                    position_ids=positions.to(self._device), logits_to_keep=keep, context=context,
                                    **kwargs).logits
            logprobs = torch.log_softmax(logits[:, :-1].float(), dim=-1)  # row k predicts the token at k+1
            for r, (_, c, _) in enumerate(chunk):
                if not c:
                    results.append((0.0, True))
                    continue
                rows = logprobs[r, logprobs.shape[1] - len(c):]
                target = torch.tensor(c, device=rows.device)
                total = float(rows.gather(-1, target[:, None]).sum())
                results.append((self.ll_sign * total, bool((rows.argmax(-1) == target).all())))
        return results

    def generate_until_multi_round(self, requests: Sequence[Any]) -> list[str]:
        raise NotImplementedError("vlweave: multi-round generation is not supported")


def _batch_size(value: int | str) -> int:
    if isinstance(value, str):
        if value.startswith("auto"):
            return 8
        if not value.isdigit():
            raise ValueError(f"vlweave: batch_size must be a positive integer or 'auto', got {value!r}")
    size = int(value)
    if size < 1:
        raise ValueError(f"vlweave: batch_size must be at least 1, got {size}")
    return size


_LMMS_CLASS: type | None = None


def _lmms_class() -> type:
    """``Vlweave``: :class:`VlweaveLMM` with lmms-eval's ``lmms`` base class (imported only now)."""
    global _LMMS_CLASS
    if _LMMS_CLASS is None:
        try:
            from lmms_eval.api.model import lmms
        except ImportError as exc:
            raise ImportError("vlweave's lmms-eval model needs lmms-eval: pip install 'vlweave[lmms]'") from exc

        class Vlweave(VlweaveLMM, lmms):
            """vlweave checkpoints in lmms-eval (``--model vlweave --model_args pretrained=CHECKPOINT``)."""

        Vlweave.__module__ = __name__
        Vlweave.__qualname__ = "Vlweave"
        _LMMS_CLASS = Vlweave
    return _LMMS_CLASS


def __getattr__(name: str) -> Any:
    if name == "Vlweave":
        return _lmms_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
