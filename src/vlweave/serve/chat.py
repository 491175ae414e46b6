"""Multi-turn chat about one image with a loaded checkpoint (used by ``vlweave chat``)."""

from __future__ import annotations

from typing import Any

import torch

from vlweave.eval.vqa import stop_token_ids
from vlweave.processing import ImageTransform, encode_prompt
from vlweave.vision.cache import load_image


class ChatSession:
    """Keeps the conversation; the image (if any) is attached to the first user turn, as LLaVA does."""

    def __init__(self, model, tokenizer, image: str | None = None, max_new_tokens: int = 128) -> None:
        self.model, self.tokenizer = model.eval(), tokenizer
        self.max_new_tokens = max_new_tokens
        self.turns: list[dict[str, str]] = []
        self.pixel_values = None
        if image:
            c = model.config
            t = ImageTransform(model.facts.image_size, c.image_mean, c.image_std, aspect=c.image_aspect)
            self.pixel_values = t(load_image(image)).unsqueeze(0)

    @torch.no_grad()
    def ask(self, text: str, **generate_kwargs: Any) -> str:
        first = not self.turns
        value = ("<image>\n" + text) if (first and self.pixel_values is not None) else text
        self.turns.append({"from": "human", "value": value})
        cfg = self.model.config
        ids = encode_prompt(self.turns, self.tokenizer, cfg.chat_template_name,
                            image_token_id=cfg.image_token_id if self.pixel_values is not None else None,
                            num_image_tokens=self.model.num_image_tokens, system_prompt=cfg.system_prompt,
                            sample_id="chat")
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        out = self.model.generate(torch.tensor([ids]), pixel_values=self.pixel_values,
                                  max_new_tokens=self.max_new_tokens, do_sample=False,
                                  eos_token_id=stop_token_ids(self.tokenizer), pad_token_id=pad, **generate_kwargs)
        answer = self.tokenizer.decode(out[0], skip_special_tokens=True).strip()
        self.turns.append({"from": "gpt", "value": answer})
        return answer
