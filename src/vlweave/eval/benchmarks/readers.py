"""Readers for the released benchmark question/annotation files, from local paths only (nothing is downloaded).

Each reader returns plain dataclass records with what generation and the scorers need.  Bad input raises
:class:`BenchmarkDataError` (a ``ValueError``) naming the file, the line/record and the problem; a file with several
bad records reports them all at once (up to ``MAX_LISTED``).

Formats:

* LLaVA eval question files (JSONL or a JSON list of questions, or conversation records such as ScienceQA's
  ``llava_test_CQM-A.json``) are read by :func:`vlweave.data.questions.read_questions`, like every question file.
* MME (:func:`read_mme`): the release folder ``MME_Benchmark/<subtask>/`` -- either ``images/`` +
  ``questions_answers_YN/<stem>.txt`` (artwork, celebrity, landmark, posters, scene) or images and ``<stem>.txt``
  side by side (the other 9), each txt holding ``question<TAB>Yes|No`` lines -- or the eval-tool layout
  ``<subtask>.txt`` with ``image_name<TAB>question<TAB>answer[<TAB>prediction]`` lines.
* POPE (:func:`read_pope`): JSON Lines (the ``coco_pope_<split>.json`` files are JSONL despite the suffix) or a JSON
  list of ``{"question_id", "image", "text", "label"}``; LLaVA's ``llava_pope_test.jsonl`` carries ``category``
  (the split) and no label -- :func:`attach_pope_labels` adds the labels from the ``coco_pope_<split>.json`` files.
* MMBench (:func:`read_mmbench_tsv`): TSV with ``index, question, hint, A, B, C, D, answer, category, image``
  (+ ``l2-category`` ...), images base64-encoded; a short ``image`` value (<= 64 chars) names the ``index`` of the
  row whose image it shares (VLMEvalKit's convention).  Images decode lazily (``record.load_image()``) or, with
  ``image_dir``, are written to files once per distinct image.
* ScienceQA (:func:`read_scienceqa`): ``problems.json`` (+ ``pid_splits.json``).
* VQAv2 / TextVQA annotations (:func:`read_vqa_annotations`) and GQA question files (:func:`read_gqa_questions`).
"""

from __future__ import annotations

import base64
import binascii
import csv
import dataclasses
import io
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlweave.eval.benchmarks._common import MULTIPLE_CHOICE_SUFFIX, SHORT_ANSWER_SUFFIX
from vlweave.eval.benchmarks.mme import MME_SUBTASKS, canonical_mme_subtask, llava_mme_prompt
from vlweave.eval.benchmarks.mmbench import CIRCULAR_OFFSET, build_multiple_choice_prompt
from vlweave.eval.benchmarks.pope import POPE_SPLITS
from vlweave.safe_io import read_text_file

MAX_LISTED = 20
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")


class BenchmarkDataError(ValueError):
    """Invalid benchmark file; the message names the file, the line/record and the problem."""


