"""Registry of benchmark scorers with the prompt convention and answer parser of each (methods.md §0.8, §6).

Prompts and parsers explain most cross-harness differences, so every result should say which were used:
:func:`score_benchmark` returns the metrics together with ``benchmark``, ``split``, ``prompt_suffix`` and
``parser``, and :func:`parse_benchmark` gives the per-item parse the scorer used (saved next to each prediction).

Each benchmark's default parser (the first of ``parsers``) is the rule its headline numbers were computed with;
the others are other harnesses' rules, selectable by name.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from vlweave.eval.benchmarks._common import MULTIPLE_CHOICE_SUFFIX, SHORT_ANSWER_SUFFIX
from vlweave.eval.benchmarks.mmbench import MMBENCH_PARSERS, parse_mmbench_item, score_mmbench
from vlweave.eval.benchmarks.mme import MME_PARSERS, parse_mme_item, score_mme
from vlweave.eval.benchmarks.pope import POPE_PARSERS, POPE_SPLITS, parse_pope_item, score_pope
from vlweave.eval.benchmarks.scienceqa import SQA_PARSERS, parse_sqa_item, score_scienceqa
from vlweave.eval.benchmarks.vqa_accuracy import (
    GQA_PARSERS, VQA_PARSERS, parse_gqa_item, parse_textvqa_item, parse_vqav2_item, score_gqa, score_textvqa,
    score_vqav2,
)

# (prediction or None, ground-truth record or None, parser) -> the item's parse, as the scorer reads it.
ItemParser = Callable[[Any, Any, str], Any]


@dataclass(frozen=True)
class BenchmarkSpec:
    """A benchmark's scorer, per-item parser, prompt suffix (appended to the question) and parser names (first =
    the default: the rule the benchmark's headline numbers were computed with)."""

    name: str
    scorer: Callable[..., dict[str, Any]]
    parse_item: ItemParser
    prompt_suffix: str
    parsers: tuple[str, ...]
    headline: str  # key of the number papers report
    splits: tuple[str, ...] = ()
    note: str = ""

    @property
    def parser(self) -> str:
        """The default parser: the rule the benchmark's headline numbers were computed with."""
        return self.parsers[0]

    def describe(self, *, split: str | None = None, parser: str | None = None) -> dict[str, Any]:
        """The fields every result records: benchmark, split, prompt suffix, parser."""
        parser = parser or self.parser
        if parser not in self.parsers:
            raise ValueError(f"unknown parser {parser!r} for {self.name}; expected one of {self.parsers}")
        return {"benchmark": self.name, "split": split, "prompt_suffix": self.prompt_suffix, "parser": parser}

    def score(self, predictions: Sequence[str] | Mapping[Any, str], records: Sequence[Any], *,
              parser: str | None = None, **kwargs: Any) -> dict[str, Any]:
        """The scorer's metrics (validates ``parser`` first)."""
        parser = self.describe(parser=parser)["parser"]
        return self.scorer(predictions, records, parser=parser, **kwargs)

    def parse(self, predictions: Sequence[str | None], records: Sequence[Any] | None = None, *,
              parser: str | None = None) -> list[Any]:
        """The per-item parse of ``predictions`` (aligned with ``records``; ``records`` may be ``None`` or hold
        ``None`` where a split has no ground truth -- only MMBench needs a record, for its options)."""
        parser = self.describe(parser=parser)["parser"]
        preds = list(predictions)
        rows = [None] * len(preds) if records is None else list(records)
        if len(rows) != len(preds):
            raise ValueError(f"{len(preds)} predictions for {len(rows)} records")
        return [self.parse_item(p, r, parser) for p, r in zip(preds, rows)]


SCORERS: dict[str, BenchmarkSpec] = {
    spec.name: spec for spec in (
        BenchmarkSpec("mme", score_mme, parse_mme_item, SHORT_ANSWER_SUFFIX, MME_PARSERS, "perception",
                      note="LLaVA-1.5 replaces MME's ' Please answer yes or no.' with the suffix; "
                           "MoVA's file appends 'Answer yes or no, and check carefully ...' as well"),
        BenchmarkSpec("pope", score_pope, parse_pope_item, SHORT_ANSWER_SUFFIX, POPE_PARSERS, "mean_f1",
                      POPE_SPLITS,
                      note="LLaVA-1.5 reports the mean F1 over the three splits"),
        BenchmarkSpec("scienceqa_img", score_scienceqa, parse_sqa_item, MULTIPLE_CHOICE_SUFFIX, SQA_PARSERS,
                      "img_accuracy", ("test",), note="llava_test_CQM-A.json with --single-pred-prompt"),
        BenchmarkSpec("mmbench", score_mmbench, parse_mmbench_item, MULTIPLE_CHOICE_SUFFIX, MMBENCH_PARSERS,
                      "accuracy", ("dev", "test"),
                      note="CircularEval; rule-based choice extraction (VLMEvalKit can_infer) without GPT judge"),
        BenchmarkSpec("vqav2", score_vqav2, parse_vqav2_item, SHORT_ANSWER_SUFFIX, VQA_PARSERS, "accuracy",
                      ("test-dev", "val"), note="LLaVA-1.5 numbers are test-dev, scored by the EvalAI server"),
        BenchmarkSpec("textvqa", score_textvqa, parse_textvqa_item, SHORT_ANSWER_SUFFIX, ("evalai", "official"),
                      "accuracy", ("val",), note="LLaVA-1.5 prompts carry 'Reference OCR token: ...' lines"),
        BenchmarkSpec("gqa", score_gqa, parse_gqa_item, SHORT_ANSWER_SUFFIX, GQA_PARSERS, "accuracy",
                      ("testdev_balanced",)),
    )
}


def get_benchmark(name: str) -> BenchmarkSpec:
    """The registry entry of ``name``; ValueError listing the known names otherwise."""
    if name not in SCORERS:
        raise ValueError(f"unknown benchmark {name!r}; expected one of {', '.join(SCORERS)}")
    return SCORERS[name]


def score_benchmark(name: str, predictions: Sequence[str] | Mapping[Any, str], records: Sequence[Any], *,
                    split: str | None = None, parser: str | None = None, **kwargs: Any) -> dict[str, Any]:
    """Score with the registered scorer; returns ``describe(...)`` fields plus ``metrics`` and ``headline``."""
    spec = get_benchmark(name)
    result = spec.describe(split=split, parser=parser)
    metrics = spec.scorer(predictions, records, parser=result["parser"], **kwargs)
    result.update({"headline_metric": spec.headline, "headline": metrics[spec.headline], "metrics": metrics})
    return result


def parse_benchmark(name: str, predictions: Sequence[str | None], records: Sequence[Any] | None = None, *,
                    parser: str | None = None) -> list[Any]:
    """The per-item parse of ``predictions`` under the registered (or named) parser: what the scorer compares."""
    return get_benchmark(name).parse(predictions, records, parser=parser)
