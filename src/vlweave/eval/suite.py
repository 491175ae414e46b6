"""Evaluate a model on the embedded multi-domain benchmark (asset ``synthetic``) with the exact scorers.

Three test files, each scored by the scorer of the benchmark it imitates: yes/no -> POPE (LLaVA parser; accuracy,
F1, yes-ratio), multiple choice with every circular rotation -> MMBench circular accuracy (rule-based choice
extraction), short answer -> VQAv2 10-answer accuracy (official normalisation).  Scores are per domain (scenes,
documents, charts) and format; every number is recorded with its scorer and parser, and every saved prediction
with its parse.  Given the training question/answer pairs, two blind guessers (:func:`blind_answers`: the majority
answer of the instruction, the majority answer of the question's template) are scored the same way beside them.
"""

from __future__ import annotations

import json
import random
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vlweave.data.questions import Question, read_questions
from vlweave.eval.analysis import answer_masker
from vlweave.eval.benchmarks import registry
from vlweave.eval.vqa import generate_answers, normalize_answer
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


def _score_by_domain(fmt: str, questions: Sequence[Question], answers: Sequence[str]
                     ) -> dict[str, tuple[dict[str, float], dict[str, Any], int]]:
    """domain -> ({format: headline score, plus ``mc_copy`` for multiple choice}, the scorer's result, n)."""
    _, bench, headline = FORMATS[fmt]
    out = {}
    for domain in sorted({q.meta["domain"] for q in questions}):
        idx = [i for i, q in enumerate(questions) if q.meta["domain"] == domain]
        result = registry.score_benchmark(bench, [answers[i] for i in idx], [questions[i].as_record() for i in idx])
        by_key = {fmt: _get(result["metrics"], headline)}
        if fmt == "mc":  # per-copy (not circular) accuracy: shows a letter bias that circular scoring hides
            by_key["mc_copy"] = float(result["metrics"]["copy_accuracy"])
        out[domain] = (by_key, result, len(idx))
    return out


def _overall(scores: dict[str, dict[str, float]]) -> tuple[dict[str, float], float]:
    """(each format's mean over the domains, the headline mean: each format once, mc = circular)."""
    keys = dict.fromkeys(k for by_fmt in scores.values() for k in by_fmt)
    overall = {k: sum(scores[d][k] for d in scores) / len(scores) for k in keys}
    return overall, sum(overall[fmt] for fmt in FORMATS) / len(FORMATS)


def _instruction(text: str) -> str:
    """The prompt's last line, the answer-format instruction (what a blind guesser knows of the format)."""
    lines = text.strip().splitlines()
    return lines[-1].strip().lower() if lines else ""


BLIND = ("blind_majority", "blind_per_template")


def blind_answers(train: Sequence[Question], questions: Sequence[Question]) -> dict[str, list[str]]:
    """The answers of two guessers that never see the image, learned from ``train``'s question/answer pairs:
    ``blind_majority`` gives the most common training answer among questions with the same instruction line (the
    format: "single word or phrase", "option's letter"), ``blind_per_template`` the most common answer of the
    question's template (the question with the training answer vocabulary masked, :func:`answer_masker`: "what is
    the color of the {answer}?"), falling back to ``blind_majority`` for a template never seen in training.  An
    answer that repeats one of its question's masked words counts as that word's position, so "which is higher,
    the ram bar or the emu bar?" learns "the first (or second) label named", as a reader of the text alone would,
    rather than one label."""
    masker = answer_masker(train)
    by_instruction: dict[str, Counter] = defaultdict(Counter)
    by_template: dict[str, Counter] = defaultdict(Counter)
    spelling: dict[str, str] = {}  # normalised answer -> its first spelling in train (scorers parse "A", not "a")

    def as_learned(q: Question, answer: str) -> str | int:
        words = [normalize_answer(w) for w in masker.words_in(q.text)]
        return words.index(answer) if answer in words else answer  # an int: the k-th masked word of the question

    for q in train:
        key = normalize_answer(str(q.answer))
        spelling.setdefault(key, str(q.answer).strip())
        by_instruction[_instruction(q.text)][key] += 1
        by_template[masker(q.text)][as_learned(q, key)] += 1
    overall = Counter(normalize_answer(str(q.answer)) for q in train).most_common(1)[0][0] if train else ""

    def top(counter: Counter | None, default: str | int) -> str | int:
        return counter.most_common(1)[0][0] if counter else default

    def resolve(q: Question, guess: str | int) -> str:
        if isinstance(guess, int):
            words = masker.words_in(q.text, original_case=True)
            return words[guess] if guess < len(words) else ""
        return spelling.get(guess, guess)

    majority = [str(top(by_instruction.get(_instruction(q.text)), overall)) for q in questions]
    per_template = [resolve(q, top(by_template.get(masker(q.text)), m)) for q, m in zip(questions, majority)]
    return {"blind_majority": [spelling.get(a, a) for a in majority], "blind_per_template": per_template}


