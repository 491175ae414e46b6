"""The OpenAI chat-completions request, read defensively: limits, image sources, errors in OpenAI's shape.

Everything a client can get wrong becomes an :class:`APIError` (status, message, ``type``, ``code``, ``param``),
which the server turns into ``{"error": {"message", "type", "code", "param"}}``; nothing here lets an exception
of another kind escape for a malformed request.

Images: ``image_url`` parts with ``data:image/...;base64,`` URLs always; local files (a path or ``file://`` URL) only
under the folders named in :attr:`ServeLimits.allowed_image_dirs` (resolved, so ``..`` and symlinks cannot leave
them); ``http(s)://`` only with :attr:`ServeLimits.allow_remote_images`.  Byte size is checked before decoding and
the pixel count from the image header before the pixels are decoded (a decompression bomb is refused unopened).
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from vlweave.processing import IMAGE_TOKEN, to_rgb


@dataclass
class ServeLimits:
    """What one request may ask for (``vlweave serve`` flags of the same names)."""

    max_body_bytes: int = 16 * 1024 * 1024
    max_image_bytes: int = 8 * 1024 * 1024
    max_image_pixels: int = 4096 * 4096
    max_images: int = 1  # LLaVA-style models take one image per conversation; 0 = text only
    max_prompt_tokens: int | None = None  # None: the LM's context minus max_tokens
    max_tokens: int = 512  # the largest max_tokens a request may ask for (and the default)
    default_max_tokens: int = 128
    allowed_image_dirs: list[str] = field(default_factory=list)
    allow_remote_images: bool = False
    remote_timeout_s: float = 10.0


class APIError(Exception):
    """A request error reported to the client in OpenAI's error shape."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type, code, param

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "code": self.code, "param": self.param}}


def bad(message: str, code: str = "invalid_value", param: str | None = None, status: int = 400) -> APIError:
    return APIError(status, message, code=code, param=param)


@dataclass
class ChatRequest:
    """A validated request: LLaVA turns (the image, if any, as ``<image>`` in its user turn), decoding settings."""

    turns: list[dict[str, str]]
    system_prompt: str | None
    image: Image.Image | None
    max_tokens: int
    temperature: float
    top_p: float
    stop: list[str]
    stream: bool
    include_usage: bool
    model: str | None


_DATA_URL = re.compile(r"data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(?:;[\w.+-]+=[\w.+-]+)*)(?P<b64>;base64)?,",
                       re.ASCII)


def _number(body: dict, key: str, default: float, lo: float, hi: float) -> float:
    value = body.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise bad(f"'{key}' must be a number, got {type(value).__name__}", "invalid_type", key)
    if not lo <= value <= hi:
        raise bad(f"'{key}' must be between {lo} and {hi}, got {value}", param=key)
    return float(value)


