"""Exact benchmark scorers (MME, POPE, ScienceQA-IMG, MMBench, VQAv2, TextVQA, GQA) and readers of their released
question files, as the reference harnesses implement them (methods.md §0.8 and §6).

Scorers are pure Python (no torch): ``score_<benchmark>(predictions, records, *, parser=...) -> dict``.
``SCORERS`` maps each benchmark name to its scorer, per-item parser, prompt suffix and parser names (the first is
the default: the rule the benchmark's headline numbers were computed with); :func:`parse_benchmark` gives the
per-item parse a scorer compares.
"""

from vlweave.eval.benchmarks._common import (
    MULTIPLE_CHOICE_SUFFIX, SHORT_ANSWER_SUFFIX, align_predictions, apply_prompt_suffix,
)
from vlweave.eval.benchmarks.mmbench import (
    MMBENCH_PARSERS, build_multiple_choice_prompt, circular_group, circular_rotations, expand_circular,
    extract_mmbench_choice, score_mmbench,
)
from vlweave.eval.benchmarks.mme import (
    COGNITION_SUBTASKS, MME_PARSERS, MME_SUBTASKS, PERCEPTION_SUBTASKS, canonical_mme_subtask, llava_mme_prompt,
    parse_mme_answer, score_mme,
)
from vlweave.eval.benchmarks.pope import POPE_PARSERS, POPE_SPLITS, parse_pope_answer, pope_metrics, score_pope
from vlweave.eval.benchmarks.registry import SCORERS, BenchmarkSpec, get_benchmark, parse_benchmark, score_benchmark
from vlweave.eval.benchmarks.scienceqa import SQA_PARSERS, extract_sqa_letter, score_scienceqa
from vlweave.eval.benchmarks.vqa_accuracy import (
    normalize_gqa_answer, normalize_vqa_answer, score_gqa, score_textvqa, score_vqav2, vqa_process_digit_article,
    vqa_process_punctuation, vqa_soft_accuracy,
)

__all__ = [
    "MULTIPLE_CHOICE_SUFFIX", "SHORT_ANSWER_SUFFIX", "align_predictions", "apply_prompt_suffix",
    "MMBENCH_PARSERS", "build_multiple_choice_prompt", "circular_group", "circular_rotations", "expand_circular",
    "extract_mmbench_choice", "score_mmbench",
    "COGNITION_SUBTASKS", "MME_PARSERS", "MME_SUBTASKS", "PERCEPTION_SUBTASKS", "canonical_mme_subtask",
    "llava_mme_prompt",
    "parse_mme_answer", "score_mme",
    "POPE_PARSERS", "POPE_SPLITS", "parse_pope_answer", "pope_metrics", "score_pope",
    "SCORERS", "BenchmarkSpec", "get_benchmark", "parse_benchmark", "score_benchmark",
    "SQA_PARSERS", "extract_sqa_letter", "score_scienceqa",
    "normalize_gqa_answer", "normalize_vqa_answer", "score_gqa", "score_textvqa", "score_vqav2",
    "vqa_process_digit_article", "vqa_process_punctuation", "vqa_soft_accuracy",
]
