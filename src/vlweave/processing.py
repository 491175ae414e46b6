"""Text and image processing: chat templates, ``<image>`` expansion, label masks, image transforms.

Text side
---------
``encode_conversation`` turns LLaVA turns (``[{"from": "human"|"gpt", "value": ...}]``) into ``input_ids`` and
``labels`` for one of three templates (``TEMPLATES``):

* ``plain`` -- LLaVA stage 1: image tokens + caption + ``"\\n"``; loss on caption + newline.
* ``vicuna_v1`` -- LLaVA-1.5 stage 2 (``methods.md`` §0.2): ``SYSTEM USER: <image>\\nQ1 ASSISTANT: A1</s>...``.
* ``tokenizer`` -- the tokenizer's own Jinja ``chat_template`` (ChatML for SmolLM2 / Qwen2).

How the label mask is made exact (LLaVA's "tokenization mismatch" bug cannot happen silently here):

1. A template renders the conversation as a list of text *segments*, each marked supervised or not
   (an assistant reply plus its end-of-turn token is supervised; everything else is prompt).
2. The full text is tokenized once, exactly as the tokenizer would tokenize it (these are the final ids).
3. For every boundary between a prompt segment and a supervised segment, the text *up to the boundary* is
   tokenized too; its ids must be a prefix of the full ids.  Their length is then the exact token position of
   the boundary.  If they are not a prefix, some token straddles the boundary (a merge across prompt and answer)
   and no exact mask exists: ``TemplateError`` names the sample and shows both token sequences where they differ.

So ``input_ids`` always equal the tokenizer's tokenization of the rendered text (with the single image token
expanded to ``num_image_tokens`` copies), and the labels are exactly the tokens of the supervised text.

Image side
----------
``ImageTransform`` reproduces CLIPImageProcessor + LLaVA's ``expand2square`` with PIL, numpy and torch only.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

IMAGE_TOKEN = "<image>"
IGNORE_INDEX = -100

VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)

# Roles accepted in LLaVA turns, mapped to chat roles.
_ROLE_MAP = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}

# A system message that no real data contains; used to locate (and remove) a ChatML system block.
_SYSTEM_SENTINEL = "VLWEAVE-SYSTEM-SENTINEL-5f1c9e"


class TemplateError(ValueError):
    """A conversation that cannot be encoded exactly; the message names the sample id and the problem."""


# ----------------------------------------------------------------------------------------------------------------
# Tokenizer helpers
# ----------------------------------------------------------------------------------------------------------------


def add_image_token(tokenizer: Any) -> int:
    """Register ``<image>`` as a special token (if absent) and make sure a pad token exists.

    The pad token follows LLaVA: ``unk`` for Llama-v1-style tokenizers (an ``unk`` distinct from ``eos``),
    ``eos`` for ChatML / GPT-like tokenizers (which have no distinct ``unk``, or use ``<|endoftext|>`` as both).
    Returns the image token id.  The caller must resize the LM's embeddings if the vocabulary grew.
    """
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        from tokenizers import AddedToken

        token = AddedToken(IMAGE_TOKEN, special=True, normalized=False, lstrip=False, rstrip=False)
        try:  # transformers >= 5 names the list "extra_special_tokens"
            tokenizer.add_special_tokens({"extra_special_tokens": [token]}, replace_extra_special_tokens=False)
        except (TypeError, ValueError, AttributeError):
            tokenizer.add_tokens([token], special_tokens=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = _default_pad_token(tokenizer)
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    if not isinstance(image_id, int) or tokenizer.encode(IMAGE_TOKEN, add_special_tokens=False) != [image_id]:
        raise RuntimeError(
            f"could not register {IMAGE_TOKEN!r} as a single special token in {type(tokenizer).__name__}"
        )
    return image_id


def _default_pad_token(tokenizer: Any) -> str:
    """LLaVA's choice of pad token: unk for Llama-v1-like tokenizers, eos for ChatML/GPT-like ones."""
    vocab = tokenizer.get_vocab()
    chatml = "<|im_end|>" in vocab or "<|im_start|>" in _template_text(tokenizer)
    unk, eos = tokenizer.unk_token, tokenizer.eos_token
    if not chatml and unk is not None and unk != eos:
        return unk
    if eos is not None:
        return eos
    if unk is not None:
        return unk
    tokenizer.add_special_tokens({"pad_token": "<pad>"})
    return "<pad>"


