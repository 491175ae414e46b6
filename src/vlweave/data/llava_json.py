"""Loading and validation of LLaVA-format training data (evaluation question files: :mod:`vlweave.data.questions`).

Every problem is reported, none is silently dropped: all bad records of a file are collected into ONE
``DataError`` that names the file and, for each record, its index, its id and what is wrong (listing capped at
``MAX_LISTED`` lines).  The only repair made is LLaVA's own, and it is announced with a warning: a leading gpt turn
is dropped (``preprocess`` in haotian-liu/LLaVA skips it).  A record with an ``image`` but no ``<image>``
placeholder gets one prepended to its first human turn, as LLaVA's custom-data doc describes.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlweave.processing import IMAGE_TOKEN
from vlweave.safe_io import read_text_file

MAX_LISTED = 20

_HUMAN_ROLES = {"human", "user"}
_GPT_ROLES = {"gpt", "assistant"}


class DataError(ValueError):
    """Invalid data; the message names the file, each bad record (index and id) and the problem."""


@dataclass
class Sample:
    """One training conversation; ``image`` is an absolute path, or ``None`` for a text-only sample."""

    id: str
    conversations: list[dict]
    image: str | None
    routing: list[str] | list[int] | None = None  # the record's ``routing`` field: expert names or 0/1 bits
    # (0/1 bits in expert order when loaded with ``routing_experts``)
    routing_pass: bool = False  # a MoVA routing instruction: trained on the routing-pass input (pooled, bits 0)

    def user_texts(self) -> list[str]:
        """The human turns' text, ``<image>`` tag removed (what context-aware connectors read)."""
        return [t["value"].replace("<image>", "").strip() for t in self.conversations if t["from"] in ("human", "user")]


# ----------------------------------------------------------------------------------------------------------------
# Reading records
# ----------------------------------------------------------------------------------------------------------------


def _read_records(path: Path) -> list[tuple[int, str, Any]]:
    """``[(index, where, record)]`` from a JSON list (``.json``) or JSON Lines (``.jsonl``) file.

    ``index`` is the 0-based record position; ``where`` names it in messages ("record 3", or
    "record 3 (line 5)" for JSONL, whose line numbers are what an editor shows).
    """
    if not path.is_file():
        raise DataError(f"{path}: data file not found")
    text = read_text_file(path, error=DataError)  # a byte-order mark is not an error; latin-1 bytes are, by line
    suffix = path.suffix.lower()
    if suffix == ".jsonl" or (suffix != ".json" and not text.lstrip().startswith("[")):
        return _read_jsonl(path, text)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from None
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
    return [(index, f"record {index}", record) for index, record in enumerate(data)]


def _read_jsonl(path: Path, text: str) -> list[tuple[int, str, Any]]:
    records: list[tuple[int, str, Any]] = []
    bad: list[str] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append((len(records), f"record {len(records)} (line {number})", json.loads(line)))
        except json.JSONDecodeError as exc:
            bad.append(f"line {number}: invalid JSON (column {exc.colno}: {exc.msg})")
    if bad:
        raise DataError(_summarise(path, bad, "line(s) of invalid JSON"))
    return records


def _summarise(path: Path, problems: list[str], what: str) -> str:
    listed = problems[:MAX_LISTED]
    more = len(problems) - len(listed)
    lines = [f"{path}: {len(problems)} {what}:"] + [f"  {p}" for p in listed]
    if more:
        lines.append(f"  ... and {more} more")
    return "\n".join(lines)


