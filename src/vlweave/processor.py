"""``VlweaveProcessor``: tokenizer + per-tower image transforms + chat template + ``<image>`` expansion, as one
object that is saved with every checkpoint and loads without a model (HF ``LlavaProcessor``'s role).

What it holds (all config facts, computed once at build time and saved in ``processor_config.json``):

* the tokenizer (saved beside it, as HF processors do);
* ``tower_transforms``: ``{tower: {"image_size", "image_mean", "image_std", "aspect"}}`` for the towers the
  connector needs, in config order (``needed_towers``); towers the connector does not read get no pixels;
* ``num_image_tokens``: the connector's visual tokens per image (``<image>`` is expanded to that many ids);
* ``image_token`` / ``image_token_id``, ``chat_template_name`` and ``system_prompt``.

So ``input_ids`` are produced from the saved folder alone, exactly as :func:`vlweave.processing.encode_conversation`
and :func:`vlweave.processing.encode_prompt` produce them (the processor calls them; it adds no tokenization of its
own), and ``pixel_values`` are keyed by tower name.

Calling it (HF style)::

    batch = processor(text=["What colour?", "Say hi."], images=[image, None])   # generation: left padding
    batch = processor(text=[conversation], images=[image])                      # training: labels, right padding
    model.generate(**batch) / model(**batch)

``text`` entries are user messages (strings) or LLaVA conversations (``[{"from": "human"|"gpt", "value": ...}]``);
conversations ending with a ``gpt`` turn are training samples (``labels``), the rest generation prompts.
``images`` has one entry per row (``None`` for a text-only row); the batch's ``context``
(:class:`~vlweave.context.VlweaveContext`) then says which row each stacked image belongs to.

Why a :class:`~transformers.ProcessorMixin` subclass: with the tokenizer as its one sub-processor and the rest as
plain JSON init arguments, HF's own ``save_pretrained``/``from_pretrained``/``AutoProcessor`` machinery works
unchanged (``processor_config.json`` + the tokenizer files).  The image transforms are not HF image processors (they
are :class:`~vlweave.processing.ImageTransform`, one per tower), so they live in the processor's config instead of
as an ``image_processor`` sub-processor.  A folder with no ``processor_config.json`` but a vlweave ``config.json``
(a checkpoint saved before processors existed) gets a processor built from that config and its tokenizer.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import AutoProcessor, AutoTokenizer, ProcessorMixin

from vlweave.connectors import build_connector
from vlweave.connectors.base import TextInput
from vlweave.context import VlweaveContext
from vlweave.data.collate import pad_batch
from vlweave.modeling import VlweaveConfig, connector_spec_for
from vlweave.processing import (
    IMAGE_TOKEN,
    ImageTransform,
    encode_conversation,
    encode_prompt,
    image_transforms,
    pixels_by_tower,
    tower_transform,
)

PROCESSOR_CONFIG = "processor_config.json"  # transformers' PROCESSOR_NAME
TEXT_TOKENIZER_DIR = "text_encoder_tokenizer"  # a connector's own text encoder's tokenizer, beside the LM's


def transform_to_dict(transform: ImageTransform) -> dict[str, Any]:
    return {"image_size": transform.image_size, "image_mean": list(transform.mean), "image_std": list(transform.std),
            "aspect": transform.aspect}


def transform_from_dict(data: Mapping[str, Any]) -> ImageTransform:
    return ImageTransform(int(data["image_size"]), data["image_mean"], data["image_std"],
                          aspect=data.get("aspect", "pad"))


def connector_facts(config: VlweaveConfig) -> tuple[list[str], int]:
    """``(needed towers in config order, visual tokens per image)`` from a ``VlweaveConfig`` alone: the connector
    is built on the meta device (no memory, no weights) just to ask it."""
    needed, num_tokens, _ = _connector_facts(config)
    return needed, num_tokens


def _connector_facts(config: VlweaveConfig) -> tuple[list[str], int, TextInput | None]:
    spec = connector_spec_for(config)
    with torch.device("meta"):
        connector = build_connector(config.connector_type, spec)
    wanted = connector.tower_layers()
    return [n for n in spec.towers if n in wanted], int(connector.num_tokens()), connector.text_input()


def load_text_tokenizer(text_input: TextInput | None):
    """The tokenizer of a connector's own text encoder (``source: encoder``), right-truncating; else None."""
    if text_input is None or text_input.source != "encoder":
        return None
    try:
        tok = AutoTokenizer.from_pretrained(text_input.tokenizer_path)
    except Exception as err:  # noqa: BLE001
        raise ValueError(f"the connector's text encoder tokenizer at {text_input.tokenizer_path!r} could not be "
                         f"loaded: {err}") from None
    tok.truncation_side = "right"
    return tok


