"""MoVA's coarse stage: context-aware expert routing by the LM itself (methods.md §2a "Context-aware expert
routing", §2e, §2f 7-8).

The same fine-tuned LM that answers also routes: it reads a *routing prompt* (an instruction, the model pool -- one
``"<Letter>. <description>"`` line per expert, from the connector's options -- and the user question) with the
image as the connector's pooled routing-pass tokens (``context.routing_pass=True``: every routing bit 0,
``num_routing_tokens`` tokens), answers expert letters greedily (at most 16 tokens), and the answer is parsed into
per-image routing bits.  The answer pass then runs only the chosen experts (``Connector.tower_rows``), reusing the
base tower's features computed for the routing pass.

What a connector must offer to be routed: ``connector.options`` with ``experts`` (tower names, routing-bit order),
``letters`` (explicit letter -> expert map, same order), ``descriptions`` (one pool sentence per expert) and
``num_routing_tokens`` (optionally ``routing_instruction``, another wording of the instruction); the MoV-Adapter
(``connectors/mova.py``) does.

Parsing (:func:`parse_routing_answer`), our reading of the released rule made safe:

* only the text before the third comma counts (the released rule; it is what makes K dynamic, 0..3);
* a letter counts only as a *whole token* (``"A, D"``, ``"The answer is B"``), never inside a word: the released
  code tests substrings, so a capitalised word such as ``"Because"`` switched expert B on (§2f 7);
* at most ``max_experts`` (3, "select the most 3 suitable models") letters are kept, in order of appearance;
* ``none`` (any case, as a word) with no known letter means no expert; anything else without a known letter --
  empty, lower-case letters, letters outside the map -- is *unparseable*: no expert, flagged, counted in the
  metrics, never an exception.

Fixed routing for ablations (:func:`fixed_routing`): ``all``, ``none``, ``random`` (seeded per question: a
uniformly drawn K in 0..min(3, E), then K distinct experts -- the paper's "random routing" arm, with the same K
range as the LM's dynamic routing) or an explicit list of letters or expert names (``A,C``).
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

# Our wording of the released routing instruction's structure (methods.md §2a step 1); not the released text.
ROUTING_INSTRUCTION = (
    "You are a router that picks vision experts for a question about an image. From the model pool below, choose "
    "at most three models that would help answer the question. Answer with the models' letters from the pool "
    "directly, separated by commas. If no model is needed, answer 'none'."
)
MAX_ROUTING_TOKENS = 16  # generated tokens of the routing answer (§2a step 3)
MAX_EXPERTS = 3  # "select the most 3 suitable models"
ROUTING_MODES = ("model", "all", "none", "random")  # plus an explicit letter/expert list


class RoutingError(ValueError):
    """A routing option or record that cannot be used; the message names it and what is allowed."""


@dataclass(frozen=True)
class RoutingPool:
    """The experts a connector routes between, as the routing prompt shows them."""

    experts: tuple[str, ...]
    letters: tuple[str, ...]
    descriptions: tuple[str, ...]
    num_routing_tokens: int
    instruction: str = ROUTING_INSTRUCTION
    max_experts: int = MAX_EXPERTS

    def __post_init__(self) -> None:
        n = len(self.experts)
        if not n or len(self.letters) != n or len(self.descriptions) != n:
            raise RoutingError(f"routing pool: {n} experts, {len(self.letters)} letters and {len(self.descriptions)} "
                               "descriptions; give one letter and one description per expert")
        if len(set(self.letters)) != n or not all(re.fullmatch(r"[A-Z]+", x) for x in self.letters):
            raise RoutingError(f"routing pool: letters {list(self.letters)} must be distinct capital letters")
        if self.num_routing_tokens < 1:
            raise RoutingError(f"routing pool: num_routing_tokens must be >= 1, got {self.num_routing_tokens}")

    @classmethod
    def from_connector(cls, connector: Any) -> "RoutingPool":
        """The pool of a routed connector (its options' ``experts``, ``letters``, ``descriptions``,
        ``num_routing_tokens``); a clear error for a connector that does not route."""
        opts = getattr(connector, "options", None)
        inner = getattr(connector, "inner", None)  # a wrapping connector (hyper_mova) routes as its inner one
        if getattr(opts, "experts", None) is None and inner is not None and getattr(inner, "options", None):
            connector, opts = inner, inner.options
        missing = [k for k in ("experts", "descriptions", "num_routing_tokens") if getattr(opts, k, None) is None]
        if missing:
            raise RoutingError(f"connector {type(connector).__name__} does not route between experts (its options "
                               f"lack {missing}); routing needs a MoVA-style connector (type 'mova')")
        experts = tuple(opts.experts)
        letters = tuple(opts.letters) if getattr(opts, "letters", None) else tuple(chr(ord("A") + i) for i in range(len(experts)))
        return cls(experts=experts, letters=letters, descriptions=tuple(opts.descriptions),
                   num_routing_tokens=int(getattr(connector, "num_routing_tokens", opts.num_routing_tokens)),
                   instruction=getattr(opts, "routing_instruction", None) or ROUTING_INSTRUCTION)

    @property
    def num_experts(self) -> int:
        return len(self.experts)

    def prompt(self, question: str) -> str:
        """The routing prompt's text (the caller puts ``<image>\\n`` in front and the chat template around it)."""
        pool = "\n".join(f"{letter}. {desc}" for letter, desc in zip(self.letters, self.descriptions))
        return f"{self.instruction}\nModel pool:\n{pool}\n\nQuestion:\n{question}"

    def answer_for(self, bits: Sequence[int]) -> str:
        """The routing answer a training record teaches for these bits: ``"A, C"``, or ``"none"``."""
        chosen = [letter for letter, b in zip(self.letters, bits) if int(b)]
        return ", ".join(chosen) if chosen else "none"

    def bits_from(self, value: Any, where: str = "routing") -> list[int]:
        """0/1 bits (expert order) from a record's ``routing``: a list of 0/1 bits of the pool's length, or a list
        of expert names or letters.  A clear error naming ``where`` otherwise."""
        return routing_bits(value, self.experts, where, letters=self.letters)