def suite_baselines(train: Sequence[Question], suite: dict[str, list[Question]]) -> dict[str, dict[str, float]]:
    """The blind baselines of :func:`blind_answers` on the benchmark's questions (``load_suite``), scored by the
    same scorers as a model: group (``domain/format``, ``all/format``, and ``accuracy`` for the headline mean) ->
    baseline -> score.  A model's group at or below its per-template baseline is answered from the wording alone."""
    scores: dict[str, dict[str, dict[str, float]]] = {name: defaultdict(dict) for name in BLIND}
    for fmt, questions in suite.items():
        guesses = blind_answers(train, questions)
        for name in BLIND:
            for domain, (by_key, _, _) in _score_by_domain(fmt, questions, guesses[name]).items():
                scores[name][domain].update(by_key)
    out: dict[str, dict[str, float]] = defaultdict(dict)
    for name, by_domain in scores.items():
        overall, mean = _overall(by_domain)
        for domain, by_key in by_domain.items():
            for key, value in by_key.items():
                out[f"{domain}/{key}"][name] = value
        for key, value in overall.items():
            out[f"all/{key}"][name] = value
        out["accuracy"][name] = mean
    return dict(out)


def evaluate_suite(model, tokenizer, folder: str | Path, *, limit_per_domain: int | None = None,
                   batch_size: int = 32, max_new_tokens: int = 8, out_dir: str | Path | None = None,
                   progress: bool = True, routing: str | None = None, routing_seed: int = 0,
                   train: Sequence[Question] | None = None) -> dict[str, Any]:
    """Generate greedy answers for every test question and score per domain and format.  ``routing``: a routed
    (MoVA) model's routing mode (:func:`vlweave.eval.vqa.generate_answers`); each prediction line then carries its
    routing, and the report the routing counts per format.  ``train``: the training question/answer pairs; the
    report then has ``baselines``, the blind baselines of :func:`suite_baselines` on the same questions."""
    suite = load_suite(folder, limit_per_domain)
    store = None
    if FeatureCache.usable(model):
        store = FeatureCache(model)
    scores: dict[str, dict[str, Any]] = defaultdict(dict)
    details: dict[str, Any] = {}
    routing_stats: dict[str, Any] = {}
    for fmt, questions in suite.items():
        bench = FORMATS[fmt][1]
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
        for domain, (by_key, result, n) in _score_by_domain(fmt, questions, answers).items():
            scores[domain].update(by_key)
            details[f"{domain}/{fmt}"] = {k: result[k] for k in ("benchmark", "prompt_suffix", "parser",
                                                                 "headline_metric")} | {"n": n}
    overall, mean = _overall(scores)
    report = {"scores": dict(scores), "overall": overall, "mean": mean, "how": details}
    if train is not None:
        report["baselines"] = suite_baselines(train, suite)
    if routing is not None:
        report["routing"] = {"mode": routing, **({"seed": routing_seed} if routing == "random" else {}),
                             "by_format": routing_stats}
    if out_dir is not None:
        (Path(out_dir) / "suite_metrics.json").write_text(json.dumps(report, indent=2))
    return report
