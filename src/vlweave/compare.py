"""``vlweave compare CONFIG... --seeds N``: apples-to-apples connector comparisons.

Every configuration is trained with the same data, steps and seeds, and evaluated on the same questions (the first
configuration's ``eval`` section, a fixed seeded subset).  Output: a table of mean +- std per configuration and
question group, ``compare.json`` with every number (per seed too), ``compare.md`` (the table in Markdown) and
``compare.png`` (bar chart with std error bars).  A new connector joins a comparison by config alone.

A finished run is reused: each run folder keeps its numbers in ``compare_run.json`` beside the resolved config it
was trained with, and a later ``compare`` into the same output folder skips a (config, seed) whose resolved config
and evaluation questions are unchanged.  So an interrupted comparison continues where it stopped, and two
``compare`` processes over disjoint configs (one per core) can share an output folder; a last call with every
config then only writes the whole table.  The key covers the configuration, not the code: after a change to
the code a comparison measures, start a fresh output folder.

A trained model is reused too: a (config, seed) whose training settings (everything but ``eval`` and the output
folder) equal those of a finished run in the same output folder is only evaluated, on that run's saved
``final/`` model, with its own ``eval`` block.  So an arm that differs only in how it is evaluated (MoVA's
random routing beside the routed arm) costs an evaluation, not a training run.

An interrupted training is resumed: a run folder records the training settings it started with
(``compare_train.json``), and a later ``compare`` whose settings are the same continues exactly from the newest
checkpoint there (the trainer's stage-end ones, and every ``train.save_every`` steps: an option, like
``train.keep_checkpoints``, that leaves both keys unchanged, so it can be set for a long comparison without
invalidating finished runs).  Checkpoints written with other settings are deleted before training starts, with
a log line: a compare run folder is the comparison's own.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import statistics
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from vlweave.config import RunConfig, explicit_values
from vlweave.data.easyvqa import add_question_types, question_template
from vlweave.eval.runner import load_eval_questions
from vlweave.presets import preset_path
from vlweave.runs import train_and_evaluate

console = Console(stderr=True, soft_wrap=True)  # log lines: paths are not broken across lines


def compare(configs: list[str], seeds: list[int], out_dir: str | Path, overrides: list[str] | None = None,
            progress: bool = True) -> dict[str, Any]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfgs = {name: RunConfig.load(preset_path(name), overrides or []) for name in configs}  # fail early on a bad one
    first = next(iter(cfgs.values()))
    questions = None  # eval.data "synthetic": the embedded benchmark's three formats, scored exactly
    if first.eval.data != "synthetic":
        questions = load_eval_questions(first.eval.data, first.eval.image_folder, first.eval.limit,
                                        first.eval.subset_seed)
    template_fn = None  # the blind per-template baseline masks the training answers' words...
    if questions is not None and first.eval.data.startswith("easy-vqa:"):
        add_question_types(questions)
        template_fn = question_template  # ...or, on easy-vqa, its colour/shape slots (the demo's numbers)
    n_questions = len(questions) if questions is not None else "all"
    results: dict[str, Any] = {"configs": configs, "seeds": seeds, "n_questions": n_questions,
                               "eval_data": first.eval.data, "runs": {}}
    results["runs"] = {name: {} for name in configs}
    for seed in seeds:  # seeds outermost: an interrupted comparison still has every config at the same seeds
        for name in configs:
            cfg = RunConfig.load(preset_path(name), (overrides or []) + [f"train.seed={seed}"])
            run_dir = out / f"{Path(name).stem}-seed{seed}"
            key, tkey = run_key(cfg, questions), train_key(cfg)
            r = finished_run(run_dir, key)
            trained = trained_run(out, tkey) if r is None else None
            if r is not None:
                console.print(f"[bold]compare[/bold] {name} seed {seed}: finished run reused ({run_dir})")
            elif trained is not None:
                console.print(f"[bold]compare[/bold] {name} seed {seed}: evaluating the model trained in {trained} "
                              "(same training settings)")
                r = evaluate_trained_run(cfg, questions, trained, run_dir, progress, template_fn)
                _write_record(run_dir, key, tkey, r)
                console.print(f"  accuracy {r['accuracy']:.3f}")
            else:
                resume = prepare_training(run_dir, tkey)
                console.print(f"[bold]compare[/bold] {name} seed {seed}"
                              + (f": resuming the interrupted training in {run_dir}" if resume else ""))
                run = train_and_evaluate(cfg, questions, run_dir, progress, template_fn=template_fn, resume=resume)
                r = {"accuracy": run.accuracy, "groups": run.groups,
                     "train_seconds": run.setup_seconds + run.train_seconds, "eval_seconds": run.eval_seconds,
                     "visual_tokens": run.visual_tokens, "baselines": run.baselines,
                     "group_counts": {g: v["n"] for g, v in run.report.get("groups", {}).items()}}
                if resume:  # train_seconds is then this process's part only
                    r["resumed"] = True
                _write_record(run_dir, key, tkey, r)
                console.print(f"  accuracy {r['accuracy']:.3f} ({r['train_seconds']:.0f}s train)")
            results["runs"][name][str(seed)] = r
            (out / "compare.json").write_text(json.dumps(summarise(results), indent=2))
    results = summarise(results)
    (out / "compare.json").write_text(json.dumps(results, indent=2))
    print_table(results)
    (out / "compare.md").write_text(markdown_table(results))
    plot(results, out / "compare.png")
    return results


# How often a run saves and how many checkpoints it keeps change neither its weights nor its numbers (resume is
# exact): left out of both keys.
NOT_IN_KEYS = ("save_every", "keep_checkpoints", "log_every")
TRAIN_RECORD = "compare_train.json"  # the training settings a run folder's checkpoints were written with


def _key_values(cfg: RunConfig) -> dict[str, Any]:
    values = explicit_values(cfg)
    for k in NOT_IN_KEYS:
        values.get("train", {}).pop(k, None)
    return values


def run_key(cfg: RunConfig, questions: list | None) -> str:
    """What a run's numbers depend on: its resolved config (seed included; fields at their defaults left out, so
    a newly added option does not invalidate finished runs; :data:`NOT_IN_KEYS` left out) and the evaluation
    questions."""
    text = json.dumps(_key_values(cfg), sort_keys=True, default=str)
    ids = [q.question_id for q in questions] if questions is not None else "embedded benchmark"
    return hashlib.sha256((text + json.dumps(ids)).encode()).hexdigest()


def train_key(cfg: RunConfig) -> str:
    """What a run's trained weights depend on: :func:`run_key`'s config without the ``eval`` block and the output
    folder (the seed stays)."""
    values = _key_values(cfg)
    values.pop("eval", None)
    values.get("train", {}).pop("output_dir", None)
    return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()


def prepare_training(run_dir: Path, tkey: str) -> bool:
    """Before training into ``run_dir``: True when it holds a complete checkpoint of an interrupted training with
    the training settings ``tkey`` (resume from it); otherwise checkpoints written with other or unknown settings,
    or none complete, are deleted (a new run must not resume from them) and ``tkey`` is recorded for the next
    call."""
    from vlweave.train.checkpoints import ResumeError, latest_checkpoint

    record = run_dir / TRAIN_RECORD
    try:
        started = json.loads(record.read_text()).get("train_key")
    except (OSError, json.JSONDecodeError, AttributeError):
        started = None
    ckpt_dir = run_dir / "checkpoints"
    if started == tkey and ckpt_dir.is_dir():
        try:
            latest_checkpoint(run_dir)  # (puts back what a crash mid-save left aside)
            return True
        except (FileNotFoundError, ResumeError) as exc:
            why = f"nothing complete to resume from ({exc})"
    else:
        why = "other training settings" if started else "unknown training settings"
    if ckpt_dir.exists():
        console.print(f"[bold]compare[/bold] deleting {ckpt_dir}: {why}")
        shutil.rmtree(ckpt_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    # The numbers of an earlier training in this folder go too: its final/ is about to be replaced, and another
    # arm must not be evaluated on the new model as if it were the old one (trained_run).
    (run_dir / "compare_run.json").unlink(missing_ok=True)
    record.write_text(json.dumps({"train_key": tkey}))
    return False


def _write_record(run_dir: Path, key: str, tkey: str, result: dict[str, Any]) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "compare_run.json").write_text(json.dumps({"key": key, "train_key": tkey, "result": result}, indent=1))


def trained_run(out: Path, tkey: str) -> Path | None:
    """A run folder under ``out`` that trained its own model with the training settings ``tkey`` and kept it."""
    for record in sorted(out.glob("*/compare_run.json")):
        try:
            data = json.loads(record.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if (data.get("train_key") == tkey and "trained_in" not in data.get("result", {})
                and (record.parent / "final").is_dir()):
            return record.parent
    return None


def evaluate_trained_run(cfg: RunConfig, questions: list | None, trained: Path, run_dir: Path, progress: bool,
                         template_fn=None) -> dict[str, Any]:
    """Evaluate the model saved in ``trained/final`` as ``cfg``'s ``eval`` block says; results into ``run_dir``."""
    import time
    from types import SimpleNamespace

    from vlweave.builder import load_checkpoint, load_processor
    from vlweave.runs import evaluate_trained

    run_dir.mkdir(parents=True, exist_ok=True)
    model, tokenizer = load_checkpoint(trained / "final")
    loaded = SimpleNamespace(model=model, tokenizer=tokenizer, processor=load_processor(trained / "final", tokenizer))
    t0 = time.time()
    accuracy, groups, report, blind = evaluate_trained(loaded, cfg, questions, run_dir, progress,
                                                       template_fn=template_fn)
    source = json.loads((trained / "compare_run.json").read_text())["result"]
    return {"accuracy": accuracy, "groups": groups, "train_seconds": source["train_seconds"],
            "eval_seconds": time.time() - t0, "visual_tokens": model.num_image_tokens, "baselines": blind,
            "group_counts": {g: v["n"] for g, v in report.get("groups", {}).items()}, "trained_in": str(trained)}


