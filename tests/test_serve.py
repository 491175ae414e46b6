"""``vlweave serve``: a real uvicorn server on 127.0.0.1 (random free port, in a thread) with a tiny checkpoint,
driven by the official ``openai`` client.  Valid requests must get exactly ``vlweave chat``'s answers (the same
generation function, batched); every malformed one a 4xx in OpenAI's error shape; the server stays healthy."""

from __future__ import annotations

import base64
import io
import json
import socket
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from PIL import Image

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

from helpers import draw_image, isolated_env, make_run  # noqa: E402
from vlweave.builder import build_model, load_checkpoint, load_processor, save_checkpoint  # noqa: E402
from vlweave.cli import main  # noqa: E402
from vlweave.serve.chat import ChatSession  # noqa: E402
from vlweave.serve.protocol import ServeLimits  # noqa: E402
from vlweave.serve.server import Engine, create_app  # noqa: E402

KEY = "test-key-123"
MAX_NEW = 6


@pytest.fixture(autouse=True, scope="module")
def _env(tmp_path_factory):
    with isolated_env(tmp_path_factory.mktemp("vlweave-cache")):
        yield


def png_bytes(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve")
    cfg = make_run(tmp, vision="siglip", language="qwen2", tokenizer="qwen", template="tokenizer")
    model, tok = build_model(cfg)
    folder = save_checkpoint(model, tok, tmp / "ckpt")
    images = sorted((Path(cfg.data.train).parent / "images").glob("*.png"))
    return folder, images


class LiveServer:
    def __init__(self, folder: Path, limits: ServeLimits, **engine_kw) -> None:
        model, tok = load_checkpoint(folder)
        self.engine = Engine(model, load_processor(folder, tok), model_name="tiny", limits=limits, **engine_kw)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(create_app(self.engine, KEY), log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline, "server did not start"
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.port}"

    def client(self, key: str = KEY):
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=120)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.engine.batcher.close()


@pytest.fixture(scope="module")
def live(checkpoint, tmp_path_factory):
    folder, images = checkpoint
    limits = ServeLimits(max_image_bytes=20_000, max_image_pixels=256 * 256, max_body_bytes=200_000, max_tokens=32,
                         allowed_image_dirs=[str(images[0].parent)])
    srv = LiveServer(folder, limits, max_batch=8, window_s=0.05)
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def chat_answer(checkpoint):
    """``vlweave chat``'s answer (the ChatSession the CLI runs) for (image path or None, question)."""
    folder, _ = checkpoint
    model, tok = load_checkpoint(folder)
    processor = load_processor(folder, tok)
    memo: dict = {}

    def answer(image, question: str) -> str:
        if (image, question) not in memo:
            session = ChatSession(model, tok, image=None if image is None else str(image), max_new_tokens=MAX_NEW,
                                  processor=processor)
            memo[(image, question)] = session.ask(question)
        return memo[(image, question)]

    return answer


def user(text: str, image: Path | None = None) -> list[dict]:
    parts: list[dict] = [{"type": "text", "text": text}]
    if image is not None:
        parts.insert(0, {"type": "image_url", "image_url": {"url": data_url(image.read_bytes())}})
    return [{"role": "user", "content": parts}]


def ask(client, messages, **kw):
    kw.setdefault("max_tokens", MAX_NEW)
    kw.setdefault("temperature", 0)
    return client.chat.completions.create(model="tiny", messages=messages, **kw)


