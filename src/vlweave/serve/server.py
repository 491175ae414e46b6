"""``vlweave serve``: an OpenAI-compatible HTTP server (FastAPI + uvicorn) for a vlweave checkpoint.

Endpoints: ``POST /v1/chat/completions`` (OpenAI chat format, ``stream: true`` as server-sent events),
``GET /v1/models``, ``GET /health``.  Requests are parsed and checked (:mod:`vlweave.serve.protocol`) off the event
loop, then queued for the batching worker (:mod:`vlweave.serve.batcher`), which answers concurrent requests with
one ``generate`` call and reuses tower features of repeated images.

Safety: an optional API key (``Authorization: Bearer KEY``, compared in constant time); the body size is counted
while it is read (a missing or false ``Content-Length`` does not get past the limit); every client error is a 4xx in
OpenAI's error shape, and any other failure a 500 with a generic message -- tracebacks go to the server log only.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from vlweave.serve.batcher import Batcher
from vlweave.serve.chat import user_texts
from vlweave.serve.generation import Completion, FeatureLRU, Prompt, image_key
from vlweave.serve.protocol import APIError, ChatRequest, ServeLimits, parse_chat_request
from vlweave.processing import TemplateError

log = logging.getLogger("vlweave.serve")


def _error(exc: APIError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
    return JSONResponse(exc.body(), status_code=exc.status, headers=headers)


class Engine:
    """The served model: processor, limits, batching worker and feature cache."""

    def __init__(self, model, processor, *, model_name: str, limits: ServeLimits | None = None,
                 max_batch: int = 8, window_s: float = 0.01, feature_cache_images: int = 256,
                 default_temperature: float = 0.0, routing: str | None = None, routing_seed: int = 0) -> None:
        self.model = model.eval()
        if routing is not None:  # a routed (MoVA) model: each image request is routed as `vlweave eval` does
            from vlweave.language.routing import routing_pool

            routing_pool(model, routing)  # refuse a model that does not route, or a bad mode, before serving
        self.processor = processor
        self.model_name = model_name
        self.limits = limits or ServeLimits()
        self.default_temperature = default_temperature
        self.context = getattr(model.config.text_config, "max_position_embeddings", None)
        if self.limits.max_images > 1:
            raise ValueError("max_images > 1: vlweave models read one image per conversation")
        features = FeatureLRU(model, processor, feature_cache_images) if feature_cache_images > 0 else None
        self.features = features
        self.batcher = Batcher(model, processor, max_batch=max_batch, window_s=window_s, features=features,
                               routing=routing, routing_seed=routing_seed)
        self.created = int(time.time())

    def prompt(self, req: ChatRequest) -> Prompt:
        """Encode a request (raises APIError for a prompt the model cannot take)."""
        try:
            ids = self.processor.encode_prompt(req.turns, has_image=req.image is not None,
                                               system_prompt=req.system_prompt, sample_id="request")
        except (TemplateError, ValueError) as exc:
            raise APIError(400, f"the conversation cannot be encoded: {exc}", code="invalid_conversation") from None
        limit = self.limits.max_prompt_tokens
        if limit is None and self.context is not None:
            limit = int(self.context) - req.max_tokens
        if limit is not None and len(ids) > limit:
            raise APIError(400, f"the prompt is {len(ids)} tokens (image tokens included), more than the "
                                f"{limit} allowed" + (f" with max_tokens={req.max_tokens} in a context of "
                                                      f"{self.context}" if self.limits.max_prompt_tokens is None
                                                      else ""),
                           code="context_length_exceeded", param="messages")
        return Prompt(input_ids=ids, image=req.image, image_key=None if req.image is None else image_key(req.image),
                      texts=user_texts(req.turns), max_new_tokens=req.max_tokens, temperature=req.temperature,
                      top_p=req.top_p, stop=req.stop)


def create_app(engine: Engine, api_key: str | None = None) -> FastAPI:
    app = FastAPI(title="vlweave", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine = engine
    key = api_key.encode() if api_key else None

    def check_key(request: Request) -> None:
        if key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        # compare_digest on bytes: time does not depend on where the first difference is.
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), key):
            raise APIError(401, "invalid or missing API key (send Authorization: Bearer KEY)",
                           code="invalid_api_key")

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return _error(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return _error(APIError(exc.status_code, str(exc.detail), code=code))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _error(APIError(400, "invalid request", code="invalid_request"))

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        log.exception("internal error")
        return _error(APIError(500, "internal server error", type="server_error", code="internal_error"))

    @app.get("/health")
    async def health() -> dict[str, Any]:
        ok = engine.batcher.alive
        return JSONResponse({"status": "ok" if ok else "worker stopped", "model": engine.model_name},
                            status_code=200 if ok else 503)

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        check_key(request)
        return {"object": "list", "data": [{"id": engine.model_name, "object": "model", "created": engine.created,
                                            "owned_by": "vlweave"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        check_key(request)
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype != "application/json":
            raise APIError(415, f"Content-Type must be application/json, got {ctype or '(none)'!r}",
                           code="unsupported_media_type")
        raw = await _read_body(request, engine.limits.max_body_bytes)
        try:
            body = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            raise APIError(400, f"the body is not valid JSON: {exc}", code="invalid_json") from None
        # Image decoding and tokenization are CPU work: off the event loop.
        req = await run_in_threadpool(parse_chat_request, body, engine.limits, engine.default_temperature)
        if req.model is not None and req.model != engine.model_name:
            raise APIError(404, f"model {req.model!r} is not served here; this server serves "
                                f"{engine.model_name!r} (GET /v1/models)", code="model_not_found", param="model")
        prompt = await run_in_threadpool(engine.prompt, req)
        rid = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        if req.stream:
            return StreamingResponse(_stream(engine, prompt, rid, created, req.include_usage),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        result: Completion = await asyncio.wrap_future(engine.batcher.submit(prompt))
        return {
            "id": rid, "object": "chat.completion", "created": created, "model": engine.model_name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text},
                         "finish_reason": result.finish_reason}],
            "usage": _usage(result),
            # vlweave's extension for routed models: which experts answered (clients keep unknown fields)
            **({"routing": result.routing} if result.routing is not None else {}),
        }

    return app


def _usage(r: Completion) -> dict[str, int]:
    return {"prompt_tokens": r.prompt_tokens, "completion_tokens": r.completion_tokens,
            "total_tokens": r.prompt_tokens + r.completion_tokens}


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            if int(declared) > limit:
                raise APIError(413, f"the request body is larger than {limit} bytes", code="body_too_large")
        except ValueError:
            raise APIError(400, "invalid Content-Length", code="invalid_request") from None
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(413, f"the request body is larger than {limit} bytes", code="body_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


async def _stream(engine: Engine, prompt: Prompt, rid: str, created: int, include_usage: bool) -> AsyncIterator[str]:
    """Server-sent events: a role chunk, content deltas as the worker produces them, a finish chunk, [DONE]."""
    loop = asyncio.get_running_loop()
    deltas: asyncio.Queue[str] = asyncio.Queue()
    prompt.on_text = lambda text: loop.call_soon_threadsafe(deltas.put_nowait, text)
    future = asyncio.wrap_future(engine.batcher.submit(prompt))

    def chunk(delta: dict[str, Any], finish: str | None = None) -> str:
        return "data: " + json.dumps({"id": rid, "object": "chat.completion.chunk", "created": created,
                                      "model": engine.model_name,
                                      "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}) + "\n\n"

    yield chunk({"role": "assistant", "content": ""})
    while True:
        getter = asyncio.ensure_future(deltas.get())
        done, _ = await asyncio.wait({getter, future}, return_when=asyncio.FIRST_COMPLETED)
        if getter in done:
            yield chunk({"content": getter.result()})
            continue
        getter.cancel()
        break
    while not deltas.empty():  # deltas queued before the result was set
        yield chunk({"content": deltas.get_nowait()})
    try:
        result: Completion = future.result()
    except Exception:  # noqa: BLE001 -- the stream has started: report in-band, details to the log only
        log.exception("streamed request failed")
        yield "data: " + json.dumps(APIError(500, "internal server error", type="server_error",
                                             code="internal_error").body()) + "\n\n"
        yield "data: [DONE]\n\n"
        return
    yield chunk({}, result.finish_reason)
    if include_usage:
        yield "data: " + json.dumps({"id": rid, "object": "chat.completion.chunk", "created": created,
                                     "model": engine.model_name, "choices": [], "usage": _usage(result)}) + "\n\n"
    yield "data: [DONE]\n\n"


def run_server(engine: Engine, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
               log_level: str = "info") -> None:
    """Serve until interrupted (uvicorn)."""
    import uvicorn

    uvicorn.run(create_app(engine, api_key), host=host, port=port, log_level=log_level)


__all__ = ["Engine", "create_app", "run_server"]