def parse_chat_request(body: Any, limits: ServeLimits, default_temperature: float = 0.0) -> ChatRequest:
    """Validate an already JSON-decoded body and decode its image (see the module docstring)."""
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object", "invalid_type")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("'messages' must be a non-empty list", "invalid_type", "messages")
    n = body.get("n", 1)
    if n not in (1, None):
        raise bad("only n=1 is supported", "unsupported_value", "n")
    for key in ("tools", "functions", "audio"):
        if body.get(key):
            raise bad(f"'{key}' is not supported by this server", "unsupported_parameter", key)
    if body.get("logprobs"):
        raise bad("'logprobs' is not supported by this server", "unsupported_parameter", "logprobs")
    fmt = body.get("response_format")
    if fmt is not None and not (isinstance(fmt, dict) and fmt.get("type") in (None, "text")):
        raise bad("only response_format {'type': 'text'} is supported", "unsupported_parameter", "response_format")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is None:
        max_tokens = min(limits.default_max_tokens, limits.max_tokens)
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise bad(f"'max_tokens' must be a positive integer, got {max_tokens!r}", "invalid_value", "max_tokens")
    if max_tokens > limits.max_tokens:
        raise bad(f"max_tokens={max_tokens} exceeds this server's limit of {limits.max_tokens}", "max_tokens_exceeded",
                  "max_tokens")
    temperature = _number(body, "temperature", default_temperature, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
    if top_p == 0.0:
        temperature = 0.0  # nothing but the most likely token is left: greedy
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop) or len(stop) > 4:
        raise bad("'stop' must be a string or a list of at most 4 strings", "invalid_value", "stop")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise bad("'stream' must be a boolean", "invalid_type", "stream")
    opts = body.get("stream_options") or {}
    include_usage = bool(isinstance(opts, dict) and opts.get("include_usage"))
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise bad("'model' must be a string", "invalid_type", "model")

    system_parts: list[str] = []
    turns: list[dict[str, str]] = []
    images: list[Image.Image] = []
    for i, msg in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(msg, dict):
            raise bad(f"{where} must be an object", "invalid_type", where)
        role = msg.get("role")
        if role not in ("system", "developer", "user", "assistant"):
            raise bad(f"{where}.role must be system, developer, user or assistant; got {role!r}", param=where)
        text, found = _content(msg.get("content"), where, limits, allow_images=role == "user")
        images.extend(found)
        if len(images) > limits.max_images:
            raise bad(f"at most {limits.max_images} image(s) per request (this model reads one image per "
                      "conversation)" if limits.max_images else "this server takes no images", "too_many_images",
                      where)
        if role in ("system", "developer"):
            if turns:
                raise bad(f"{where}: a {role} message must come before the conversation", param=where)
            system_parts.append(text)
            continue
        if found:
            text = f"{IMAGE_TOKEN}\n{text}"
        turns.append({"from": "human" if role == "user" else "gpt", "value": text})
    if not turns or turns[-1]["from"] != "human":
        raise bad("the last message must be a user message", param="messages")
    for a, b in zip(turns, turns[1:]):
        if a["from"] == b["from"]:
            raise bad("user and assistant messages must alternate", param="messages")
    return ChatRequest(turns=turns, system_prompt="\n".join(system_parts) if system_parts else None,
                       image=images[0] if images else None, max_tokens=int(max_tokens), temperature=temperature,
                       top_p=top_p, stop=stop, stream=stream, include_usage=include_usage, model=model)


def _content(content: Any, where: str, limits: ServeLimits, allow_images: bool) -> tuple[str, list[Image.Image]]:
    if isinstance(content, str):
        if IMAGE_TOKEN in content:
            raise bad(f"{where}: the text may not contain {IMAGE_TOKEN!r}; send images as image_url parts",
                      param=where)
        return content, []
    if not isinstance(content, list):
        raise bad(f"{where}.content must be a string or a list of parts", "invalid_type", where)
    texts, images = [], []
    for j, part in enumerate(content):
        pw = f"{where}.content[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            if IMAGE_TOKEN in part["text"]:
                raise bad(f"{pw}: the text may not contain {IMAGE_TOKEN!r}; send images as image_url parts",
                          param=pw)
            texts.append(part["text"])
        elif kind == "image_url":
            if not allow_images:
                raise bad(f"{pw}: images go in user messages", param=pw)
            spec = part.get("image_url")
            url = spec.get("url") if isinstance(spec, dict) else spec
            if not isinstance(url, str):
                raise bad(f"{pw}.image_url.url must be a string", "invalid_type", pw)
            if len(images) + 1 > max(limits.max_images, 0):
                raise bad(f"at most {limits.max_images} image(s) per request", "too_many_images", pw)
            images.append(load_request_image(url, limits, pw))
        else:
            raise bad(f"{pw}: parts must be {{'type': 'text', 'text': ...}} or {{'type': 'image_url', "
                      f"'image_url': {{'url': ...}}}}; got type {kind!r}", param=pw)
    return "\n".join(texts), images