def _default_prefix_ids(tokenizer: Any) -> list[int]:
    """The ids the tokenizer puts in front of any text by default (BOS for Llama, nothing for Qwen/SmolLM2).

    LLaVA calls ``tokenizer(prompt)`` with special tokens on, so the ``plain`` and ``vicuna_v1`` templates start
    with exactly these ids.  BOS is added as an id, not rendered as text: ``"<s>" + text`` can tokenize the first
    word differently (no leading "▁") from what the tokenizer produces for ``text`` with BOS added.
    """
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    without = tokenizer("a", add_special_tokens=False)["input_ids"]
    for start in range(len(with_special) - len(without) + 1):
        if with_special[start : start + len(without)] == without:
            return list(with_special[:start])
    return []


def _special_strings(tokenizer: Any) -> list[str]:
    """Strings that the tokenizer turns into special tokens wherever they occur in text."""
    found = {str(t) for t in getattr(tokenizer, "all_special_tokens", [])}
    for added in getattr(tokenizer, "added_tokens_decoder", {}).values():
        if getattr(added, "special", False):
            found.add(str(getattr(added, "content", added)))
    return sorted((s for s in found if s), key=len, reverse=True)


def _template_text(tokenizer: Any) -> str:
    """The tokenizer's Jinja chat template as text ("default" entry when it has several named templates)."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("default", next(iter(template.values()), None))
    return template if isinstance(template, str) else ""


def _structural_specials(tokenizer: Any) -> list[str]:
    """Special-token strings that would break the turn structure if they appeared inside a turn's text.

    These are the named specials (bos/eos/unk/pad/...) and every special token the chat template itself uses
    (``<|im_start|>``, ``<|im_end|>``).  Other added specials (SmolLM2's ``<filename>``, ``<jupyter_code>``) only
    become single ids, so text containing them is accepted.
    """
    named = {getattr(tokenizer, f"{name}_token", None) for name in ("bos", "eos", "unk", "pad", "sep", "cls", "mask")}
    template = _template_text(tokenizer)
    return [s for s in _special_strings(tokenizer) if s in named or s in template]


def _image_placeholder(tokenizer: Any, image_token_id: int, sample_id: str) -> str:
    """The text of the image token; it must tokenize to exactly ``[image_token_id]`` anywhere in the text."""
    placeholder = tokenizer.convert_ids_to_tokens(image_token_id)
    # An ordinary vocabulary piece would also occur in plain text ("cat"), so only added tokens qualify.
    if (
        not isinstance(placeholder, str)
        or placeholder not in tokenizer.get_added_vocab()
        or tokenizer.encode(placeholder, add_special_tokens=False) != [image_token_id]
    ):
        raise TemplateError(
            f"sample {sample_id!r}: image token id {image_token_id} ({placeholder!r}) is not a single special token "
            "of this tokenizer; call vlweave.processing.add_image_token(tokenizer) first"
        )
    return placeholder


# ----------------------------------------------------------------------------------------------------------------
# Templates
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Segment:
    """A piece of rendered text and whether the model is trained to produce it."""

    text: str
    supervised: bool = False


@dataclass
class Rendered:
    """A rendered conversation: literal ids put in front (e.g. BOS), then text segments."""

    prefix_ids: list[int] = field(default_factory=list)
    segments: list[Segment] = field(default_factory=list)

    @property
    def text(self) -> str:
        return "".join(s.text for s in self.segments)


@dataclass
class _Ctx:
    """What a template needs besides the turns."""

    tokenizer: Any
    sample_id: str
    placeholder: str | None  # the image token's text, or None for a text-only sample
    system_prompt: str | None
    add_generation_prompt: bool


class ChatTemplate(ABC):
    """Renders normalised turns ``[(role, content)]`` (roles ``user``/``assistant``) into segments."""

    name: str = ""
    description: str = ""

    @abstractmethod
    def render(self, turns: list[tuple[str, str]], ctx: _Ctx) -> Rendered:
        """Render a conversation; with ``ctx.add_generation_prompt`` it ends with a user turn + assistant prefix."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


class PlainTemplate(ChatTemplate):
    """LLaVA stage-1 ``plain``: the human text is replaced by the image; sequence = image + caption + "\\n"."""

    name = "plain"
    description = "LLaVA stage-1 captioning: <image> + caption + newline, loss on the caption"

    def render(self, turns: list[tuple[str, str]], ctx: _Ctx) -> Rendered:
        expected = 1 if ctx.add_generation_prompt else 2
        if len(turns) != expected:
            raise TemplateError(
                f"sample {ctx.sample_id!r}: template 'plain' is single-turn (one human turn and one gpt turn), "
                f"got {len(turns)} turns"
            )
        # The human text is dropped on purpose (LLaVA preprocess_plain keeps only the image).
        segments = [Segment(ctx.placeholder or "")]
        if not ctx.add_generation_prompt:
            segments.append(Segment(turns[1][1] + "\n", supervised=True))
        return Rendered(_default_prefix_ids(ctx.tokenizer), segments)


class VicunaV1Template(ChatTemplate):
    """LLaVA ``conv_vicuna_v1`` (separator style TWO, ``sep=" "``, ``sep2=eos``)."""

    name = "vicuna_v1"
    description = "LLaVA-1.5 stage 2: 'SYSTEM USER: <image>\\nQ ASSISTANT: A</s>'"

    def __init__(self, system: str = VICUNA_SYSTEM, roles: tuple[str, str] = ("USER", "ASSISTANT")) -> None:
        self.system = system
        self.roles = roles

    def render(self, turns: list[tuple[str, str]], ctx: _Ctx) -> Rendered:
        eos = ctx.tokenizer.eos_token
        if not eos:
            raise TemplateError(f"sample {ctx.sample_id!r}: template 'vicuna_v1' needs a tokenizer with an eos token")
        system = self.system if ctx.system_prompt is None else ctx.system_prompt
        user, assistant = self.roles
        segments: list[Segment] = []
        pending = f"{system} " if system else ""  # prompt text not yet emitted
        for role, content in turns:
            if role == "user":
                pending += f"{user}: {content} "
            else:
                # The space before the answer belongs to the answer: SentencePiece glues it to the first word
                # ("▁A"), and LLaVA's "-2" instruction-length correction supervises that token too.
                segments.append(Segment(pending + f"{assistant}:"))
                answer = f" {content}" if content else ""
                segments.append(Segment(answer + eos, supervised=True))
                pending = ""
        if ctx.add_generation_prompt:
            pending += f"{assistant}:"
        if pending:
            segments.append(Segment(pending))
        return Rendered(_default_prefix_ids(ctx.tokenizer), segments)


class TokenizerChatTemplate(ChatTemplate):
    """The tokenizer's own Jinja ``chat_template`` (ChatML for SmolLM2 / Qwen2, or any other).

    Supervised: everything the model must generate after the template's generation prompt, up to and including
    the first special token after the assistant content (``<|im_end|>`` for ChatML); not the role header, not the
    newline after ``<|im_end|>``.  Replies are located by rendering growing prefixes of the conversation (exact
    for prefix-stable templates such as SmolLM2's and Qwen2's); templates that render history turns differently
    (Qwen3 drops ``<think>`` blocks from history) fall back to finding the assistant header and the content.

    ``system_prompt``: ``None`` -- whatever the template does with no system message (SmolLM2 then injects its
    default "You are a helpful AI assistant named SmolLM..."); a string -- a system message with that text;
    ``""`` -- no system message at all.  Jinja templates cannot be told to skip their default, so for a ChatML
    template we render with a sentinel system message and cut out its ``<|im_start|>system\\n...<|im_end|>\\n``
    block, which leaves exactly the template's rendering of the other turns.  Non-ChatML templates are rendered
    without a system message (a template that injects a default unconditionally keeps it).
    """

    name = "tokenizer"
    description = "the tokenizer's own Jinja chat_template (ChatML for SmolLM2/Qwen2)"

    def render(self, turns: list[tuple[str, str]], ctx: _Ctx) -> Rendered:
        tok = ctx.tokenizer
        if not _template_text(tok):
            raise TemplateError(
                f"sample {ctx.sample_id!r}: template 'tokenizer' needs a tokenizer with a chat_template "
                f"({type(tok).__name__} has none); use 'vicuna_v1' or 'plain'"
            )
        messages = [{"role": role, "content": content} for role, content in turns]
        if ctx.add_generation_prompt:
            return Rendered([], [Segment(self._render(messages, True, ctx))])
        full = self._render(messages, False, ctx)
        specials = _special_strings(tok)
        segments: list[Segment] = []
        pos = 0  # characters of `full` already assigned to segments
        for i, (role, content) in enumerate(turns):
            if role != "assistant":
                continue
            span = self._span_by_prefix(messages, i, full, pos, ctx)
            if span is None:  # e.g. Qwen3 renders history turns differently from the last one
                span = self._span_by_search(messages, i, full, pos, specials, ctx)
            start, content_end = span
            stop = _end_of_turn(full[content_end:], specials)
            if stop is None:
                raise TemplateError(
                    f"sample {ctx.sample_id!r}: the chat_template emits no special end-of-turn token after "
                    f"assistant turn {i} (got {full[content_end:content_end + 40]!r}); the model could not learn "
                    "to stop"
                )
            segments.append(Segment(full[pos:start]))
            segments.append(Segment(full[start : content_end + stop], supervised=True))
            pos = content_end + stop
        segments.append(Segment(full[pos:]))
        return Rendered([], [s for s in segments if s.text])

    def _span_by_prefix(
        self, messages: list[dict[str, str]], i: int, full: str, pos: int, ctx: _Ctx
    ) -> tuple[int, int] | None:
        """(start, content end) of assistant turn ``i`` if the template is prefix-stable there (the usual case).

        Rendering turns ``[:i]`` plus the generation prompt must be a prefix of rendering turns ``[:i+1]``, itself a
        prefix of the whole conversation; the reply then starts exactly where the generation prompt ends, and
        whatever the template puts between that point and the content is part of what the model must generate.
        """
        prompt = self._render(messages[:i], True, ctx)
        upto = self._render(messages[: i + 1], False, ctx)
        if not (upto.startswith(prompt) and full.startswith(upto) and len(prompt) >= pos):
            return None
        content = messages[i]["content"]
        at = upto.find(content, len(prompt))
        return None if at < 0 else (len(prompt), at + len(content))

    def _span_by_search(
        self, messages: list[dict[str, str]], i: int, full: str, pos: int, specials: list[str], ctx: _Ctx
    ) -> tuple[int, int]:
        """Fallback for templates that are not prefix-stable: find the assistant header, then the content.

        The header is what the generation prompt adds (``<|im_start|>assistant\n``); it cannot occur inside user
        text because special-token strings are rejected there.  Between the header and the content only
        non-special text (e.g. an empty ``<think>`` block) may stand.
        """
        bare = self._render(messages[:i], False, ctx)
        prompt = self._render(messages[:i], True, ctx)
        content = messages[i]["content"]
        header = prompt[len(bare) :] if prompt.startswith(bare) else ""
        where = full.find(header, pos) if header else -1
        start = where + len(header)
        at = full.find(content, start) if where >= 0 else -1
        if at < 0 or any(special in full[start:at] for special in specials):
            raise TemplateError(
                f"sample {ctx.sample_id!r}: cannot locate assistant turn {i} ({content[:40]!r}) in the chat_template's "
                f"rendering after the assistant header {header!r}; the template is not prefix-stable and rewrites "
                "the turn. Use 'vicuna_v1' or a simpler template."
            )
        return start, at + len(content)

    def _render(self, messages: list[dict[str, str]], generation: bool, ctx: _Ctx) -> str:
        tok = ctx.tokenizer
        template = _template_text(tok)
        chatml = "<|im_start|>" in template and "<|im_end|>" in template
        system = ctx.system_prompt
        if system == "" and chatml:
            messages = [{"role": "system", "content": _SYSTEM_SENTINEL}, *messages]
        elif system:
            messages = [{"role": "system", "content": system}, *messages]
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)
        if not isinstance(text, str):
            raise TemplateError(f"sample {ctx.sample_id!r}: apply_chat_template returned {type(text).__name__}")
        if system == "" and chatml:
            block = f"<|im_start|>system\n{_SYSTEM_SENTINEL}<|im_end|>\n"
            if text.count(block) != 1:
                raise TemplateError(
                    f"sample {ctx.sample_id!r}: cannot render without a system message: the ChatML template did "
                    f"not render a system message as {block!r}"
                )
            text = text.replace(block, "", 1)
        return text


