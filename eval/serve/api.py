"""OpenAI's chat-completions format: the request, its checks, and the errors it answers with.

Everything a request can get wrong is found here, before it reaches the model, and raised as
:class:`APIError`, which the app answers in OpenAI's error shape
``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import base64
import binascii
import json
import time
import urllib.parse
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from vlm.data.decode import BadSample, decode_image
from vlm.eval.serve.fetch import FetchError, FetchPolicy, fetch


class APIError(Exception):
    """A request the server refuses: ``status`` 4xx (the client's fault) or 5xx."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        kind: str = "invalid_request_error",
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass
class Limits:
    """What the server accepts.

    Args:
        max_body_bytes: a larger request body is refused (413) before it is read in full.
        max_images: images per request.
        max_image_pixels: a larger image (a decompression bomb, say) is refused before decoding.
        context_length: prompt plus completion tokens, at most (``None``: what the model takes,
            see ``app.context_length``).
        default_max_tokens: the completion's budget when the request names none.
        local_images: a folder ``file://`` URLs and paths may point into (``None``: refused).
        remote_images: fetch ``http(s)://`` image URLs (refused unless set).
        remote_timeout_s: the whole fetch of a remote image (connecting, redirects, reading)
            must end within this many seconds.
        private_image_hosts: let remote image URLs reach loopback, private, link-local,
            multicast and reserved addresses (refused unless set: the server's own network).
        max_waiting: requests waiting beyond the running batch; past it a request gets 503 with
            ``Retry-After`` at once (``None``: no bound).
        request_timeout_s: a request not finished this long after it was admitted gets 503
            (``None``: no deadline).
    """

    max_body_bytes: int = 20 * 2**20
    max_images: int = 8
    max_image_pixels: int = 4096 * 4096
    context_length: int | None = None
    default_max_tokens: int = 128
    local_images: Path | None = None
    remote_images: bool = False
    remote_timeout_s: float = 10.0
    private_image_hosts: bool = False
    max_waiting: int | None = 64
    request_timeout_s: float | None = 600.0


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class ImageURL(BaseModel):
    model_config = ConfigDict(extra="ignore")
    url: str
    detail: str | None = None


class ImagePart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["image_url"]
    image_url: ImageURL


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart | ImagePart]

    @field_validator("content", mode="before")
    @classmethod
    def _known_parts(cls, content: Any) -> Any:
        """Names an unknown part type plainly (pydantic would list every union member's error)."""
        if isinstance(content, list):
            for i, part in enumerate(content):
                kind = part.get("type") if isinstance(part, dict) else None
                if kind not in ("text", "image_url"):
                    raise ValueError(f"part {i} has type {kind!r}; parts are 'text' and 'image_url'")
        return content


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class ChatRequest(BaseModel):
    """The fields vlm reads; others that change nothing (``user``, ``metadata``...) are ignored,
    and those it cannot honour are refused (:func:`parse_request`)."""

    model_config = ConfigDict(extra="allow")
    model: str
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = Field(default=None, validate_default=True)
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1

    @field_validator("stop")
    @classmethod
    def _stops(cls, stop: str | list[str] | None) -> list[str]:
        stops = [] if stop is None else [stop] if isinstance(stop, str) else stop
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("give at most 4 stop sequences, none empty")
        return stops


#: Fields of OpenAI's API that vlm does not implement: refused rather than silently ignored.
UNSUPPORTED = ("tools", "tool_choice", "functions", "logprobs", "top_logprobs", "response_format", "audio")


def parse_request(body: bytes) -> ChatRequest:
    """The request in ``body``, or :class:`APIError` saying what is wrong with it."""
    try:
        raw = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise APIError(400, f"the body is not valid JSON: {err}") from err
    if not isinstance(raw, dict):
        raise APIError(400, "the body must be a JSON object")
    try:
        request = ChatRequest.model_validate(raw)
    except ValidationError as err:
        first = err.errors()[0]
        param = ".".join(str(p) for p in first["loc"])
        raise APIError(400, f"{param}: {first['msg']}", param=param or None) from err
    for name in UNSUPPORTED:
        if raw.get(name) not in (None, False, [], {"type": "text"}):
            raise APIError(400, f"{name} is not supported by this server", param=name)
    if request.n != 1:
        raise APIError(400, "only n=1 is supported", param="n")
    for name in ("presence_penalty", "frequency_penalty"):
        if raw.get(name) not in (None, 0, 0.0):
            raise APIError(400, f"{name} is not supported by this server (leave it at 0)", param=name)
    if raw.get("logit_bias"):
        raise APIError(400, "logit_bias is not supported by this server", param="logit_bias")
    return request


