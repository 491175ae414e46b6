"""Summarise the yes/no recipe runs of docs/demo.md ("Yes/no that looks at the image") into a JSON and a PNG.

Each run is a finished ``vlweave train`` folder (``predictions.jsonl``, ``metrics.json``, ``train_metrics.json``).
Per run: overall accuracy, accuracy per question type, yes/no accuracy balanced within templates (0.5 = answered
from the wording alone; ``vlweave.eval.analysis.yes_no_balance``), the naming-implied yes/no accuracy where the
data pair naming and yes/no questions, and the training time.

    python experiments/yes_no_recipes.py --run demo=runs/demo --run paired=runs/a,runs/b,runs/c ... \\
        --prior paired=0.861 --output docs/results/yes-no-recipes.json

A run given as several comma-separated folders (one per seed) is reported as mean +- std (population std).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from vlweave.data.easyvqa import question_template, question_type  # noqa: E402
from vlweave.data.questions import Question  # noqa: E402
from vlweave.eval.analysis import answer_masker, train_questions, yes_no_balance  # noqa: E402


def summarise(folder: Path, data: str) -> dict:
    preds = [json.loads(line) for line in (folder / "predictions.jsonl").read_text().splitlines()]
    # vlweave train writes metrics.json, a compare run eval_metrics.json
    metrics_file = folder / "metrics.json" if (folder / "metrics.json").is_file() else folder / "eval_metrics.json"
    metrics = json.loads(metrics_file.read_text())
    train = json.loads((folder / "train_metrics.json").read_text())["summary"]
    questions = [Question(question_id=r["question_id"], text=r["question"], image=None, answer=r["answer"])
                 for r in preds]
    if data == "easy-vqa":
        kind, template_fn = (lambda a: question_type(a)), question_template
    else:  # the own-data VQA of examples/own_data/make_vqa.py: naming + yes/no
        kind = lambda a: "yes/no" if a in ("yes", "no") else "naming"  # noqa: E731
        from vlweave.config import RunConfig

        template_fn = answer_masker(train_questions(RunConfig.load(folder / "config.yaml").data.train))
    by: dict[str, list[bool]] = {}
    for r in preds:
        by.setdefault(kind(r["answer"]), []).append(bool(r["correct"]))
    balance = yes_no_balance(questions, [r["prediction"] for r in preds], template_fn)
    cons = metrics.get("consistency") or {}
    return {"folder": str(folder), "n": len(preds), "accuracy": sum(r["correct"] for r in preds) / len(preds),
            "by_type": {k: sum(v) / len(v) for k, v in sorted(by.items())},
            "yes_no_balanced": balance["template_balanced_accuracy"] if balance else None,
            "naming_implied": cons.get("naming_implied_accuracy"),
            "train_seconds": train.get("train_seconds"),
            "steps": {s["stage"]: s["steps"] for s in train.get("stages", [])}}


def aggregate(runs: list[dict]) -> dict:
    """Mean and std (population) of every number over the seeds' summaries; the seeds' own summaries kept."""
    import statistics

    def stats(values):
        values = [v for v in values if v is not None]
        if not values:
            return None, None
        return statistics.mean(values), (statistics.pstdev(values) if len(values) > 1 else 0.0)

    out: dict = {"seeds": runs, "n": runs[0]["n"], "steps": runs[0]["steps"]}
    for key in ("accuracy", "yes_no_balanced", "naming_implied", "train_seconds"):
        out[key], out[key + "_std"] = stats([r[key] for r in runs])
    out["by_type"], out["by_type_std"] = {}, {}
    for t in runs[0]["by_type"]:
        out["by_type"][t], out["by_type_std"][t] = stats([r["by_type"].get(t) for r in runs])
    return out


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = result["runs"]
    names = list(runs)
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(names)), 4))
    x = range(len(names))
    ax.bar([i - 0.2 for i in x], [runs[n]["by_type"].get("yes/no", 0) for n in names], 0.4,
           yerr=[runs[n]["by_type_std"].get("yes/no", 0) for n in names], capsize=3, label="yes/no accuracy")
    ax.bar([i + 0.2 for i in x], [runs[n]["yes_no_balanced"] or 0 for n in names], 0.4,
           yerr=[runs[n]["yes_no_balanced_std"] or 0 for n in names], capsize=3,
           label="balanced within templates (0.5 = wording only)")
    for i, n in enumerate(names):
        if runs[n].get("prior") is not None:
            ax.hlines(runs[n]["prior"], i - 0.4, i + 0.4, colors="k", linestyles="--", lw=1)
        if runs[n].get("naming_implied") is not None:
            ax.plot(i, runs[n]["naming_implied"], "r*", ms=9)
    ax.plot([], [], "k--", lw=1, label="blind per-template prior")
    ax.plot([], [], "r*", label="implied by its own names")
    ax.set_xticks(list(x), names, rotation=20, ha="right", fontsize=8)
    ax.set_ylim(0.3, 1.02)
    ax.set_ylabel("yes/no (mean +- std over the seeds given)")
    ax.set_title("Does the embedded model look when it answers yes/no?")
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", action="append", required=True, help="LABEL=FOLDER[:digits] (default data: easy-vqa)")
    ap.add_argument("--prior", action="append", default=[], help="LABEL=VALUE: the blind prior drawn for a run")
    ap.add_argument("--output", type=Path, default=ROOT / "docs" / "results" / "yes-no-recipes.json")
    args = ap.parse_args()
    priors = dict(p.split("=", 1) for p in args.prior)
    runs = {}
    for item in args.run:
        label, spec = item.split("=", 1)
        folders, _, data = spec.partition(":")
        runs[label] = aggregate([summarise(Path(f), data or "easy-vqa") for f in folders.split(",")])
        if label in priors:
            runs[label]["prior"] = float(priors[label])
        r = runs[label]
        pm = lambda v, sd: f"{v:.3f}" if len(r["seeds"]) == 1 else f"{v:.3f}+-{sd:.3f}"  # noqa: E731
        print(f"{label:24s} seeds {len(r['seeds'])}  all {pm(r['accuracy'], r['accuracy_std'])}  "
              + "  ".join(f"{k} {pm(v, r['by_type_std'][k])}" for k, v in r["by_type"].items())
              + f"  balanced {pm(r['yes_no_balanced'], r['yes_no_balanced_std'])}"
              + (f"  naming-implied {r['naming_implied']:.3f}" if r["naming_implied"] is not None else "")
              + f"  train {r['train_seconds']:.0f} s")
    args.output.write_text(json.dumps({"runs": runs}, indent=1) + "\n")
    plot({"runs": runs}, args.output.with_suffix(".png"))
    print(f"wrote {args.output} and {args.output.with_suffix('.png')}")


if __name__ == "__main__":
    main()
