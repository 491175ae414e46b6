"""Derived easy-vqa training files for the yes/no recipe study (docs/demo.md, "Yes/no recipes"):

- ``naming.json``:        the colour and shape questions of ``train_single.json`` only (a naming-first curriculum);
- ``yes_no_paired.json``: the yes/no questions of ``train_paired.json`` only (each with its answer-flipping twin).

Usage: ``python experiments/yes_no_data.py --out data/yes-no``; the records' image paths are absolute (into the
prepared easy-vqa asset folder), so the files can be named as a stage's ``data`` without an image folder.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from vlweave import assets  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    folder = assets.pull("easy-vqa")
    answer = lambda r: r["conversations"][1]["value"].strip().lower()  # noqa: E731
    single = json.loads((folder / "train_single.json").read_text())
    paired = json.loads((folder / "train_paired.json").read_text())
    args.out.mkdir(parents=True, exist_ok=True)
    files = {"naming.json": [r for r in single if answer(r) not in ("yes", "no")],
             "yes_no_paired.json": [r for r in paired if answer(r) in ("yes", "no")]}
    for name, rows in files.items():
        rows = [{**r, "image": str(folder / r["image"])} for r in rows]
        (args.out / name).write_text(json.dumps(rows) + "\n")
        print(f"{args.out / name}: {len(rows)} records")


if __name__ == "__main__":
    main()