def _end_of_turn(tail: str, specials: list[str]) -> int | None:
    """Characters of ``tail`` up to and including the first special token, if only whitespace precedes it."""
    best: tuple[int, int] | None = None
    for special in specials:  # longest first, so at equal positions the longest special wins
        at = tail.find(special)
        if at >= 0 and not tail[:at].strip() and (best is None or at < best[0]):
            best = (at, at + len(special))
    return None if best is None else best[1]


TEMPLATES: dict[str, ChatTemplate] = {
    "plain": PlainTemplate(),
    "vicuna_v1": VicunaV1Template(),
    "tokenizer": TokenizerChatTemplate(),
}
TEMPLATE_ALIASES: dict[str, str] = {"v1": "vicuna_v1", "chatml": "tokenizer"}


def get_template(name: str) -> ChatTemplate:
    """Look a template up by exact name or explicit alias; an unknown name lists the known ones."""
    key = TEMPLATE_ALIASES.get(name, name)
    if key not in TEMPLATES:
        aliases = ", ".join(f"{a} -> {t}" for a, t in sorted(TEMPLATE_ALIASES.items()))
        raise ValueError(f"unknown chat template {name!r}; known: {', '.join(sorted(TEMPLATES))} (aliases: {aliases})")
    return TEMPLATES[key]


