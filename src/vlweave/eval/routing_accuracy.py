"""How well a MoVA model's coarse routing agrees with routing labels (issue 13 item 8; paper §2a).

Labels are the loss-based ``routing`` bits that ``vlweave mova routing-data`` writes onto records (expert ``j`` is
useful for a question iff the base + expert ``j`` model's loss on its answer is lower than the base alone's); run
on held-out questions, they say which experts *would have helped* each one.  The routing decisions are the
``routing.bits`` of an evaluation's prediction lines (``predictions*.jsonl``).  Reported per group (the benchmark's
domain, or all questions):

* ``exact``: the routed set equals the labelled set (the paper's routing accuracy reading);
* ``per_expert``: for each expert, the fraction of questions whose bit agrees, and its precision/recall;
* ``none_rate``: how often the routing chose no expert, beside how often the labels do.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any


def read_labels(path: str | Path) -> dict[str, list[int]]:
    """``{record id: routing bits}`` of a ``routed.json`` (records without ``routing`` are skipped)."""
    records = json.loads(Path(path).read_text())
    return {str(r["id"]): [int(b) for b in r["routing"]] for r in records if r.get("routing") is not None}


def read_decisions(run_dir: str | Path) -> dict[str, list[int]]:
    """``{question id: routed bits}`` from every ``predictions*.jsonl`` of an evaluation folder."""
    out: dict[str, list[int]] = {}
    files = sorted(Path(run_dir).glob("predictions*.jsonl"))
    if not files:
        raise FileNotFoundError(f"{run_dir}: no predictions*.jsonl (evaluate the model with routing first)")
    for path in files:
        for n, line in enumerate(path.read_text().splitlines(), 1):
            row = json.loads(line)
            routing = row.get("routing")
            if routing is None:
                raise ValueError(f"{path}:{n}: question {row.get('question_id')!r} has no routing decision "
                                 "(was the model evaluated with --routing?)")
            out[str(row["question_id"])] = [int(b) for b in routing["bits"]]
    return out


def _one_group(pairs: Sequence[tuple[list[int], list[int]]], experts: Sequence[str]) -> dict[str, Any]:
    n = len(pairs)
    per_expert = {}
    for j, name in enumerate(experts):
        tp = sum(1 for lab, dec in pairs if lab[j] and dec[j])
        chosen = sum(1 for _, dec in pairs if dec[j])
        useful = sum(1 for lab, _ in pairs if lab[j])
        per_expert[name] = {"agreement": sum(1 for lab, dec in pairs if lab[j] == dec[j]) / n,
                            "precision": tp / chosen if chosen else None, "recall": tp / useful if useful else None,
                            "routed": chosen / n, "useful": useful / n}
    return {"n": n, "exact": sum(1 for lab, dec in pairs if lab == dec) / n, "per_expert": per_expert,
            "none_rate": sum(1 for _, dec in pairs if not any(dec)) / n,
            "labels_none_rate": sum(1 for lab, _ in pairs if not any(lab)) / n}


def routing_agreement(labels: Mapping[str, list[int]], decisions: Mapping[str, list[int]], experts: Sequence[str],
                      group_of: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Agreement of ``decisions`` with ``labels`` over the questions both have; ``group_of`` maps a question id to
    its group (e.g. domain).  Errors name what does not fit: bit vectors of another length, no common question."""
    common = [q for q in decisions if q in labels]
    if not common:
        raise ValueError("no question has both a routing label and a routing decision (do the label ids match the "
                         "predictions' question ids?)")
    for q in common:
        for what, bits in (("label", labels[q]), ("decision", decisions[q])):
            if len(bits) != len(experts):
                raise ValueError(f"question {q!r}: {what} has {len(bits)} bits; experts are {list(experts)}")
    groups: dict[str, list[str]] = {"all": common}
    for q in common:
        if group_of is not None and q in group_of:
            groups.setdefault(group_of[q], []).append(q)
    return {g: _one_group([(labels[q], decisions[q]) for q in qs], experts) for g, qs in groups.items()}


def prior_decisions(group_of: Mapping[str, str], rule: Mapping[str, Iterable[str]],
                    experts: Sequence[str]) -> dict[str, list[int]]:
    """Fixed decisions from a question's group (e.g. ``{"documents": ["docs"]}``): the rule-based baseline a
    routing model should beat."""
    return {q: [int(e in set(rule.get(g, ()))) for e in experts] for q, g in group_of.items()}


__all__ = ["prior_decisions", "read_decisions", "read_labels", "routing_agreement"]
