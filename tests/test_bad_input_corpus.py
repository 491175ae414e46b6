"""A corpus of bad inputs, each driven through the CLI in-process (``vlweave.cli.main``): training data and configs,
resume, question files, benchmark readers and chat.  Every case must exit non-zero with one message that names the
file or the record (and the problem), print no traceback, and leave its input files untouched; the tolerated cases
(answers truncated by ``max_length``) run to the end with a counted warning and train on every record.

Most cases fail before any model is built (the data is checked first), so the whole corpus costs a few seconds; the
few that need a model use one tiny random-init checkpoint saved once.
"""

from __future__ import annotations

import base64
import io
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
from helpers import draw_image, finetune_stage, isolated_env, make_run
from vlweave.builder import build_model, save_checkpoint
from vlweave.cli import main


@pytest.fixture(autouse=True, scope="module")
def _env(tmp_path_factory):
    with isolated_env(tmp_path_factory.mktemp("vlweave-cache")):
        yield


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """Good data (16 records with images, 6 questions) and one untrained tiny checkpoint (context 512 tokens)."""
    tmp = tmp_path_factory.mktemp("corpus")
    cfg = make_run(tmp, stages=[finetune_stage("full", max_steps=1)])
    model, tokenizer = build_model(cfg)
    save_checkpoint(model, tokenizer, tmp / "ckpt")
    data = Path(cfg.data.train).parent
    return SimpleNamespace(tmp=tmp, cfg=cfg, data=data, ckpt=tmp / "ckpt",
                           records=json.loads((data / "train.json").read_text()),
                           questions=[json.loads(line) for line in (data / "questions.jsonl").read_text().splitlines()],
                           image=str(sorted((data / "images").glob("*.png"))[0]))


@dataclass
class Case:
    """``build(base, tmp) -> (argv, inputs)``: the CLI arguments and the input files that must stay unchanged;
    ``expect``: substrings of the error (``{tmp}`` is the case's folder)."""

    name: str
    build: Callable
    expect: tuple[str, ...]


# ---- builders ---------------------------------------------------------------------------------------------------


def train_case(base, tmp: Path, records=None, *, raw: bytes | None = None, sets: tuple[str, ...] = ()):
    """A run config over a (bad) copy of the training data; images resolve against the good data folder."""
    data = tmp / "train.json"
    data.write_bytes(raw if raw is not None else json.dumps(records, indent=1).encode())
    cfg = make_run(base.tmp, stages=[finetune_stage("full", max_steps=1)])
    cfg.data.train, cfg.data.image_folder, cfg.train.output_dir = str(data), str(base.data), str(tmp / "run")
    cfg.save(tmp / "run.yaml")
    return ["train", str(tmp / "run.yaml"), *(a for s in sets for a in ("--set", s))], [data]


def with_record(base, index: int, change: Callable[[dict], None]) -> list[dict]:
    records = json.loads(json.dumps(base.records))
    change(records[index])
    return records


def answer(value: str):
    def change(r):
        r["conversations"][1]["value"] = value
    return change


def field(key: str, value):
    def change(r):
        r[key] = value
    return change