# ----------------------------------------------------------------------------------------------------------------
# Turn normalisation and <image> placement
# ----------------------------------------------------------------------------------------------------------------


def _normalise_turns(conversations: list[dict], sample_id: str, *, final_role: str) -> list[tuple[str, str]]:
    """LLaVA turns -> ``[(role, stripped content)]`` with roles alternating user/assistant from user.

    Values are stripped (as most chat templates do) so that no whitespace can sit on a prompt/answer boundary.
    """
    if not isinstance(conversations, list) or not conversations:
        raise TemplateError(f"sample {sample_id!r}: conversations must be a non-empty list")
    turns: list[tuple[str, str]] = []
    for i, turn in enumerate(conversations):
        if not isinstance(turn, dict):
            raise TemplateError(f"sample {sample_id!r}: turn {i} is not a dict")
        raw_role = turn.get("from", turn.get("role"))
        value = turn.get("value", turn.get("content"))
        role = _ROLE_MAP.get(str(raw_role).lower()) if raw_role is not None else None
        if role is None:
            raise TemplateError(f"sample {sample_id!r}: turn {i} has unknown role {raw_role!r} (use human/gpt)")
        if not isinstance(value, str):
            raise TemplateError(f"sample {sample_id!r}: turn {i} has no string 'value'")
        expected = "user" if i % 2 == 0 else "assistant"
        if role != expected:
            raise TemplateError(
                f"sample {sample_id!r}: turn {i} is {raw_role!r} but turns must alternate human/gpt starting with human"
            )
        turns.append((role, value.strip()))
    if turns[-1][0] != final_role:
        what = "a gpt turn (use encode_prompt for a generation prompt)" if final_role == "assistant" else "a human turn"
        raise TemplateError(f"sample {sample_id!r}: the conversation must end with {what}")
    return turns