def load_request_image(url: str, limits: ServeLimits, where: str = "image_url") -> Image.Image:
    """Bytes from a ``data:`` URL, an allowed local file or (if enabled) a remote URL -> a checked RGB image."""
    if url.startswith("data:"):
        m = _DATA_URL.match(url)
        if not m or not m.group("b64"):
            raise bad(f"{where}: a data URL must look like data:image/png;base64,<data>", "invalid_image_url", where)
        mime = (m.group("mime") or "").lower()
        if not mime.startswith("image/"):
            raise bad(f"{where}: data URL media type {mime or '(none)'!r} is not an image", "invalid_image_url", where)
        payload = url[m.end():]
        if len(payload) * 3 // 4 > limits.max_image_bytes:
            raise APIError(413, f"{where}: the image is larger than {limits.max_image_bytes} bytes",
                           code="image_too_large", param=where)
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise bad(f"{where}: the data URL is not valid base64", "invalid_base64", where) from None
    elif url.startswith(("http://", "https://")):
        if not limits.allow_remote_images:
            raise APIError(403, f"{where}: this server does not fetch remote images (start it with "
                                "--allow-remote-images); send a data: URL instead",
                           code="remote_images_disabled", param=where)
        data = _fetch(url, limits, where)
    else:
        data = _read_local(url, limits, where)
    if len(data) > limits.max_image_bytes:
        raise APIError(413, f"{where}: the image is larger than {limits.max_image_bytes} bytes",
                       code="image_too_large", param=where)
    return decode_image(data, limits, where)


def _read_local(url: str, limits: ServeLimits, where: str) -> bytes:
    path = url[len("file://"):] if url.startswith("file://") else url
    if not limits.allowed_image_dirs:
        raise APIError(403, f"{where}: local image paths are disabled (start the server with --allow-image-dir "
                            "FOLDER); send a data: URL instead", code="local_images_disabled", param=where)
    try:
        real = Path(path).resolve(strict=True)
    except (OSError, RuntimeError, ValueError):
        raise bad(f"{where}: no such image file", "image_not_found", where, status=404) from None
    allowed = [Path(d).resolve() for d in limits.allowed_image_dirs]
    if not any(real.is_relative_to(d) for d in allowed) or not real.is_file():
        raise APIError(403, f"{where}: the path is outside the allowed image folders", code="path_not_allowed",
                       param=where)
    if real.stat().st_size > limits.max_image_bytes:
        raise APIError(413, f"{where}: the image is larger than {limits.max_image_bytes} bytes",
                       code="image_too_large", param=where)
    return real.read_bytes()


def _fetch(url: str, limits: ServeLimits, where: str) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=limits.remote_timeout_s) as resp:  # noqa: S310 (opt-in)
            data = resp.read(limits.max_image_bytes + 1)
    except Exception as exc:  # any network failure is the client's URL's problem, reported as such
        raise bad(f"{where}: could not fetch the image: {type(exc).__name__}", "image_fetch_failed", where) from None
    return data


def decode_image(data: bytes, limits: ServeLimits, where: str = "image") -> Image.Image:
    try:
        im = Image.open(io.BytesIO(data))
        w, h = im.size  # from the header: nothing is decoded yet
    except Exception:
        raise bad(f"{where}: the data is not a readable image", "invalid_image", where) from None
    if w * h > limits.max_image_pixels:
        raise bad(f"{where}: the image has {w}x{h} = {w * h} pixels, more than this server's limit of "
                  f"{limits.max_image_pixels}", "image_too_many_pixels", where)
    try:
        im.load()
        return to_rgb(im)
    except Exception:
        raise bad(f"{where}: the image data is truncated or corrupt", "invalid_image", where) from None


__all__ = ["APIError", "ChatRequest", "ServeLimits", "decode_image", "load_request_image", "parse_chat_request"]
