"""The lmms-eval model plugin (``vlweave.integrations.lmms_eval``) on a tiny random checkpoint.

Always run: the adapter against lmms-eval's request contract with stand-in instances (objects with ``.args``) --
``generate_until`` equals vlweave's own batched greedy answers (stop strings and ``max_new_tokens`` honoured) and
``loglikelihood`` equals the sum of log-probs computed from the model's logits.  With lmms-eval installed
(``make test-lmms`` builds a separate venv for it): the entry point resolves ``--model vlweave``, and lmms-eval runs
a local generate_until task (a YAML over a JSONL dataset in tmp_path) end to end.
"""

from __future__ import annotations

import importlib.util
import json
import textwrap
from pathlib import Path

import pytest
import torch
from PIL import Image

from helpers import draw_image, isolated_env, make_run
from vlweave.builder import build_model, load_checkpoint, save_checkpoint
from vlweave.data.questions import Question
from vlweave.eval.vqa import generate_answers
from vlweave.integrations import lmms_eval as plugin
from vlweave.processing import encode_prompt
from vlweave.train.trainer import make_transform
from vlweave.vision.cache import load_image

HAVE_LMMS_EVAL = importlib.util.find_spec("lmms_eval") is not None
ROOT = Path(__file__).resolve().parents[1]


class FakeInstance:
    """What the adapter reads of lmms-eval's ``Instance``: ``args``."""

    def __init__(self, *args):
        self.args = args


