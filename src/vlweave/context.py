"""The typed per-batch context: what a context-aware connector or LM-side module may read besides the pixels.

Built by the collator (training) or the prompt batcher (evaluation, chat), passed through
``forward``/``embed_inputs``/``generate`` and handed to the connector.  Plain projectors ignore it; MoVA's gating
reads the question text, HyperLLaVA's experts read the guidance computed inside the model.

``image_rows`` is what makes mixed batches right: images are stacked only for the samples that have one, so the
``k``-th image belongs to batch row ``image_rows[k]`` (not to row ``k``).  ``guidance`` is the one slot written
inside the model: prefill hooks (``VlweaveForConditionalGeneration.register_prefill_hook``) store per-sample state
there once per full-sequence forward; during generation the same context object is passed to every cached decode
step, so that state lives exactly as long as the KV cache.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class VlweaveContext:
    image_rows: torch.Tensor | None = None  # [N_images] long: the batch row of each image, in ``<image>`` slot order
    texts: list[list[str]] | None = None  # per sample: its user-turn text segments (the ``<image>`` tag removed)
    text_input_ids: list[list[int]] | None = None  # per sample: a declared text encoder's token ids
    routing: list[Any] | None = None  # per image: routing bits read from the data (record field ``routing``)
    guidance: dict[str, Any] = field(default_factory=dict)  # written inside the model (prefill hooks)
    # [B, L] bool: the prompt's tokens of the running forward -- the attended tokens before each row's first
    # supervised label.  Set by the model's forward when labels are given (training), so that guidance pooled
    # "over the prompt" sees in training exactly what generation sees at prefill; None = every attended token.
    prompt_mask: torch.Tensor | None = None
    # MoVA's coarse routing pass (language/routing.py): the connector runs with every routing bit 0 and emits its
    # pooled routing-pass tokens; towers it does not read in that pass are given no rows (Connector.tower_rows).
    routing_pass: bool = False

    @classmethod
    def for_batch(cls, has_image: Sequence[bool], texts: Sequence[Sequence[str]] | None = None,
                  routing: Sequence[Any] | None = None,
                  text_input_ids: Sequence[Sequence[int]] | None = None,
                  routing_pass: bool = False) -> "VlweaveContext":
        """A context for a batch whose row ``i`` has an image iff ``has_image[i]``; ``routing`` is per *sample*
        (one entry per row) and is kept for the rows with an image."""
        rows = [i for i, h in enumerate(has_image) if h]
        if texts is not None and len(texts) != len(has_image):
            raise ValueError(f"context: {len(texts)} text entries for a batch of {len(has_image)}")
        if routing is not None and len(routing) != len(has_image):
            raise ValueError(f"context: {len(routing)} routing entries for a batch of {len(has_image)}")
        return cls(
            image_rows=torch.tensor(rows, dtype=torch.long),
            texts=None if texts is None else [list(t) for t in texts],
            text_input_ids=None if text_input_ids is None else [list(t) for t in text_input_ids],
            routing=None if routing is None else [routing[i] for i in rows],
            routing_pass=routing_pass,
        )

    @property
    def num_images(self) -> int | None:
        return None if self.image_rows is None else int(self.image_rows.numel())

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "VlweaveContext":
        """Move the tensors (accelerate's ``send_to_device`` calls this); returns ``self``."""
        if self.image_rows is not None:
            self.image_rows = self.image_rows.to(device, non_blocking=non_blocking)
        if self.prompt_mask is not None:
            self.prompt_mask = self.prompt_mask.to(device, non_blocking=non_blocking)
        return self

    def check(self, batch_size: int, num_images: int) -> None:
        """Raise a clear error when the context does not describe a batch of this size and image count."""
        if self.image_rows is not None:
            if int(self.image_rows.numel()) != num_images:
                raise ValueError(f"context lists {int(self.image_rows.numel())} image(s), the batch has {num_images}")
            if num_images and (int(self.image_rows.min()) < 0 or int(self.image_rows.max()) >= batch_size):
                raise ValueError(f"context image_rows {self.image_rows.tolist()} out of range for batch {batch_size}")
        if self.texts is not None and len(self.texts) != batch_size:
            raise ValueError(f"context has {len(self.texts)} text entries for a batch of {batch_size}")


__all__ = ["VlweaveContext"]