def routing_bits(value: Any, experts: Sequence[str], where: str = "routing",
                 letters: Sequence[str] | None = None) -> list[int]:
    """Bits in ``experts`` order from 0/1 bits (length must match) or expert names/letters (must be known)."""
    n = len(experts)
    if not isinstance(value, (list, tuple)):
        raise RoutingError(f"{where}: 'routing' must be a list of {n} 0/1 bits or of expert names, got {value!r}")
    if not value:  # an empty list of names: no expert
        return [0] * n
    if all(isinstance(v, (bool, int)) and not isinstance(v, str) for v in value):
        if len(value) != n:
            raise RoutingError(f"{where}: 'routing' has {len(value)} bits; the model has {n} experts {list(experts)}")
        if any(int(v) not in (0, 1) for v in value):
            raise RoutingError(f"{where}: 'routing' bits must be 0 or 1, got {list(value)}")
        return [int(v) for v in value]
    if all(isinstance(v, str) for v in value):
        names = {e: i for i, e in enumerate(experts)} | {x: i for i, x in enumerate(letters or ())}
        unknown = [v for v in value if v not in names]
        if unknown:
            raise RoutingError(f"{where}: unknown expert(s) {unknown} in 'routing'; experts: {list(experts)}")
        bits = [0] * n
        for v in value:
            bits[names[v]] = 1
        return bits
    raise RoutingError(f"{where}: 'routing' must be a list of {n} 0/1 bits or of expert names, got {value!r}")


# ---- parsing ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RoutingDecision:
    """The routing of one image: bits in expert order, the chosen experts, how it was decided, and the LM's raw
    answer when the LM routed (``parsed`` False: an answer that named no known letter and was not ``none``)."""

    bits: tuple[int, ...]
    experts: tuple[str, ...]
    mode: str
    answer: str | None = None
    parsed: bool = True

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"mode": self.mode, "experts": list(self.experts), "bits": list(self.bits)}
        if self.answer is not None:
            out.update({"answer": self.answer, "parsed": self.parsed})
        return out


