"""Evaluate a model on the embedded multi-domain benchmark (asset ``synthetic``) with the exact scorers.

Three test files, each scored by the scorer of the benchmark it imitates: yes/no -> POPE (LLaVA parser; accuracy,
F1, yes-ratio), multiple choice with every circular rotation -> MMBench circular accuracy (rule-based choice
extraction), short answer -> VQAv2 10-answer accuracy (official normalisation).  Scores are per domain (scenes,
documents, charts) and format; every number is recorded with its scorer and parser, and every saved prediction
with its parse.
"""

from __future__ import annotations

import json
import random
from collections import defaultdict
from pathlib import Path
from typing import Any

from vlweave.data.questions import Question, read_questions
from vlweave.eval.benchmarks import registry
from vlweave.eval.vqa import generate_answers
from vlweave.language.routing import RoutingStats
from vlweave.vision.cache import FeatureCache

# format -> (file, benchmark whose scorer is used, headline metric path)
FORMATS = {
    "yesno": ("test_yesno.jsonl", "pope", ("pooled", "accuracy")),
    "mc": ("test_mc.jsonl", "mmbench", ("accuracy",)),
    "short": ("test_short.jsonl", "vqav2", ("accuracy",)),
}


def load_suite(folder: str | Path, limit_per_domain: int | None = None, seed: int = 0) -> dict[str, list[Question]]:
    """Questions per format; ``limit_per_domain`` keeps a seeded subset of questions (all rotations of a kept
    multiple-choice question stay together)."""
    folder = Path(folder)
    out = {}
    for fmt, (name, _, _) in FORMATS.items():
        qs = read_questions(folder / name, folder)
        if limit_per_domain is not None:
            key = ((lambda q: q.meta.get("circular_group", q.meta.get("index"))) if fmt == "mc"
                   else (lambda q: q.question_id))
            by_domain: dict[str, list] = defaultdict(list)
            for k in dict.fromkeys(key(q) for q in qs):
                by_domain[next(q.meta["domain"] for q in qs if key(q) == k)].append(k)
            keep = set()
            for domain, keys in sorted(by_domain.items()):
                keep |= set(random.Random(f"{seed}-{fmt}-{domain}").sample(keys, min(limit_per_domain, len(keys))))
            qs = [q for q in qs if key(q) in keep]
        out[fmt] = qs
    return out


def _get(metrics: dict[str, Any], path: tuple[str, ...]) -> float:
    for part in path:
        metrics = metrics[part]
    return float(metrics)  # type: ignore[arg-type]


def evaluate_suite(model, tokenizer, folder: str | Path, *, limit_per_domain: int | None = None,
                   batch_size: int = 32, max_new_tokens: int = 8, out_dir: str | Path | None = None,
                   progress: bool = True, routing: str | None = None, routing_seed: int = 0) -> dict[str, Any]:
    """Generate greedy answers for every test question and score per domain and format.  ``routing``: a routed
    (MoVA) model's routing mode (:func:`vlweave.eval.vqa.generate_answers`); each prediction line then carries its
    routing, and the report the routing counts per format."""
    suite = load_suite(folder, limit_per_domain)
    store = None
    if FeatureCache.usable(model):
        store = FeatureCache(model)
    scores: dict[str, dict[str, Any]] = defaultdict(dict)
    details: dict[str, Any] = {}
    routing_stats: dict[str, Any] = {}
    for fmt, questions in suite.items():
        _, bench, headline = FORMATS[fmt]
        # The test texts already end with the benchmark's prompt suffix.
        decisions: list | None = [] if routing is not None else None
        answers = generate_answers(model, tokenizer, questions, batch_size=batch_size, max_new_tokens=max_new_tokens,
                                   store=store, progress=progress, routing=routing, routing_seed=routing_seed,
                                   decisions=decisions)
        if decisions is not None:
            routing_stats[fmt] = RoutingStats.from_decisions(routing, decisions).to_json()
        if out_dir is not None:
            Path(out_dir).mkdir(parents=True, exist_ok=True)
            parsed = registry.parse_benchmark(bench, answers, [q.as_record() for q in questions])  # what the scorer compares, per item
            with open(Path(out_dir) / f"predictions_{fmt}.jsonl", "w") as fh:
                for k, (q, a, p) in enumerate(zip(questions, answers, parsed)):
                    row = {"question_id": q.question_id, "prediction": a, "parsed": p, "answer": q.answer}
                    if decisions is not None:
                        row["routing"] = None if decisions[k] is None else decisions[k].to_json()
                    fh.write(json.dumps(row) + "\n")
        for domain in sorted({q.meta["domain"] for q in questions}):
            idx = [i for i, q in enumerate(questions) if q.meta["domain"] == domain]
            result = registry.score_benchmark(bench, [answers[i] for i in idx], [questions[i].as_record() for i in idx])
            scores[domain][fmt] = _get(result["metrics"], headline)
            if fmt == "mc":  # per-copy (not circular) accuracy: shows a letter bias that circular scoring hides
                scores[domain]["mc_copy"] = float(result["metrics"]["copy_accuracy"])
            details[f"{domain}/{fmt}"] = {k: result[k] for k in ("benchmark", "prompt_suffix", "parser",
                                                                 "headline_metric")} | {"n": len(idx)}
    keys = dict.fromkeys(k for by_fmt in scores.values() for k in by_fmt)
    overall = {k: sum(scores[d][k] for d in scores) / len(scores) for k in keys}
    headline = [overall[fmt] for fmt in FORMATS]  # the mean counts each format once (mc = circular)
    report = {"scores": dict(scores), "overall": overall, "mean": sum(headline) / len(headline),
              "how": details}
    if routing is not None:
        report["routing"] = {"mode": routing, **({"seed": routing_seed} if routing == "random" else {}),
                             "by_format": routing_stats}
    if out_dir is not None:
        (Path(out_dir) / "suite_metrics.json").write_text(json.dumps(report, indent=2))
    return report
