"""Padding and collation of encoded samples into batch tensors.

Fixed shapes matter on CPU: with bf16 autocast every new sequence length pays a warm-up, so a batch can be padded
to a multiple of some length (a few buckets) or to one fixed ``max_length`` (a single shape for the whole run).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from vlweave.processing import IGNORE_INDEX

_SEQUENCE_KEYS = ("input_ids", "labels", "attention_mask")


def _as_list(value: Any, key: str, index: int) -> list[int]:
    if isinstance(value, torch.Tensor):
        if value.dim() != 1:
            raise ValueError(f"feature {index}: {key!r} must be 1-D, got shape {tuple(value.shape)}")
        return [int(v) for v in value.tolist()]
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        return [int(v) for v in value]
    raise ValueError(f"feature {index}: {key!r} must be a list of ints or a 1-D tensor, got {type(value).__name__}")


def _target_length(longest: int, pad_to_multiple_of: int | None, max_length: int | None) -> int:
    """The padded length: the longest sequence, rounded up to a multiple, or exactly ``max_length``."""
    if max_length is not None:
        if longest > max_length:
            raise ValueError(
                f"a sequence has {longest} tokens, more than max_length={max_length}; truncate when encoding "
                "(encode_conversation(max_length=...)) so the image tokens are checked"
            )
        return max_length
    if pad_to_multiple_of:
        return -(-longest // pad_to_multiple_of) * pad_to_multiple_of
    return longest


def _pad(rows: list[list[int]], length: int, value: int, side: str) -> torch.Tensor:
    out = torch.full((len(rows), length), value, dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            if side == "right":
                out[i, : len(row)] = torch.tensor(row, dtype=torch.long)
            else:
                out[i, length - len(row) :] = torch.tensor(row, dtype=torch.long)
    return out


def _collate_extra(values: list[Any]) -> Any:
    """Stack tensors of one shape; anything else (None, mixed shapes, numbers, strings) stays a list."""
    if values and all(isinstance(v, torch.Tensor) for v in values):
        shapes = {tuple(v.shape) for v in values}
        if len(shapes) == 1:
            return torch.stack(values)
    return list(values)


def pad_batch(
    features: list[dict],
    pad_token_id: int,
    *,
    padding_side: str = "right",
    pad_to_multiple_of: int | None = None,
    max_length: int | None = None,
) -> dict[str, Any]:
    """Pad ``input_ids`` (with ``pad_token_id``) and ``labels`` (with ``IGNORE_INDEX``); build ``attention_mask``.

    ``padding_side``: "right" for training, "left" for batched generation.  ``pad_to_multiple_of`` rounds the
    batch length up; ``max_length`` pads every batch to exactly that length (a longer sequence is an error, not a
    silent cut).  ``labels`` are returned when the features have them (all or none).  Other keys: tensors of equal
    shape are stacked (e.g. ``pixel_values`` -> ``[B, 3, S, S]``); other values are passed through as lists.
    """
    if not features:
        raise ValueError("pad_batch needs at least one feature")
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    if pad_to_multiple_of is not None and pad_to_multiple_of < 1:
        raise ValueError(f"pad_to_multiple_of must be >= 1, got {pad_to_multiple_of}")
    ids = [_as_list(f["input_ids"], "input_ids", i) for i, f in enumerate(features)]
    with_labels = ["labels" in f for f in features]
    if any(with_labels) and not all(with_labels):
        missing = [i for i, has in enumerate(with_labels) if not has]
        raise ValueError(f"features {missing} have no 'labels' but others do")
    length = _target_length(max(len(row) for row in ids), pad_to_multiple_of, max_length)
    batch: dict[str, Any] = {
        "input_ids": _pad(ids, length, pad_token_id, padding_side),
        "attention_mask": _pad([[1] * len(row) for row in ids], length, 0, padding_side),
    }
    if all(with_labels):
        labels = [_as_list(f["labels"], "labels", i) for i, f in enumerate(features)]
        for i, (row, lab) in enumerate(zip(ids, labels)):
            if len(row) != len(lab):
                raise ValueError(f"feature {i}: {len(row)} input_ids but {len(lab)} labels")
        batch["labels"] = _pad(labels, length, IGNORE_INDEX, padding_side)
    extra_keys = [k for k in dict.fromkeys(k for f in features for k in f) if k not in _SEQUENCE_KEYS]
    for key in extra_keys:
        batch[key] = _collate_extra([f.get(key) for f in features])
    return batch


__all__ = ["pad_batch"]