def png_bytes(kind: str) -> bytes:
    buf = io.BytesIO()
    draw_image("red", "square", 32).save(buf, format="PNG")
    good = buf.getvalue()
    return {"text": b"this is not an image\n", "truncated": good[: len(good) // 2], "empty": b""}[kind]


def bad_image_train(kind: str):
    def build(base, tmp):
        (tmp / "bad.png").write_bytes(png_bytes(kind))
        argv, inputs = train_case(base, tmp, with_record(base, 5, field("image", str(tmp / "bad.png"))))
        return argv, inputs + [tmp / "bad.png"]
    return build


def config_case(*sets: str):
    return lambda base, tmp: train_case(base, tmp, base.records, sets=sets)


def latin1_config(base, tmp):
    argv, inputs = train_case(base, tmp, base.records)
    text = (tmp / "run.yaml").read_bytes().replace(b"seed: 0", "seed: 0  # r\xe9sum\xe9".encode("latin-1"))
    (tmp / "run.yaml").write_bytes(text)
    return argv, inputs + [tmp / "run.yaml"]


def latin1_train(base, tmp):
    text = json.dumps(base.records, indent=1, ensure_ascii=False).replace("What color is this?", "What colour is th\u00e9s?", 1)
    assert "\u00e9" in text
    return train_case(base, tmp, raw=text.encode("latin-1"))


def resume_case(mutate: Callable[[Path], list[str]]):
    def build(base, tmp):
        run = tmp / "run"
        run.mkdir()
        cfg = make_run(base.tmp, stages=[finetune_stage("full", max_steps=1)])
        cfg.train.output_dir = str(run)
        cfg.save(run / "config.yaml")
        return ["train", str(run / "config.yaml"), "--resume", str(run), *mutate(run)], [run / "config.yaml"]
    return build


def question_case(rows=None, *, raw: bytes | None = None, args: tuple[str, ...] = (), ckpt: str | None = None):
    def build(base, tmp):
        q = tmp / "q.jsonl"
        q.write_bytes(raw if raw is not None else "".join(json.dumps(r) + "\n" for r in rows).encode())
        return ["eval", ckpt or str(base.ckpt), "--data", str(q), "--image-folder", str(base.data),
                "--output", str(tmp / "out"), *args], [q]
    return build


def questions_with(index: int, change: Callable[[dict], None]):
    def build(base, tmp):
        rows = json.loads(json.dumps(base.questions))
        change(rows[index])
        return question_case(rows)(base, tmp)
    return build


def questions_raw(make: Callable[[list[dict]], bytes]):
    return lambda base, tmp: question_case(raw=make(base.questions))(base, tmp)


def questions_args(*args: str):
    return lambda base, tmp: question_case(base.questions, args=args)(base, tmp)


def bad_image_question(base, tmp):
    (tmp / "bad.png").write_bytes(png_bytes("truncated"))
    rows = json.loads(json.dumps(base.questions))
    rows[2]["image"] = str(tmp / "bad.png")
    argv, inputs = question_case(rows)(base, tmp)
    return argv, inputs + [tmp / "bad.png"]


def damaged_checkpoint(base, tmp) -> Path:
    ckpt = tmp / "ckpt"
    shutil.copytree(base.ckpt, ckpt)
    data = (ckpt / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").write_bytes(data[: len(data) - 1000])
    return ckpt


def eval_damaged(base, tmp):
    ckpt = damaged_checkpoint(base, tmp)
    return question_case(base.questions, ckpt=str(ckpt))(base, tmp)


def pope_case(rows_or_raw, *, image_bytes: bytes | None = None, args: tuple[str, ...] = ()):
    def build(base, tmp):
        inputs = []
        if image_bytes is not None:
            (tmp / "bad.png").write_bytes(image_bytes)
            inputs.append(tmp / "bad.png")
        rows = [{"question_id": i, "image": Path(base.image).name if i != 1 or image_bytes is None else
                 str(tmp / "bad.png"), "text": "Is there a square in the image?", "label": "yes",
                 "category": "random"} for i in range(3)]
        q = tmp / "coco_pope_random.json"
        raw = rows_or_raw(rows) if callable(rows_or_raw) else rows_or_raw
        q.write_bytes(raw)
        return ["eval", str(base.ckpt), "--benchmark", "pope", "--data", str(q), "--image-folder",
                str(Path(base.image).parent), "--output", str(tmp / "out"), *args], inputs + [q]
    return build


def _pope_json(rows) -> bytes:
    return json.dumps(rows, indent=1).encode()


def mmbench_case(make_rows: Callable[[str], list[list[str]]], *, latin1: bool = False):
    def build(base, tmp):
        b64 = base64.b64encode(Path(base.image).read_bytes()).decode()
        header = ["index", "question", "hint", "A", "B", "answer", "category", "image"]
        text = "\t".join(header) + "\n" + "".join("\t".join(r) + "\n" for r in make_rows(b64))
        tsv = tmp / "mmbench_dev_en.tsv"
        tsv.write_bytes(text.encode("latin-1" if latin1 else "utf-8"))
        return ["eval", str(base.ckpt), "--benchmark", "mmbench", "--data", str(tsv), "--output",
                str(tmp / "out")], [tsv]
    return build


def vqa_style_case(benchmark: str, annotations: Callable[[list[dict]], object]):
    """A good LLaVA question file with bad ground truth (``--annotations``)."""
    def build(base, tmp):
        rows = [{"question_id": q["question_id"], "image": q["image"], "text": q["text"]} for q in base.questions]
        q = tmp / "questions.jsonl"
        q.write_text("".join(json.dumps(r) + "\n" for r in rows))
        ann = tmp / "annotations.json"
        ann.write_text(json.dumps(annotations(rows)))
        return ["eval", str(base.ckpt), "--benchmark", benchmark, "--data", str(q), "--annotations", str(ann),
                "--image-folder", str(base.data), "--output", str(tmp / "out")], [q, ann]
    return build


def chat_case(*args: str, ckpt: Callable | None = None, image: bytes | None = None):
    def build(base, tmp):
        folder = ckpt(base, tmp) if ckpt else base.ckpt
        inputs = []
        extra = list(args)
        if image is not None:
            (tmp / "bad.png").write_bytes(image)
            extra += ["--image", str(tmp / "bad.png")]
            inputs.append(tmp / "bad.png")
        if "--max-new-tokens" not in extra:
            extra += ["--max-new-tokens", "2"]
        return ["chat", str(folder), *extra], inputs
    return build


LONG = " ".join(["color"] * 700)  # > the tiny LM's 512 positions

CASES = [
    # -- training data (checked before the model is built)
    Case("train-latin1-bytes", latin1_train, ("{tmp}/train.json", "not UTF-8 text at line", "byte 0xe9")),
    Case("train-invalid-json", lambda b, t: train_case(b, t, raw=b'[{"id": "x",\n "conversations": ]'),
         ("{tmp}/train.json", "invalid JSON at line 2")),
    Case("train-not-a-list", lambda b, t: train_case(b, t, raw=b'{"id": 1}'), ("{tmp}/train.json", "expected a JSON list")),
    Case("train-record-not-object", lambda b, t: train_case(b, t, b.records[:3] + ["oops"]),
         ("{tmp}/train.json", "record 3: expected an object")),
    Case("train-empty-answer", lambda b, t: train_case(b, t, with_record(b, 2, answer(""))),
         ("{tmp}/train.json", "record 2 (id 's02')", "empty answer")),
    Case("train-blank-answer", lambda b, t: train_case(b, t, with_record(b, 4, answer("  \n "))),
         ("record 4 (id 's04')", "empty answer")),
    Case("train-nul-byte", lambda b, t: train_case(b, t, with_record(b, 3, answer("red\x00"))),
         ("record 3 (id 's03')", "NUL byte")),
    Case("train-image-escapes-folder", lambda b, t: train_case(b, t, with_record(b, 1, field("image", "../../etc/passwd"))),
         ("record 1 (id 's01')", "escapes the image folder")),
    Case("train-image-missing", lambda b, t: train_case(b, t, with_record(b, 6, field("image", "images/nope.png"))),
         ("record 6 (id 's06')", "image file not found")),
    Case("train-image-not-an-image", bad_image_train("text"),
         ("{tmp}/train.json", "record id 's05'", "{tmp}/bad.png", "does not decode")),
    Case("train-image-truncated", bad_image_train("truncated"), ("record id 's05'", "{tmp}/bad.png", "does not decode")),
    Case("train-image-empty-file", bad_image_train("empty"), ("record id 's05'", "{tmp}/bad.png", "does not decode")),
    Case("train-image-list", lambda b, t: train_case(b, t, with_record(b, 0, field("image", ["a.png", "b.png"]))),
         ("record 0 (id 's00')", "only one image")),
    Case("train-ends-with-question", lambda b, t: train_case(b, t, with_record(
        b, 7, lambda r: r.__setitem__("conversations", r["conversations"][:1]))), ("record 7 (id 's07')", "ends with a human turn")),
    Case("train-duplicate-id", lambda b, t: train_case(b, t, with_record(b, 9, field("id", "s08"))),
         ("record 9 (id 's08')", "duplicate id")),
    Case("train-value-not-string", lambda b, t: train_case(b, t, with_record(b, 10, answer(3))),
         ("record 10 (id 's10')", "'value' must be a string")),
    Case("train-unknown-role", lambda b, t: train_case(b, t, with_record(
        b, 11, lambda r: r["conversations"][1].__setitem__("from", "bot"))), ("record 11 (id 's11')", "unknown role")),
    Case("train-two-image-tags", lambda b, t: train_case(b, t, with_record(
        b, 12, lambda r: r["conversations"][0].__setitem__("value", "<image>\n<image>\nWhat?"))),
         ("record 12 (id 's12')", "placeholders")),
    Case("train-data-file-missing", lambda b, t: train_case(b, t, b.records, sets=(f"data.train={t / 'none.json'}",)),
         ("{tmp}/none.json", "data file not found")),
    # -- train config
    Case("config-max-steps-0", config_case("train.stages.0.max_steps=0"), ("train.stages.0.max_steps = 0",)),
    Case("config-max-steps-negative", config_case("train.stages.0.max_steps=-3"), ("train.stages.0.max_steps = -3",)),
    Case("config-batch-size-0", config_case("train.stages.0.batch_size=0"), ("train.stages.0.batch_size = 0",)),
    Case("config-grad-accum-0", config_case("train.stages.0.grad_accum=0"), ("train.stages.0.grad_accum = 0",)),
    Case("config-lr-nan", config_case("train.stages.0.lr=.nan"), ("train.stages.0.lr = nan", "finite positive")),
    Case("config-lr-inf", config_case("train.stages.0.lr=.inf"), ("train.stages.0.lr = inf", "finite positive")),
    Case("config-lr-negative", config_case("train.stages.0.lr=-0.001"), ("train.stages.0.lr = -0.001",)),
    Case("config-lr-zero", config_case("train.stages.0.lr=0"), ("train.stages.0.lr = 0.0",)),
    Case("config-connector-lr-nan", config_case("train.stages.0.connector_lr=.nan"), ("train.stages.0.connector_lr = nan",)),
    Case("config-keep-checkpoints-0", config_case("train.keep_checkpoints=0"), ("train.keep_checkpoints = 0",)),
    Case("config-on-nonfinite-unknown", config_case("train.on_nonfinite=ignore"), ("train.on_nonfinite = 'ignore'",)),
    Case("config-latin1-bytes", latin1_config, ("{tmp}/run.yaml", "not UTF-8 text at line")),
    # -- resume
    Case("resume-with-set", resume_case(lambda run: ["--set", "train.seed=1"]), ("--set and --output do not apply",)),
    Case("resume-with-output", resume_case(lambda run: ["--output", str(run.parent / "elsewhere")]),
         ("--set and --output do not apply",)),
    Case("resume-missing-folder", lambda b, t: (["train", "demo", "--resume", str(t / "nowhere")], []),
         ("{tmp}/nowhere", "no such run folder")),
    Case("resume-no-checkpoint", resume_case(lambda run: []), ("{tmp}/run", "no checkpoint to resume from")),
    # -- eval question files (checked before the model is loaded)
    Case("eval-missing-answer", questions_with(1, lambda r: r.pop("answer")), ("{tmp}/q.jsonl", "question_id 'q1'",
                                                                               "missing 'answer'")),
    Case("eval-number-answer", questions_with(2, field("answer", 3)), ("question_id 'q2'", "'answer' must be a string")),
    Case("eval-list-answer", questions_with(3, field("answer", ["red"])), ("question_id 'q3'", "'answer' must be a string")),
    Case("eval-latin1-bytes", questions_raw(lambda qs: b"".join(
        json.dumps(q).encode() + b"\n" for q in qs[:3]) + '{"question_id": "x", "text": "caf\xe9"}\n'.encode("latin-1")),
         ("{tmp}/q.jsonl", "not UTF-8 text at line 4")),
    Case("eval-invalid-json-line", questions_raw(lambda qs: json.dumps(qs[0]).encode() + b"\n{oops\n"),
         ("{tmp}/q.jsonl", "line 2: invalid JSON")),
    Case("eval-nul-in-text", questions_with(0, field("text", "What\x00 color?")), ("question_id 'q0'", "NUL byte")),
    Case("eval-empty-text", questions_with(4, field("text", " ")), ("question_id 'q4'", "missing or empty 'text'")),
    Case("eval-image-escapes-folder", questions_with(5, field("image", "../../../x.png")),
         ("question_id 'q5'", "escapes the image folder")),
    Case("eval-image-missing", questions_with(5, field("image", "images/none.png")),
         ("question_id 'q5'", "image file not found")),
    Case("eval-image-corrupt", bad_image_question, ("{tmp}/q.jsonl", "question_id 'q2'", "{tmp}/bad.png",
                                                    "does not decode")),
    Case("eval-limit-negative", questions_args("--limit", "-1"), ("--limit must be at least 1, got -1",)),
    Case("eval-limit-zero", questions_args("--limit", "0"), ("--limit must be at least 1, got 0",)),
    Case("eval-batch-size-zero", questions_args("--batch-size", "0"), ("--batch-size must be at least 1",)),
    Case("eval-max-new-tokens-zero", questions_args("--max-new-tokens", "0"), ("--max-new-tokens must be at least 1",)),
    Case("eval-over-long-question", questions_with(1, field("text", LONG)),
         ("question_id 'q1'", "too long for the model's context of 512 tokens")),
    Case("eval-truncated-weights", eval_damaged, ("{tmp}/ckpt/model.safetensors", "damaged weights file")),
    # -- benchmark readers
    Case("pope-latin1-bytes", pope_case(lambda rows: _pope_json(rows).replace(b"square", "squ\xe4re".encode("latin-1"), 1)),
         ("{tmp}/coco_pope_random.json", "not UTF-8 text at line")),
    Case("pope-bad-label", pope_case(lambda rows: _pope_json([dict(rows[0], label="maybe"), *rows[1:]])),
         ("{tmp}/coco_pope_random.json", "question_id 0", "'label' must be yes or no")),
    Case("pope-image-corrupt", pope_case(_pope_json, image_bytes=png_bytes("text")),
         ("{tmp}/coco_pope_random.json", "question_id 1", "{tmp}/bad.png", "does not decode")),
    Case("benchmark-limit-negative", pope_case(_pope_json, args=("--limit", "-1")), ("--limit must be at least 1",)),
    Case("mmbench-latin1-bytes", mmbench_case(lambda b64: [["0", "Which col\xf6r?", "", "red", "blue", "A", "c", b64]],
                                              latin1=True), ("{tmp}/mmbench_dev_en.tsv", "not UTF-8 text at line 2")),
    Case("mmbench-bad-base64", mmbench_case(lambda b64: [["0", "Which?", "", "red", "blue", "A", "c", "@@@"]]),
         ("{tmp}/mmbench_dev_en.tsv", "row 1")),
    Case("textvqa-non-string-answers", vqa_style_case("textvqa", lambda rows: {"data": [
        {"question_id": r["question_id"], "answers": ["red"] * 10 if i != 2 else [1, 2]} for i, r in enumerate(rows)]}),
         ("{tmp}/annotations.json", "record 2 (question_id 'q2')", "'answers' must be a non-empty list of strings")),
    Case("gqa-missing-answer", vqa_style_case("gqa", lambda rows: {
        r["question_id"]: {"question": r["text"], **({"answer": "red"} if i != 4 else {})} for i, r in enumerate(rows)}),
         ("{tmp}/annotations.json", "question 'q4'", "missing 'answer'")),
    # -- chat
    Case("chat-image-missing", chat_case("--image", "/nonexistent/x.png", "--prompt", "Hi"),
         ("/nonexistent/x.png", "no such image file")),
    Case("chat-image-corrupt", chat_case("--prompt", "Hi", image=png_bytes("truncated")),
         ("{tmp}/bad.png", "cannot read image")),
    Case("chat-truncated-weights", chat_case("--prompt", "Hi", ckpt=damaged_checkpoint),
         ("{tmp}/ckpt/model.safetensors", "damaged weights file")),
    Case("chat-over-long-prompt", chat_case("--prompt", LONG), ("chat turn 1 (", "too long for the model's context")),
    Case("chat-max-new-tokens-zero", chat_case("--prompt", "Hi", "--max-new-tokens", "0"),
         ("--max-new-tokens and --frames must be at least 1",)),
]


def test_corpus_is_large_and_covers_every_entry_point():
    kinds = {c.name.split("-")[0] for c in CASES}
    assert len(CASES) >= 30 and len({c.name for c in CASES}) == len(CASES)
    assert {"train", "config", "resume", "eval", "pope", "mmbench", "textvqa", "gqa", "chat"} <= kinds


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_is_refused_by_name(case: Case, base, tmp_path, capsys):
    argv, inputs = case.build(base, tmp_path)
    before = {p: p.read_bytes() for p in inputs}
    capsys.readouterr()
    rc = main(argv)
    captured = capsys.readouterr()
    err = captured.err
    assert rc != 0, f"{case.name}: accepted (rc 0); stdout: {captured.out[-500:]}"
    assert "Traceback" not in err and "Traceback" not in captured.out
    assert f"vlweave {argv[0]}: error: " in err, err
    for needle in case.expect:
        assert needle.replace("{tmp}", str(tmp_path)) in err, f"{case.name}: {needle!r} not in:\n{err}"
    assert {p: p.read_bytes() for p in inputs} == before  # nothing rewritten, nothing lost
    for out in (tmp_path / "out", tmp_path / "run"):
        assert not (out / "predictions.jsonl").exists() and not (out / "final").exists()
        assert not (out / "predictions.partial.jsonl").exists()  # refused before generating anything


def test_answers_truncated_by_max_length_are_counted_not_hidden(base, tmp_path, capsys):
    records = json.loads(json.dumps(base.records))
    long_ids = ["s03", "s11"]
    for r in records:
        if r["id"] in long_ids:
            r["conversations"][1]["value"] = " ".join(["red"] * 120)  # far past max_length 96
    argv, _ = train_case(base, tmp_path, records, sets=("language.max_length=96", "train.stages.0.max_steps=4"))
    with pytest.warns(UserWarning, match=r"2 record\(s\) longer than language.max_length=96"):
        assert main(argv) == 0
    metrics = json.loads((tmp_path / "run" / "train_metrics.json").read_text())
    entry = metrics["warnings"]["truncated_answer"]
    assert entry["count"] == 2 and sorted(entry["examples"]) == long_ids
    # No record was dropped: 4 steps of 4 = all 16 records, each trained once.
    assert [m["step"] for m in metrics["log"]] == [1, 2, 3, 4] and all(m["tokens"] > 0 for m in metrics["log"])


def test_interrupted_eval_keeps_the_predictions_made_so_far(base, tmp_path, monkeypatch):
    from vlweave.builder import load_checkpoint
    from vlweave.eval.runner import evaluate, load_eval_questions

    model, tokenizer = load_checkpoint(base.ckpt)
    questions = load_eval_questions(str(base.data / "questions.jsonl"))
    real = type(model).generate
    calls = {"n": 0}

    def generate(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # the user stops a long evaluation (or the machine goes away)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(type(model), "generate", generate)
    with pytest.raises(KeyboardInterrupt):
        evaluate(model, tokenizer, questions, out_dir=tmp_path, batch_size=2, max_new_tokens=2, progress=False)
    rows = [json.loads(line) for line in (tmp_path / "predictions.partial.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and not (tmp_path / "predictions.jsonl").exists()
    assert {r["question_id"] for r in rows} <= {q.question_id for q in questions}
    monkeypatch.setattr(type(model), "generate", real)
    report = evaluate(model, tokenizer, questions, out_dir=tmp_path, batch_size=2, max_new_tokens=2, progress=False)
    assert report["n"] == 6 and not (tmp_path / "predictions.partial.jsonl").exists()
    final = {json.loads(line)["question_id"]: json.loads(line) for line in
             (tmp_path / "predictions.jsonl").read_text().splitlines()}
    for r in rows:  # the partial rows are exactly the complete run's rows for those questions
        assert final[r["question_id"]] == r
