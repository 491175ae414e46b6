#!/usr/bin/env python
"""``vlweave serve`` throughput: requests/s and p50/p95 latency for 1, 8 and 32 concurrent clients, against
one-by-one generation of the same requests in the same process.

The model: DINOv2-S/14 at 112 px + ``mlp2x_gelu`` + SmolLM2-135M-Instruct (the offline assets, untrained
connector: the answers are not meaningful, the work is real), or with ``--tiny`` the test suite's tiny random
model.  Requests: ``--requests`` greedy questions about ``--images`` distinct images (so images repeat and the
feature cache is exercised), each capped at ``--max-tokens`` new tokens.  Every variant answers the same requests
greedily, so they do the same work, and the bench checks that every server answer equals the one-by-one answer.

Variants, in one process:

* ``one-by-one``: ``generate_batch([prompt])`` per request, sequentially (what ``vlweave chat`` does per turn);
* ``server, N clients``: a live uvicorn server on 127.0.0.1 (thread), N client threads (official ``openai``
  client) sending their share of the requests back to back.

Usage::

    .venv/bin/python bench/bench_serve.py                 # 64 requests, 16 tokens, SmolLM2 + DINOv2-S
    .venv/bin/python bench/bench_serve.py --quick         # 16 requests, 4 tokens
    .venv/bin/python bench/bench_serve.py --tiny --json /tmp/serve.json

Exit status 2 if any server answer differs from the one-by-one answer (the table is printed anyway).
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import socket
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the tiny-model helpers


def build(tiny: bool, tmp: Path):
    from vlweave.builder import build_model
    from vlweave.config import RunConfig

    if tiny:
        from helpers import make_run

        cfg = make_run(tmp, vision="siglip", language="qwen2", tokenizer="qwen", template="tokenizer")
    else:
        cfg = RunConfig()
        cfg.vision.name, cfg.vision.image_size = "dinov2-small", 112
        cfg.connector.type, cfg.connector.options = "mlp2x_gelu", {}
        cfg.language.name, cfg.language.template, cfg.language.system_prompt = "smollm2-135m-instruct", "tokenizer", ""
    model, tok = build_model(cfg)
    return model.eval(), tok


def images(n: int):
    from PIL import Image, ImageDraw

    out = []
    colors = [(220, 30, 30), (30, 200, 40), (30, 40, 220), (230, 220, 20), (200, 40, 200), (20, 200, 200)]
    for i in range(n):
        im = Image.new("RGB", (64, 64), (255, 255, 255))
        d = ImageDraw.Draw(im)
        box = (8 + i % 5, 10, 52, 50 - i % 7)
        (d.rectangle if i % 2 else d.ellipse)(box, fill=colors[i % len(colors)])
        out.append(im)
    return out


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    k = (len(xs) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=None, help="requests per variant (default 64; --quick 16)")
    ap.add_argument("--max-tokens", type=int, default=None, help="new tokens per request (default 16; --quick 4)")
    ap.add_argument("--images", type=int, default=8, help="distinct images the requests cycle through")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--window-ms", type=float, default=10.0)
    ap.add_argument("--tiny", action="store_true", help="the tests' tiny random model instead of the assets")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args(argv)
    n_req = args.requests or (16 if args.quick else 64)
    max_tokens = args.max_tokens or (4 if args.quick else 16)
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import openai
    import uvicorn

    from vlweave.processor import VlweaveProcessor
    from vlweave.serve.chat import user_texts
    from vlweave.serve.generation import Prompt, generate_batch
    from vlweave.serve.protocol import ServeLimits
    from vlweave.serve.server import Engine, create_app

    tmp = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    model, tok = build(args.tiny, tmp)
    processor = VlweaveProcessor.from_model(model, tok)
    pics = images(args.images)
    questions = ["What color is the shape?", "What shape is this?", "Describe the image.", "Is there a circle?"]
    reqs = [(i % len(pics), questions[i % len(questions)]) for i in range(n_req)]
    print(f"model: {'tiny' if args.tiny else 'DINOv2-S@112 + mlp2x_gelu + SmolLM2-135M'}, {n_req} requests x "
          f"{max_tokens} tokens, {len(pics)} images, torch threads {torch.get_num_threads()}, "
          f"load {os.getloadavg()[0]:.2f}", flush=True)

    # ---- one by one ------------------------------------------------------------------------------------
    def prompt(i: int, q: str) -> Prompt:
        turns = [{"from": "human", "value": "<image>\n" + q}]
        return Prompt(input_ids=processor.encode_prompt(turns, has_image=True), image=pics[i],
                      texts=user_texts(turns), max_new_tokens=max_tokens)

    generate_batch(model, processor, [prompt(*reqs[0])])  # warm-up
    ref_answers, lat = [], []
    t0 = time.perf_counter()
    for i, q in reqs:
        t = time.perf_counter()
        ref_answers.append(generate_batch(model, processor, [prompt(i, q)])[0].text)
        lat.append(time.perf_counter() - t)
    wall = time.perf_counter() - t0
    rows = [{"variant": "one-by-one", "clients": 1, "req_s": n_req / wall, "p50_s": percentile(lat, 0.5),
             "p95_s": percentile(lat, 0.95), "mean_batch": 1.0, "check": "reference"}]
    print(f"one-by-one: {rows[0]['req_s']:.2f} req/s", flush=True)

    # ---- server ----------------------------------------------------------------------------------------
    engine = Engine(model, processor, model_name="bench", limits=ServeLimits(max_tokens=max(512, max_tokens)),
                    max_batch=args.max_batch, window_s=args.window_ms / 1000.0)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(engine), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    urls = []
    for im in pics:
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        urls.append("data:image/png;base64," + base64.b64encode(buf.getvalue()).decode())
    client = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=600)

    def one(k: int) -> tuple[int, str, float]:
        i, q = reqs[k]
        t = time.perf_counter()
        r = client.chat.completions.create(model="bench", max_tokens=max_tokens, temperature=0, messages=[
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": urls[i]}},
                                         {"type": "text", "text": q}]}])
        return k, r.choices[0].message.content, time.perf_counter() - t

    one(0)  # warm-up (and the first image's features)
    status = 0
    for c in args.clients:
        engine.features._items.clear()  # every variant starts with a cold feature cache
        before = len(engine.batcher.batches)
        hits0 = engine.features.hits

        def client_loop(ci: int) -> list[tuple[int, str, float]]:
            return [one(k) for k in range(ci, n_req, c)]

        t0 = time.perf_counter()
        with ThreadPoolExecutor(max_workers=c) as pool:
            results = [r for part in pool.map(client_loop, range(c)) for r in part]
        wall = time.perf_counter() - t0
        lat = [r[2] for r in results]
        wrong = sum(ref_answers[k] != text for k, text, _ in results)
        sizes = engine.batcher.batches[before:]
        row = {"variant": "server", "clients": c, "req_s": n_req / wall, "p50_s": percentile(lat, 0.5),
               "p95_s": percentile(lat, 0.95), "mean_batch": statistics.mean(sizes) if sizes else 0.0,
               "cache_hits": engine.features.hits - hits0,
               "check": "answers equal" if not wrong else f"{wrong} answers differ (!)"}
        status = status or (2 if wrong else 0)
        rows.append(row)
        print(f"server, {c} clients: {row['req_s']:.2f} req/s", flush=True)
    server.should_exit = True
    thread.join(timeout=10)
    engine.batcher.close()

    ref = rows[0]["req_s"]
    print()
    print(f"{'variant':<22}{'req/s':>8}{'ratio':>8}{'p50 s':>8}{'p95 s':>8}{'batch':>7}  check")
    for r in rows:
        name = r["variant"] if r["variant"] == "one-by-one" else f"server, {r['clients']} clients"
        print(f"{name:<22}{r['req_s']:>8.2f}{r['req_s'] / ref:>8.2f}{r['p50_s']:>8.2f}{r['p95_s']:>8.2f}"
              f"{r['mean_batch']:>7.1f}  {r['check']}")
    print(f"load average at end {os.getloadavg()[0]:.2f}; 'batch' = mean requests per generate call")
    if args.json:
        Path(args.json).write_text(json.dumps({"requests": n_req, "max_tokens": max_tokens, "rows": rows}, indent=1))
    if status:
        print("a server answer differed from the one-by-one answer (exit status 2)")
    return status


if __name__ == "__main__":
    sys.exit(main())
