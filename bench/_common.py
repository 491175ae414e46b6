"""What the model benchmarks share: their command line (batch size, timed repetitions, threads, a JSON file for
every timing), the easy-vqa samples they time, and a training batch built from the library's public pieces."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from vlweave import assets
from vlweave.data.collate import pad_batch
from vlweave.data.llava_json import Sample, load_llava_data
from vlweave.processing import encode_conversation
from vlweave.train.trainer import make_transform
from vlweave.vision.cache import load_image


def bench_parser(doc: str, *, batch_size: int | None = 8, image_size: int | None = None,
                 reps_help: str = "timed repetitions per variant (after one warm-up)") -> argparse.ArgumentParser:
    """``--batch-size``, ``--reps``, ``--threads``, ``--json`` (and ``--image-size`` when given a default); a
    bench adds its own arguments and calls :func:`parse`."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    if image_size is not None:
        ap.add_argument("--image-size", type=int, default=image_size)
    ap.add_argument("--batch-size", type=int, default=batch_size)
    ap.add_argument("--reps", type=int, default=3, help=reps_help)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", help="write all timings here")
    return ap


def parse(ap: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """Parsed arguments, with ``--threads`` applied to torch."""
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    return args


def easyvqa_samples(n: int) -> list[Sample]:
    """The first ``n`` single-question easy-vqa training records (the demo's finetune data)."""
    root = Path(assets.pull("easy-vqa"))
    return load_llava_data(root / "train_single.json", root)[:n]


def train_batch(model, tokenizer, samples: list[Sample], pad_to_multiple_of: int | None = None) -> dict:
    """A right-padded training batch (question + answer, the demo's template, no system prompt) with the images'
    pixel values through the model's own transform."""
    rows = [encode_conversation(s.conversations[:2], tokenizer, "tokenizer", image_token_id=model.config.image_token_id,
                                num_image_tokens=model.num_image_tokens, system_prompt="", sample_id=s.id)
            for s in samples]
    batch = pad_batch(rows, tokenizer.pad_token_id, padding_side="right", pad_to_multiple_of=pad_to_multiple_of)
    transform = make_transform(model)
    batch["pixel_values"] = torch.stack([transform(load_image(s.image)) for s in samples])
    return batch
