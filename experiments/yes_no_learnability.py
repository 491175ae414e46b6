"""How many samples does it take to learn easy-vqa's yes/no *comparison* from the demo's frozen visual features?

The demo answers yes/no at the blind per-template prior (docs/demo.md): the LM never learns to compare the question's
colour/shape word with the image within the demo's ~2,200 finetune samples. This script takes the LM out of the
question and asks the same of small dedicated learners on the demo's own inputs (DINOv2-S at 112 px, pooled to the
4 visual tokens, standardised per channel, frozen): each gets the visual tokens and a representation of the
question and is trained as a yes/no classifier (batch 32, AdamW), then scored on the test split's yes/no questions.

Learners (the question side, from weakest to an oracle):

- ``bag``:        mean of the question's SmolLM2 input embeddings, concatenated with the visual tokens, GELU MLP.
- ``attn``:       attention pooling over the question's token embeddings (4 learned heads), bilinear with the
                  visual tokens (``a(v) * b(q) + c(q)``, GELU, linear).
- ``slot``:       the oracle question parse (one-hot of the colour/shape word + a negation bit), bilinear.
- ``slot+name``:  ``slot`` with a naming head (colour and shape classification) on the same visual map ``a(v)``,
                  trained on the same images' colour/shape labels in the same step (multi-task).
- ``factorised``: a naming head first (colour/shape softmax from the visual tokens, trained on naming labels), the
                  comparison then reads only the 11 naming probabilities and the parsed question.

Usage: ``python experiments/yes_no_learnability.py [--steps 800] [--seeds 0 1 2]``; writes
``docs/results/yes-no-learnability.json`` and ``.png``.  Features are cached in ``--cache`` (one encode, ~1 min).
"""

from __future__ import annotations

import argparse
import json
import random
import re
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from vlweave import assets  # noqa: E402
from vlweave.data.easyvqa import COLORS, SHAPES, image_facts  # noqa: E402

WORDS = COLORS + SHAPES
CHECK_STEPS = (25, 50, 100, 200, 400, 800, 1600)


def encode_features(cache: Path) -> dict[str, torch.Tensor]:
    """The demo's prepared base-tower features ``[N, 4, 384]`` for every train and test image."""
    if cache.is_file():
        return torch.load(cache)
    from PIL import Image
    from tqdm import tqdm

    from vlweave.builder import build_model
    from vlweave.config import RunConfig
    from vlweave.presets import preset_path
    from vlweave.processing import tower_transform

    model, _ = build_model(RunConfig.load(preset_path("demo")))
    model.eval()
    transform = tower_transform(model.tower_specs["base"])
    folder = assets.pull("easy-vqa") / "images"
    out = {}
    for split, n in (("train", 4000), ("test", 1000)):
        chunks = []
        for start in tqdm(range(0, n, 100), desc=f"encoding {split}"):
            px = torch.stack([transform(Image.open(folder / split / f"{i}.png").convert("RGB"))
                              for i in range(start, min(n, start + 100))])
            with torch.no_grad():
                chunks.append(model.prepare_tower_features("base", px)[0].float().clone())
        out[split] = torch.cat(chunks)
    cache.parent.mkdir(parents=True, exist_ok=True)
    torch.save(out, cache)
    return out


def _image_index(path: str) -> int:
    return int(re.search(r"(\d+)\.png$", path).group(1))


def yes_no_rows(records: list[dict]) -> list[tuple[int, str, float]]:
    rows = []
    for r in records:
        if "conversations" in r:
            q, a = r["conversations"][0]["value"].replace("<image>", "").strip(), r["conversations"][1]["value"]
        else:
            q, a = r["text"], r["answer"]
        if a in ("yes", "no"):
            rows.append((_image_index(r["image"]), q, 1.0 if a == "yes" else 0.0))
    return rows