def _place_image(
    turns: list[tuple[str, str]], placeholder: str | None, sample_id: str, specials: list[str]
) -> tuple[list[tuple[str, str]], bool]:
    """Move ``<image>`` to the front of the first human turn as ``"<image>\\n" + rest`` (LLaVA preprocess_multimodal).

    Also rejects special-token strings inside the text: they would tokenize as control tokens (an ``</s>`` in an
    answer would end the turn early), which is exactly what broke LLaVA's masks.
    """
    count = sum(content.count(IMAGE_TOKEN) for _, content in turns)
    if count > 1:
        raise TemplateError(f"sample {sample_id!r}: {count} {IMAGE_TOKEN} placeholders; at most one is supported")
    if count and placeholder is None:
        raise TemplateError(f"sample {sample_id!r}: the text contains {IMAGE_TOKEN} but image_token_id is None")
    for i, (role, content) in enumerate(turns):
        if role == "assistant" and IMAGE_TOKEN in content:
            raise TemplateError(f"sample {sample_id!r}: {IMAGE_TOKEN} in gpt turn {i}; it must be in a human turn")
    cleaned = [(role, content.replace(IMAGE_TOKEN, "").strip()) for role, content in turns]
    for i, (_, content) in enumerate(cleaned):
        for special in specials:
            if special in content:
                raise TemplateError(
                    f"sample {sample_id!r}: turn {i} contains the special token {special!r} as text; it would be "
                    "tokenized as a control token and corrupt the turn structure"
                )
    if not count:
        return turns, False
    role, content = cleaned[0]
    cleaned[0] = (role, f"{placeholder}\n{content}")
    return cleaned, True


# ----------------------------------------------------------------------------------------------------------------
# Tokenization with verified label masks
# ----------------------------------------------------------------------------------------------------------------


def _merge_segments(segments: list[Segment]) -> list[Segment]:
    """Join neighbours with the same supervision flag, so that boundaries are only prompt/answer switches."""
    merged: list[Segment] = []
    for seg in segments:
        if not seg.text:
            continue
        if merged and merged[-1].supervised == seg.supervised:
            merged[-1] = Segment(merged[-1].text + seg.text, seg.supervised)
        else:
            merged.append(seg)
    return merged