@pytest.fixture(autouse=True, scope="module")
def _env(tmp_path_factory):
    with isolated_env(tmp_path_factory.mktemp("vlweave-cache")):
        yield


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny random checkpoint and four docs (three with an image, one text-only)."""
    tmp = tmp_path_factory.mktemp("plugin")
    model, tok = build_model(make_run(tmp, vision="clip", language="qwen2", tokenizer="qwen", template="tokenizer"))
    ckpt = save_checkpoint(model, tok, tmp / "ckpt")
    docs = []
    for i, (color, shape) in enumerate([("red", "square"), ("blue", "circle"), ("green", "square")]):
        path = tmp / f"img{i}.png"
        draw_image(color, shape, size=32).save(path)
        docs.append({"id": i, "image": str(path), "question": f"What color is the {shape}?", "answer": color})
    docs.append({"id": 3, "image": None, "question": "Say a colour.", "answer": "red"})
    return ckpt, docs


def _doc_to_visual(doc):
    return [Image.open(doc["image"]).convert("RGB")] if doc["image"] else []


def _adapter(ckpt, docs, **kwargs):
    lm = plugin.VlweaveLMM(pretrained=str(ckpt), **kwargs)
    lm.task_dict = {"tiny": {"test": docs}}
    return lm


def _questions(docs):
    return [Question(question_id=d["id"], text=d["question"], image=d["image"]) for d in docs]


def test_import_does_not_need_lmms_eval():
    assert plugin.VlweaveLMM.is_simple is True
    assert plugin.cut_at_stop("red. blue\nx", ["\n", "."]) == "red"
    assert plugin.cut_at_stop("red", ["", "zz"]) == "red"
    # The entry point is the manifest function (lmms-eval 0.7.x calls callables and wants a ModelManifest).
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert '[project.entry-points."lmms_eval.models"]\nvlweave = "vlweave.integrations.lmms_eval:model_manifest"\n' \
        in pyproject
    assert plugin.CLASS_PATH == "vlweave.integrations.lmms_eval.Vlweave"
    if not HAVE_LMMS_EVAL:
        with pytest.raises(ImportError, match="pip install 'vlweave\\[lmms\\]'"):
            plugin.Vlweave  # noqa: B018


def test_generate_until_is_our_batched_greedy(setup):
    ckpt, docs = setup
    lm = _adapter(ckpt, docs, batch_size=2)
    greedy = {"max_new_tokens": 4, "temperature": 0, "do_sample": False}
    requests = [FakeInstance(d["question"], dict(greedy), _doc_to_visual, d["id"], "tiny", "test") for d in docs]
    requests.append(FakeInstance(docs[0]["question"], {"max_new_tokens": 2}, _doc_to_visual, 0, "tiny", "test"))
    got = lm.generate_until(requests)
    model, tok = load_checkpoint(ckpt)
    expected = generate_answers(model, tok, _questions(docs), batch_size=2, max_new_tokens=4, progress=False)
    short = generate_answers(model, tok, _questions(docs[:1]), batch_size=2, max_new_tokens=2, progress=False)
    assert got == expected + short
    # "until" stop strings cut the greedy text at the first occurrence.
    k = next(i for i, a in enumerate(expected) if len(a.strip()) >= 2)
    stop = expected[k].strip()[1]
    cut = lm.generate_until([FakeInstance(docs[k]["question"], {**greedy, "until": [stop]}, _doc_to_visual,
                                          docs[k]["id"], "tiny", "test")])
    assert cut == [expected[k].split(stop, 1)[0]]
    # Sampling settings are ignored (with a warning): decoding stays greedy.
    with pytest.warns(UserWarning, match="greedily"):
        sampled = lm.generate_until([FakeInstance(docs[0]["question"], {"max_new_tokens": 4, "temperature": 0.7},
                                                  _doc_to_visual, 0, "tiny", "test")])
    assert sampled == expected[:1]
    with pytest.raises(NotImplementedError):
        lm.generate_until_multi_round(requests)


def _direct_loglikelihood(model, tok, doc, continuation):
    """Sum of log-probs of the continuation tokens from one unpadded forward pass, and whether each is argmax."""
    cfg = model.config
    has_image = doc["image"] is not None
    conv = [{"from": "human", "value": ("<image>\n" if has_image else "") + doc["question"]}]
    prompt = encode_prompt(conv, tok, cfg.chat_template_name, image_token_id=cfg.image_token_id if has_image else None,
                           num_image_tokens=model.num_image_tokens, system_prompt=cfg.system_prompt)
    cont = tok(continuation, add_special_tokens=False)["input_ids"]
    kwargs = {"pixel_values": make_transform(model)(load_image(doc["image"]))[None]} if has_image else {}
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt + cont]), **kwargs).logits[0]
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    rows = logprobs[len(prompt) - 1: len(prompt) - 1 + len(cont)]
    total = float(sum(rows[j, t] for j, t in enumerate(cont)))
    return total, all(int(rows[j].argmax()) == t for j, t in enumerate(cont)), prompt, logprobs


def test_loglikelihood_is_the_sum_of_logprobs(setup):
    ckpt, docs = setup
    lm = _adapter(ckpt, docs, batch_size=3)  # one padded batch of 3 and one of 1
    model, tok = load_checkpoint(ckpt)
    continuations = [" red", "blue circle", "green", " yes"]
    requests = [FakeInstance(d["question"], c, _doc_to_visual, d["id"], "tiny", "test")
                for d, c in zip(docs, continuations)]
    got = lm.loglikelihood(requests)
    for (value, greedy), doc, cont in zip(got, docs, continuations):
        total, is_greedy, _, _ = _direct_loglikelihood(model, tok, doc, cont)
        assert value == pytest.approx(total, abs=1e-3) and value < 0
        assert greedy == is_greedy
    # The greedy next token is reported as greedy; doc_to_target (a callable) gives the continuation.
    _, _, prompt, logprobs = _direct_loglikelihood(model, tok, docs[1], "")
    best = int(logprobs[len(prompt) - 1].argmax())
    text = tok.decode([best])
    if tok(text, add_special_tokens=False)["input_ids"] == [best]:
        (value, greedy), = lm.loglikelihood([FakeInstance(docs[1]["question"], lambda doc: text, _doc_to_visual, 1,
                                                          "tiny", "test")])
        assert greedy is True and value == pytest.approx(float(logprobs[len(prompt) - 1, best]), abs=1e-3)
    # ll_convention=nll negates (what lmms-eval's multiple_choice argmin expects).
    nll = _adapter(ckpt, docs, batch_size=3, ll_convention="nll").loglikelihood(requests)
    assert [v for v, _ in nll] == pytest.approx([-v for v, _ in got], abs=1e-4)


def test_bad_model_args_and_visuals(setup, tmp_path):
    ckpt, docs = setup
    with pytest.raises(TypeError, match="unknown model_args \\['tempreature'\\]"):
        plugin.VlweaveLMM(pretrained=str(ckpt), tempreature=0)
    with pytest.raises(ValueError, match="batch_size"):
        plugin.VlweaveLMM(pretrained=str(ckpt), batch_size="many")
    lm = _adapter(ckpt, docs)
    two = FakeInstance("Q?", {}, lambda doc: [Image.new("RGB", (8, 8))] * 2, 0, "tiny", "test")
    with pytest.raises(ValueError, match="2 visuals"):
        lm.generate_until([two])
    video = FakeInstance("Q?", {}, lambda doc: ["clip.mp4"], 0, "tiny", "test")
    with pytest.raises(ValueError, match="videos and audio are not supported"):
        lm.generate_until([video])


# ----------------------------------------------------------------------------------------------------------------
# The real lmms-eval (skipped unless installed; `make test-lmms`)
# ----------------------------------------------------------------------------------------------------------------

TASK_UTILS = '''
from PIL import Image


def doc_to_visual(doc):
    return [Image.open(doc["image"]).convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    kwargs = lmms_eval_specific_kwargs or {}
    return kwargs.get("pre_prompt", "") + doc["question"] + kwargs.get("post_prompt", "")
'''

GEN_TASK = """
task: vlweave_tiny_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_visual: !function vlweave_tiny_utils.doc_to_visual
doc_to_text: !function vlweave_tiny_utils.doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: 4
  temperature: 0
  do_sample: false
  until: ["zzz"]
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
lmms_eval_specific_kwargs:
  default:
    pre_prompt: ""
    post_prompt: "\\nAnswer the question using a single word or phrase."