class VlweaveBatch(dict):
    """A processor's output: ``input_ids``, ``attention_mask``, (``labels``), (``pixel_values`` by tower) and
    ``context``; ``model(**batch)`` / ``model.generate(**batch)`` take it as is.  ``to(device)`` moves every tensor,
    the per-tower pixels and the context."""

    def to(self, device: torch.device | str) -> "VlweaveBatch":
        for key, value in self.items():
            if isinstance(value, torch.Tensor):
                self[key] = value.to(device)
            elif isinstance(value, dict):
                self[key] = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in value.items()}
            elif isinstance(value, VlweaveContext):
                value.to(device)
        return self


class VlweaveProcessor(ProcessorMixin):
    """See the module docstring.  Build it with :meth:`from_model`, :meth:`from_config` or :meth:`from_pretrained`
    rather than by hand."""

    def __init__(
        self,
        tokenizer=None,
        tower_transforms: dict[str, dict[str, Any]] | None = None,
        num_image_tokens: int | None = None,
        image_token_id: int | None = None,
        image_token: str = IMAGE_TOKEN,
        chat_template_name: str = "tokenizer",
        system_prompt: str | None = None,
        needed_towers: list[str] | None = None,
        chat_template: str | None = None,
        text_input: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        if tokenizer is None:
            raise ValueError("VlweaveProcessor needs a tokenizer")
        if not tower_transforms or num_image_tokens is None:
            raise ValueError("VlweaveProcessor needs tower_transforms and num_image_tokens (config facts); build it "
                             "with VlweaveProcessor.from_model(model, tokenizer) or from_config(config, tokenizer)")
        self.tower_transforms = {name: dict(t) for name, t in tower_transforms.items()}
        self.needed_towers = list(needed_towers) if needed_towers is not None else list(self.tower_transforms)
        if self.needed_towers != list(self.tower_transforms):
            raise ValueError(f"needed_towers {self.needed_towers} must name the tower_transforms in order "
                             f"({list(self.tower_transforms)})")
        self.num_image_tokens = int(num_image_tokens)
        if self.num_image_tokens < 1:
            raise ValueError(f"num_image_tokens must be >= 1, got {self.num_image_tokens}")
        self.image_token = image_token
        found = tokenizer.convert_tokens_to_ids(image_token)
        if image_token_id is None:
            image_token_id = found
        if found != image_token_id:
            raise ValueError(f"image token {image_token!r} is id {found} in this tokenizer, but the processor says "
                             f"{image_token_id}; call vlweave.processing.add_image_token(tokenizer) before building")
        self.image_token_id = int(image_token_id)
        self.chat_template_name = chat_template_name
        self.system_prompt = system_prompt
        # The live transforms (not saved: tower_transforms is their JSON form).
        self.transforms: dict[str, ImageTransform] = {n: transform_from_dict(t)
                                                      for n, t in self.tower_transforms.items()}
        # What the connector reads as text ids (context.text_input_ids), as plain JSON; None: no text.  A
        # connector's own encoder's tokenizer comes as the ``text_tokenizer`` keyword (not saved in the JSON: it
        # is saved beside the LM's tokenizer, in TEXT_TOKENIZER_DIR).
        self.text_input = dict(text_input) if text_input is not None else None
        spec = self.text_input_spec
        text_tokenizer = kwargs.pop("text_tokenizer", None)
        if spec is not None and spec.source == "encoder" and text_tokenizer is None:
            raise ValueError("VlweaveProcessor: the connector reads text with its own encoder; give its tokenizer "
                             "(text_tokenizer=...) or build the processor with from_model/from_config/from_pretrained")
        self._text_tokenizer = text_tokenizer
        super().__init__(tokenizer, chat_template=chat_template, **kwargs)

    # ---- construction --------------------------------------------------------------------------------------
    @classmethod
    def from_model(cls, model: Any, tokenizer: Any) -> "VlweaveProcessor":
        """The processor of a built :class:`~vlweave.modeling.VlweaveForConditionalGeneration` and its tokenizer."""
        cfg = model.config
        transforms = {n: transform_to_dict(tower_transform(model.tower_specs[n])) for n in model.needed_towers()}
        text = model.connector.text_input()
        return cls(tokenizer, tower_transforms=transforms, num_image_tokens=model.num_image_tokens,
                   image_token_id=cfg.image_token_id, chat_template_name=cfg.chat_template_name,
                   system_prompt=cfg.system_prompt, needed_towers=list(transforms),
                   text_input=None if text is None else text.to_dict(), text_tokenizer=load_text_tokenizer(text))

    @classmethod
    def from_config(cls, config: VlweaveConfig, tokenizer: Any) -> "VlweaveProcessor":
        """The processor of a ``VlweaveConfig`` + tokenizer, without weights (checkpoints saved before processors)."""
        needed, num_tokens, text = _connector_facts(config)
        transforms = {n: transform_to_dict(t) for n, t in image_transforms(config, needed).items()}
        return cls(tokenizer, tower_transforms=transforms, num_image_tokens=num_tokens,
                   image_token_id=config.image_token_id, chat_template_name=config.chat_template_name,
                   system_prompt=config.system_prompt, needed_towers=needed,
                   text_input=None if text is None else text.to_dict(), text_tokenizer=load_text_tokenizer(text))

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, tokenizer: Any = None,
                        **kwargs: Any) -> "VlweaveProcessor":
        """A saved processor (``processor_config.json`` + tokenizer); for a vlweave checkpoint without one, the
        processor built from its ``config.json`` and tokenizer (:meth:`from_config`).  ``tokenizer``: use this
        already loaded tokenizer instead of loading the folder's again."""
        folder = Path(pretrained_model_name_or_path)
        if folder.is_dir() and not (folder / PROCESSOR_CONFIG).exists() and (folder / "config.json").exists():
            model_type = json.loads((folder / "config.json").read_text()).get("model_type")
            if model_type != VlweaveConfig.model_type:
                raise ValueError(f"{folder}: no {PROCESSOR_CONFIG}, and config.json has model_type {model_type!r}, "
                                 f"not {VlweaveConfig.model_type!r}")
            return cls.from_config(VlweaveConfig.from_pretrained(folder),
                                   tokenizer if tokenizer is not None else AutoTokenizer.from_pretrained(folder))
        saved_text = None
        if (folder / PROCESSOR_CONFIG).exists():
            saved_text = json.loads((folder / PROCESSOR_CONFIG).read_text()).get("text_input")
        own_text = saved_text is not None and saved_text.get("source") == "encoder"
        if (tokenizer is not None or own_text) and (folder / PROCESSOR_CONFIG).exists():
            saved = json.loads((folder / PROCESSOR_CONFIG).read_text())
            for key in ("processor_class", "auto_map"):
                saved.pop(key, None)
            if tokenizer is None:
                tokenizer = AutoTokenizer.from_pretrained(folder)
            if own_text:
                sub = folder / TEXT_TOKENIZER_DIR
                if not sub.is_dir():
                    raise FileNotFoundError(f"{folder}: the processor reads text with the connector's encoder but "
                                            f"{TEXT_TOKENIZER_DIR}/ (its tokenizer) is missing")
                text_tok = AutoTokenizer.from_pretrained(sub)
                text_tok.truncation_side = "right"
                saved["text_tokenizer"] = text_tok
            return cls(tokenizer, **saved)
        kwargs.pop("trust_remote_code", None)
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    def save_pretrained(self, save_directory: str | Path, *args: Any, **kwargs: Any) -> Any:
        """HF's save (``processor_config.json`` + the tokenizer), plus the connector's text encoder tokenizer."""
        out = super().save_pretrained(save_directory, *args, **kwargs)
        if self._text_tokenizer is not None:
            self._text_tokenizer.save_pretrained(Path(save_directory) / TEXT_TOKENIZER_DIR)
        return out

    # ---- text ----------------------------------------------------------------------------------------------
    @property
    def text_input_spec(self) -> TextInput | None:
        if self.text_input is None:
            return None
        own = self.text_input.get("source") == "encoder"  # its tokenizer is self._text_tokenizer (saved beside)
        return TextInput(**{k: v for k, v in self.text_input.items() if k != "tokenizer_path"},
                         tokenizer_path=TEXT_TOKENIZER_DIR if own else None)

    @property
    def text_tokenizer(self):
        """The tokenizer the connector's text ids come from (its own encoder's, or the LM's); None: no text."""
        spec = self.text_input_spec
        if spec is None:
            return None
        return self._text_tokenizer if spec.source == "encoder" else self.tokenizer

    def text_ids(self, texts: Sequence[Sequence[str]] | None,
                 spec: TextInput | None = None) -> list[list[int]] | None:
        """Per sample, the ids of its user-turn texts as the connector reads them (``context.text_input_ids``);
        None when the connector reads no text.  ``spec`` overrides the saved one (the trainer asks the live
        connector)."""
        spec = spec if spec is not None else self.text_input_spec
        if spec is None or texts is None:
            return None
        tok = self._text_tokenizer if spec.source == "encoder" else self.tokenizer
        if tok is None:
            raise ValueError("the connector reads text with its own encoder, but this processor has no tokenizer "
                             "for it")
        out = []
        for sample in texts:
            kwargs: dict[str, Any] = {"add_special_tokens": spec.add_special_tokens}
            if spec.max_length is not None:
                kwargs.update(truncation=True, max_length=spec.max_length)
            out.append(list(tok(spec.format(list(sample)), **kwargs)["input_ids"]))
        return out

    @property
    def pad_token_id(self) -> int:
        tok = self.tokenizer
        return tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    def _system(self, system_prompt: str | None) -> str | None:
        return self.system_prompt if system_prompt is None else system_prompt

    def encode_conversation(self, conversations: list[dict], *, has_image: bool, template: str | None = None,
                            system_prompt: str | None = None, max_length: int | None = None,
                            sample_id: str = "?", num_image_tokens: int | None = None) -> dict[str, list[int]]:
        """A training sample's ``{"input_ids", "labels"}`` (:func:`vlweave.processing.encode_conversation` with this
        processor's image token, token count, template and system prompt unless overridden; ``num_image_tokens``:
        e.g. a MoVA routing instruction's ``num_routing_tokens``)."""
        return encode_conversation(conversations, self.tokenizer, template or self.chat_template_name,
                                   image_token_id=self.image_token_id if has_image else None,
                                   num_image_tokens=self.num_image_tokens if num_image_tokens is None
                                   else num_image_tokens, system_prompt=self._system(system_prompt),
                                   max_length=max_length, sample_id=sample_id)

    def encode_prompt(self, conversations: list[dict], *, has_image: bool, template: str | None = None,
                      system_prompt: str | None = None, num_image_tokens: int | None = None,
                      sample_id: str = "?") -> list[int]:
        """A generation prompt's ids (:func:`vlweave.processing.encode_prompt`).  ``num_image_tokens`` overrides
        the per-image count (a video fills the one ``<image>`` slot with ``frames x pooled tokens``)."""
        return encode_prompt(conversations, self.tokenizer, template or self.chat_template_name,
                             image_token_id=self.image_token_id if has_image else None,
                             num_image_tokens=self.num_image_tokens if num_image_tokens is None else num_image_tokens,
                             system_prompt=self._system(system_prompt), sample_id=sample_id)

    def encode_question(self, text: str, has_image: bool, *, template: str | None = None,
                        system_prompt: str | None = None, sample_id: str = "?") -> list[int]:
        """One question's generation prompt: ``<image>\\n`` in front of the text when there is an image."""
        conv = [{"from": "human", "value": (IMAGE_TOKEN + "\n" + text) if has_image else text}]
        return self.encode_prompt(conv, has_image=has_image, template=template, system_prompt=system_prompt,
                                  sample_id=sample_id)

    # ---- images --------------------------------------------------------------------------------------------
    def pixel_values(self, images: Sequence[Any]) -> dict[str, torch.Tensor]:
        """``{tower: FloatTensor [N, 3, S, S]}`` for the towers the connector needs, each through its own transform.
        ``images``: paths or PIL images (each opened once)."""
        return pixels_by_tower(self.transforms, images)

    # ---- batches -------------------------------------------------------------------------------------------
    def collate(self, encoded: Sequence[Mapping[str, Any]], images: Sequence[Any] | None = None, *,
                padding_side: str, texts: Sequence[Sequence[str]] | None = None,
                pad_to_multiple_of: int | None = None, trim_unsupervised_tail: bool = False,
                pixel_values: bool = True) -> VlweaveBatch:
        """Pad encoded rows (``{"input_ids"[, "labels"]}``) into a batch with the pixels of the rows that have an
        image (``images[i]`` is row ``i``'s, ``None`` for none) and the batch context.  ``pixel_values=False``:
        the context only (the caller feeds cached features for those images)."""
        rows = [{k: e[k] for k in ("input_ids", "labels") if k in e} for e in encoded]
        images = list(images) if images is not None else [None] * len(rows)
        if len(images) != len(rows):
            raise ValueError(f"{len(images)} image entries for {len(rows)} rows; give one per row (None for none)")
        batch = VlweaveBatch(pad_batch(rows, self.pad_token_id, padding_side=padding_side,
                                       pad_to_multiple_of=pad_to_multiple_of,
                                       trim_unsupervised_tail=trim_unsupervised_tail,
                                       image_token_id=self.image_token_id))
        has_image = [im is not None for im in images]
        present = [im for im in images if im is not None]
        if present and pixel_values:
            batch["pixel_values"] = self.pixel_values(present)
        batch["context"] = VlweaveContext.for_batch(has_image, texts=texts, text_input_ids=self.text_ids(texts))
        return batch

    def __call__(self, images: Any = None, text: Any = None, *, padding_side: str | None = None,
                 pad_to_multiple_of: int | None = None, max_length: int | None = None, template: str | None = None,
                 system_prompt: str | None = None, **kwargs: Any) -> VlweaveBatch:
        """Encode a batch (see the module docstring): ``text`` -- a string, a conversation, or a list of either;
        ``images`` -- one entry per row (``None`` for a text-only row), or a single image for a single row.

        Generation prompts are left-padded, training samples (conversations ending with a ``gpt`` turn, which get
        ``labels``) right-padded, unless ``padding_side`` says otherwise.  A row with an image but no ``<image>``
        tag gets one in front of its first user turn (as the LLaVA loader does)."""
        if kwargs:
            raise TypeError(f"VlweaveProcessor: unexpected arguments {sorted(kwargs)}")
        if text is None:
            raise ValueError("VlweaveProcessor needs text (a string, a conversation, or a list of them)")
        single = isinstance(text, str) or (isinstance(text, list) and bool(text) and isinstance(text[0], dict))
        rows = [text] if single else list(text)
        if images is None:
            row_images: list[Any] = [None] * len(rows)
        elif single and not isinstance(images, (list, tuple)):
            row_images = [images]
        else:
            row_images = list(images)
        if len(row_images) != len(rows):
            raise ValueError(f"{len(row_images)} image entries for {len(rows)} texts; give one per row (None for a "
                             "text-only row)")
        convs = [_as_conversation(r, im is not None) for r, im in zip(rows, row_images)]
        training = [_is_training(c) for c in convs]
        if any(training) and not all(training):
            raise ValueError("a batch mixes training conversations (ending with a gpt turn) and generation prompts")
        texts = [[t["value"].replace(IMAGE_TOKEN, "").strip() for t in c if t["from"] in ("human", "user")]
                 for c in convs]
        if all(training):
            encoded = [self.encode_conversation(c, has_image=im is not None, template=template,
                                                system_prompt=system_prompt, max_length=max_length,
                                                sample_id=str(i))
                       for i, (c, im) in enumerate(zip(convs, row_images))]
        else:
            encoded = [{"input_ids": self.encode_prompt(c, has_image=im is not None, template=template,
                                                        system_prompt=system_prompt, sample_id=str(i))}
                       for i, (c, im) in enumerate(zip(convs, row_images))]
        side = padding_side or ("right" if all(training) else "left")
        return self.collate(encoded, row_images, padding_side=side, texts=texts,
                            pad_to_multiple_of=pad_to_multiple_of)

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "pixel_values", "context"]


def _as_conversation(row: Any, has_image: bool) -> list[dict]:
    """A row of ``text`` as LLaVA turns; with an image and no ``<image>`` tag, the tag goes in front."""
    if isinstance(row, str):
        conv = [{"from": "human", "value": row}]
    elif isinstance(row, list) and all(isinstance(t, dict) for t in row):
        conv = [{"from": t.get("from", t.get("role")), "value": t.get("value", t.get("content"))} for t in row]
    else:
        raise TypeError(f"VlweaveProcessor: a text entry must be a string or a list of turns, got {type(row).__name__}")
    if has_image and not any(isinstance(t["value"], str) and IMAGE_TOKEN in t["value"] for t in conv):
        conv[0] = {**conv[0], "value": f"{IMAGE_TOKEN}\n{conv[0]['value']}"}
    return conv


def _is_training(conv: list[dict]) -> bool:
    return str(conv[-1]["from"]).lower() in ("gpt", "assistant")


try:
    AutoProcessor.register(VlweaveConfig, VlweaveProcessor)
except ValueError:
    pass  # already registered (module reloaded)


__all__ = ["VlweaveBatch", "VlweaveProcessor", "connector_facts", "load_text_tokenizer", "transform_from_dict",
           "transform_to_dict"]