def _tokens(tokenizer: Any, ids: Sequence[int]) -> list[str]:
    return [str(t) for t in tokenizer.convert_ids_to_tokens(list(ids))]


def _mismatch(tokenizer: Any, name: str, sample_id: str, full: str, boundary: int, part: list[int],
              whole: list[int]) -> TemplateError:
    """A readable error for a token that straddles a prompt/answer boundary."""
    at = next((i for i, (a, b) in enumerate(zip(part, whole)) if a != b), min(len(part), len(whole)))
    lo = max(0, at - 3)
    return TemplateError(
        f"sample {sample_id!r}: tokenization mismatch with template {name!r} at the prompt/answer boundary "
        f"{full[max(0, boundary - 25):boundary]!r} | {full[boundary:boundary + 25]!r}: the text up to the boundary "
        f"tokenizes to ...{_tokens(tokenizer, part[lo:at + 3])} but the full text to "
        f"...{_tokens(tokenizer, whole[lo:at + 3])} (token {at}); a token spans the boundary, so no exact label "
        "mask exists. Check that the template matches the tokenizer."
    )


def _tokenize(rendered: Rendered, tokenizer: Any, name: str, sample_id: str) -> tuple[list[int], list[int]]:
    """Tokenize the full text once and find every prompt/answer boundary by tokenizing the prefix before it."""
    segments = _merge_segments(rendered.segments)
    full = "".join(s.text for s in segments)
    bounds: list[int] = []
    offset = 0
    for seg in segments[:-1]:
        offset += len(seg.text)
        bounds.append(offset)
    # One batched call: the prefixes and the full text (fast tokenizers encode a batch in parallel).
    encoded = tokenizer([full[:b] for b in bounds] + [full], add_special_tokens=False)["input_ids"]
    whole = list(encoded[-1])
    token_bounds = [0]
    for b, part in zip(bounds, encoded[:-1]):
        part = list(part)
        if whole[: len(part)] != part or len(part) < token_bounds[-1]:
            raise _mismatch(tokenizer, name, sample_id, full, b, part, whole)
        token_bounds.append(len(part))
    token_bounds.append(len(whole))
    labels = [IGNORE_INDEX] * len(whole)
    for seg, start, stop in zip(segments, token_bounds, token_bounds[1:]):
        if seg.supervised:
            labels[start:stop] = whole[start:stop]
    prefix = list(rendered.prefix_ids)
    return prefix + whole, [IGNORE_INDEX] * len(prefix) + labels


def _expand_image(ids: list[int], labels: list[int] | None, image_token_id: int | None, has_image: bool,
                  num_image_tokens: int, sample_id: str) -> tuple[list[int], list[int] | None, int | None]:
    """Repeat the single image token ``num_image_tokens`` times; returns the ids, labels and image start."""
    if image_token_id is None:
        return ids, labels, None
    where = [i for i, t in enumerate(ids) if t == image_token_id]
    if len(where) != (1 if has_image else 0):
        raise TemplateError(
            f"sample {sample_id!r}: expected {int(has_image)} image token(s) after tokenization, found {len(where)}"
        )
    if not has_image:
        return ids, labels, None
    if num_image_tokens < 1:
        raise TemplateError(f"sample {sample_id!r}: num_image_tokens must be >= 1, got {num_image_tokens}")
    at = where[0]
    ids = ids[:at] + [image_token_id] * num_image_tokens + ids[at + 1 :]
    if labels is not None:
        labels = labels[:at] + [IGNORE_INDEX] * num_image_tokens + labels[at + 1 :]
    return ids, labels, at


def _prepare(conversations: list[dict], tokenizer: Any, template: str, image_token_id: int | None,
             system_prompt: str | None, sample_id: str, generation: bool) -> tuple[ChatTemplate, Rendered, bool]:
    tmpl = get_template(template)
    turns = _normalise_turns(conversations, sample_id, final_role="user" if generation else "assistant")
    placeholder = None if image_token_id is None else _image_placeholder(tokenizer, image_token_id, sample_id)
    specials = [s for s in _structural_specials(tokenizer) if s != placeholder]
    turns, has_image = _place_image(turns, placeholder, sample_id, specials)
    ctx = _Ctx(tokenizer, sample_id, placeholder if has_image else None, system_prompt, generation)
    return tmpl, tmpl.render(turns, ctx), has_image


