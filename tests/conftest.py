"""Shared test fixtures.

Tokenizers are built in-process from tiny vocabularies, so no test needs the Hugging Face hub:

* ``llama_tokenizer`` -- SentencePiece-style (Unigram + Metaspace, ``prepend_scheme="first"`` like current
  Llama fast tokenizers), BOS ``<s>`` added by default, EOS ``</s>``, UNK ``<unk>``.  Its vocabulary is explicit
  (``LLAMA_PIECES``), so expected ids can be written down by hand: id = 3 + index in ``LLAMA_PIECES``.
* ``llama_legacy_tokenizer`` -- the same pieces with Llama's *legacy* behaviour (a normalizer that prepends "▁"
  to every text piece, so also right after special tokens such as ``</s>``).
* ``chatml_tokenizer`` -- byte-level BPE (GPT-2 pre-tokenisation) with ``<|endoftext|>``, ``<|im_start|>``,
  ``<|im_end|>`` and SmolLM2's ChatML ``chat_template`` (it injects a default system prompt).
* ``qwen_tokenizer`` -- the same BPE with a Qwen2-style template (default "You are a helpful assistant.").
* ``smollm2_tokenizer`` -- the real SmolLM2-135M-Instruct tokenizer from the offline asset cache (skip if absent).

Fixtures are session-scoped and callers must not mutate them: tests that add tokens use ``copy.deepcopy``.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

QWEN2_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}"
    "{%- else %}{{- '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{%- endif %}"
    "{%- for message in messages %}{%- if message.role == 'system' and loop.first %}{%- else %}"
    "{{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
)

# Whole-word pieces of the tiny Llama-style vocabulary (ids 3, 4, ...; 0-2 are <unk>, <s>, </s>).
LLAMA_PIECES: list[str] = [
    "▁A", "▁chat", "▁between", "▁a", "▁curious", "▁user", "▁and", "▁an", "▁artificial", "▁intelligence",
    "▁assistant", "▁The", "▁gives", "▁helpful", "▁detailed", "▁polite", "▁answers", "▁to", "▁the", "'s",
    "▁questions", "▁USER", "USER", "▁ASSISTANT", ":", ".", ",", "?", "\n", "▁What", "What", "▁is", "▁this",
    "▁cat", "▁color", "▁It", "▁red", "▁", "▁Describe", "▁image", "▁dog",
]
_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789'!-"

LLAMA_SPECIALS = ["<unk>", "<s>", "</s>"]


def llama_id(piece: str) -> int:
    """Id of a piece of the tiny Llama-style vocabulary."""
    if piece in LLAMA_SPECIALS:
        return LLAMA_SPECIALS.index(piece)
    return len(LLAMA_SPECIALS) + LLAMA_PIECES.index(piece)


def make_unigram_tokenizer(
    pieces: list[str] = LLAMA_PIECES,
    *,
    style: str = "first",
    extra: dict[str, float] | None = None,
    chat_template: str | None = None,
    specials: list[str] = LLAMA_SPECIALS,
    bos: str | None = "<s>",
    eos: str = "</s>",
    unk: str = "<unk>",
) -> PreTrainedTokenizerFast:
    """A SentencePiece-like Unigram tokenizer with an explicit vocabulary (whole words beat characters).

    ``style``: "first" (Metaspace pre-tokenizer, "▁" only at the start of the input), "legacy" (normalizer adds
    "▁" to every text piece, as old Llama tokenizers do after special tokens) or "nosplit" (Metaspace without
    splitting on spaces, so ``extra`` pieces may span words -- used to build a tokenizer that breaks masks).
    """
    vocab = [(s, 0.0) for s in specials] + [(p, -1.0) for p in pieces]
    vocab += [(p, score) for p, score in (extra or {}).items()]
    known = {p for p, _ in vocab}
    vocab += [(c, -10.0) for c in _CHARS if c not in known]
    tok = Tokenizer(models.Unigram(vocab, unk_id=specials.index(unk), byte_fallback=False))
    if style == "legacy":
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        tok.decoder = decoders.Sequence(
            [decoders.Replace("▁", " "), decoders.Fuse(), decoders.Strip(content=" ", left=1, right=0)]
        )
    else:
        split = style != "nosplit"
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=split)
        tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first", split=split)
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    if bos is not None:
        bos_id = specials.index(bos)
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)]
        )
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, unk_token=unk)
    if chat_template is not None:
        hf.chat_template = chat_template
    return hf


CHATML_CORPUS = [
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face",
    "You are a helpful assistant.",
    "system", "user", "assistant",
    "What is this? A cat. What color? It is red.",
    "Describe the image. A dog between a cat and a chat.",
    "Be brief. Answer the question using a single word or phrase.",
    "The quick brown fox jumps over the lazy dog. Hello world!",
]


def make_chatml_tokenizer(chat_template: str = SMOLLM2_TEMPLATE) -> PreTrainedTokenizerFast:
    """Byte-level BPE (GPT-2 style) trained on a tiny corpus, with ChatML special tokens and template.

    The vocabulary is large enough that every corpus word becomes one token, so the pieces of a text are exactly
    its GPT-2 pre-tokens ("Ġis", "?", "Ċ", ...) whatever order the trainer learned its merges in.
    """
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=2000,
        min_frequency=1,
        special_tokens=[AddedToken(s, special=True, normalized=False) for s in specials],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CHATML_CORPUS * 3, trainer=trainer)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>", unk_token="<|endoftext|>"
    )
    hf.chat_template = chat_template
    return hf


@pytest.fixture(scope="session")
def llama_tokenizer() -> PreTrainedTokenizerFast:
    return make_unigram_tokenizer()


@pytest.fixture(scope="session")
def llama_legacy_tokenizer() -> PreTrainedTokenizerFast:
    return make_unigram_tokenizer(style="legacy")


@pytest.fixture(scope="session")
def chatml_tokenizer() -> PreTrainedTokenizerFast:
    return make_chatml_tokenizer(SMOLLM2_TEMPLATE)


@pytest.fixture(scope="session")
def qwen_tokenizer(chatml_tokenizer: PreTrainedTokenizerFast) -> PreTrainedTokenizerFast:
    tok = copy.deepcopy(chatml_tokenizer)
    tok.chat_template = QWEN2_TEMPLATE
    return tok


def smollm2_folder() -> Path | None:
    """The offline SmolLM2-135M-Instruct asset folder, if it is fully prepared (``vlweave assets pull``)."""
    try:
        from vlweave import assets

        if assets.is_prepared("smollm2-135m-instruct"):
            return assets.asset_path("smollm2-135m-instruct")
        return None
    except (ImportError, AttributeError, KeyError, ValueError):  # registry not available: look in the default place
        root = Path(os.environ.get("VLWEAVE_CACHE") or Path.home() / ".cache" / "vlweave")
        folder = root / "assets" / "smollm2-135m-instruct"
        return folder if (folder / "tokenizer.json").is_file() else None


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    folder = smollm2_folder()
    if folder is None:
        pytest.skip("SmolLM2 tokenizer asset not prepared (run: vlweave assets pull smollm2-135m-instruct)")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))