def test_plain_request_equals_chat(live, checkpoint, chat_answer, capsys):
    folder, images = checkpoint
    resp = ask(live.client(), user("What color?", images[0]))
    text = resp.choices[0].message.content
    assert text == chat_answer(images[0], "What color?")
    assert resp.choices[0].finish_reason in ("stop", "length") and resp.model == "tiny"
    assert resp.usage.completion_tokens <= MAX_NEW
    assert resp.usage.prompt_tokens > live.engine.processor.num_image_tokens  # the image's tokens are counted
    # ... and the `vlweave chat` command prints the same answer.
    assert main(["chat", str(folder), "--image", str(images[0]), "--prompt", "What color?",
                 "--max-new-tokens", str(MAX_NEW)]) == 0
    assert capsys.readouterr().out == text + "\n"
    # Text only, and a string content.
    resp = ask(live.client(), [{"role": "user", "content": "Describe the image."}])
    assert resp.choices[0].message.content == chat_answer(None, "Describe the image.")
    # Sampling runs (its own generate group); top_p=0 leaves only the top token, i.e. greedy.
    sampled = ask(live.client(), user("What color?", images[0]), temperature=1.0, top_p=0.9)
    assert sampled.usage.completion_tokens >= 1 and isinstance(sampled.choices[0].message.content, str)
    greedy = ask(live.client(), user("What color?", images[0]), temperature=0.7, top_p=0)
    assert greedy.choices[0].message.content == text
    models = live.client().models.list()
    assert [m.id for m in models.data] == ["tiny"]


def test_streaming_equals_plain(live, checkpoint, chat_answer):
    _, images = checkpoint
    stream = ask(live.client(), user("What is this?", images[1]), stream=True,
                 stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert text == chat_answer(images[1], "What is this?")
    assert len(finishes) == 1 and chunks[-1].usage is not None and chunks[-1].usage.completion_tokens >= 1


def test_stop_string_and_local_paths(live, checkpoint, chat_answer):
    _, images = checkpoint
    full = chat_answer(images[2], "What color is this?")
    assert len(full) >= 3, full
    stop = full[1:3]
    resp = ask(live.client(), user("What color is this?", images[2]), stop=[stop])
    assert resp.choices[0].message.content == full[: full.find(stop)].strip()
    assert resp.choices[0].finish_reason == "stop"
    # A local file under an allowed folder is read; one outside is refused.
    local = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": str(images[2])}},
                                          {"type": "text", "text": "What color is this?"}]}]
    assert ask(live.client(), local).choices[0].message.content == full
    outside = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "/etc/passwd"}},
                                            {"type": "text", "text": "x"}]}]
    with pytest.raises(openai.PermissionDeniedError) as err:
        ask(live.client(), outside)
    assert err.value.body["code"] == "path_not_allowed"
    remote = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://example.com/a.png"}},
                                           {"type": "text", "text": "x"}]}]
    with pytest.raises(openai.PermissionDeniedError) as err:
        ask(live.client(), remote)
    assert err.value.body["code"] == "remote_images_disabled"


def error_of(call) -> tuple[int, dict]:
    with pytest.raises(openai.APIStatusError) as err:
        call()
    body = err.value.response.json()
    assert set(body) == {"error"} and {"message", "type", "code"} <= set(body["error"]), body
    assert "Traceback" not in err.value.response.text
    return err.value.status_code, body["error"]


