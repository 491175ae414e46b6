"""Multi-turn chat about one image or one video with a loaded checkpoint (used by ``vlweave chat``).

A video is answered training-free (Dense Connector §3.4 / FreeVA): ``num_frames`` frames sampled at segment
midpoints, each encoded as an image, max-pooled and concatenated into the single ``<image>`` slot.
"""

from __future__ import annotations

from typing import Any

import torch

from vlweave.eval.vqa import check_prompt_lengths, stop_token_ids
from vlweave.processing import load_image, make_transform
from vlweave.processor import VlweaveProcessor
from vlweave.vision.towers import BASE_TOWER


def load_video_tensor(model, path: str, num_frames: int = 8,
                      processor: VlweaveProcessor | None = None) -> torch.Tensor:
    """[1, T, 3, H, W] frames of a video file, each processed exactly like an image by the base tower's transform
    (the processor's when given)."""
    from vlweave.data.video import read_video_frames

    model.check_video_fits(num_frames)
    if processor is None:
        transform = make_transform(model)
    elif BASE_TOWER in processor.transforms:
        transform = processor.transforms[BASE_TOWER]
    else:
        raise ValueError(f"video frames go through the {BASE_TOWER!r} tower, which this connector does not read "
                         f"(it reads {processor.needed_towers})")
    return torch.stack([transform(f) for f in read_video_frames(path, num_frames)]).unsqueeze(0)


class ChatSession:
    """Keeps the conversation; the image or video (if any) is attached to the first user turn, as LLaVA does.
    Prompts and pixels come from ``processor`` (the checkpoint's, ``builder.load_processor``; by default one made
    from ``model`` and ``tokenizer``)."""

    def __init__(self, model, tokenizer, image: str | None = None, max_new_tokens: int = 128,
                 video: str | None = None, num_frames: int = 8, processor: VlweaveProcessor | None = None) -> None:
        if image and video:
            raise ValueError("chat about an image or a video, not both")
        self.model, self.tokenizer = model.eval(), tokenizer
        self.processor = processor if processor is not None else VlweaveProcessor.from_model(model, tokenizer)
        self.max_new_tokens = max_new_tokens
        self.turns: list[dict[str, str]] = []
        self.pixel_values = None
        self.pixel_values_videos = None
        self.num_visual_tokens = self.processor.num_image_tokens
        if image:
            self.pixel_values = self.processor.pixel_values([load_image(image)])
        if video:
            self.pixel_values_videos = load_video_tensor(model, video, num_frames, self.processor)
            self.num_visual_tokens = model.num_video_tokens(num_frames)

    @torch.no_grad()
    def ask(self, text: str, **generate_kwargs: Any) -> str:
        first = not self.turns
        visual = self.pixel_values is not None or self.pixel_values_videos is not None
        value = ("<image>\n" + text) if (first and visual) else text
        self.turns.append({"from": "human", "value": value})
        try:
            ids = self.processor.encode_prompt(self.turns, has_image=visual, num_image_tokens=self.num_visual_tokens,
                                               sample_id="chat")
            check_prompt_lengths(self.model, [(f"chat turn {len(self.turns) // 2 + 1}", len(ids))],
                                 self.max_new_tokens)
        except ValueError:
            self.turns.pop()  # the refused turn is not part of the conversation
            raise
        pad = self.processor.pad_token_id
        out = self.model.generate(torch.tensor([ids]), pixel_values=self.pixel_values,
                                  pixel_values_videos=self.pixel_values_videos,
                                  max_new_tokens=self.max_new_tokens, do_sample=False,
                                  eos_token_id=stop_token_ids(self.tokenizer), pad_token_id=pad, **generate_kwargs)
        answer = self.tokenizer.decode(out[0], skip_special_tokens=True).strip()
        self.turns.append({"from": "gpt", "value": answer})
        return answer
