"""Turn a labelled image set into vlweave's LLaVA JSON: a naming question and a yes/no question per image.

Input: a folder with one sub-folder per class (``DIR/<class name>/*.png|jpg``, torchvision's ImageFolder layout),
or ``--sklearn-digits``: the 1,797 8x8 handwritten digits that ship inside scikit-learn's wheel
(``sklearn/datasets/data/digits.csv.gz``; the wheel is downloaded with ``pip download``, never installed), written
out in that layout first as 56x56 grey PNGs.

Output (in ``--out``)::

    images/<class>/<name>.png   the images (copied or written), paths in the JSON are relative to --out
    train.json                  LLaVA conversation records, one question each (as vlweave's demo trains)
    captions.json               "<image> Describe the image briefly." -> "<class>": align data made from labels
    test.jsonl                  held-out questions {question_id, image, text, answer, type}

Every image gets "What {noun} is shown?" -> its class, and "Is this a {class'}?" about its own class or another one
(seeded, ``--yes-fraction`` of them about its own); with ``--paired`` every *training* image is asked about its own
class and about another one, so each image carries a "yes" and a "no" (the test questions stay the same).  A seeded ``--test-fraction`` of the images (not of the
questions: no test image is seen in training) goes to ``test.jsonl``.

    python examples/own_data/make_vqa.py --sklearn-digits --out data/digits
    python examples/own_data/make_vqa.py --folders my_photos/ --noun "kind of item" --out data/mine
"""

from __future__ import annotations

import argparse
import csv
import gzip
import io
import json
import random
import shutil
import sys
import zipfile
from pathlib import Path

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"}
SKLEARN = "scikit-learn==1.9.1"  # any wheel of it has the same digits.csv.gz


def sklearn_digits(folder: Path, size: int = 56) -> Path:
    """Write scikit-learn's digits as ``folder/<digit>/<index>.png`` (grey 0..16 scaled to 0..255, nearest-
    neighbour upscaled so each of the 8x8 cells stays a flat block)."""
    from PIL import Image

    from vlweave.assets import _fetch_wheel  # the library's cached `pip download --no-deps` (no install)

    wheel = _fetch_wheel(SKLEARN)
    with zipfile.ZipFile(wheel) as zf:
        raw = zf.read("sklearn/datasets/data/digits.csv.gz")
    rows = list(csv.reader(io.StringIO(gzip.decompress(raw).decode())))
    for i, row in enumerate(rows):
        pixels, label = [int(float(v)) for v in row[:64]], int(float(row[64]))
        im = Image.frombytes("L", (8, 8), bytes(min(255, v * 16) for v in pixels))
        out = folder / str(label) / f"{i:04d}.png"
        out.parent.mkdir(parents=True, exist_ok=True)
        im.resize((size, size), Image.NEAREST).convert("RGB").save(out)
    return folder


def read_folders(root: Path) -> list[tuple[Path, str]]:
    """(image, class) pairs of an ImageFolder layout, sorted; a clear error when it is not one."""
    if not root.is_dir():
        raise SystemExit(f"{root}: not a folder")
    classes = sorted(p for p in root.iterdir() if p.is_dir())
    pairs = [(f, c.name) for c in classes for f in sorted(c.iterdir()) if f.suffix.lower() in IMAGE_SUFFIXES]
    if len(classes) < 2 or not pairs:
        raise SystemExit(f"{root}: expected one sub-folder of images per class (at least 2), found "
                         f"{len(classes)} sub-folder(s) and {len(pairs)} image(s)")
    return pairs


def build(pairs: list[tuple[Path, str]], out: Path, noun: str, test_fraction: float, yes_fraction: float,
          seed: int, paired: bool = False) -> dict[str, int]:
    rng = random.Random(seed)
    # The paired extras draw from their own stream, so the split and the test questions are the same either way.
    pair_rng = random.Random(seed + 1)
    classes = sorted({c for _, c in pairs})
    order = list(range(len(pairs)))
    rng.shuffle(order)
    n_test = round(len(pairs) * test_fraction)
    test_ids = set(order[:n_test])
    train, captions, test = [], [], []
    for i, (src, label) in enumerate(pairs):
        rel = Path("images") / label / f"{i:05d}{src.suffix.lower()}"
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, out / rel)
        asked = label if rng.random() < yes_fraction else rng.choice([c for c in classes if c != label])
        qa = [(f"What {noun} is shown?", label, "naming"),
              (f"Is this a {asked}?", "yes" if asked == label else "no", "yes/no")]
        if i in test_ids:
            test += [{"question_id": f"{i}-{k}", "image": str(rel), "text": q, "answer": a, "type": t}
                     for k, (q, a, t) in enumerate(qa)]
            continue
        if paired:  # a training image is asked about its own class ("yes") *and* another one ("no")
            other = asked if asked != label else pair_rng.choice([c for c in classes if c != label])
            qa = [qa[0], (f"Is this a {label}?", "yes", "yes/no"), (f"Is this a {other}?", "no", "yes/no")]
        train += [{"id": f"{i}-{k}", "image": str(rel),
                   "conversations": [{"from": "human", "value": f"<image>\n{q}"}, {"from": "gpt", "value": a}]}
                  for k, (q, a, _) in enumerate(qa)]
        captions.append({"id": f"{i}-caption", "image": str(rel), "conversations": [
            {"from": "human", "value": "<image>\nDescribe the image briefly."}, {"from": "gpt", "value": label}]})
    rng.shuffle(train)
    (out / "train.json").write_text(json.dumps(train, indent=0))
    (out / "captions.json").write_text(json.dumps(captions, indent=0))
    (out / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in test))
    return {"images": len(pairs), "classes": len(classes), "train_questions": len(train),
            "test_questions": len(test), "captions": len(captions)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--folders", type=Path, help="ImageFolder layout: one sub-folder of images per class")
    src.add_argument("--sklearn-digits", action="store_true", help="scikit-learn's 8x8 digits (10 classes)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--noun", help='what the classes are, for "What {noun} is shown?" (digits: "digit")')
    p.add_argument("--test-fraction", type=float, default=0.2)
    p.add_argument("--yes-fraction", type=float, default=0.5,
                   help="share of yes/no questions about the image's own class (0.5: a blind model gets 0.5)")
    p.add_argument("--paired", action="store_true",
                   help="training images get two yes/no questions, about their own class and another one (the "
                        "test questions are unchanged)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.sklearn_digits:
        root = sklearn_digits(args.out / "source")
        noun = args.noun or "digit"
    else:
        root, noun = args.folders, args.noun or "kind of item"
    counts = build(read_folders(root), args.out, noun, args.test_fraction, args.yes_fraction, args.seed,
                   paired=args.paired)
    if args.sklearn_digits:
        shutil.rmtree(root)  # the copies under images/ are what the JSON names
    print(json.dumps({"out": str(args.out), **counts}), file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