def test_bad_requests_are_clear_4xx(live, checkpoint):
    _, images = checkpoint
    c = live.client()
    status, e = error_of(lambda: ask(live.client("wrong-key"), user("hi")))
    assert status == 401 and e["code"] == "invalid_api_key"
    noise = png_bytes(Image.effect_noise((160, 160), 100).convert("RGB"))
    assert len(noise) > 20_000
    big = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(noise)}},
                                        {"type": "text", "text": "x"}]}]
    status, e = error_of(lambda: ask(c, big))
    assert status == 413 and e["code"] == "image_too_large"
    wide = png_bytes(draw_image("red", "square", size=400))  # small file, too many pixels
    status, e = error_of(lambda: ask(c, [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url(wide)}}, {"type": "text", "text": "x"}]}]))
    assert status == 400 and e["code"] == "image_too_many_pixels"
    broken = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}},
                                           {"type": "text", "text": "x"}]}]
    status, e = error_of(lambda: ask(c, broken))
    assert status == 400 and e["code"] == "invalid_base64"
    not_image = data_url(b"hello world, not a png at all")
    status, e = error_of(lambda: ask(c, [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": not_image}}, {"type": "text", "text": "x"}]}]))
    assert status == 400 and e["code"] == "invalid_image"
    status, e = error_of(lambda: ask(c, user("hi"), extra_headers={"Content-Type": "text/plain"}))
    assert status == 415 and e["code"] == "unsupported_media_type"
    two = user("x", images[0])
    two[0]["content"].append(two[0]["content"][0])
    status, e = error_of(lambda: ask(c, two))
    assert status == 400 and e["code"] == "too_many_images"
    status, e = error_of(lambda: ask(c, user("hi"), max_tokens=1000))
    assert status == 400 and e["code"] == "max_tokens_exceeded"
    status, e = error_of(lambda: ask(c, user("word " * 600)))
    assert status == 400 and e["code"] == "context_length_exceeded"
    status, e = error_of(lambda: ask(c, user("x" * 250_000)))
    assert status == 413 and e["code"] == "body_too_large"
    status, e = error_of(lambda: ask(c, [{"role": "robot", "content": "hi"}]))
    assert status == 400
    status, e = error_of(lambda: ask(c, user("hi"), temperature="hot"))
    assert status == 400 and e["param"] == "temperature"
    status, e = error_of(lambda: c.chat.completions.create(model="gpt-4", messages=user("hi")))
    assert status == 404 and e["code"] == "model_not_found"
    # Not JSON at all, and a JSON array (raw bodies, so not through the client).
    hi = '[{"role": "user", "content": "hi"}]'
    odd = [b"{not json", b"[1, 2]", b'{"messages": "hi"}', b"\xff\xfe", b"[" * 100_000 + b"]" * 100_000,
           b'{"messages": [null]}', b'{"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}',
           b'{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": 5}}]}]}',
           b'{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": '
           b'"data:image/png;base64,"}}]}]}',
           b'{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "file:///etc/passwd"}]}]}',
           b'{"messages": [{"role": "user", "content": null}]}', b'{"messages": []}', b"{}", b"null", b'"x"']
    odd += [f'{{"messages": {hi}, {field}}}'.encode() for field in (
        '"max_tokens": true', '"max_tokens": 2.5', '"stop": [1]', '"stop": ["a", "b", "c", "d", "e"]',
        '"stream": "yes"', '"model": 5', '"n": 3', '"top_p": 7', '"tools": [{"type": "function"}]',
        '"response_format": {"type": "json_schema"}')]
    for raw in odd:
        status, body = raw_post(live.url + "/v1/chat/completions", raw)
        assert 400 <= status < 500 and set(body["error"]) >= {"message", "type", "code"}, (raw[:80], body)
    assert c.models.list().data[0].id == "tiny"


def raw_post(url: str, data: bytes, ctype: str = "application/json") -> tuple[int, dict]:
    req = urllib.request.Request(url, data=data, method="POST",
                                 headers={"Content-Type": ctype, "Authorization": f"Bearer {KEY}"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


MALFORMED = [
    lambda im: [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,%%"}},
                                             {"type": "text", "text": "x"}]}],
    lambda im: [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:text/plain;base64,aGk="}},
                                             {"type": "text", "text": "x"}]}],
    lambda im: [{"role": "user", "content": [{"type": "video", "video": "x"}]}],
    lambda im: [{"role": "assistant", "content": "I speak first"}],
    lambda im: [{"role": "user", "content": "hi <image> there"}],
]


def test_fifty_concurrent_requests_with_malformed(live, checkpoint, chat_answer):
    _, images = checkpoint
    questions = ["What color?", "What is this?", "Describe the image.", "What color is this?"]
    jobs = []
    for i in range(50):
        if i % 5 == 4:  # 20 % malformed
            jobs.append(("bad", MALFORMED[(i // 5) % len(MALFORMED)](images[0]), None))
        else:
            image = images[i % 3] if i % 7 else None  # repeated images (feature cache) and text-only rows
            q = questions[i % len(questions)]
            jobs.append(("ok", user(q, image), (image, q)))
    hits_before = live.engine.features.hits
    batches_before = len(live.engine.batcher.batches)
    client = live.client()

    def run(job):
        kind, messages, _ = job
        try:
            return ask(client, messages).choices[0].message.content
        except openai.APIStatusError as exc:
            return exc

    with ThreadPoolExecutor(max_workers=50) as pool:
        results = list(pool.map(run, jobs))
    for (kind, _, key), result in zip(jobs, results):
        if kind == "bad":
            assert isinstance(result, openai.APIStatusError) and 400 <= result.status_code < 500, result
        else:
            assert result == chat_answer(*key), (key, result)
    answers = {r for (kind, _, _), r in zip(jobs, results) if kind == "ok"}
    assert len(answers) > 3 and all(answers), answers  # real, different answers (not one empty string)
    sizes = live.engine.batcher.batches[batches_before:]
    assert sum(sizes) == 40 and max(sizes) > 1  # answered in shared generate calls
    assert live.engine.features.hits > hits_before  # repeated images skipped the towers
    with urllib.request.urlopen(live.url + "/health", timeout=10) as r:
        assert json.loads(r.read()) == {"status": "ok", "model": "tiny"}
    assert live.thread.is_alive() and live.engine.batcher.alive


def test_a_failing_batch_fails_only_its_culprit(monkeypatch):
    """The worker retries a failed batch request by request: only the request that breaks generation gets the
    error, and the worker lives on."""
    import vlweave.serve.batcher as batcher_mod
    from vlweave.serve.generation import Completion, Prompt

    calls = []

    def fake_generate(model, processor, prompts, features=None, routing=None, routing_seed=0):
        calls.append(len(prompts))
        if any(p.input_ids == [666] for p in prompts):
            raise RuntimeError("boom")
        return [Completion(text=str(p.input_ids[0]), finish_reason="stop", prompt_tokens=1, completion_tokens=1)
                for p in prompts]

    monkeypatch.setattr(batcher_mod, "generate_batch", fake_generate)
    b = batcher_mod.Batcher(None, None, max_batch=8, window_s=0.3)
    futures = [b.submit(Prompt(input_ids=[i])) for i in (1, 666, 3)]
    assert futures[0].result(timeout=10).text == "1" and futures[2].result(timeout=10).text == "3"
    with pytest.raises(RuntimeError, match="boom"):
        futures[1].result(timeout=10)
    assert calls[0] == 3 and calls[1:] == [1, 1, 1] and b.alive
    assert b.submit(Prompt(input_ids=[7])).result(timeout=10).text == "7"
    b.close()


def test_serve_command_builds_the_engine_from_its_flags(checkpoint, monkeypatch, capsys, tmp_path):
    import vlweave.serve.server as server_mod

    seen = {}
    monkeypatch.setattr(server_mod, "run_server", lambda engine, **kw: seen.update(engine=engine, **kw))
    monkeypatch.setenv("VLWEAVE_API_KEY", "from-env")
    folder, images = checkpoint
    assert main(["serve", str(folder), "--port", "9", "--max-batch", "3", "--max-tokens", "20",
                 "--max-image-pixels", "1000", "--allow-image-dir", str(images[0].parent)]) == 0
    engine = seen["engine"]
    try:
        assert seen["port"] == 9 and seen["api_key"] == "from-env" and engine.model_name == "ckpt"
        assert engine.batcher.max_batch == 3 and engine.limits.max_tokens == 20
        assert engine.limits.max_image_pixels == 1000 and engine.limits.default_max_tokens == 20
        assert engine.limits.allowed_image_dirs == [str(images[0].parent)]
    finally:
        engine.batcher.close()
    assert main(["serve", str(folder), "--allow-image-dir", str(tmp_path / "nope")]) == 2
    assert "not a folder" in capsys.readouterr().err
    # --routing is for routed (MoVA) checkpoints: this one's connector does not route
    assert main(["serve", str(folder), "--routing", "A"]) == 2
    assert "does not route between experts" in capsys.readouterr().err
