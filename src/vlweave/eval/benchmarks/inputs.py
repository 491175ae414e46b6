"""What ``vlweave eval --benchmark`` generates for and scores against: prompts, images and ground-truth records.

:func:`load_benchmark` reads a benchmark's released files with the readers of :mod:`.readers`, builds every prompt
with the convention of methods.md §0.8 (the prompt builders below) and pairs it with the ground-truth record its
scorer takes.  Nothing here loads a model; images are checked to exist (or, for MMBench, kept as base64 and decoded
in memory when a batch needs them), so bad input fails before the slow part with a message naming the file and
record.

Expected ``--data`` layouts are in :data:`DATA_LAYOUTS` (also shown by ``vlweave eval --help`` and docs/eval.md).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlweave.data.llava_json import DataError
from vlweave.data.questions import ImageSource, Question, read_questions
from vlweave.eval.benchmarks._common import MULTIPLE_CHOICE_SUFFIX, SHORT_ANSWER_SUFFIX, apply_prompt_suffix
from vlweave.eval.benchmarks.mmbench import build_multiple_choice_prompt, expand_circular
from vlweave.eval.benchmarks.mme import llava_mme_prompt
from vlweave.eval.benchmarks.pope import POPE_SPLITS
from vlweave.eval.benchmarks.readers import (
    BenchmarkDataError, MMBenchRecord, _decode_b64, _Problems, attach_pope_labels, read_gqa_questions,
    read_mmbench_tsv, read_mme, read_pope, read_scienceqa, read_vqa_annotations,
)
from vlweave.eval.benchmarks.registry import get_benchmark

# File names the LLaVA eval layout (playground/data/eval/<benchmark>/) uses; looked for next to --data.
POPE_QUESTION_FILE = "llava_pope_test.jsonl"
DEFAULT_ANNOTATIONS: dict[str, tuple[str, ...]] = {
    "pope": ("coco", "."),
    "scienceqa_img": ("problems.json",),
    "vqav2": ("v2_mscoco_val2014_annotations.json",),
    "textvqa": ("TextVQA_0.5.1_val.json",),
    "gqa": ("testdev_balanced_questions.json",),
}

DATA_LAYOUTS: dict[str, str] = {
    "pope": "LLaVA's question JSONL (llava_pope_test.jsonl; 'category' = split) or the folder holding it; labels "
            "from the coco_pope_<split>.json files in --annotations (default: <data folder>/coco, else the data "
            "folder). A labelled coco_pope_<split>.json file also works on its own. Images: --image-folder "
            "(COCO val2014; default: the data folder). --split keeps one split.",
    "mme": "The MME_Benchmark release folder (<subtask>/images + questions_answers_YN/, or images and <stem>.txt "
           "side by side), or a folder of eval-tool <subtask>.txt files (image<TAB>question<TAB>answer) with "
           "--image-folder pointing at the release folder.",
    "mmbench": "An MMBench TSV (index, question, hint, A-D, answer, category, image as base64). Main questions get "
               "their circular copies added (LLaVA's --all-rounds). Without answers (test split) predictions are "
               "written but not scored.",
    "scienceqa_img": "LLaVA's llava_test_CQM-A.json (conversation records, 'image' relative to --image-folder, "
                     "default: the data folder); ground truth from ScienceQA's problems.json (--annotations, "
                     "default: <data folder>/problems.json; pid_splits.json beside it is used when present). "
                     "Questions without an image run text-only.",
    "vqav2": "LLaVA question JSONL (llava_vqav2_mscoco_*.jsonl); --annotations: the VQAv2 annotation JSON "
             "(default: <data folder>/v2_mscoco_val2014_annotations.json). Without annotations (test-dev) "
             "predictions are written but not scored.",
    "textvqa": "LLaVA question JSONL (llava_textvqa_val_v051_ocr.jsonl); --annotations: TextVQA_0.5.1_val.json "
               "(default: next to the data file); matched by question_id.",
    "gqa": "LLaVA question JSONL (llava_gqa_testdev_balanced.jsonl); --annotations: GQA's "
           "testdev_balanced_questions.json (default: next to the data file); matched by question_id.",
}


# ----------------------------------------------------------------------------------------------------------------
# Prompt builders (methods.md §0.8); the runner adds "<image>\n" in front when the question has an image.
# ----------------------------------------------------------------------------------------------------------------


def short_answer_prompt(text: str) -> str:
    """Question + ``"\\nAnswer the question using a single word or phrase."``, unless the text already ends with it
    (LLaVA's released POPE / VQAv2 / TextVQA / GQA question files carry it)."""
    return apply_prompt_suffix(text, SHORT_ANSWER_SUFFIX)


def mme_prompt(question: str) -> str:
    """MME as LLaVA's llava_mme.jsonl carries it: " Please answer yes or no." replaced by the short-answer suffix."""
    return llava_mme_prompt(question, SHORT_ANSWER_SUFFIX)


def multiple_choice_prompt(question: str, options: dict[str, str], hint: str | None = None) -> str:
    """Hint line (if any), question, ``"A. <option>"`` lines, then the option-letter suffix (MMBench)."""
    return build_multiple_choice_prompt(question, options, hint, MULTIPLE_CHOICE_SUFFIX)


def scienceqa_prompt(text: str) -> str:
    """A llava_test_CQM-A.json question (context, question and options already in it) + the option-letter suffix
    (``model_vqa_science.py --single-pred-prompt``), unless it is already there."""
    return apply_prompt_suffix(text, MULTIPLE_CHOICE_SUFFIX)


# ----------------------------------------------------------------------------------------------------------------
# Items
# ----------------------------------------------------------------------------------------------------------------


def _item(question_id: str | int, prompt: str, image: ImageSource | None, record: Any, group: str | int,
          gold: Any = None) -> Question:
    """One generation, a :class:`Question`: the ``prompt`` (no image placeholder) is its text and ``gold`` its
    answer; ``meta["record"]`` is what the scorer reads for it (``None`` when the split has no public answers);
    ``meta["group"]`` is the unit ``--limit`` counts (an MMBench question with its circular copies, an MME image
    with its two questions, else the question itself)."""
    return Question(question_id=question_id, text=prompt, image=image, answer=gold,
                    meta={"record": record, "group": group})


@dataclass
class BenchmarkInputs:
    benchmark: str
    items: list[Question]
    split: str | None = None
    sources: dict[str, str] = field(default_factory=dict)
    unscored_reason: str | None = None  # set when there is no ground truth to score against

    @property
    def records(self) -> list[Any]:
        return [item.meta["record"] for item in self.items]


def _existing(path: str | Path, what: str) -> Path:
    path = Path(path).expanduser()
    if not path.exists():
        raise BenchmarkDataError(f"{path}: {what} not found")
    return path


def _question_file(data: Path, default_name: str | None = None) -> Path:
    if data.is_dir():
        if default_name is not None and (data / default_name).is_file():
            return data / default_name
        raise BenchmarkDataError(f"{data}: is a folder; expected a question file"
                                 + (f" (or a folder holding {default_name})" if default_name else ""))
    return data


def _find_annotations(benchmark: str, data: Path, given: str | Path | None) -> Path | None:
    if given is not None:
        return _existing(given, "annotation file/folder")
    folder = data if data.is_dir() else data.parent
    for name in DEFAULT_ANNOTATIONS.get(benchmark, ()):
        candidate = folder / name
        if benchmark == "pope":
            if candidate.is_dir() and any(candidate.glob("coco_pope_*.json")):
                return candidate
        elif candidate.is_file():
            return candidate
    return None


def _check_images(items: Sequence[Question], source: Path, *, optional: bool = False) -> None:
    """Every item has an image (unless ``optional``) and every image path is a file; else one error listing all."""
    problems = _Problems(source)
    for item in items:
        if item.image is None:
            if not optional:
                problems.add(f"question_id {item.question_id!r}", "record has no image")
        elif isinstance(item.image, str) and not Path(item.image).is_file():
            problems.add(f"question_id {item.question_id!r}", f"image file not found: {item.image}")
    problems.raise_if_any()


def _decode_images(items: Sequence[Question], source: Path) -> None:
    """Every image file decodes (in parallel, cached by content), before any model is loaded."""
    from vlweave.data.images import verify_images
    from vlweave.data.llava_json import DataError

    try:
        verify_images([(f"question_id {it.question_id!r}", it.image) for it in items if isinstance(it.image, str)],
                      source)
    except DataError as exc:
        raise BenchmarkDataError(str(exc)) from None


def _read_questions(path: Path, image_folder: str | Path) -> list[Question]:
    """A LLaVA question file's questions (images are checked by :func:`_check_images`)."""
    try:
        return read_questions(path, image_folder, check_images=False)
    except DataError as exc:
        raise BenchmarkDataError(str(exc)) from None


def _match(questions: Sequence[Question], truth: Iterable[Any], source: Path, truth_path: Path) -> list[Any]:
    """Ground-truth records for ``questions``, by question_id (compared as strings); one error lists the misses."""
    by_id = {str(record.question_id): record for record in truth}
    problems = _Problems(source)
    out = []
    for q in questions:
        record = by_id.get(str(q.question_id))
        if record is None:
            problems.add(f"question_id {q.question_id!r}", f"no ground truth in {truth_path}")
        out.append(record)
    problems.raise_if_any()
    return out


def _load_pope(data: Path, image_folder: str | None, annotations: str | None, split: str | None
               ) -> BenchmarkInputs:
    if split is not None and split not in POPE_SPLITS:
        raise BenchmarkDataError(f"unknown POPE split {split!r}; expected one of {', '.join(POPE_SPLITS)}")
    qfile = _question_file(data, POPE_QUESTION_FILE)
    records = read_pope(qfile, require_label=False, image_folder=image_folder or qfile.parent)
    sources = {"questions": str(qfile)}
    if any(r.label is None for r in records):
        folder = _find_annotations("pope", data, annotations)
        if folder is None:
            raise BenchmarkDataError(f"{qfile}: questions have no labels and no coco_pope_<split>.json files were "
                                     f"found (pass --annotations FOLDER)")
        records = attach_pope_labels(records, folder)
        sources["annotations"] = str(folder)
    if split is not None:
        records = [r for r in records if r.split == split]
        if not records:
            raise BenchmarkDataError(f"{qfile}: no questions of split {split!r}")
    items = [_item(r.question_id, short_answer_prompt(r.text), r.image, r, r.question_id, r.label)
             for r in records]
    _check_images(items, qfile)
    return BenchmarkInputs("pope", items, split, sources)


def _load_mme(data: Path, image_folder: str | None) -> BenchmarkInputs:
    records = read_mme(data, image_root=image_folder)
    items = [_item(r.question_id, mme_prompt(r.question), r.image, r, f"{r.subtask}/{r.image_name}",
               r.answer) for r in records]
    missing = [it for it in items if it.image is None]
    if missing:
        raise BenchmarkDataError(f"{data}: {len(missing)} question(s) without an image file, first question_id "
                                 f"{missing[0].question_id!r} (eval-tool <subtask>.txt files need --image-folder "
                                 "pointing at the MME_Benchmark release folder)")
    _check_images(items, data)
    return BenchmarkInputs("mme", items, None, {"questions": str(data)})


def _check_mmbench_images(records: Sequence[MMBenchRecord]) -> None:
    """Every distinct base64 image decodes and has a picture header (pixels are decoded later, batch by batch)."""
    import io

    from PIL import Image

    seen: set[str] = set()
    for record in records:
        data = record.image_b64 or ""
        if data in seen:
            continue
        seen.add(data)
        try:
            Image.open(io.BytesIO(_decode_b64(data, record.source))).close()
        except BenchmarkDataError:
            raise
        except Exception as exc:  # PIL raises several exception types for corrupt data
            raise BenchmarkDataError(f"{record.source}: image is not a readable picture ({exc})") from None


def _load_mmbench(data: Path, split: str | None) -> BenchmarkInputs:
    records = read_mmbench_tsv(data)
    _check_mmbench_images(records)
    records = expand_circular(records)
    items = [_item(r.index, multiple_choice_prompt(r.question, r.options, r.hint), r.load_image, r,
               r.group, r.answer) for r in records]
    unscored = None
    if any(r.answer is None for r in records):
        unscored = ("rows without answers (MMBench test split): predictions are scored by the OpenCompass "
                    "server, not locally")
    return BenchmarkInputs("mmbench", items, split, {"questions": str(data)}, unscored)


def _load_scienceqa(data: Path, image_folder: str | None, annotations: str | None, split: str | None
                    ) -> BenchmarkInputs:
    qfile = _question_file(data)
    questions = _read_questions(qfile, image_folder or qfile.parent)
    problems = _find_annotations("scienceqa_img", data, annotations)
    if problems is None:
        raise BenchmarkDataError(f"{qfile}: ScienceQA ground truth not found (pass --annotations problems.json)")
    pid_splits = problems.parent / "pid_splits.json"
    split = split or "test"
    truth = read_scienceqa(problems, pid_splits if pid_splits.is_file() else None, split=split)
    records = _match(questions, truth, qfile, problems)
    items = [_item(q.question_id, scienceqa_prompt(q.text), q.image, r, q.question_id, r.answer)
             for q, r in zip(questions, records)]
    _check_images(items, qfile, optional=True)
    return BenchmarkInputs("scienceqa_img", items, split, {"questions": str(qfile), "annotations": str(problems)})


def _load_vqa_style(benchmark: str, data: Path, image_folder: str | None, annotations: str | None,
                    split: str | None) -> BenchmarkInputs:
    qfile = _question_file(data)
    questions = _read_questions(qfile, image_folder or qfile.parent)
    truth_path = _find_annotations(benchmark, data, annotations)
    sources = {"questions": str(qfile)}
    unscored = None
    if truth_path is None:
        if benchmark != "vqav2":
            raise BenchmarkDataError(f"{qfile}: {benchmark} ground truth not found (pass --annotations FILE)")
        records: list[Any] = [None] * len(questions)
        unscored = "no --annotations (VQAv2 test-dev answers are private: submit the predictions to EvalAI)"
    else:
        truth = read_gqa_questions(truth_path) if benchmark == "gqa" else read_vqa_annotations(truth_path)
        records = _match(questions, truth, qfile, truth_path)
        sources["annotations"] = str(truth_path)
    items = [_item(q.question_id, short_answer_prompt(q.text), q.image, r, q.question_id,
               None if r is None else getattr(r, "answer", None) or getattr(r, "answers", None))
             for q, r in zip(questions, records)]
    _check_images(items, qfile)
    return BenchmarkInputs(benchmark, items, split, sources, unscored)


def select_groups(items: Sequence[Question], limit: int | None) -> list[Question]:
    """The items of the first ``limit`` groups, in file order (whole MMBench circular groups, whole MME images)."""
    if limit is None:
        return list(items)
    if limit < 1:
        raise ValueError(f"--limit must be at least 1, got {limit}")
    keep: set[Any] = set()
    for item in items:
        if len(keep) == limit:
            break
        keep.add(item.meta["group"])
    return [item for item in items if item.meta["group"] in keep]


def load_benchmark(benchmark: str, data: str | Path, *, image_folder: str | Path | None = None,
                   annotations: str | Path | None = None, split: str | None = None,
                   limit: int | None = None) -> BenchmarkInputs:
    """Read ``benchmark``'s files (layouts in :data:`DATA_LAYOUTS`) into prompts, images and scorer records.

    Raises :class:`BenchmarkDataError` (a ``ValueError``) naming the file and record for a missing file, a bad
    record, a record without an image or an image file that does not exist.
    """
    spec = get_benchmark(benchmark)  # ValueError listing the known names
    data_path = _existing(data, "benchmark data")
    folder = None if image_folder is None else str(_existing(image_folder, "image folder"))
    notes = None if annotations is None else str(annotations)
    if split is None and len(spec.splits) == 1:
        split = spec.splits[0]
    if benchmark == "pope":
        inputs = _load_pope(data_path, folder, notes, split)
    elif benchmark == "mme":
        inputs = _load_mme(data_path, folder)
    elif benchmark == "mmbench":
        inputs = _load_mmbench(_question_file(data_path), split)
    elif benchmark == "scienceqa_img":
        inputs = _load_scienceqa(data_path, folder, notes, split)
    else:
        inputs = _load_vqa_style(benchmark, data_path, folder, notes, split)
    inputs.items = select_groups(inputs.items, limit)
    if not inputs.items:
        raise BenchmarkDataError(f"{data_path}: no questions")
    _decode_images(inputs.items, data_path)  # the selected questions' images, before any model is loaded
    return inputs