metadata:
  - version: 0.0
"""

@pytest.mark.skipif(not HAVE_LMMS_EVAL, reason="lmms-eval not installed (make test-lmms)")
def test_lmms_eval_end_to_end(setup, tmp_path, monkeypatch):
    ckpt, docs = setup
    monkeypatch.setenv("LMMS_EVAL_DATASETS_CACHE", str(tmp_path / "hf-datasets"))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    image_docs = [d for d in docs if d["image"]]
    data = tmp_path / "tiny.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in image_docs))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "vlweave_tiny_utils.py").write_text(textwrap.dedent(TASK_UTILS))
    (tasks / "vlweave_tiny_gen.yaml").write_text(GEN_TASK.format(data=data))

    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.models import get_model
    from lmms_eval.tasks import TaskManager

    assert get_model("vlweave") is plugin.Vlweave  # found through the entry point
    out = simple_evaluate(model="vlweave", model_args=f"pretrained={ckpt}", tasks=["vlweave_tiny_gen"],
                          batch_size=2, device="cpu",
                          task_manager=TaskManager(include_path=str(tasks), include_defaults=False),
                          log_samples=True, process_docs_parallel=1)

    # generate_until: lmms-eval's responses are vlweave's greedy answers to the task's prompts.
    model, tok = load_checkpoint(ckpt)
    suffix = "\nAnswer the question using a single word or phrase."
    questions = [Question(question_id=d["id"], text=d["question"] + suffix, image=d["image"]) for d in image_docs]
    expected = generate_answers(model, tok, questions, batch_size=2, max_new_tokens=4, progress=False)
    samples = sorted(out["samples"]["vlweave_tiny_gen"], key=lambda s: s["doc_id"])
    assert [s["resps"][0][0] for s in samples] == expected
    em = out["results"]["vlweave_tiny_gen"]["exact_match,none"]
    assert em == pytest.approx(sum(a == d["answer"] for a, d in zip(expected, image_docs)) / len(image_docs))



@pytest.mark.skipif(not HAVE_LMMS_EVAL, reason="lmms-eval not installed (make test-lmms)")
def test_lmms_eval_073_stringifies_loglikelihood_results():
    """Why no loglikelihood / multiple_choice task runs end to end above: lmms-eval 0.7.3's evaluator passes every
    response through ``unwrap_generation_output``, which turns a ``(logprob, is_greedy)`` tuple into its string,
    so its ``multiple_choice`` scoring fails for every model ("too many values to unpack").  When this starts to
    fail, upstream has fixed it: add a multiple_choice task (with ``ll_convention=nll``) to the test above."""
    from lmms_eval.api.instance import unwrap_generation_output

    assert unwrap_generation_output((-1.5, True)) == ("(-1.5, True)", None)