def finished_run(run_dir: Path, key: str) -> dict[str, Any] | None:
    """The numbers of a finished run in ``run_dir`` when it was trained with the same config and questions."""
    record = run_dir / "compare_run.json"
    if not record.is_file():
        return None
    try:
        data = json.loads(record.read_text())
    except (OSError, json.JSONDecodeError):
        return None  # a damaged record: train again
    return data["result"] if data.get("key") == key else None


def _mean_std(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values)}


def summarise(results: dict[str, Any]) -> dict[str, Any]:
    summary = {}
    blind: dict[str, dict[str, list[float]]] = {}  # group -> baseline -> values (runs' training data may differ)
    counts: dict[str, int] = {}
    for by_seed in results["runs"].values():
        for r in by_seed.values():
            counts.update(r.get("group_counts", {}))
            for g, b in r.get("baselines", {}).items():
                for k, v in b.items():
                    blind.setdefault(g, {}).setdefault(k, []).append(v)
    for name, by_seed in results["runs"].items():
        runs = list(by_seed.values())
        if not runs:
            continue
        groups = sorted({g for r in runs for g in r["groups"]})
        summary[name] = {"accuracy": _mean_std([r["accuracy"] for r in runs]),
                         "groups": {g: _mean_std([r["groups"][g] for r in runs if g in r["groups"]]) for g in groups},
                         "train_seconds": _mean_std([r["train_seconds"] for r in runs]),
                         "visual_tokens": runs[0]["visual_tokens"]}
    baselines = {g: {k: statistics.fmean(v) for k, v in b.items()} for g, b in blind.items()}
    return {**results, "summary": summary, "baselines": baselines, "group_counts": counts}