def parse_routing_answer(text: str, letters: Sequence[str], max_experts: int = MAX_EXPERTS
                         ) -> tuple[list[int], bool]:
    """``(bits in letter order, parsed)`` of a routing answer (see the module docstring for the rule)."""
    head = ",".join((text or "").split(",")[:3])  # the text before the third comma
    alternatives = "|".join(re.escape(x) for x in sorted(letters, key=len, reverse=True))
    found: list[str] = []
    for m in re.finditer(rf"(?<![A-Za-z0-9])({alternatives})(?![A-Za-z0-9])", head):
        if m.group(1) not in found:
            found.append(m.group(1))
    found = found[:max_experts]
    bits = [int(x in found) for x in letters]
    if found:
        return bits, True
    return bits, bool(re.search(r"(?<![A-Za-z])none(?![A-Za-z])", head, flags=re.IGNORECASE))


def decision_from_answer(pool: RoutingPool, answer: str) -> RoutingDecision:
    bits, parsed = parse_routing_answer(answer, pool.letters, pool.max_experts)
    return RoutingDecision(bits=tuple(bits), experts=tuple(e for e, b in zip(pool.experts, bits) if b),
                           mode="model", answer=answer, parsed=parsed)


# ---- fixed routing (ablations) ------------------------------------------------------------------------------------


def check_routing_mode(mode: str, pool: RoutingPool) -> None:
    """Refuse an unknown ``--routing`` value up front (naming the allowed values)."""
    if mode in ROUTING_MODES:
        return
    fixed_bits(mode, pool)


def routing_pool(model: Any, mode: str) -> RoutingPool:
    """The routing pool of ``model`` for a ``--routing`` mode: a clear error for a model that does not route or a
    mode it cannot take (what eval, chat, the server and the lmms-eval plugin check before any work)."""
    pool = RoutingPool.from_connector(model.connector)
    check_routing_mode(mode, pool)
    return pool


def fixed_bits(mode: str, pool: RoutingPool) -> list[int]:
    """Bits of an explicit list (``A,C`` or ``docs,scenes``) or of ``all``/``none``."""
    if mode == "all":
        return [1] * pool.num_experts
    if mode == "none":
        return [0] * pool.num_experts
    items = [x.strip() for x in mode.split(",") if x.strip()]
    try:
        return pool.bits_from(items, where=f"--routing {mode!r}")
    except RoutingError:
        raise RoutingError(f"--routing {mode!r}: expected one of {list(ROUTING_MODES)} or letters/experts separated "
                           f"by commas (letters {list(pool.letters)} = experts {list(pool.experts)})") from None


def fixed_routing(mode: str, pool: RoutingPool, key: str, seed: int = 0) -> RoutingDecision:
    """The decision of a fixed mode for one question (``key``: its id, so ``random`` does not depend on the batch
    order or size)."""
    if mode == "random":
        digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
        rng = random.Random(int.from_bytes(digest[:8], "little"))
        k = rng.randint(0, min(pool.max_experts, pool.num_experts))
        chosen = set(rng.sample(range(pool.num_experts), k))
        bits = [int(i in chosen) for i in range(pool.num_experts)]
    else:
        bits = fixed_bits(mode, pool)
    return RoutingDecision(bits=tuple(bits), experts=tuple(e for e, b in zip(pool.experts, bits) if b), mode=mode)


# ---- the routing pass -------------------------------------------------------------------------------------------