class QuestionCodec:
    """Question text -> the representation each learner reads."""

    def __init__(self) -> None:
        from safetensors.torch import load_file
        from tokenizers import Tokenizer

        folder = assets.pull("smollm2-135m-instruct")
        self.embed = load_file(str(folder / "model.safetensors"))["model.embed_tokens.weight"].float()
        self.embed = self.embed / self.embed.norm(dim=1).mean()  # unit-ish scale for the learners
        self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        self._cache: dict[tuple[str, str], torch.Tensor] = {}

    def __call__(self, kind: str, q: str) -> torch.Tensor:
        key = (kind, q)
        if key not in self._cache:
            if kind == "slot":
                words = q.lower().replace("?", "").split()
                v = torch.zeros(len(WORDS) + 1)
                for j, w in enumerate(WORDS):
                    v[j] = float(w in words)
                v[-1] = float("not" in words or "no" in words)
                self._cache[key] = v
            else:
                ids = self.tokenizer.encode(q).ids
                e = self.embed[ids]
                if kind == "bag":
                    self._cache[key] = e.mean(0)
                else:  # tokens, padded to 24
                    pad = torch.zeros(24, e.shape[1])
                    pad[: len(ids)] = e
                    self._cache[key] = pad
        return self._cache[key]


class Learner(nn.Module):
    def __init__(self, kind: str, v_dim: int, q_dim: int, hidden: int = 256) -> None:
        super().__init__()
        self.kind = kind
        if kind == "bag":
            self.mlp = nn.Sequential(nn.Linear(v_dim + q_dim, hidden), nn.GELU(), nn.Linear(hidden, 1))
            return
        if kind == "attn":
            self.heads = nn.Linear(q_dim, 4)
        if kind == "factorised":
            self.name_color, self.name_shape = nn.Linear(v_dim, len(COLORS)), nn.Linear(v_dim, len(SHAPES))
            v_dim = len(WORDS)
        self.a = nn.Linear(v_dim, hidden)
        self.b, self.c = nn.Linear(q_dim, hidden), nn.Linear(q_dim, hidden)
        self.out = nn.Sequential(nn.GELU(), nn.Linear(hidden, 1))
        if kind == "slot+name":
            self.name_color, self.name_shape = nn.Linear(hidden, len(COLORS)), nn.Linear(hidden, len(SHAPES))

    def naming_logits(self, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.a(v) if self.kind == "slot+name" else v
        return self.name_color(h), self.name_shape(h)

    def forward(self, v: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        if self.kind == "bag":
            return self.mlp(torch.cat([v, q], 1)).squeeze(1)
        if self.kind == "attn":
            mask = q.abs().sum(-1) > 0
            w = self.heads(q).masked_fill(~mask[..., None], -1e9).softmax(1)
            q = torch.einsum("blh,bld->bhd", w, q).mean(1)
        if self.kind == "factorised":
            c, s = self.naming_logits(v)
            v = torch.cat([c.softmax(-1), s.softmax(-1)], 1)
        return self.out(self.a(v) * self.b(q) + self.c(q)).squeeze(1)


def run(kind: str, data: str, seed: int, steps: int, lr: float, feats, codec, train_rows, test_rows, facts_by_index):
    torch.manual_seed(seed)
    rng = random.Random(seed)
    mu, sd = feats["train"].mean((0, 1)), feats["train"].std((0, 1)) + 1e-5
    vis = lambda X, idx: ((X[idx] - mu) / sd).flatten(1)  # noqa: E731
    q_kind = "slot" if kind in ("slot", "slot+name", "factorised") else kind
    model = Learner(kind, feats["train"].shape[1] * feats["train"].shape[2],
                    codec(q_kind, train_rows[0][1]).shape[-1])
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    vt = vis(feats["test"], torch.tensor([i for i, _, _ in test_rows]))
    qt = torch.stack([codec(q_kind, q) for _, q, _ in test_rows])
    yt = torch.tensor([a for _, _, a in test_rows])
    named = [r for r in train_rows if r[0] in facts_by_index]
    curve = {}
    for step in range(1, steps + 1):
        batch = rng.sample(named if kind in ("slot+name", "factorised") else train_rows, 32)
        idx = torch.tensor([i for i, _, _ in batch])
        v = vis(feats["train"], idx)
        q = torch.stack([codec(q_kind, s) for _, s, _ in batch])
        y = torch.tensor([a for _, _, a in batch])
        loss = F.binary_cross_entropy_with_logits(model(v, q), y)
        if kind in ("slot+name", "factorised"):
            # The naming labels of the same images (what the demo's colour/shape questions teach).
            color = torch.tensor([COLORS.index(facts_by_index[i][0]) for i in idx.tolist()])
            shape = torch.tensor([SHAPES.index(facts_by_index[i][1]) for i in idx.tolist()])
            lc, ls = model.naming_logits(v)
            loss = loss + F.cross_entropy(lc, color) + F.cross_entropy(ls, shape)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step in CHECK_STEPS:
            with torch.no_grad():
                curve[step] = ((model(vt, qt) > 0).float() == yt).float().mean().item()
    return curve


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--kinds", nargs="+", default=["bag", "attn", "slot", "slot+name", "factorised"])
    ap.add_argument("--data", nargs="+", default=["train_balanced.json", "train_paired.json"])
    ap.add_argument("--cache", type=Path, default=Path("/tmp/vlweave-yes-no-features.pt"))
    ap.add_argument("--output", type=Path, default=ROOT / "docs" / "results" / "yes-no-learnability.json")
    ap.add_argument("--replot", action="store_true", help="redraw the PNG from --output's JSON and stop")
    args = ap.parse_args()
    if args.replot:
        replot(args.output)
        return
    torch.set_num_threads(1)
    feats = encode_features(args.cache)
    folder = assets.pull("easy-vqa")
    facts = image_facts(json.loads((folder / "train.json").read_text()))
    facts_by_index = {_image_index(p): f for p, f in facts.items()}
    test_rows = yes_no_rows([json.loads(line) for line in (folder / "test_qa.jsonl").read_text().splitlines()])
    codec = QuestionCodec()
    results = []
    for data in args.data:
        train_rows = yes_no_rows(json.loads((folder / data).read_text()))
        for kind in args.kinds:
            curves = []
            for seed in args.seeds:
                t0 = time.time()
                curves.append(run(kind, data, seed, args.steps, args.lr, feats, codec, train_rows, test_rows,
                                  facts_by_index))
                print(f"{data:22s} {kind:11s} seed {seed}: " + "  ".join(f"{s}:{a:.3f}" for s, a in curves[-1].items())
                      + f"  ({time.time() - t0:.0f} s)", flush=True)
            steps = sorted(curves[0])
            results.append({"data": data, "learner": kind, "seeds": args.seeds, "lr": args.lr, "batch_size": 32,
                            "steps": steps,
                            "mean": [statistics.mean(c[s] for c in curves) for s in steps],
                            "std": [statistics.pstdev([c[s] for c in curves]) for s in steps]})
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({"test_questions": len(test_rows), "results": results}, indent=1) + "\n")
    replot(args.output)
    print(f"wrote {args.output} and {args.output.with_suffix('.png')}")


def replot(json_path: Path) -> None:
    """The PNG beside ``json_path`` from its results (``--replot`` redraws without re-running)."""
    plot(json.loads(json_path.read_text())["results"], json_path.with_suffix(".png"))


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datas = sorted({r["data"] for r in results})
    fig, axes = plt.subplots(1, len(datas), figsize=(6 * len(datas), 4), sharey=True, squeeze=False)
    for ax, data in zip(axes[0], datas):
        for r in (r for r in results if r["data"] == data):
            samples = [s * r["batch_size"] for s in r["steps"]]
            ax.errorbar(samples, r["mean"], yerr=r["std"], marker="o", capsize=3, label=r["learner"])
        ax.axvline(70 * 32, color="gray", ls="--", lw=1)
        ax.text(70 * 32, 0.2, " demo finetune\n (70 x 32)", color="gray", fontsize=8)
        ax.set_xscale("log")
        ax.set_xlabel("training yes/no samples (batch 32)")
        ax.set_title(f"yes/no from frozen demo features: {data}")
        ax.axhline(0.5, color="k", lw=0.5)
        ax.set_ylim(0.15, 1.0)
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel(f"test yes/no accuracy (mean ± std, {len(results[0]['seeds'])} seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
