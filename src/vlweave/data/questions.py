"""One question record for every evaluation path (easy-vqa, LLaVA question files, released benchmarks), and the
one reader of LLaVA question files.

A :class:`Question` is what the greedy runner (:func:`vlweave.eval.vqa.generate_answers`) answers and the exact-match
report scores: an id, the prompt text, an optional image and an optional gold answer.  Everything else a record
carries (easy-vqa's question ``type``, a benchmark's ``category``/``domain``, a benchmark item's scorer record and
``--limit`` group) lives in ``meta``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

from vlweave.data.llava_json import DataError, _folder_hint, _read_records, _resolve_image, _summarise
from vlweave.processing import IMAGE_TOKEN

if TYPE_CHECKING:
    from PIL import Image

# A file path, a PIL image, or a zero-argument callable returning one (decoded only when its batch runs, e.g.
# MMBench's base64 images).  Only paths go through the feature cache.
ImageSource = Union[str, "Image.Image", Callable[[], "Image.Image"]]


@dataclass
class Question:
    """One question: ``text`` is the prompt without the ``<image>`` placeholder (the runner puts it in front when
    there is an ``image``); ``answer`` is the gold answer when known (a benchmark may keep its reference answers
    there, e.g. VQAv2's ten); ``meta`` holds the record's other fields."""

    question_id: str | int
    text: str
    image: ImageSource | None = None
    answer: Any = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def has_image(self) -> bool:
        return self.image is not None and not (isinstance(self.image, str) and not self.image)

    def as_record(self) -> dict[str, Any]:
        """The question as one flat record (``meta`` fields beside the others), as the benchmark scorers read it."""
        return {"question_id": self.question_id, "image": self.image, "text": self.text, "answer": self.answer,
                **self.meta}


_QUESTION_KEYS = {"question_id", "image", "text", "answer"}
_CONVERSATION_KEYS = {"id", "question_id", "image", "conversations", "answer"}


def _fields(record: dict) -> tuple[Any, Any, Any, set[str], list[str]]:
    """(question_id, text, answer, keys not kept in ``meta``, problems with the text) of a question record, or of
    a LLaVA conversation record (``llava_test_CQM-A.json``: the first turn is the question, the second the answer)."""
    if "conversations" in record and "text" not in record:
        qid, answer, turns = record.get("id", record.get("question_id")), record.get("answer"), record["conversations"]
        if not isinstance(turns, list) or not turns or not isinstance(turns[0], dict):
            return qid, None, answer, _CONVERSATION_KEYS, ["'conversations' must be a non-empty list of turns"]
        text = turns[0].get("value")
        if isinstance(text, str):
            text = text.replace(IMAGE_TOKEN, "").strip()
        if answer is None and len(turns) > 1 and isinstance(turns[1], dict):
            answer = turns[1].get("value")
        keys = _CONVERSATION_KEYS
    else:
        qid, text, answer, keys = record.get("question_id"), record.get("text"), record.get("answer"), _QUESTION_KEYS
    if not isinstance(text, str) or not text.strip():
        return qid, text, answer, keys, ["missing or empty 'text'"]
    if "\x00" in text:
        return qid, text, answer, keys, ["'text' contains a NUL byte (a binary or mis-encoded file?)"]
    if text.count(IMAGE_TOKEN) > 1:
        return qid, text, answer, keys, [f"{text.count(IMAGE_TOKEN)} {IMAGE_TOKEN} placeholders; at most one is "
                                         "supported"]
    if IMAGE_TOKEN in text and record.get("image") is None:
        return qid, text, answer, keys, [f"{IMAGE_TOKEN} in 'text' but the record has no 'image'"]
    return qid, text, answer, keys, []


def read_questions(
    path: str | Path, image_folder: str | Path | None = None, *, check_images: bool = True,
    require_answer: bool = False,
) -> list[Question]:
    """Read a question file: JSONL (LLaVA's eval files) or a JSON list of ``{"question_id", "image"?, "text",
    "answer"?, ...}`` records, or of LLaVA conversation records (``{"id", "image"?, "conversations"}``).

    ``image`` is made absolute against ``image_folder`` (default: the file's folder) and, with ``check_images``,
    checked to exist; ``answer`` becomes a string; other fields go to ``meta`` unchanged.  With
    ``require_answer`` (scoring by exact match) a record without a string ``answer`` is an error: a missing one
    would be scored as wrong, a number would be compared in its Python spelling.  Raises one ``DataError``
    listing every bad record.
    """
    path = Path(path).expanduser().resolve()
    folder = Path(image_folder).expanduser().resolve() if image_folder is not None else path.parent
    questions: list[Question] = []
    problems: list[str] = []
    first_seen: dict[str, str] = {}
    for _, where, record in _read_records(path):
        if not isinstance(record, dict):
            problems.append(f"{where}: expected an object, got {type(record).__name__}")
            continue
        qid, text, answer, keys, text_problems = _fields(record)
        bad: list[str] = []
        if qid is None or (isinstance(qid, str) and not qid.strip()):
            bad.append("missing 'question_id'")
        elif isinstance(qid, bool) or not isinstance(qid, (str, int)):
            bad.append(f"'question_id' must be a string or an integer, got {type(qid).__name__}")
        elif str(qid) in first_seen:
            bad.append(f"duplicate question_id (first used by {first_seen[str(qid)]})")
        else:
            first_seen[str(qid)] = where
        bad.extend(text_problems)
        if answer is not None and not isinstance(answer, (str, int, float)) or (
                require_answer and answer is not None and not isinstance(answer, str)):
            bad.append(f"'answer' must be a string, got {type(answer).__name__}")
        elif require_answer and answer is None:
            bad.append("missing 'answer' (needed to score the prediction)")
        elif isinstance(answer, str) and "\x00" in answer:
            bad.append("'answer' contains a NUL byte")
        image: str | None = None
        if record.get("image") is not None:
            image, problem = _resolve_image(record["image"], folder, check_images)
            if problem:
                bad.append(problem)
        if bad:
            problems.extend(f"{where} (question_id {qid!r}): {p}" for p in bad)
            continue
        questions.append(Question(question_id=qid, text=text, image=image,
                                  answer=None if answer is None else str(answer),
                                  meta={k: v for k, v in record.items() if k not in keys}))
    if problems:
        raise DataError(_summarise(path, problems, "problem(s) in records") + _folder_hint(folder, check_images))
    return questions


__all__ = ["ImageSource", "Question", "read_questions"]