@dataclass
class RoutingStats:
    """Counts for the metrics: answers routed, unparseable answers, and how often each expert was chosen."""

    mode: str
    routed: int = 0
    unparseable: int = 0
    expert_use: dict[str, int] = field(default_factory=dict)

    @classmethod
    def from_decisions(cls, mode: str, decisions: Sequence["RoutingDecision | None"]) -> "RoutingStats":
        """The counts of one evaluation's decisions (None = a text-only question, not routed)."""
        stats = cls(mode=mode)
        for d in decisions:
            if d is not None:
                stats.add(d)
        return stats

    def add(self, decision: RoutingDecision) -> None:
        self.routed += 1
        self.unparseable += int(not decision.parsed)
        for e in decision.experts:
            self.expert_use[e] = self.expert_use.get(e, 0) + 1

    def to_json(self) -> dict[str, Any]:
        return {"mode": self.mode, "routed": self.routed, "unparseable": self.unparseable,
                "expert_use": dict(sorted(self.expert_use.items()))}


def routing_report(mode: str, seed: int, decisions: Sequence[RoutingDecision | None]) -> dict[str, Any]:
    """The metrics' ``routing`` entry of one evaluation: :class:`RoutingStats` plus the seed of ``random``."""
    return RoutingStats.from_decisions(mode, decisions).to_json() | ({"seed": seed} if mode == "random" else {})


def routing_prompt_ids(processor: Any, pool: RoutingPool, question: str, *, template: str | None = None,
                       system_prompt: str | None = None, sample_id: str = "?") -> list[int]:
    """Token ids of the routing prompt for one question: ``<image>`` expanded to ``num_routing_tokens``, then the
    routing prompt, in the checkpoint's chat template."""
    conv = [{"from": "human", "value": "<image>\n" + pool.prompt(question)}]
    return processor.encode_prompt(conv, has_image=True, template=template, system_prompt=system_prompt,
                                   num_image_tokens=pool.num_routing_tokens, sample_id=sample_id)


@torch.no_grad()
def route_batch(model: Any, processor: Any, pool: RoutingPool, questions: Sequence[str],
                base_features: list[torch.Tensor], *, template: str | None = None, system_prompt: str | None = None,
                stop_ids: Sequence[int] | None = None, max_new_tokens: int = MAX_ROUTING_TOKENS,
                sample_ids: Sequence[str] | None = None) -> list[RoutingDecision]:
    """One batched routing pass: question ``i`` with image ``i`` (its prepared base features, row ``i`` of
    ``base_features``) -> its decision.  Greedy, at most ``max_new_tokens`` tokens; the experts are not run (the
    connector gives them no rows in the routing pass)."""
    from vlweave.context import VlweaveContext

    if not questions:
        return []
    ids = sample_ids or [str(i) for i in range(len(questions))]
    prompts = [routing_prompt_ids(processor, pool, q, template=template, system_prompt=system_prompt,
                                  sample_id=str(sid)) for q, sid in zip(questions, ids)]
    batch = processor.collate([{"input_ids": p} for p in prompts], [True] * len(prompts), padding_side="left",
                              texts=[[q] for q in questions], pixel_values=False)
    context: VlweaveContext = batch["context"]
    context.routing_pass = True
    context.routing = [[0] * pool.num_experts for _ in questions]
    device = next(model.parameters()).device
    out = model.generate(batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                         vision_features={"base": [f.to(device) for f in base_features]}, context=context,
                         max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=list(stop_ids or []) or None,
                         pad_token_id=processor.pad_token_id)
    answers = [processor.tokenizer.decode(row, skip_special_tokens=True).strip() for row in out]
    return [decision_from_answer(pool, a) for a in answers]


def connector_routes(model: Any) -> bool:
    """Whether the model's connector can be routed (has a routing pool)."""
    try:
        RoutingPool.from_connector(model.connector)
    except RoutingError:
        return False
    return True


__all__ = [
    "MAX_EXPERTS", "MAX_ROUTING_TOKENS", "ROUTING_INSTRUCTION", "ROUTING_MODES", "RoutingDecision", "RoutingError",
    "RoutingPool", "RoutingStats", "check_routing_mode", "connector_routes", "decision_from_answer", "fixed_bits",
    "fixed_routing", "parse_routing_answer", "route_batch", "routing_bits", "routing_pool", "routing_prompt_ids", "routing_report",
]
