"""``vlm serve``'s app: OpenAI's chat-completions API and a page to try the model, on FastAPI.

Routes: ``POST /v1/chat/completions`` (plain or streamed as server-sent events),
``GET /v1/models``, ``GET /health``, and the page at ``/``. Every refusal is a 4xx in OpenAI's
error shape, and the server goes on serving. Past its bounds (``Limits.max_waiting`` requests
waiting, ``Limits.request_timeout_s`` for one request) it answers 503 with ``Retry-After`` at
once rather than queueing without end.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
from importlib import resources
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from vlm.eval.predict import InputError, Predictor, conversation_inputs, sizes_of, upright
from vlm.eval.serve.api import (
    APIError,
    ChatRequest,
    Limits,
    chunk,
    completion,
    completion_id,
    parse_request,
    to_chat_messages,
    usage,
)
from vlm.eval.serve.scheduler import Finished, Overloaded, Scheduler, Settings

log = logging.getLogger(__name__)


class Service:
    """A loaded model behind the API: turns checked requests into prompts and runs them."""

    def __init__(self, predictor: Predictor, *, model_name: str, limits: Limits, max_batch_size: int = 16):
        if limits.context_length is None:
            limits = dataclasses.replace(limits, context_length=context_length(predictor))
        self.predictor, self.model_name, self.limits = predictor, model_name, limits
        self.created = int(time.time())
        generation = predictor.generation
        self.scheduler = Scheduler(
            predictor.model,
            predictor.tokenizer,
            eos_token_id=generation.eos_token_id,
            pad_token_id=generation.pad_token_id,
            max_batch_size=max_batch_size,
            max_waiting=limits.max_waiting,
            request_timeout_s=limits.request_timeout_s,
        )

    def prepare(
        self, request: ChatRequest
    ) -> tuple[list[int], torch.Tensor | None, torch.Tensor | None, Settings]:
        """The prompt ids, pixels (each image's tiles), image sizes (``None`` for a model that
        does not tile) and settings of a request (runs in a worker thread: images are decoded,
        cut and resized here, not on the event loop or the model's thread)."""
        if request.model != self.model_name:
            raise APIError(
                404,
                f"the model {request.model!r} does not exist; this server serves {self.model_name!r}",
                param="model",
                code="model_not_found",
            )
        messages = to_chat_messages(request, self.limits)
        try:
            texts, images = conversation_inputs(messages)
            images = upright(images)
            prompt = self.predictor.processor.messages_prompt_ids(texts, image_sizes=sizes_of(images))
        except (InputError, ValueError) as err:
            raise APIError(400, str(err), param="messages") from err
        context = self.limits.context_length
        asked = request.max_completion_tokens or request.max_tokens
        budget = asked or min(self.limits.default_max_tokens, context - len(prompt))
        if len(prompt) + budget > context or budget < 1:
            raise APIError(
                400,
                f"this model's maximum context length is {context} tokens; the messages take "
                f"{len(prompt)} and {budget} more were asked for the completion",
                param="messages" if asked is None else "max_tokens",
                code="context_length_exceeded",
            )
        pixels = self.predictor.pixel_values(images) if images else None
        sizes = torch.tensor(sizes_of(images)) if images and self.predictor.processor.tiling.splits else None
        settings = Settings(
            max_new_tokens=budget,
            temperature=request.temperature,
            top_p=request.top_p,
            seed=request.seed,
            stop=tuple(request.stop),
        )
        return prompt, pixels, sizes, settings


def context_length(predictor: Predictor) -> int:
    """The longest prompt plus completion the model takes: the ``max_length`` it was trained
    with, or fewer where the LM has fewer positions (GPT-2's learned position table)."""
    text_config = predictor.model.decoder.lm.config.get_text_config()
    positions = getattr(text_config, "max_position_embeddings", None) or getattr(
        text_config, "n_positions", None
    )
    return min(predictor.processor.max_length, positions or predictor.processor.max_length)


def create_app(service: Service) -> FastAPI:
    """The ASGI app serving ``service``."""
    app = FastAPI(title="vlm", summary=f"OpenAI-compatible chat completions for {service.model_name}")
    app.state.service = service

    @app.exception_handler(APIError)
    async def _api_error(request: Request, error: APIError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

    @app.exception_handler(Overloaded)
    async def _overloaded(request: Request, error: Overloaded) -> JSONResponse:
        return JSONResponse(**_unavailable(str(error), error.code, error.retry_after_s))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code)
        return JSONResponse(
            APIError(error.status_code, str(error.detail), code=code).body(), error.status_code
        )

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        return JSONResponse(APIError(400, str(error)).body(), status_code=400)

    @app.exception_handler(Exception)
    async def _bug(request: Request, error: Exception) -> JSONResponse:
        log.exception("%s %s failed", request.method, request.url.path)
        body = APIError(500, f"the server failed: {type(error).__name__}", kind="server_error").body()
        return JSONResponse(body, status_code=500)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(
            resources.files("vlm.eval.serve").joinpath("page.html").read_text(encoding="utf-8")
        )

    @app.get("/health")
    async def health() -> JSONResponse:
        scheduler = service.scheduler
        ok = scheduler.alive()
        body = {
            "status": "ok" if ok else "generation thread stopped",
            "model": service.model_name,
            "running": scheduler.running,
            "waiting": scheduler.waiting,
            "rejected": scheduler.counts["rejected"],
            "timed_out": scheduler.counts["timed_out"],
            "max_batch_size": scheduler.max_batch_size,
            "max_waiting": scheduler.max_waiting,
            "request_timeout_s": scheduler.request_timeout_s,
            "requests": dict(scheduler.counts),
        }
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        entry = {"id": service.model_name, "object": "model", "created": service.created, "owned_by": "vlm"}
        return {"object": "list", "data": [entry]}

    @app.post("/v1/chat/completions")
    async def chat_completions(http: Request):
        service.scheduler.check_admission()  # a full queue refuses before reading or decoding
        body = await _read_body(http, service.limits.max_body_bytes)
        request = parse_request(body)
        prompt, pixels, sizes, settings = await run_in_threadpool(service.prepare, request)
        id_ = completion_id()
        events = service.scheduler.submit(prompt, pixels, settings, image_sizes=sizes)
        del pixels  # the scheduler holds them while the request waits, and drops them after
        if request.stream:
            include_usage = bool(request.stream_options and request.stream_options.include_usage)
            return StreamingResponse(
                _stream(events, id_, service.model_name, len(prompt), include_usage, _timed_out(service)),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        done = await _wait(events, http)
        if done is None:  # the client went away; nobody reads this
            return Response(status_code=499)
        if done.reason == "error":
            raise APIError(500, f"generation failed: {done.error}", kind="server_error")
        if done.reason == "timeout":
            return JSONResponse(**_unavailable(*_timed_out(service)))
        return completion(
            id_, service.model_name, done.text, done.reason, len(prompt), done.completion_tokens
        )

    return app


async def _read_body(http: Request, limit: int) -> bytes:
    """The body, refused (413) as soon as it is known to be over ``limit`` bytes."""
    declared = http.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"the request body is over the limit of {limit} bytes", code="request_too_large")
    body = bytearray()
    async for piece in http.stream():
        body += piece
        if len(body) > limit:
            raise APIError(
                413, f"the request body is over the limit of {limit} bytes", code="request_too_large"
            )
    return bytes(body)


async def _wait(events, http: Request) -> Finished | None:
    """The reply of a plain request; ``None`` if the client went away (its row is cancelled)."""
    waiting = asyncio.ensure_future(anext(events))
    try:
        while True:
            done, _ = await asyncio.wait({waiting}, timeout=0.5)
            if done:
                event = waiting.result()
                if isinstance(event, Finished):
                    return event
                waiting = asyncio.ensure_future(anext(events))
            elif await http.is_disconnected():
                return None
    finally:
        waiting.cancel()
        await asyncio.gather(waiting, return_exceptions=True)
        await events.aclose()


async def _stream(
    events, id_: str, model: str, prompt_tokens: int, include_usage: bool, timed_out: tuple[str, str, int]
):
    """Server-sent events in OpenAI's chunk format, ending with ``data: [DONE]``; a request
    past its deadline ends with an error event (``timed_out``: its message, code, retry)."""
    try:
        yield _sse(chunk(id_, model, {"role": "assistant", "content": ""}))
        async for event in events:
            if isinstance(event, Finished):
                if event.reason == "error":
                    error = APIError(500, f"generation failed: {event.error}", kind="server_error")
                    yield _sse(error.body())
                    break
                if event.reason == "timeout":  # the headers are sent: the error is the last event
                    yield _sse(_unavailable(*timed_out)["content"])
                    break
                yield _sse(chunk(id_, model, {}, event.reason))
                if include_usage:
                    tail = chunk(id_, model, {})
                    tail["choices"], tail["usage"] = [], usage(prompt_tokens, event.completion_tokens)
                    yield _sse(tail)
                break
            yield _sse(chunk(id_, model, {"content": event}))
        yield "data: [DONE]\n\n"
    finally:
        await events.aclose()  # a client that left: its row leaves the batch


def _unavailable(message: str, code: str, retry_after_s: int) -> dict[str, Any]:
    """A 503 in OpenAI's error shape with ``Retry-After`` (JSONResponse's arguments)."""
    body = APIError(503, message, code=code, kind="server_error").body()
    return {"content": body, "status_code": 503, "headers": {"Retry-After": str(retry_after_s)}}


def _timed_out(service: Service) -> tuple[str, str, int]:
    seconds = service.scheduler.request_timeout_s
    message = f"the request did not finish within the server's request timeout of {seconds:g} s"
    return message, "request_timeout", service.scheduler.retry_after_s()


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"