def table_rows(results: dict[str, Any]) -> tuple[str, list[str], list[list[str]]]:
    """(title, header, rows) of the comparison table: one row per question group (all questions first), one column
    per config (mean +- std over seeds), then the two blind baselines -- the groups can be many (question
    templates), the configs are few.  The printed table and ``compare.md`` are this."""
    summary = results["summary"]
    groups = sorted({g for s in summary.values() for g in s["groups"]})
    counts = results.get("group_counts", {})
    blind = results.get("baselines", {})
    title = (f"compare: {results['n_questions']} questions of {results['eval_data']}, seeds {results['seeds']} "
             "(mean +- std)")
    keys = [k for k in ("blind_majority", "blind_per_template") if any(k in b for b in blind.values())]
    header = ["group", "n", *summary, *("blind: " + ("majority" if k == "blind_majority" else "per template")
                                        for k in keys)]
    fmt = lambda m: f"{m['mean']:.3f}+-{m['std']:.3f}"  # noqa: E731
    rows = []
    for g in ["accuracy", *groups]:
        cells = [fmt(s["accuracy"] if g == "accuracy" else s["groups"][g]) if g == "accuracy" or g in s["groups"]
                 else "-" for s in summary.values()]
        b = [f"{blind[g][k]:.3f}" if k in blind.get(g, {}) else "-" for k in keys]
        rows.append(["all" if g == "accuracy" else g,
                     str(counts.get(g, results["n_questions"] if g == "accuracy" else "")), *cells, *b])
    rows.append(["visual tokens", "", *[str(s["visual_tokens"]) for s in summary.values()], *[""] * len(keys)])
    rows.append(["train s", "", *[f"{s['train_seconds']['mean']:.0f}" for s in summary.values()], *[""] * len(keys)])
    return title, header, rows


