"""Registry of benchmark scorers with the prompt convention and answer parser of each (methods.md §0.8, §6).

Prompts and parsers explain most cross-harness differences, so every result should say which were used:
:func:`score_benchmark` returns the metrics together with ``benchmark``, ``split``, ``prompt_suffix`` and
``parser``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from vlweave.eval.benchmarks._common import MULTIPLE_CHOICE_SUFFIX, SHORT_ANSWER_SUFFIX
from vlweave.eval.benchmarks.mmbench import MMBENCH_PARSERS, score_mmbench
from vlweave.eval.benchmarks.mme import MME_PARSERS, score_mme
from vlweave.eval.benchmarks.pope import POPE_PARSERS, POPE_SPLITS, score_pope
from vlweave.eval.benchmarks.scienceqa import SQA_PARSERS, score_scienceqa
from vlweave.eval.benchmarks.vqa_accuracy import GQA_PARSERS, VQA_PARSERS, score_gqa, score_textvqa, score_vqav2


@dataclass(frozen=True)
class BenchmarkSpec:
    """A benchmark's scorer, prompt suffix (appended to the question) and parsers (first = LLaVA-1.5's)."""

    name: str
    scorer: Callable[..., dict[str, Any]]
    prompt_suffix: str
    parsers: tuple[str, ...]
    headline: str  # key of the number papers report
    splits: tuple[str, ...] = ()
    note: str = ""

    @property
    def parser(self) -> str:
        """The default parser: the one LLaVA-1.5's numbers were computed with."""
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


SCORERS: dict[str, BenchmarkSpec] = {
    spec.name: spec for spec in (
        BenchmarkSpec("mme", score_mme, SHORT_ANSWER_SUFFIX, MME_PARSERS, "perception",
                      note="LLaVA-1.5 replaces MME's ' Please answer yes or no.' with the suffix; "
                           "MoVA's file appends 'Answer yes or no, and check carefully ...' as well"),
        BenchmarkSpec("pope", score_pope, SHORT_ANSWER_SUFFIX, POPE_PARSERS, "mean_f1", POPE_SPLITS,
                      note="LLaVA-1.5 reports the mean F1 over the three splits"),
        BenchmarkSpec("scienceqa_img", score_scienceqa, MULTIPLE_CHOICE_SUFFIX, SQA_PARSERS, "img_accuracy",
                      ("test",), note="llava_test_CQM-A.json with --single-pred-prompt"),
        BenchmarkSpec("mmbench", score_mmbench, MULTIPLE_CHOICE_SUFFIX, MMBENCH_PARSERS, "accuracy", ("dev", "test"),
                      note="CircularEval; rule-based choice extraction without GPT judge"),
        BenchmarkSpec("vqav2", score_vqav2, SHORT_ANSWER_SUFFIX, VQA_PARSERS, "accuracy", ("test-dev", "val"),
                      note="LLaVA-1.5 numbers are test-dev, scored by the EvalAI server"),
        BenchmarkSpec("textvqa", score_textvqa, SHORT_ANSWER_SUFFIX, ("evalai", "official"), "accuracy", ("val",),
                      note="LLaVA-1.5 prompts carry 'Reference OCR token: ...' lines"),
        BenchmarkSpec("gqa", score_gqa, SHORT_ANSWER_SUFFIX, GQA_PARSERS, "accuracy", ("testdev_balanced",)),
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