def _resolve_image(value: Any, folder: Path, check: bool) -> tuple[str | None, str | None]:
    """(absolute path, problem) for an ``image`` field."""
    if isinstance(value, list):
        return None, f"'image' is a list ({len(value)} images); only one image per sample is supported"
    if not isinstance(value, str) or not value.strip():
        return None, f"'image' must be a non-empty string, got {value!r}"
    if "\x00" in value:
        return None, "'image' contains a NUL byte"
    image = Path(value).expanduser()
    if not image.is_absolute():
        # Lexically, so a symlinked image tree is fine but "../../x" is not: a relative path names a file in the
        # image folder, and one that leaves it is almost always a wrong --image-folder or a hostile file.
        inside = Path(os.path.normpath(folder / image))
        if inside != folder and folder not in inside.parents:
            return None, f"image path {value!r} escapes the image folder {folder}"
    image = (image if image.is_absolute() else folder / image).resolve()
    if check and not image.is_file():
        return None, f"image file not found: {image}"
    return str(image), None


def _folder_hint(folder: Path, check_images: bool) -> str:
    """A missing image folder explains a whole list of missing images at once."""
    if check_images and not folder.is_dir():
        return f"\n(note: the image folder {folder} does not exist)"
    return ""


# ----------------------------------------------------------------------------------------------------------------
# Conversations
# ----------------------------------------------------------------------------------------------------------------


def _check_conversations(raw: Any, has_image: bool) -> tuple[list[dict] | None, list[str], bool]:
    """Validate and normalise one record's turns: (turns, problems, leading gpt turn dropped)."""
    if raw is None:
        return None, ["missing 'conversations'"], False
    if not isinstance(raw, list) or not raw:
        return None, ["'conversations' must be a non-empty list"], False
    problems: list[str] = []
    turns: list[dict] = []
    for t, turn in enumerate(raw):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            problems.append(f"turn {t} must be an object with 'from' and 'value'")
            continue
        role, value = turn["from"], turn["value"]
        if not isinstance(value, str):
            problems.append(f"turn {t} 'value' must be a string, got {type(value).__name__}")
            continue
        if "\x00" in value:
            problems.append(f"turn {t} contains a NUL byte (a binary or mis-encoded file?)")
            continue
        if role in _GPT_ROLES and not value.strip():
            problems.append(f"turn {t} is an empty answer (nothing to train on)")
            continue
        if role in _HUMAN_ROLES:
            turns.append({"from": "human", "value": value})
        elif role in _GPT_ROLES:
            turns.append({"from": "gpt", "value": value})
        else:
            problems.append(f"turn {t} has unknown role {role!r} (expected human/gpt or user/assistant)")
    if problems:
        return None, problems, False
    dropped = turns[0]["from"] == "gpt"
    if dropped:  # LLaVA's preprocess drops a leading gpt turn; we do too, with a warning.
        turns = turns[1:]
        if not turns:
            return None, ["the only turn is a gpt turn"], dropped
    offset = int(dropped)
    for t, turn in enumerate(turns):
        expected = "human" if t % 2 == 0 else "gpt"
        if turn["from"] != expected:
            return None, [f"turn {t + offset} is {turn['from']!r}; turns must alternate human/gpt"], dropped
    if turns[-1]["from"] != "gpt":
        return None, ["the conversation ends with a human turn (no answer to train on)"], dropped
    where = [t + offset for t, turn in enumerate(turns) for _ in range(turn["value"].count(IMAGE_TOKEN))]
    if len(where) > 1:
        return None, [f"{len(where)} {IMAGE_TOKEN} placeholders (turns {where}); at most one is supported"], dropped
    if where and turns[where[0] - offset]["from"] != "human":
        return None, [f"{IMAGE_TOKEN} in gpt turn {where[0]}; it must be in a human turn"], dropped
    if where and not has_image:
        return None, [f"{IMAGE_TOKEN} in turn {where[0]} but the record has no 'image'"], dropped
    if has_image and not where:
        # LLaVA custom-data convention: an image with no placeholder goes in front of the first question.
        turns[0] = {"from": "human", "value": f"{IMAGE_TOKEN}\n{turns[0]['value']}"}
    return turns, [], dropped


def _valid_routing(value: Any) -> bool:
    if not isinstance(value, list):
        return False
    names = all(isinstance(v, str) and v for v in value)
    bits = all(isinstance(v, (bool, int)) and int(v) in (0, 1) for v in value)
    return names or bits


