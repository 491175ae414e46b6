"""Routing accuracy of a MoVA model against routing labels (vlweave.eval.routing_accuracy): counts on a small
hand-made set, the files it reads, and the errors for what does not fit."""

from __future__ import annotations

import json

import pytest

from vlweave.eval.routing_accuracy import prior_decisions, read_decisions, read_labels, routing_agreement

EXPERTS = ["docs", "scenes"]
LABELS = {"d1": [1, 0], "d2": [1, 0], "d3": [0, 0], "s1": [0, 1], "s2": [1, 1]}
DECISIONS = {"d1": [1, 0], "d2": [0, 0], "d3": [0, 0], "s1": [0, 1], "s2": [0, 1], "extra": [1, 1]}
GROUP = {"d1": "documents", "d2": "documents", "d3": "documents", "s1": "scenes", "s2": "scenes"}


def test_agreement_counts():
    got = routing_agreement(LABELS, DECISIONS, EXPERTS, GROUP)
    assert got["all"]["n"] == 5  # "extra" has no label
    assert got["all"]["exact"] == pytest.approx(3 / 5)  # d1, d3, s1
    docs = got["all"]["per_expert"]["docs"]
    assert docs["agreement"] == pytest.approx(3 / 5)  # d1, d3, s1 agree; d2, s2 missed
    assert docs["precision"] == 1.0 and docs["recall"] == pytest.approx(1 / 3)
    scenes = got["all"]["per_expert"]["scenes"]
    assert scenes["agreement"] == 1.0 and scenes["routed"] == pytest.approx(2 / 5)
    assert got["all"]["none_rate"] == pytest.approx(2 / 5) and got["all"]["labels_none_rate"] == pytest.approx(1 / 5)
    assert got["documents"]["exact"] == pytest.approx(2 / 3) and got["scenes"]["exact"] == pytest.approx(1 / 2)
    assert got["scenes"]["per_expert"]["docs"]["precision"] is None  # never routed there


def test_prior_decisions_and_files(tmp_path):
    prior = prior_decisions(GROUP, {"documents": ["docs"], "scenes": ["scenes"]}, EXPERTS)
    assert prior == {"d1": [1, 0], "d2": [1, 0], "d3": [1, 0], "s1": [0, 1], "s2": [0, 1]}
    assert routing_agreement(LABELS, prior, EXPERTS)["all"]["exact"] == pytest.approx(3 / 5)
    (tmp_path / "routed.json").write_text(json.dumps([{"id": "d1", "routing": [1, 0]}, {"id": "t", "conversations": []}]))
    assert read_labels(tmp_path / "routed.json") == {"d1": [1, 0]}
    run = tmp_path / "run"
    run.mkdir()
    (run / "predictions_short.jsonl").write_text(
        json.dumps({"question_id": "d1", "routing": {"mode": "model", "experts": ["docs"], "bits": [1, 0]}}) + "\n")
    assert read_decisions(run) == {"d1": [1, 0]}
    (run / "predictions_mc.jsonl").write_text(json.dumps({"question_id": "d2", "routing": None}) + "\n")
    with pytest.raises(ValueError, match=r"predictions_mc.jsonl:1: question 'd2' has no routing decision"):
        read_decisions(run)
    with pytest.raises(FileNotFoundError, match="no predictions"):
        read_decisions(tmp_path / "routed.json.d")


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="no question has both"):
        routing_agreement({"a": [1, 0]}, {"b": [1, 0]}, EXPERTS)
    with pytest.raises(ValueError, match=r"question 'a': decision has 3 bits; experts are \['docs', 'scenes'\]"):
        routing_agreement({"a": [1, 0]}, {"a": [1, 0, 1]}, EXPERTS)