def encode_conversation(
    conversations: list[dict],
    tokenizer: Any,
    template: str,
    *,
    image_token_id: int | None,
    num_image_tokens: int,
    system_prompt: str | None = None,
    max_length: int | None = None,
    sample_id: str = "?",
) -> dict[str, list[int]]:
    """Encode a training conversation into ``{"input_ids", "labels"}`` (labels ``IGNORE_INDEX`` on the prompt).

    ``image_token_id`` is the id of the (single, special) image token; the ``<image>`` placeholder is moved to the
    front of the first human turn and expanded to ``num_image_tokens`` copies, all masked.  ``image_token_id=None``
    or no ``<image>`` in the text gives a text-only sample.  ``max_length`` truncates, but a cut into the image
    tokens or a result without any supervised token raises ``TemplateError``.
    """
    tmpl, rendered, has_image = _prepare(
        conversations, tokenizer, template, image_token_id, system_prompt, sample_id, generation=False
    )
    ids, labels = _tokenize(rendered, tokenizer, tmpl.name, sample_id)
    ids, labels, image_at = _expand_image(ids, labels, image_token_id, has_image, num_image_tokens, sample_id)
    assert labels is not None
    truncated = max_length is not None and len(ids) > max_length
    if truncated:
        assert max_length is not None
        if image_at is not None and image_at + num_image_tokens > max_length:
            raise TemplateError(
                f"sample {sample_id!r}: max_length={max_length} would cut into the image tokens "
                f"(positions {image_at}..{image_at + num_image_tokens - 1}; the sequence has {len(ids)} tokens)"
            )
        ids, labels = ids[:max_length], labels[:max_length]
    if all(label == IGNORE_INDEX for label in labels):
        why = f" after truncation to max_length={max_length}" if truncated else ""
        raise TemplateError(f"sample {sample_id!r}: no supervised token{why}")
    return {"input_ids": ids, "labels": labels}


def encode_prompt(
    conversations: list[dict],
    tokenizer: Any,
    template: str,
    *,
    image_token_id: int | None,
    num_image_tokens: int,
    system_prompt: str | None = None,
    sample_id: str = "?",
) -> list[int]:
    """Encode a generation prompt: turns ending with a human turn, then the assistant prefix.

    The ids end with ``"ASSISTANT:"`` (vicuna_v1), ``"<|im_start|>assistant\\n"`` (ChatML) or right after the
    image (plain), exactly as the same turns are tokenized in training.
    """
    _, rendered, has_image = _prepare(
        conversations, tokenizer, template, image_token_id, system_prompt, sample_id, generation=True
    )
    text = rendered.text
    ids = list(rendered.prefix_ids) + (list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else [])
    ids, _, _ = _expand_image(ids, None, image_token_id, has_image, num_image_tokens, sample_id)
    return ids


# ----------------------------------------------------------------------------------------------------------------
# Images
# ----------------------------------------------------------------------------------------------------------------


