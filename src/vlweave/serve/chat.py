"""Multi-turn chat about one image or one video with a loaded checkpoint (used by ``vlweave chat``).

A video is answered training-free (Dense Connector §3.4 / FreeVA): ``num_frames`` frames sampled at segment
midpoints, each encoded as an image, max-pooled and concatenated into the single ``<image>`` slot.
"""

from __future__ import annotations

import torch

from vlweave.eval.vqa import check_prompt_lengths, stop_token_ids
from vlweave.language.routing import fixed_routing, route_batch, routing_pool
from vlweave.processing import IMAGE_TOKEN, load_image, make_transform
from vlweave.processor import VlweaveProcessor
from vlweave.serve.generation import Prompt, generate_batch
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
                 video: str | None = None, num_frames: int = 8, processor: VlweaveProcessor | None = None,
                 routing: str | None = None, routing_seed: int = 0) -> None:
        if image and video:
            raise ValueError("chat about an image or a video, not both")
        # Routed connectors (MoVA): each question is routed (the LM's routing pass, or a fixed mode) before it is
        # answered; the base tower's features are computed once for the session.
        self.pool = None
        self.routing, self.routing_seed = routing, routing_seed
        self.last_routing = None
        if routing is not None:
            if video:
                raise ValueError("--routing applies to an image chat, not a video")
            self.pool = routing_pool(model, routing)
        self.model, self.tokenizer = model.eval(), tokenizer
        self.processor = processor if processor is not None else VlweaveProcessor.from_model(model, tokenizer)
        self.max_new_tokens = max_new_tokens
        self.turns: list[dict[str, str]] = []
        self.image = None
        self.pixel_values = None
        self.pixel_values_videos = None
        self.num_visual_tokens = self.processor.num_image_tokens
        self.base_features = None
        if image:
            self.image = load_image(image)
            self.pixel_values = self.processor.pixel_values([self.image])
            if self.pool is not None:
                with torch.no_grad():
                    self.base_features = model.prepare_tower_features(BASE_TOWER, self.pixel_values[BASE_TOWER])
        if video:
            self.pixel_values_videos = load_video_tensor(model, video, num_frames, self.processor)
            self.num_visual_tokens = model.num_video_tokens(num_frames)

    @torch.no_grad()
    def ask(self, text: str, *, temperature: float = 0.0, top_p: float = 1.0,
            stop: list[str] | None = None) -> str:
        """The next answer (greedy unless ``temperature`` > 0), through the same generation function as the
        server (:func:`vlweave.serve.generation.generate_batch`)."""
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
        if self.base_features is not None:
            return self._ask_routed(text, ids)
        prompt = Prompt(input_ids=ids, image=self.image, texts=user_texts(self.turns),
                        max_new_tokens=self.max_new_tokens, temperature=temperature, top_p=top_p,
                        stop=list(stop or []), video=self.pixel_values_videos)
        (completion,) = generate_batch(self.model, self.processor, [prompt])
        answer = completion.text
        self.turns.append({"from": "gpt", "value": answer})
        return answer

    def _ask_routed(self, text: str, ids: list[int]) -> str:
        """Route this question (the LM's routing pass on the cached base features, or the fixed mode), then answer
        greedily with the chosen experts only (routed chat is greedy; the server routes a batch of requests the same
        way, serve/generation.py)."""
        if self.routing == "model":
            (decision,) = route_batch(self.model, self.processor, self.pool, [text], self.base_features,
                                      stop_ids=stop_token_ids(self.tokenizer))
        else:
            decision = fixed_routing(self.routing, self.pool, f"chat:{len(self.turns)}", self.routing_seed)
        self.last_routing = decision
        # Through the processor, so the context carries what it fills for the connector (texts, text-encoder ids).
        context = self.processor.collate([{"input_ids": ids}], [True], padding_side="left",
                                         texts=[user_texts(self.turns)], pixel_values=False)["context"]
        context.routing = [list(decision.bits)]
        rows = self.model.tower_rows(context)
        experts = {n: v for n, v in self.pixel_values.items()
                   if n != BASE_TOWER and (rows.get(n) is None or len(rows[n]))}
        out = self.model.generate(torch.tensor([ids]), vision_features={BASE_TOWER: self.base_features},
                                  pixel_values=experts or None, context=context,
                                  max_new_tokens=self.max_new_tokens, do_sample=False,
                                  eos_token_id=stop_token_ids(self.tokenizer), pad_token_id=self.processor.pad_token_id)
        answer = self.tokenizer.decode(out[0], skip_special_tokens=True).strip()
        self.turns.append({"from": "gpt", "value": answer})
        return answer


def user_texts(turns: list[dict[str, str]]) -> list[str]:
    """The user-turn texts of a conversation with the ``<image>`` tag removed (what the batch context carries)."""
    return [t["value"].replace(IMAGE_TOKEN, "").strip() for t in turns if t["from"] in ("human", "user")]