def print_table(results: dict[str, Any]) -> None:
    """:func:`table_rows` as a rich table on stdout."""
    title, header, rows = table_rows(results)
    table = Table(title=title)
    for k, col in enumerate(header):
        table.add_column(col, justify="left" if k == 0 else "right")
    for row in rows:
        table.add_row(*row)
    Console().print(table)


def markdown_table(results: dict[str, Any]) -> str:
    """:func:`table_rows` as a Markdown table (``compare.md``), to paste into a report."""
    title, header, rows = table_rows(results)
    lines = [f"{title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(c.replace("+-", " ± ") for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = results["summary"]
    groups = ["accuracy"] + sorted({g for s in summary.values() for g in s["groups"]})
    names = list(summary)
    width = 0.8 / max(1, len(names))
    # Wide enough for every bar, but capped: the embedded benchmark has 18 groups, and a 40-inch chart is unreadable.
    fig, ax = plt.subplots(figsize=(min(18.0, max(6.0, 0.3 * len(groups) * (len(names) + 1))), 4.5))
    for i, name in enumerate(names):
        s = summary[name]
        stats = [s["accuracy"]] + [s["groups"].get(g, {"mean": 0.0, "std": 0.0}) for g in groups[1:]]
        xs = [j + i * width for j in range(len(groups))]
        ax.bar(xs, [m["mean"] for m in stats], width, yerr=[m["std"] for m in stats], capsize=3, label=name)
    blind = results.get("baselines", {})
    labelled = False
    for j, g in enumerate(groups):  # the blind per-template baseline as a line across each group's bars
        if "blind_per_template" in blind.get(g, {}):
            ax.hlines(blind[g]["blind_per_template"], j - width / 2, j + width * (len(names) - 0.5), colors="black",
                      linestyles="dashed", label=None if labelled else "blind: majority per template")
            labelled = True
    counts = results.get("group_counts", {})
    ticks = [f"{g}\n(n={counts[g]})" if g in counts else g for g in groups]
    ax.set_xticks([j + width * (len(names) - 1) / 2 for j in range(len(groups))], ticks,
                  rotation=30 if len(groups) > 6 else 0, fontsize=8 if len(groups) > 6 else 10)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy (mean +- std over seeds)")
    ax.set_title(f"{results['eval_data']}: {results['n_questions']} questions, seeds {results['seeds']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