def to_rgb(image: Image.Image, background: tuple[int, int, int] = (0, 0, 0)) -> Image.Image:
    """Convert any PIL mode to RGB; transparent pixels are composited onto ``background``.

    (LLaVA calls ``convert("RGB")``, which keeps whatever colour transparent pixels happen to store; for opaque
    images the two are identical.)
    """
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        # 16-bit / float greyscale: scale to 8 bits by the range instead of clipping.
        arr = np.asarray(image, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
        image = Image.fromarray(arr.round().astype(np.uint8), mode="L")
    return image.convert("RGB") if image.mode != "RGB" else image


def pad_to_square(image: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """LLaVA ``expand2square``: paste the image centred on a square canvas of ``background`` colour."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new("RGB", (side, side), background)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


def resize_center_crop(image: Image.Image, size: int) -> Image.Image:
    """CLIPImageProcessor: resize the shortest side to ``size`` (bicubic), then centre-crop ``size``×``size``."""
    width, height = image.size
    short, long = (width, height) if width <= height else (height, width)
    new_long = max(size, int(size * long / short))  # int() truncation as in transformers' resize helper
    new_size = (size, new_long) if width <= height else (new_long, size)
    if new_size != image.size:
        image = image.resize(new_size, resample=Image.Resampling.BICUBIC)
    width, height = image.size
    left, top = (width - size) // 2, (height - size) // 2
    return image.crop((left, top, left + size, top + size))


class ImageTransform:
    """PIL image -> normalised ``FloatTensor [3, S, S]``.

    ``aspect="pad"``: pad to a square with the mean colour (``round(mean*255)``), image centred, then resize
    (LLaVA-1.5 stage 2 and eval).  ``aspect="square"``: resize the shortest side and centre-crop (CLIP default).
    """

    ASPECTS = ("pad", "square")

    def __init__(self, image_size: int, mean: Sequence[float], std: Sequence[float], aspect: str = "pad") -> None:
        if aspect not in self.ASPECTS:
            raise ValueError(f"unknown aspect {aspect!r}; known: {', '.join(self.ASPECTS)}")
        if len(mean) != 3 or len(std) != 3:
            raise ValueError(f"mean and std need 3 values (RGB), got {list(mean)} and {list(std)}")
        if image_size < 1 or any(s <= 0 for s in std):
            raise ValueError(f"image_size must be >= 1 and std > 0, got {image_size} and {list(std)}")
        self.image_size = int(image_size)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.aspect = aspect
        # round(), as methods.md §0.3 specifies; LLaVA's code truncates (int(x*255)), which differs by 1/255 in
        # some channels (CLIP mean: (123, 117, 104) here vs (122, 116, 104) there).
        red, green, blue = (int(round(m * 255)) for m in self.mean)
        self.background: tuple[int, int, int] = (red, green, blue)
        self._mean = torch.tensor(self.mean, dtype=torch.float32).view(3, 1, 1)
        self._std = torch.tensor(self.std, dtype=torch.float32).view(3, 1, 1)

    def __call__(self, image: Image.Image | str | Path) -> torch.Tensor:
        if isinstance(image, (str, Path)):
            with Image.open(image) as opened:
                opened.load()
                image = opened.copy()
        image = to_rgb(image, self.background)
        if self.aspect == "pad":
            image = pad_to_square(image, self.background)
        image = resize_center_crop(image, self.image_size)
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32).copy()).permute(2, 0, 1) / 255.0
        return (pixels - self._mean) / self._std

    def __repr__(self) -> str:
        return (f"ImageTransform(image_size={self.image_size}, mean={self.mean}, std={self.std}, "
                f"aspect={self.aspect!r})")


def load_image(path: str | Path) -> Image.Image:
    """An image file as RGB; an unreadable file raises ``ValueError`` naming it."""
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: cannot read image: {exc}") from None


def tower_transform(spec: Any) -> ImageTransform:
    """The image transform of one named tower (a :class:`vlweave.vision.towers.TowerSpec`): its own size,
    normalisation and aspect handling."""
    return ImageTransform(spec.facts.image_size, spec.image_mean, spec.image_std, aspect=spec.aspect)


def image_transforms(config: Any, towers: Sequence[str] | None = None) -> dict[str, ImageTransform]:
    """Transforms of a ``VlweaveConfig``'s towers by name (all, or ``towers``), from the config alone."""
    specs = config.tower_specs()
    return {name: tower_transform(spec) for name, spec in specs.items() if towers is None or name in towers}


def make_transform(model: Any) -> ImageTransform:
    """The base tower's image transform of a built model."""
    return tower_transform(model.tower_specs["base"])


def tower_pixels(model: Any, images: Sequence[Any],
                 transforms: dict[str, ImageTransform] | None = None) -> dict[str, torch.Tensor]:
    """``pixel_values`` keyed by tower for the towers the model's connector needs: each tower sees the images
    through its own transform (size, normalisation, aspect).  ``images``: paths or PIL images."""
    if transforms is None:
        transforms = {n: tower_transform(model.tower_specs[n]) for n in model.needed_towers()}
    return pixels_by_tower(transforms, images)


def pixels_by_tower(transforms: dict[str, ImageTransform], images: Sequence[Any]) -> dict[str, torch.Tensor]:
    """``{tower: FloatTensor [N, 3, S, S]}``: each image (a path or a PIL image, opened once) through every
    tower's transform."""
    opened = [load_image(p) if isinstance(p, (str, Path)) else p for p in images]
    return {name: torch.stack([t(im) for im in opened]) for name, t in transforms.items()}


__all__ = [
    "IGNORE_INDEX",
    "IMAGE_TOKEN",
    "TEMPLATES",
    "TEMPLATE_ALIASES",
    "VICUNA_SYSTEM",
    "ChatTemplate",
    "ImageTransform",
    "Segment",
    "TemplateError",
    "add_image_token",
    "encode_conversation",
    "encode_prompt",
    "get_template",
    "image_transforms",
    "load_image",
    "make_transform",
    "pixels_by_tower",
    "tower_pixels",
    "tower_transform",
    "pad_to_square",
    "resize_center_crop",
    "to_rgb",
]