def load_llava_data(
    path: str | Path, image_folder: str | Path | None = None, *, check_images: bool = True,
    routing_experts: "list[str] | tuple[str, ...] | None" = None,
) -> list[Sample]:
    """Load and validate a LLaVA training file (JSON list or JSON Lines).

    ``image`` paths are relative to ``image_folder`` (default: the data file's folder).  Records without an id
    are named ``"<file name>:<index>"``.  Raises one ``DataError`` listing every bad record.

    ``routing_experts`` (a routed model's experts, in routing-bit order): each record's ``routing`` must then be
    0/1 bits of exactly that length or names of those experts, and is returned as bits; a wrong length, a value
    other than 0/1 or an unknown name is reported with the record's id.  ``routing_pass: true`` marks a routing
    instruction (trained on the routing-pass input).
    """
    path = Path(path).expanduser().resolve()
    folder = Path(image_folder).expanduser().resolve() if image_folder is not None else path.parent
    samples: list[Sample] = []
    problems: list[str] = []
    first_seen: dict[str, str] = {}
    dropped_leading: list[str] = []
    for index, where, record in _read_records(path):
        if not isinstance(record, dict):
            problems.append(f"{where}: expected an object, got {type(record).__name__}")
            continue
        sample_id = str(record["id"]) if record.get("id") is not None else f"{path.name}:{index}"
        label = f"{where} (id {sample_id!r})"
        bad: list[str] = []
        if sample_id in first_seen:
            bad.append(f"duplicate id (first used by {first_seen[sample_id]})")
        else:
            first_seen[sample_id] = where
        image: str | None = None
        if record.get("image") is not None:
            image, problem = _resolve_image(record["image"], folder, check_images)
            if problem:
                bad.append(problem)
        has_image = record.get("image") is not None
        routing = record.get("routing")
        if routing is not None and not _valid_routing(routing):
            bad.append(f"'routing' must be a list of expert names or of 0/1 bits, got {routing!r}")
        elif routing is not None and not has_image:
            bad.append("'routing' given for a record without an image")
        elif routing is not None and routing_experts is not None:
            from vlweave.language.routing import RoutingError, routing_bits

            try:
                routing = routing_bits(routing, list(routing_experts), "record")
            except RoutingError as err:
                bad.append(str(err).removeprefix("record: "))
        routing_pass = record.get("routing_pass", False)
        if not isinstance(routing_pass, bool):
            bad.append(f"'routing_pass' must be true or false, got {routing_pass!r}")
        elif routing_pass and not has_image:
            bad.append("'routing_pass' given for a record without an image")
        turns, conv_problems, dropped = _check_conversations(record.get("conversations"), has_image)
        bad.extend(conv_problems)
        if bad:
            problems.extend(f"{label}: {p}" for p in bad)
            continue
        if dropped:
            dropped_leading.append(sample_id)
        assert turns is not None
        samples.append(Sample(id=sample_id, conversations=turns, image=image, routing=routing,
                              routing_pass=bool(routing_pass)))
    if problems:
        raise DataError(_summarise(path, problems, "problem(s) in records") + _folder_hint(folder, check_images))
    if dropped_leading:
        shown = ", ".join(repr(i) for i in dropped_leading[:5])
        more = f" and {len(dropped_leading) - 5} more" if len(dropped_leading) > 5 else ""
        warnings.warn(
            f"{path}: dropped a leading gpt turn in {len(dropped_leading)} record(s) ({shown}{more}), as LLaVA does",
            stacklevel=2,
        )
    return samples


def iter_image_paths(samples: list[Sample]) -> Iterator[str]:
    """The distinct image paths of some samples, in first-use order (e.g. to build a feature cache)."""
    seen: set[str] = set()
    for sample in samples:
        if sample.image is not None and sample.image not in seen:
            seen.add(sample.image)
            yield sample.image


__all__ = ["MAX_LISTED", "DataError", "Sample", "iter_image_paths", "load_llava_data"]
