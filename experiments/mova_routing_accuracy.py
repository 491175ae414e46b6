#!/usr/bin/env python
"""Routing accuracy of the MoVA comparison's routed arm against loss-based routing labels (docs/mova.md).

1. ``labels``: the embedded benchmark's evaluated questions (the same seeded subset ``eval.limit`` keeps) as LLaVA
   records, ids = question ids, answered with their gold answers; then ``vlweave mova routing-data`` scores them
   with a trained MoVA model (base alone vs base + each expert) and writes the labels into ``routed.json``:

       python experiments/mova_routing_accuracy.py labels --limit 50 --output runs/mova-routing-test
       vlweave mova routing-data runs/mova-synthetic/final --data runs/mova-routing-test/questions.json \\
           --output runs/mova-routing-test

2. ``score``: each run folder's routing decisions (its ``predictions_*.jsonl``) against those labels, by domain,
   beside a rule baseline (documents and charts -> the docs expert, scenes -> the scenes expert):

       python experiments/mova_routing_accuracy.py score --labels runs/mova-routing-test/routed.json \\
           runs/mova-compare/mova-compare-routed-seed{0,1,2} --json docs/results/mova-routing-accuracy.json
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import sys
from pathlib import Path

from vlweave import assets
from vlweave.eval.routing_accuracy import prior_decisions, read_decisions, read_labels, routing_agreement
from vlweave.eval.suite import load_suite

EXPERTS = ["docs", "scenes"]  # mova-synthetic's experts, in letter order (A, B)
RULE = {"documents": ["docs"], "charts": ["docs"], "scenes": ["scenes"]}


def gold(answer) -> str:
    if isinstance(answer, list):  # VQAv2-style reference answers: the most common one
        return collections.Counter(answer).most_common(1)[0][0]
    return str(answer)


def benchmark_questions(limit: int | None):
    return [q for qs in load_suite(assets.pull("synthetic"), limit).values() for q in qs]


def cmd_labels(args) -> int:
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    records = [{"id": str(q.question_id), "image": str(q.image), "domain": q.meta["domain"],
                "conversations": [{"from": "human", "value": "<image>\n" + q.text},
                                  {"from": "gpt", "value": gold(q.answer)}]} for q in benchmark_questions(args.limit)]
    (out / "questions.json").write_text(json.dumps(records, indent=1))
    print(f"{len(records)} questions -> {out / 'questions.json'}")
    return 0


def cmd_score(args) -> int:
    labels = read_labels(args.labels)
    group_of = {str(q.question_id): q.meta["domain"] for q in benchmark_questions(args.limit)}
    rows = {"rule (domain -> expert)": routing_agreement(labels, prior_decisions(group_of, RULE, EXPERTS), EXPERTS,
                                                         group_of),
            "all experts": routing_agreement(labels, {q: [1, 1] for q in group_of}, EXPERTS, group_of)}
    per_run = {str(run): routing_agreement(labels, read_decisions(run), EXPERTS, group_of) for run in args.runs}
    groups = list(next(iter(per_run.values())).keys()) if per_run else ["all"]
    if per_run:  # mean +- std of the exact agreement over the runs (seeds)
        rows["routed arm (mean over runs)"] = {
            g: {"exact": statistics.fmean(r[g]["exact"] for r in per_run.values()),
                "exact_std": statistics.stdev([r[g]["exact"] for r in per_run.values()]) if len(per_run) > 1 else 0.0,
                "none_rate": statistics.fmean(r[g]["none_rate"] for r in per_run.values()),
                "n": next(iter(per_run.values()))[g]["n"]} for g in groups}
    print(f"{'routing':<30}" + "".join(f"{g:>18}" for g in groups))
    for name, by_group in rows.items():
        cells = []
        for g in groups:
            r = by_group.get(g)
            cells.append("-" if r is None else f"{r['exact']:.3f}" + (f" +- {r['exact_std']:.3f}" if "exact_std" in r
                                                                      else ""))
        print(f"{name:<30}" + "".join(f"{c:>18}" for c in cells))
    label_none = routing_agreement(labels, {q: [0, 0] for q in group_of}, EXPERTS, group_of)
    print("labels: " + ", ".join(f"{g}: no expert useful {label_none[g]['exact']:.3f}, "
                                 + ", ".join(f"{e} useful {label_none[g]['per_expert'][e]['useful']:.3f}"
                                             for e in EXPERTS) for g in groups))
    if args.json:
        Path(args.json).write_text(json.dumps({"labels": str(args.labels), "rows": rows, "runs": per_run,
                                               "labels_summary": label_none}, indent=1))
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("labels")
    a.add_argument("--limit", type=int, default=50, help="questions per domain and format (the eval's eval.limit)")
    a.add_argument("--output", required=True)
    a.set_defaults(func=cmd_labels)
    s = sub.add_parser("score")
    s.add_argument("--labels", required=True, help="routed.json of `vlweave mova routing-data` on questions.json")
    s.add_argument("--limit", type=int, default=50)
    s.add_argument("--json")
    s.add_argument("runs", nargs="*", help="evaluation folders with routed predictions_*.jsonl")
    s.set_defaults(func=cmd_score)
    args = ap.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
