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


def _supervised_end(ids: list[int], labels: list[int], image_token_id: int | None) -> int:
    """Length of a sequence cut right after its last supervised label, but never before an image placeholder
    (the image count must still match the images); the whole length if nothing is supervised."""
    keep = [i for i, lab in enumerate(labels) if lab != IGNORE_INDEX]
    if not keep:
        return len(ids)
    end = keep[-1] + 1
    if image_token_id is not None:
        images = [i for i, t in enumerate(ids) if t == image_token_id]
        if images:
            end = max(end, images[-1] + 1)
    return end


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
    trim_unsupervised_tail: bool = False,
    image_token_id: int | None = None,
) -> dict[str, Any]:
    """Pad ``input_ids`` (with ``pad_token_id``) and ``labels`` (with ``IGNORE_INDEX``); build ``attention_mask``.

    ``padding_side``: "right" for training, "left" for batched generation.  ``pad_to_multiple_of`` rounds the
    batch length up; ``max_length`` pads every batch to exactly that length (a longer sequence is an error, not a
    silent cut).  ``trim_unsupervised_tail`` (training only) first drops the tokens after each sequence's last
    supervised label (e.g. the newline a chat template puts after the final end-of-turn): under causal attention
    they cannot change the loss, yet they cost as much as any token; image placeholders (``image_token_id``) are
    never cut.  ``labels`` are returned when the features have them (all or none).  Other keys: tensors of equal
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
    labels = [_as_list(f["labels"], "labels", i) for i, f in enumerate(features)] if all(with_labels) else None
    if labels is not None:
        for i, (row, lab) in enumerate(zip(ids, labels)):
            if len(row) != len(lab):
                raise ValueError(f"feature {i}: {len(row)} input_ids but {len(lab)} labels")
        if trim_unsupervised_tail:
            ends = [_supervised_end(row, lab, image_token_id) for row, lab in zip(ids, labels)]
            ids = [row[:end] for row, end in zip(ids, ends)]
            labels = [lab[:end] for lab, end in zip(labels, ends)]
    elif trim_unsupervised_tail:
        raise ValueError("trim_unsupervised_tail needs labels")
    length = _target_length(max(len(row) for row in ids), pad_to_multiple_of, max_length)
    batch: dict[str, Any] = {
        "input_ids": _pad(ids, length, pad_token_id, padding_side),
        "attention_mask": _pad([[1] * len(row) for row in ids], length, 0, padding_side),
    }
    if labels is not None:
        batch["labels"] = _pad(labels, length, IGNORE_INDEX, padding_side)
    extra_keys = [k for k in dict.fromkeys(k for f in features for k in f) if k not in _SEQUENCE_KEYS]
    for key in extra_keys:
        batch[key] = _collate_extra([f.get(key) for f in features])
    return batch


__all__ = ["pad_batch"]