def to_chat_messages(request: ChatRequest, limits: Limits) -> list[dict[str, Any]]:
    """The messages in transformers' chat format (what ``Predictor`` takes), images decoded."""
    images = sum(
        isinstance(part, ImagePart)
        for m in request.messages
        if isinstance(m.content, list)
        for part in m.content
    )
    if images > limits.max_images:
        raise APIError(
            400,
            f"the messages hold {images} images; this server takes at most {limits.max_images}",
            param="messages",
            code="too_many_images",
        )
    messages = []
    for i, message in enumerate(request.messages):
        role = "system" if message.role == "developer" else message.role
        if isinstance(message.content, str):
            messages.append({"role": role, "content": message.content})
            continue
        parts = []
        for j, part in enumerate(message.content):
            if isinstance(part, TextPart):
                parts.append({"type": "text", "text": part.text})
            else:
                param = f"messages.{i}.content.{j}.image_url"
                parts.append({"type": "image", "image": load_image_url(part.image_url.url, limits, param)})
        messages.append({"role": role, "content": parts})
    if messages[-1]["role"] != "user":
        raise APIError(400, "the last message must be the user's", param="messages")
    return messages


def load_image_url(url: str, limits: Limits, param: str) -> Image.Image:
    """The image an ``image_url`` names: a ``data:`` URI, or (if allowed) a local or remote file."""
    if url.startswith("data:"):
        header, comma, payload = url.partition(",")
        if not comma or not header.endswith(";base64"):
            raise APIError(400, "a data: URI must be data:image/...;base64,<data>", param=param)
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as err:
            raise APIError(400, f"the image's base64 data does not decode: {err}", param=param) from err
    elif url.startswith(("http://", "https://")):
        if not limits.remote_images:
            raise APIError(
                400,
                "remote image URLs are refused; send the image as a data: URI "
                "(or start the server with --allow-remote-images)",
                param=param,
            )
        data = _fetch(url, limits, param)
    else:
        data = _read_local(url, limits, param)
    try:
        return decode_image(data, max_pixels=limits.max_image_pixels)[0]
    except BadSample as bad:
        raise APIError(
            400, f"the image cannot be used: {bad}", param=param, code=f"image_{bad.reason}"
        ) from bad


def _read_local(url: str, limits: Limits, param: str) -> bytes:
    if limits.local_images is None:
        raise APIError(
            400,
            "local image paths are refused; send the image as a data: URI "
            "(or start the server with --local-images DIR)",
            param=param,
        )
    raw = urllib.parse.unquote(urllib.parse.urlparse(url).path) if url.startswith("file://") else url
    root = limits.local_images.resolve()
    path = (root / raw).resolve()
    if not path.is_relative_to(root):
        raise APIError(400, f"{raw} is outside the served image folder", param=param)
    if not path.is_file():
        raise APIError(400, f"{raw}: no such image in the served image folder", param=param)
    if path.stat().st_size > limits.max_body_bytes:
        raise APIError(413, f"{raw} is larger than {limits.max_body_bytes} bytes", param=param)
    return path.read_bytes()


def _fetch(url: str, limits: Limits, param: str) -> bytes:
    policy = FetchPolicy(
        max_bytes=limits.max_body_bytes,
        timeout_s=limits.remote_timeout_s,
        private_hosts=limits.private_image_hosts,
    )
    try:
        return fetch(url, policy)
    except FetchError as err:
        raise APIError(err.status, str(err), param=param, code=err.code) from None


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def completion(
    id_: str, model: str, text: str, finish_reason: str, prompt_tokens: int, completion_tokens: int
) -> dict[str, Any]:
    return {
        "id": id_,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": finish_reason,
                "logprobs": None,
            }
        ],
        "usage": usage(prompt_tokens, completion_tokens),
    }


def chunk(id_: str, model: str, delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
    return {
        "id": id_,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}],
    }


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
