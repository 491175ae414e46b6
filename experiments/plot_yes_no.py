"""Plot docs/results/yes-no-oracle.json: the balanced yes/no loss through text captions vs through image tokens.

Both losses are divided by their chance level, so 1.0 means "no better than a coin": the text oracle logs the
answer token alone (chance ln 2), the demo's trainer averages the answer with ``<|im_end|>`` (chance ln 2 / 2, as
the end token is learnt at once).

    python experiments/plot_yes_no.py docs/results/yes-no-oracle.json docs/results/yes-no-oracle.png
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def smooth(values: list[float], k: int = 5) -> list[float]:
    return [sum(values[max(0, i - k + 1):i + 1]) / len(values[max(0, i - k + 1):i + 1]) for i in range(len(values))]


def main(src: str, out: str) -> None:
    results = json.loads(Path(src).read_text())
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, run in results["runs"].items():
        chance = math.log(2) / run["tokens_per_answer"]
        curve = smooth([v / chance for v in run["loss"]])
        label = f"{name} (test yes/no {run['yes_no_accuracy']:.3f})"
        ax.plot(range(1, len(curve) + 1), curve, label=label, ls="-" if run["input"] == "text" else "--")
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_xlabel("step (batch 32, balanced yes/no questions only)")
    ax.set_ylabel("loss / chance loss (5-step mean)")
    ax.set_ylim(0, 2)
    ax.set_title("SmolLM2-135M + LoRA: caption as text vs 4 image tokens")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(out)


if __name__ == "__main__":
    main(*sys.argv[1:3])
