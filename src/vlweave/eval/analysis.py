"""Results a researcher can read, for any question set: accuracy per question group beside blind baselines learned
from the training answers, a confusion summary for closed-vocabulary answers, a yes/no consistency check, and
yes/no accuracy balanced within templates (whether the answers depend on the image at all).

Groups come from a record field when the questions carry one (``category``, ``type``, ``domain``, or one named by
the caller), otherwise from the question *template*: the question with its content words masked.  Content words are
the data's own answer vocabulary (every training answer except yes/no), so "Is this a 3?" and "Is this a 7?" share
the template ``is this a {answer}?`` without any data-set-specific list; easy-vqa's helpers build the same masker
with their named slots (``{color}``, ``{shape}``).

The blind baselines answer without the image: the majority training answer, and the majority training answer of
the question's template.  A group whose accuracy is no better than its per-template baseline is answered from the
wording alone.

The consistency check pairs a yes/no question about X ("is this a 3?") with the model's own answer to a naming
question on the same image ("what digit is shown?" -> "3"): the yes/no answer the model's names imply, how often the
model gives it, and how accurate those implied answers would be.  A model that names well but answers yes/no at the
blind rate is not comparing the question with the image.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from vlweave.data.questions import Question
from vlweave.data.templates import TemplateMasker, is_negated
from vlweave.eval.vqa import majority_baselines, normalize_answer

GROUP_FIELDS = ("category", "type", "domain")  # record fields that name a question's group, in this order
YES_NO = ("yes", "no")
MAX_TEMPLATE_GROUPS = 20  # more templates than this: the most frequent ones, the rest as one "(other templates)"
OTHER_TEMPLATES = "(other templates)"
MAX_CLOSED_VOCABULARY = 50  # distinct gold answers up to which a confusion summary is meaningful
TOP_CONFUSIONS = 10


def answer_masker(train: Sequence[Question], slot: str = "answer") -> TemplateMasker:
    """A masker whose one slot is the training answer vocabulary without yes/no (the content words of any data)."""
    vocab = {normalize_answer(str(q.answer)) for q in train if q.answer is not None}
    return TemplateMasker({slot: sorted(w for w in vocab if w and w not in YES_NO)})


def is_yes_no(answer: Any) -> bool:
    return normalize_answer(str(answer)) in YES_NO


# ---- training answers -------------------------------------------------------------------------------------------


def train_questions(path: str | Path) -> list[Question]:
    """Every (question, answer) turn pair of a LLaVA training file as a :class:`Question` (what the blind
    baselines learn from).  Images are not opened or checked: the baselines never look at them."""
    from vlweave.data.llava_json import _read_records
    from vlweave.processing import IMAGE_TOKEN

    out: list[Question] = []
    for index, _, record in _read_records(Path(path)):
        if not isinstance(record, dict):
            continue
        if "conversations" not in record:  # a question file ({question_id, text, answer})
            if isinstance(record.get("text"), str) and record.get("answer") is not None:
                out.append(Question(question_id=record.get("question_id", index), text=record["text"],
                                    answer=str(record["answer"]), image=record.get("image"),
                                    meta={k: v for k, v in record.items()
                                          if k not in ("question_id", "text", "answer", "image")}))
            continue
        turns = record.get("conversations") or []
        for k in range(0, len(turns) - 1, 2):
            q, a = turns[k], turns[k + 1]
            if isinstance(q, dict) and isinstance(a, dict) and isinstance(q.get("value"), str) \
                    and isinstance(a.get("value"), str):
                out.append(Question(question_id=f"{record.get('id', index)}#{k // 2}",
                                    text=q["value"].replace(IMAGE_TOKEN, "").strip(), answer=a["value"],
                                    image=record.get("image")))
    return out


# ---- groups -------------------------------------------------------------------------------------------------------


def group_field(questions: Sequence[Question], requested: str | None = None) -> str | None:
    """The record field results are grouped by: ``requested`` (every question must have it), else the first of
    :data:`GROUP_FIELDS` that every question has, else None (group by template)."""
    if requested:
        missing = [q.question_id for q in questions if requested not in q.meta]
        if missing:
            raise ValueError(f"--group-by {requested!r}: {len(missing)} of {len(questions)} questions have no "
                             f"{requested!r} field (first: question_id {missing[0]!r}); fields they have: "
                             f"{sorted(set().union(*(q.meta for q in questions)))}")
        return requested
    for key in GROUP_FIELDS:
        if questions and all(key in q.meta for q in questions):
            return key
    return None


def assign_groups(questions: Sequence[Question], field: str | None,
                  template_fn: Callable[[str], str]) -> list[str]:
    """Each question's group: its ``field`` value, or its template (the rarest templates merged when there are
    more than :data:`MAX_TEMPLATE_GROUPS`)."""
    if field is not None:
        return [str(q.meta[field]) for q in questions]
    templates = [template_fn(q.text) for q in questions]
    counts = Counter(templates)
    if len(counts) <= MAX_TEMPLATE_GROUPS:
        return templates
    keep = {t for t, _ in counts.most_common(MAX_TEMPLATE_GROUPS - 1)}
    return [t if t in keep else OTHER_TEMPLATES for t in templates]


# ---- the report ---------------------------------------------------------------------------------------------------


def confusion_summary(questions: Sequence[Question], answers: Sequence[str]) -> dict[str, Any] | None:
    """Per-answer accuracy (by gold answer) and the most frequent (gold -> predicted) mistakes, when the gold
    answers form a closed vocabulary (at most :data:`MAX_CLOSED_VOCABULARY` distinct); else None."""
    gold = [normalize_answer(str(q.answer)) for q in questions]
    vocab = set(gold)
    if not vocab or len(vocab) > MAX_CLOSED_VOCABULARY:
        return None
    pred = [normalize_answer(a) for a in answers]
    per: dict[str, list[bool]] = defaultdict(list)
    mistakes: Counter = Counter()
    for g, p in zip(gold, pred):
        per[g].append(g == p)
        if g != p:
            mistakes[(g, p)] += 1
    return {
        "vocabulary": len(vocab),
        "per_answer": {g: {"accuracy": sum(v) / len(v), "n": len(v)} for g, v in sorted(per.items())},
        "top_confusions": [{"answer": g, "predicted": p, "count": c}
                           for (g, p), c in mistakes.most_common(TOP_CONFUSIONS)],
        "outside_vocabulary": sum(p not in vocab for p in pred),
        "predicted_counts": dict(Counter(pred).most_common(TOP_CONFUSIONS)),
    }


def consistency_check(questions: Sequence[Question], answers: Sequence[str], train: Sequence[Question],
                      masker: TemplateMasker) -> dict[str, Any] | None:
    """Yes/no answers against the model's own naming answers on the same image (see the module docstring).

    A slot word's *naming templates* are the templates of the training questions it answers ("3" answers
    ``what digit is shown?``).  A yes/no question pairs up when each slot word it mentions has a naming question
    on the same image; the implied answer is "yes" when the model named every mentioned word, flipped by a "not"/
    "no" in the question.  None when no question pairs up."""
    naming: dict[str, set[str]] = defaultdict(set)
    for q in train:
        a = normalize_answer(str(q.answer))
        if a and a not in YES_NO:
            naming[a].add(masker(q.text))
    named: dict[Any, dict[str, str]] = defaultdict(dict)  # image -> naming template -> the model's answer
    for q, a in zip(questions, answers):
        if q.has_image and isinstance(q.image, str) and not is_yes_no(q.answer):
            named[q.image].setdefault(masker(q.text), normalize_answer(a))
    rows = []
    for q, a in zip(questions, answers):
        if not (q.has_image and isinstance(q.image, str) and is_yes_no(q.answer)):
            continue
        words = masker.words_in(q.text)
        if not words:
            continue
        matches = []
        for w in words:
            said = [named[q.image][t] for t in naming.get(normalize_answer(w), ()) if t in named[q.image]]
            if not said:
                break
            matches.append(said[0] == normalize_answer(w))
        else:
            present = all(matches)
            implied = "yes" if present != is_negated(q.text) else "no"
            rows.append((normalize_answer(a), implied, normalize_answer(str(q.answer))))
    if not rows:
        return None
    n = len(rows)
    return {
        "n": n,
        "model_accuracy": sum(p == g for p, _, g in rows) / n,
        "naming_implied_accuracy": sum(i == g for _, i, g in rows) / n,
        "consistency": sum(p == i for p, i, _ in rows) / n,
    }


def yes_no_balance(questions: Sequence[Question], answers: Sequence[str],
                   template_fn: Callable[[str], str]) -> dict[str, Any] | None:
    """Does the model's yes/no answer depend on the image, or only on the wording?

    Accuracy on yes/no questions rewards answering each template with its majority answer (easy-vqa: "no" to "is
    there a {color} shape?" is right 88 % of the time).  Here each template that has both gold answers in the test
    set scores its *balanced* accuracy, the mean of the "yes" rate on gold-"yes" questions and the "no" rate on
    gold-"no" ones, and the templates are averaged by their question counts: any answer that is a function of the
    template alone scores exactly 0.5, a model that looks scores up to 1.  None when no template has both answers."""
    per: dict[str, dict[str, list[int]]] = defaultdict(lambda: {"yes": [0, 0], "no": [0, 0]})  # gold -> [right, n]
    for q, a in zip(questions, answers):
        if not is_yes_no(q.answer):
            continue
        gold = normalize_answer(str(q.answer))
        cell = per[template_fn(q.text)][gold]
        cell[0] += normalize_answer(a) == gold
        cell[1] += 1
    rows = [d for d in per.values() if d["yes"][1] and d["no"][1]]
    if not rows:
        return None
    n = sum(d["yes"][1] + d["no"][1] for d in rows)
    balanced = sum((d["yes"][1] + d["no"][1]) * (d["yes"][0] / d["yes"][1] + d["no"][0] / d["no"][1]) / 2
                   for d in rows) / n
    return {"n": n, "templates": len(rows), "template_balanced_accuracy": balanced,
            "yes_recall": sum(d["yes"][0] for d in rows) / sum(d["yes"][1] for d in rows),
            "no_recall": sum(d["no"][0] for d in rows) / sum(d["no"][1] for d in rows)}


def analyse(questions: Sequence[Question], answers: Sequence[str], train: Sequence[Question] | None = None, *,
            group_by: str | None = None, template_fn: Callable[[str], str] | None = None,
            group_fn: Callable[[Question], str] | None = None) -> dict[str, Any]:
    """The readable report for one evaluation: ``groups`` (accuracy, count and blind baselines per group; by
    ``group_fn``, else the ``group_by``/auto field, else the template), overall ``baselines``, ``confusion`` and
    ``consistency`` and ``yes_no_balance`` (None where the data do not allow them).  ``train``: the training
    questions the baselines
    learn from (None: no baselines); ``template_fn``: default the answer-vocabulary masker of ``train``."""
    masker = answer_masker(train or [])
    template_fn = template_fn or masker
    if group_fn is not None:
        field_name, labels = "custom", [group_fn(q) for q in questions]
    else:
        field_name = group_field(questions, group_by)
        labels = assign_groups(questions, field_name, template_fn)
    correct = [normalize_answer(a) == normalize_answer(str(q.answer)) for q, a in zip(questions, answers)]
    by: dict[str, list[int]] = defaultdict(list)
    for i, g in enumerate(labels):
        by[g].append(i)
    groups: dict[str, dict[str, Any]] = {}
    baselines = None
    if train:
        label_of = {id(q): g for q, g in zip(questions, labels)}
        baselines = majority_baselines(train, questions, template_fn, group_fn=lambda q: label_of[id(q)])
    for g, idx in sorted(by.items(), key=lambda kv: (-len(kv[1]), kv[0])):
        row: dict[str, Any] = {"n": len(idx), "accuracy": sum(correct[i] for i in idx) / len(idx)}
        if baselines is not None:
            row["blind_majority"] = baselines["majority_by_group"][g]
            row["blind_per_template"] = baselines["majority_per_template_by_group"][g]
        groups[g] = row
    return {
        "accuracy": sum(correct) / max(1, len(correct)),
        "n": len(correct),
        "group_by": field_name or "template",
        "groups": groups,
        "baselines": None if baselines is None else {k: baselines[k] for k in ("majority", "majority_per_template")},
        "baseline_source": None if not train else f"{len(train)} training question(s)",
        "confusion": confusion_summary(questions, answers),
        "consistency": None if not train else consistency_check(questions, answers, train, masker),
        "yes_no_balance": yes_no_balance(questions, answers, template_fn),
    }


def print_report(report: dict[str, Any], title: str, console=None) -> None:
    """The printed table: overall and per-group accuracy beside the blind baselines, then the confusion and
    consistency lines."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console(stderr=True)
    table = Table(title=title)
    for col in ("group", "n", "accuracy", "blind majority", "blind per template"):
        table.add_column(col, justify="left" if col == "group" else "right")
    b = report.get("baselines") or {}
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    table.add_row("[bold]all[/bold]", str(report["n"]), f"[bold]{report['accuracy']:.3f}[/bold]",
                  fmt(b.get("majority")), fmt(b.get("majority_per_template")))
    for g, r in report["groups"].items():
        table.add_row(f"  {g}", str(r["n"]), f"{r['accuracy']:.3f}", fmt(r.get("blind_majority")),
                      fmt(r.get("blind_per_template")))
    console.print(table)
    if not b:
        console.print("blind baselines: no training answers found (pass --train-data)")
    print_details(report, console)


def print_details(report: dict[str, Any], console) -> None:
    """The confusion summary and consistency lines under a results table."""
    conf = report.get("confusion")
    if conf:
        worst = sorted(conf["per_answer"].items(), key=lambda kv: kv[1]["accuracy"])[:5]
        console.print("per-answer accuracy (lowest): " + ", ".join(f"{a} {r['accuracy']:.2f} (n={r['n']})"
                                                                   for a, r in worst))
        if conf["top_confusions"]:
            console.print("top confusions (answer -> predicted): " + ", ".join(
                f"{c['answer']} -> {c['predicted'] or '<empty>'} x{c['count']}" for c in conf["top_confusions"][:5]))
    cons = report.get("consistency")
    if cons:
        console.print(f"yes/no vs the model's own naming answers ({cons['n']} pairs): "
                      f"model {cons['model_accuracy']:.3f}"
                      f", implied by its names {cons['naming_implied_accuracy']:.3f}, agreement "
                      f"{cons['consistency']:.3f}")
    bal = report.get("yes_no_balance")
    if bal:
        console.print(f"yes/no balanced within templates ({bal['n']} questions, {bal['templates']} templates): "
                      f"{bal['template_balanced_accuracy']:.3f} (0.5: answered from the wording alone; recall of "
                      f"yes {bal['yes_recall']:.3f}, of no {bal['no_recall']:.3f})")