class _Problems:
    """Collects the problems of one file and raises them together."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.items: list[str] = []

    def add(self, where: str, problem: str) -> None:
        self.items.append(f"{where}: {problem}")

    def raise_if_any(self) -> None:
        if not self.items:
            return
        shown = self.items[:MAX_LISTED]
        more = len(self.items) - len(shown)
        lines = "\n  ".join(shown) + (f"\n  ... and {more} more" if more else "")
        raise BenchmarkDataError(f"{self.path}: {len(self.items)} bad record(s):\n  {lines}")


def _existing_file(path: str | Path) -> Path:
    path = Path(path).expanduser()
    if not path.is_file():
        raise BenchmarkDataError(f"{path}: file not found")
    return path


def _read_text(path: Path) -> str:
    return read_text_file(path, error=BenchmarkDataError)  # a non-UTF-8 byte: file, line and column


def _load_json(path: Path) -> Any:
    try:
        return json.loads(_read_text(path))
    except json.JSONDecodeError as exc:
        raise BenchmarkDataError(f"{path}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from None


def _json_records(path: Path) -> list[tuple[str, Any]]:
    """``[(where, record)]`` from a JSON list or a JSON Lines file (detected from the content, not the suffix)."""
    text = _read_text(path)
    if text.lstrip().startswith("["):
        data = _load_json(path)
        return [(f"record {i}", record) for i, record in enumerate(data)]
    records: list[tuple[str, Any]] = []
    problems = _Problems(path)
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append((f"line {number}", json.loads(line)))
        except json.JSONDecodeError as exc:
            problems.add(f"line {number}", f"invalid JSON (column {exc.colno}: {exc.msg})")
    problems.raise_if_any()
    return records


def _join(folder: str | Path | None, name: str | None) -> str | None:
    if name is None:
        return None
    return str(Path(folder).expanduser() / name) if folder is not None else name


def _check_id(value: Any, name: str, seen: dict[str, str], where: str, problems: _Problems) -> bool:
    if value is None or (isinstance(value, str) and not value.strip()):
        problems.add(where, f"missing {name!r}")
        return False
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        problems.add(where, f"{name!r} must be a string or an integer, got {type(value).__name__}")
        return False
    if str(value) in seen:
        problems.add(where, f"duplicate {name} {value!r} (first at {seen[str(value)]})")
        return False
    seen[str(value)] = where
    return True


# ----------------------------------------------------------------------------------------------------------------
# MME
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class MMERecord:
    """One MME yes/no question.  ``question`` is as released (ending " Please answer yes or no."); ``text`` is the
    LLaVA-1.5 prompt; ``image`` is the image path when known; ``prediction`` the 4th column of eval-tool files."""

    question_id: str
    subtask: str
    image_name: str
    question: str
    answer: str
    image: str | None = None
    prediction: str | None = None

    @property
    def text(self) -> str:
        return llava_mme_prompt(self.question, SHORT_ANSWER_SUFFIX)


def _subtask_of(name: str) -> str | None:
    try:
        return canonical_mme_subtask(name)
    except ValueError:
        return None


def _yes_no(value: str) -> str | None:
    value = value.strip().lower()
    return value if value in ("yes", "no") else None


def read_mme(root: str | Path, *, subtasks: Iterable[str] | None = None,
             image_root: str | Path | None = None) -> list[MMERecord]:
    """Read MME from the release folder or from eval-tool ``<subtask>.txt`` files (layout detected).

    ``root``: the folder holding the subtask folders (``MME_Benchmark``), a folder of ``<subtask>.txt`` files, or
    one such file.  ``subtasks`` restricts the subtasks read (names in any case).  For eval-tool files,
    ``image_root`` (a release folder) lets ``image`` be filled in.  Records come subtask by subtask in the official
    order, then in file order.
    """
    root = Path(root).expanduser()
    wanted = None if subtasks is None else {canonical_mme_subtask(s) for s in subtasks}
    if root.is_file():
        subtask = _subtask_of(root.stem)
        if subtask is None:
            raise BenchmarkDataError(f"{root}: file name is not an MME subtask ({', '.join(MME_SUBTASKS)})")
        return _read_mme_tool_file(root, subtask, image_root)
    if not root.is_dir():
        raise BenchmarkDataError(f"{root}: MME folder not found")
    tool_files = {s: p for p in sorted(root.glob("*.txt")) if (s := _subtask_of(p.stem)) is not None}
    folders = {s: p for p in sorted(root.iterdir()) if p.is_dir() and (s := _subtask_of(p.name)) is not None}
    if not tool_files and not folders:
        raise BenchmarkDataError(f"{root}: no MME subtask folders or <subtask>.txt files found "
                                 f"(expected names like {', '.join(MME_SUBTASKS[:3])}, ...)")
    records: list[MMERecord] = []
    for subtask in MME_SUBTASKS:
        if wanted is not None and subtask not in wanted:
            continue
        if subtask in tool_files:
            records += _read_mme_tool_file(tool_files[subtask], subtask, image_root)
        elif subtask in folders:
            records += _read_mme_release_folder(folders[subtask], subtask)
    if not records:
        raise BenchmarkDataError(f"{root}: no MME questions found for the requested subtasks")
    return records


def _find_image(folder: Path, stem: str) -> Path | None:
    for suffix in IMAGE_SUFFIXES:
        for candidate in (folder / (stem + suffix), folder / (stem + suffix.upper())):
            if candidate.is_file():
                return candidate
    return None


def _read_mme_release_folder(folder: Path, subtask: str) -> list[MMERecord]:
    split = (folder / "images").is_dir() and (folder / "questions_answers_YN").is_dir()
    qa_folder = folder / "questions_answers_YN" if split else folder
    image_folder = folder / "images" if split else folder
    qa_files = sorted(qa_folder.glob("*.txt"))
    if not qa_files:
        raise BenchmarkDataError(f"{qa_folder}: no question files (<image>.txt) for MME subtask {subtask}")
    records: list[MMERecord] = []
    for qa_file in qa_files:
        image = _find_image(image_folder, qa_file.stem)
        if image is None:
            raise BenchmarkDataError(f"{qa_file}: no image named {qa_file.stem}.<jpg|png|...> in {image_folder}")
        problems = _Problems(qa_file)
        k = 0
        for number, line in enumerate(_read_text(qa_file).splitlines(), start=1):
            if not line.strip():
                continue
            fields = line.split("\t")
            if len(fields) != 2:
                problems.add(f"line {number}", f"expected 2 tab-separated fields (question, Yes/No), "
                                               f"got {len(fields)}")
                continue
            question, answer = fields[0].strip(), _yes_no(fields[1])
            if not question or answer is None:
                problems.add(f"line {number}", "empty question" if not question
                             else f"answer must be Yes or No, got {fields[1].strip()!r}")
                continue
            records.append(MMERecord(question_id=f"{subtask}/{image.name}#{k}", subtask=subtask,
                                     image_name=image.name, question=question, answer=answer, image=str(image)))
            k += 1
        problems.raise_if_any()
    return records


def _read_mme_tool_file(path: Path, subtask: str, image_root: str | Path | None) -> list[MMERecord]:
    problems = _Problems(path)
    records: list[MMERecord] = []
    counts: dict[str, int] = {}
    subtask_folder = None
    if image_root is not None:
        candidates = [p for p in Path(image_root).expanduser().iterdir()
                      if p.is_dir() and _subtask_of(p.name) == subtask]
        subtask_folder = candidates[0] if candidates else None
    for number, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.rstrip("\r\n").split("\t")
        if len(fields) not in (3, 4):
            problems.add(f"line {number}", f"expected 3 or 4 tab-separated fields (image_name, question, answer"
                                           f"[, prediction]), got {len(fields)}")
            continue
        image_name, question, answer = fields[0].strip(), fields[1].strip(), _yes_no(fields[2])
        if not image_name or not question or answer is None:
            problems.add(f"line {number}", "empty image name" if not image_name else "empty question"
                         if not question else f"answer must be Yes or No, got {fields[2].strip()!r}")
            continue
        image = None
        if subtask_folder is not None:
            for folder in (subtask_folder / "images", subtask_folder):
                if (folder / image_name).is_file():
                    image = str(folder / image_name)
                    break
        k = counts.get(image_name, 0)
        counts[image_name] = k + 1
        records.append(MMERecord(question_id=f"{subtask}/{image_name}#{k}", subtask=subtask, image_name=image_name,
                                 question=question, answer=answer, image=image,
                                 prediction=fields[3] if len(fields) == 4 else None))
    problems.raise_if_any()
    if not records:
        raise BenchmarkDataError(f"{path}: no questions")
    return records


# ----------------------------------------------------------------------------------------------------------------
# POPE
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class POPERecord:
    """One POPE question; ``label`` is "yes"/"no" (``None`` in LLaVA's unlabelled question file)."""

    question_id: str | int
    image: str
    text: str
    label: str | None = None
    split: str | None = None


def _split_from_name(path: Path) -> str | None:
    match = re.search(r"(adversarial|popular|random)", path.stem)
    return match.group(1) if match else None


def read_pope(path: str | Path, *, split: str | None = None, require_label: bool = True,
              image_folder: str | Path | None = None) -> list[POPERecord]:
    """Read a POPE question file.

    The split of a record is its ``category`` field, else ``split``, else the split named in the file name
    (``coco_pope_adversarial.json`` -> adversarial).  ``label`` (or ``answer``) must be yes/no; with
    ``require_label=False`` it may be absent (LLaVA's ``llava_pope_test.jsonl``).
    """
    path = _existing_file(path)
    if split is not None and split not in POPE_SPLITS:
        raise BenchmarkDataError(f"{path}: unknown POPE split {split!r}; expected one of {POPE_SPLITS}")
    default_split = split or _split_from_name(path)
    problems = _Problems(path)
    seen: dict[str, str] = {}
    out: list[POPERecord] = []
    for where, record in _json_records(path):
        if not isinstance(record, dict):
            problems.add(where, f"expected an object, got {type(record).__name__}")
            continue
        qid = record.get("question_id")
        label_where = f"{where} (question_id {qid!r})" if qid is not None else where
        ok = _check_id(qid, "question_id", seen, where, problems)
        bad = []
        image, text = record.get("image"), record.get("text")
        if not isinstance(image, str) or not image.strip():
            bad.append("missing or empty 'image'")
        if not isinstance(text, str) or not text.strip():
            bad.append("missing or empty 'text'")
        raw_label = record.get("label", record.get("answer"))
        label = _yes_no(raw_label) if isinstance(raw_label, str) else None
        if raw_label is None and require_label:
            bad.append("missing 'label'")
        elif raw_label is not None and label is None:
            bad.append(f"'label' must be yes or no, got {raw_label!r}")
        record_split = record.get("category", default_split)
        if record_split is not None and record_split not in POPE_SPLITS:
            bad.append(f"unknown split {record_split!r} (expected one of {', '.join(POPE_SPLITS)})")
        for problem in bad:
            problems.add(label_where, problem)
        if ok and not bad:
            out.append(POPERecord(question_id=qid, image=_join(image_folder, image), text=text, label=label,
                                  split=record_split))
    problems.raise_if_any()
    return out


def attach_pope_labels(questions: list[POPERecord],
                       annotations: str | Path | Mapping[str, str | Path]) -> list[POPERecord]:
    """Labels for LLaVA's unlabelled POPE questions, from the ``coco_pope_<split>.json`` files.

    As LLaVA's ``eval_pope.py`` does, the questions of a split are matched with that split's annotation records
    *by position*; a count mismatch, or a question text that does not start with the annotation's text, raises.
    ``annotations`` is a folder holding ``coco_pope_<split>.json`` files or a split -> file mapping.
    """
    if isinstance(annotations, Mapping):
        files = {s: Path(p).expanduser() for s, p in annotations.items()}
    else:
        folder = Path(annotations).expanduser()
        if not folder.is_dir():
            raise BenchmarkDataError(f"{folder}: POPE annotation folder not found")
        files = {s: folder / f"coco_pope_{s}.json" for s in POPE_SPLITS}
    by_split: dict[str | None, list[int]] = {}
    for i, q in enumerate(questions):
        by_split.setdefault(q.split, []).append(i)
    out = list(questions)
    for split_name, positions in by_split.items():
        if split_name is None:
            raise BenchmarkDataError(f"question {questions[positions[0]].question_id!r} has no split; "
                                     "cannot match it with a coco_pope_<split>.json file")
        if split_name not in files:
            raise BenchmarkDataError(f"no annotation file given for POPE split {split_name!r}")
        labelled = read_pope(files[split_name], split=split_name)
        if len(labelled) != len(positions):
            raise BenchmarkDataError(f"{files[split_name]}: {len(labelled)} annotations for {len(positions)} "
                                     f"{split_name} questions")
        for k, (i, ann) in enumerate(zip(positions, labelled)):
            if not out[i].text.strip().startswith(ann.text.strip()):
                raise BenchmarkDataError(f"{files[split_name]}: annotation {k} (question_id {ann.question_id!r}) "
                                         f"{ann.text!r} does not match question {out[i].question_id!r} "
                                         f"{out[i].text!r}")
            out[i] = dataclasses.replace(out[i], label=ann.label)
    return out


# ----------------------------------------------------------------------------------------------------------------
# MMBench
# ----------------------------------------------------------------------------------------------------------------

_MMBENCH_REQUIRED = ("index", "question", "A", "B", "image")
_OPTION_COLUMNS = tuple("ABCDEFGHIJ")


def _is_none(value: str | None) -> bool:
    """LLaVA's ``is_none``: empty, "nan" or "none" (any case) counts as a missing value."""
    return value is None or value.strip() == "" or value.strip().lower() in ("nan", "none")


@dataclass
class MMBenchRecord:
    """One MMBench row (a main question, ``index < 10**6``, or one of its circular copies).

    ``image`` is the image file path when the reader was given ``image_dir``; otherwise call :meth:`load_image`.
    """

    index: int
    question: str
    options: dict[str, str]
    answer: str | None = None
    category: str | None = None
    hint: str | None = None
    l2_category: str | None = None
    image: str | None = None
    image_b64: str | None = field(default=None, repr=False)
    source: str = field(default="", repr=False)  # "file: row N (line L)" for error messages

    @property
    def group(self) -> int:
        return self.index % CIRCULAR_OFFSET

    @property
    def is_main(self) -> bool:
        return self.index < CIRCULAR_OFFSET

    def prompt(self, suffix: str = MULTIPLE_CHOICE_SUFFIX) -> str:
        """LLaVA's MMBench prompt (hint, question, ``A. ...`` lines, ``suffix``); no image placeholder."""
        return build_multiple_choice_prompt(self.question, self.options, self.hint, suffix)

    def load_image(self):
        """The image as an RGB ``PIL.Image`` (from ``image`` if written to a file, else decoded from base64)."""
        from PIL import Image

        if self.image is not None:
            with Image.open(self.image) as img:
                return img.convert("RGB")
        if self.image_b64 is None:
            raise BenchmarkDataError(f"{self.source}: record has no image")
        data = _decode_b64(self.image_b64, self.source)
        try:
            with Image.open(io.BytesIO(data)) as img:
                return img.convert("RGB")
        except Exception as exc:  # PIL raises several exception types for corrupt data
            raise BenchmarkDataError(f"{self.source}: image is not a readable picture ({exc})") from None


def _decode_b64(text: str, where: str) -> bytes:
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise BenchmarkDataError(f"{where}: invalid base64 image ({exc})") from None


def read_mmbench_tsv(path: str | Path, *, image_dir: str | Path | None = None) -> list[MMBenchRecord]:
    """Read an MMBench TSV (dev or test; test rows have no ``answer``).

    Options are the A, B, C, ... columns up to the first missing value (LLaVA's ``get_options``); "", "nan" and
    "none" count as missing (also for ``hint``).  With ``image_dir`` every distinct image is decoded, checked and
    written there once as ``<index>.<format>`` (rows sharing an image share the file); without it, images stay
    base64 until :meth:`MMBenchRecord.load_image`.
    """
    path = _existing_file(path)
    problems = _Problems(path)
    rows: list[tuple[str, dict[str, str]]] = []
    old_limit = csv.field_size_limit()
    csv.field_size_limit(2**31 - 1)  # base64 images exceed csv's default 128 KiB field limit
    try:
        with open(path, encoding="utf-8-sig", newline="") as fh:
            reader = csv.reader(fh, delimiter="\t")
            try:
                header = next(reader)
            except StopIteration:
                raise BenchmarkDataError(f"{path}: empty file (no header row)") from None
            header = [h.strip() for h in header]
            missing = [c for c in _MMBENCH_REQUIRED if c not in header]
            if missing:
                raise BenchmarkDataError(f"{path}: missing column(s) {', '.join(repr(c) for c in missing)} "
                                         f"(header: {', '.join(header)})")
            last_line = reader.line_num
            for row_number, row in enumerate(reader, start=1):
                where = f"row {row_number} (line {last_line + 1})"
                last_line = reader.line_num
                if not row or all(not v.strip() for v in row):
                    continue
                if len(row) != len(header):
                    problems.add(where, f"{len(row)} fields for {len(header)} columns")
                    continue
                rows.append((where, dict(zip(header, row))))
    except UnicodeDecodeError as exc:
        read_text_file(path, error=BenchmarkDataError)  # raises naming the line and column of the bad byte
        raise BenchmarkDataError(f"{path}: not UTF-8 text ({exc.reason})") from None
    except csv.Error as exc:
        raise BenchmarkDataError(f"{path}: malformed TSV ({exc})") from None
    finally:
        csv.field_size_limit(old_limit)

    records: list[MMBenchRecord] = []
    seen: dict[int, str] = {}
    images: dict[int, str] = {}
    for where, row in rows:
        raw_index = row["index"].strip()
        try:
            index = int(raw_index)
        except ValueError:
            problems.add(where, f"'index' must be an integer, got {raw_index!r}")
            continue
        where = f"{where} (index {index})"
        if index in seen:
            problems.add(where, f"duplicate index (first at {seen[index]})")
            continue
        seen[index] = where
        bad: list[str] = []
        if _is_none(row["question"]):
            bad.append("empty 'question'")
        options: dict[str, str] = {}
        for letter in _OPTION_COLUMNS:
            if letter not in row or _is_none(row[letter]):
                break
            options[letter] = row[letter]
        if len(options) < 2:
            bad.append(f"needs at least options A and B, got {len(options)}")
        answer = row.get("answer")
        answer = None if _is_none(answer) else answer.strip().upper()
        if answer is not None and answer not in options:
            bad.append(f"answer {answer!r} is not one of the options {''.join(options)}")
        if _is_none(row["image"]):
            bad.append("empty 'image'")
        for problem in bad:
            problems.add(where, problem)
        if bad:
            continue
        images[index] = row["image"].strip()
        category = row.get("category")
        l2 = row.get("l2-category", row.get("l2_category"))
        records.append(MMBenchRecord(
            index=index, question=row["question"], options=options, answer=answer,
            category=None if _is_none(category) else category.strip(),
            hint=None if _is_none(row.get("hint")) else row["hint"],
            l2_category=None if _is_none(l2) else l2.strip(),
            image_b64=None, source=f"{path}: {where}",
        ))
    problems.raise_if_any()

    # Resolve image references: a short value is the index of the row holding the picture.
    owners: dict[int, int] = {}
    for record in records:
        value = images[record.index]
        owner = record.index
        if len(value) <= 64:
            try:
                owner = int(value)
            except ValueError:
                owner = -1
            if owner not in images or len(images[owner]) <= 64:
                problems.add(seen[record.index], f"'image' {value!r} is neither base64 data nor the index of a row "
                                                 "with an image")
                continue
        owners[record.index] = owner
        record.image_b64 = images[owner]
    problems.raise_if_any()

    if image_dir is not None:
        _write_mmbench_images(records, owners, Path(image_dir).expanduser())
    return records


def _write_mmbench_images(records: list[MMBenchRecord], owners: dict[int, int], folder: Path) -> None:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    written: dict[int, str] = {}
    for record in records:
        owner = owners[record.index]
        if owner not in written:
            data = _decode_b64(record.image_b64 or "", record.source)
            try:
                with Image.open(io.BytesIO(data)) as img:
                    fmt = (img.format or "png").lower()
                    img.verify()
            except Exception as exc:  # PIL raises several exception types for corrupt data
                raise BenchmarkDataError(f"{record.source}: image is not a readable picture ({exc})") from None
            target = folder / f"{owner}.{'jpg' if fmt == 'jpeg' else fmt}"
            if not (target.is_file() and target.stat().st_size == len(data)):
                target.write_bytes(data)
            written[owner] = str(target)
        record.image = written[owner]


# ----------------------------------------------------------------------------------------------------------------
# ScienceQA
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class ScienceQARecord:
    """One ScienceQA problem; ``answer`` is the option letter; ``image`` the image path when ``image_root`` given."""

    question_id: str
    question: str
    choices: list[str]
    answer: str
    has_image: bool
    hint: str = ""
    image: str | None = None
    subject: str | None = None

    @property
    def num_choices(self) -> int:
        return len(self.choices)


def read_scienceqa(problems_path: str | Path, pid_splits_path: str | Path | None = None, *, split: str = "test",
                   image_root: str | Path | None = None) -> list[ScienceQARecord]:
    """Read ScienceQA's ``problems.json`` for one split (ids from ``pid_splits.json`` when given, else the problems'
    own ``split`` field).  ``image_root`` is the split's image folder (``<root>/<pid>/image.png``)."""
    path = _existing_file(problems_path)
    data = _load_json(path)
    if not isinstance(data, dict):
        raise BenchmarkDataError(f"{path}: expected an object of problems keyed by id, got {type(data).__name__}")
    if pid_splits_path is not None:
        splits_path = _existing_file(pid_splits_path)
        splits = _load_json(splits_path)
        if not isinstance(splits, dict) or split not in splits or not isinstance(splits[split], list):
            raise BenchmarkDataError(f"{splits_path}: no list of ids for split {split!r}")
        ids = [str(i) for i in splits[split]]
    else:
        ids = [pid for pid, prob in data.items() if isinstance(prob, dict) and prob.get("split") == split]
    problems = _Problems(path)
    out: list[ScienceQARecord] = []
    for pid in ids:
        where = f"problem {pid!r}"
        prob = data.get(pid)
        if not isinstance(prob, dict):
            problems.add(where, "not found" if prob is None else f"expected an object, got {type(prob).__name__}")
            continue
        choices, answer, question = prob.get("choices"), prob.get("answer"), prob.get("question")
        bad = []
        if not isinstance(question, str) or not question.strip():
            bad.append("missing or empty 'question'")
        if not isinstance(choices, list) or not 2 <= len(choices) <= 5 or not all(isinstance(c, str) for c in choices):
            bad.append(f"'choices' must be a list of 2-5 strings, got {choices!r}")
        elif isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
            bad.append(f"'answer' must be an index into the {len(choices)} choices, got {answer!r}")
        for problem in bad:
            problems.add(where, problem)
        if bad:
            continue
        image_name = prob.get("image")
        out.append(ScienceQARecord(
            question_id=pid, question=question, choices=list(choices), answer="ABCDE"[answer],
            has_image=bool(image_name), hint=str(prob.get("hint") or ""),
            image=str(Path(image_root).expanduser() / pid / image_name) if image_name and image_root else None,
            subject=prob.get("subject"),
        ))
    problems.raise_if_any()
    return out


# ----------------------------------------------------------------------------------------------------------------
# VQAv2 / TextVQA annotations, GQA questions
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class VQARecord:
    """One question with its human answers (10 in VQAv2 and TextVQA)."""

    question_id: str | int
    answers: list[str]
    question: str | None = None
    image_id: str | int | None = None
    answer_type: str | None = None
    question_type: str | None = None


def read_vqa_annotations(path: str | Path, questions_path: str | Path | None = None) -> list[VQARecord]:
    """Read VQAv2 annotations (``{"annotations": [...]}``, answers as ``{"answer": ...}``; question texts from the
    optional ``{"questions": [...]}`` file) or TextVQA's ``{"data": [...]}`` file (answers as strings)."""
    path = _existing_file(path)
    data = _load_json(path)
    key = "annotations" if isinstance(data, dict) and "annotations" in data else "data"
    if not isinstance(data, dict) or not isinstance(data.get(key), list):
        raise BenchmarkDataError(f"{path}: expected an object with an 'annotations' (VQAv2) or 'data' (TextVQA) list")
    texts: dict[str, str] = {}
    if questions_path is not None:
        qpath = _existing_file(questions_path)
        qdata = _load_json(qpath)
        if not isinstance(qdata, dict) or not isinstance(qdata.get("questions"), list):
            raise BenchmarkDataError(f"{qpath}: expected an object with a 'questions' list")
        texts = {str(q.get("question_id")): q.get("question") for q in qdata["questions"] if isinstance(q, dict)}
    problems = _Problems(path)
    seen: dict[str, str] = {}
    out: list[VQARecord] = []
    for i, record in enumerate(data[key]):
        where = f"record {i}"
        if not isinstance(record, dict):
            problems.add(where, f"expected an object, got {type(record).__name__}")
            continue
        qid = record.get("question_id")
        if not _check_id(qid, "question_id", seen, where, problems):
            continue
        where = f"{where} (question_id {qid!r})"
        raw = record.get("answers")
        answers = []
        if isinstance(raw, list):
            answers = [a.get("answer") if isinstance(a, dict) else a for a in raw]
        if not answers or not all(isinstance(a, str) for a in answers):
            problems.add(where, f"'answers' must be a non-empty list of strings or {{'answer': ...}} objects, "
                                f"got {raw!r}")
            continue
        out.append(VQARecord(question_id=qid, answers=answers,
                             question=record.get("question", texts.get(str(qid))),
                             image_id=record.get("image_id"), answer_type=record.get("answer_type"),
                             question_type=record.get("question_type")))
    problems.raise_if_any()
    return out


@dataclass
class GQARecord:
    question_id: str
    question: str
    answer: str
    image_id: str | None = None


def read_gqa_questions(path: str | Path) -> list[GQARecord]:
    """Read a GQA question file (``{question_id: {"imageId", "question", "answer", ...}}``, e.g.
    ``testdev_balanced_questions.json``)."""
    path = _existing_file(path)
    data = _load_json(path)
    if not isinstance(data, dict):
        raise BenchmarkDataError(f"{path}: expected an object of questions keyed by id, got {type(data).__name__}")
    problems = _Problems(path)
    out: list[GQARecord] = []
    for qid, record in data.items():
        where = f"question {qid!r}"
        if not isinstance(record, dict):
            problems.add(where, f"expected an object, got {type(record).__name__}")
            continue
        question, answer = record.get("question"), record.get("answer")
        if not isinstance(question, str) or not question.strip():
            problems.add(where, "missing or empty 'question'")
        elif not isinstance(answer, str):
            problems.add(where, "missing 'answer'")
        else:
            out.append(GQARecord(question_id=qid, question=question, answer=answer, image_id=record.get("imageId")))
    problems.raise_if_any()
    return out
