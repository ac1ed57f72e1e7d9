# SPDX-License-Identifier: Apache-2.0
"""The ASGI app (FastAPI): OpenAI's chat completions, models, health and Prometheus metrics.

Every error, the client's or ours, leaves as OpenAI's error body with the right status; nothing a client sends
reaches the worker unchecked. The handlers never run torch: they parse (images are decoded in the thread pool),
hand the request to the :class:`~dimple_rt.serve.scheduler.Scheduler` and wait for its events.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import APIError, bad_request
from .images import DEFAULT_LIMITS, ImageLimits
from .scheduler import Event, Failed, Finished, Job, Progress, Scheduler, Started
from .schemas import ChatRequest, chunk_body, completion_body, completion_id, parse_chat_request
from .streaming import CommittedPrefix

log = logging.getLogger("dimple_rt.serve")
DISCONNECT_POLL_SECONDS = 0.25
"""How often a waiting non-streamed request checks whether its client went away."""
ENDPOINTS = ("/v1/chat/completions", "/v1/models", "/health", "/metrics")


def create_app(
    scheduler: Scheduler,
    *,
    model_name: str,
    api_key: str | None = None,
    image_dir: str | Path | None = None,
    limits: ImageLimits = DEFAULT_LIMITS,
) -> FastAPI:
    """The app serving ``scheduler``'s Runtime as ``model_name``. The app starts the scheduler and shuts it down
    (its lifespan). ``api_key``: required as ``Authorization: Bearer KEY`` on /v1/*; ``image_dir``: the folder
    local image paths may name (None: no local paths)."""
    folder = Path(image_dir).resolve() if image_dir is not None else None
    if folder is not None and not folder.is_dir():
        raise ValueError(f"image_dir {image_dir} is not a folder")
    max_body = limits.max_images * (limits.max_bytes * 4 // 3 + 1024) + 1024 * 1024
    runtime = scheduler.runtime
    mask_id = runtime.config.mask_token_id

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        scheduler.start()
        yield
        await run_in_threadpool(scheduler.shutdown)

    app = FastAPI(title="dimple_rt", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(_CountResponses, scheduler=scheduler)

    @app.exception_handler(APIError)
    async def api_error(request: Request, err: APIError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        message = f"{request.method} {request.url.path}: {err.detail}"
        if err.status_code == 404:
            message += f"; the endpoints are {', '.join(ENDPOINTS)}"
        return JSONResponse(APIError(err.status_code, message).body(), status_code=err.status_code)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, err: Exception) -> JSONResponse:
        log.exception("unhandled error")
        body = APIError(500, f"internal error: {type(err).__name__}", type="server_error").body()
        return JSONResponse(body, status_code=500)

    def authorize(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise APIError(
                401,
                "invalid or missing API key: send it as 'Authorization: Bearer <key>'",
                code="invalid_api_key",
            )

    @app.get("/health")
    async def health() -> JSONResponse:
        alive = scheduler.alive
        body = {
            "status": "ok" if alive else "unavailable",
            "model": model_name,
            "queue_depth": scheduler.queue_depth,
            "batch_size": scheduler.batch_size,
        }
        return JSONResponse(body, status_code=200 if alive else 503)

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(scheduler.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models(request: Request) -> JSONResponse:
        authorize(request)
        card = {"id": model_name, "object": "model", "created": 0, "owned_by": "dimple_rt"}
        return JSONResponse({"object": "list", "data": [card]})

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        authorize(request)
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > max_body:
            raise APIError(413, f"the request body is {length} bytes; at most {max_body} are accepted")
        raw = await request.body()
        if len(raw) > max_body:
            raise APIError(413, f"the request body is {len(raw)} bytes; at most {max_body} are accepted")
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise bad_request(f"the request body is not valid JSON ({err}); send a JSON object") from None
        except RecursionError:
            raise bad_request("the request body is nested too deeply; send a plain JSON object") from None
        chat = await run_in_threadpool(
            parse_chat_request,
            body,
            model_name=model_name,
            image_dir=folder,
            limits=limits,
            preset=scheduler.runtime.preset,
        )
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event] = asyncio.Queue()

        def emit(event: Event) -> None:
            loop.call_soon_threadsafe(events.put_nowait, event)

        job = scheduler.submit(chat, emit)
        cid = completion_id()
        try:
            if chat.stream:
                first = await _wait(events, request, (Started, Failed))
                if isinstance(first, Failed):
                    raise first.error
                if first is None:
                    scheduler.cancel(job)
                    return Response(status_code=499)
                stream = _sse(events, job, chat, cid)
                job = None  # the stream owns the job now
                return StreamingResponse(stream, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
            last = await _wait(events, request, (Finished, Failed))
            if last is None:
                return Response(status_code=499)
            if isinstance(last, Failed):
                raise last.error
            job = None
            done = last.completion
            return JSONResponse(
                completion_body(cid, model_name, done.text, done.finish_reason, done.usage(), done.extension())
            )
        finally:
            if job is not None:
                scheduler.cancel(job)

    async def _wait(events: asyncio.Queue[Event], request: Request, kinds: tuple[type, ...]) -> Any:
        """The next event of one of ``kinds`` (others are dropped), or None once the client has gone away."""
        while True:
            try:
                event = await asyncio.wait_for(events.get(), DISCONNECT_POLL_SECONDS)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    return None
                continue
            if isinstance(event, kinds):
                return event

    async def _sse(events: asyncio.Queue[Event], job: Job, chat: ChatRequest, cid: str) -> AsyncIterator[str]:
        """The event stream after the first step: role, text deltas (the committed prefix), optional canvas
        chunks, the finish chunk, the usage chunk if asked, then ``[DONE]``. A cancelled stream (the client went
        away) cancels its request."""
        prefix = CommittedPrefix(runtime.tokenizer, mask_id, chat.stop)
        finished = False
        try:
            yield _data(chunk_body(cid, model_name, {"role": "assistant", "content": ""}))
            while True:
                event = await events.get()
                if isinstance(event, Progress):
                    if chat.stream_canvas:
                        canvas = runtime.render_canvas(torch.tensor(event.canvas))
                        step = {"step": event.step, "canvas": canvas, "masks_left": event.masks_left}
                        yield _data(chunk_body(cid, model_name, None, dimple=step))
                    delta = prefix.update(event.canvas)
                    if delta:
                        yield _data(chunk_body(cid, model_name, {"content": delta}))
                elif isinstance(event, Finished):
                    finished = True
                    done = event.completion
                    delta = prefix.finish(done.text)
                    if delta:
                        yield _data(chunk_body(cid, model_name, {"content": delta}))
                    if prefix.sent != done.text:
                        log.warning("streamed text differs from the answer (decoding was not append-only)")
                    extension = done.extension()
                    yield _data(chunk_body(cid, model_name, {}, done.finish_reason, dimple=extension))
                    if chat.include_usage:
                        yield _data(chunk_body(cid, model_name, None, usage=done.usage()))
                    yield "data: [DONE]\n\n"
                    return
                elif isinstance(event, Failed):
                    finished = True
                    yield _data(event.error.body())
                    yield "data: [DONE]\n\n"
                    return
        finally:
            if not finished:
                scheduler.cancel(job)

    return app


def _data(body: dict[str, Any]) -> str:
    return f"data: {json.dumps(body, separators=(',', ':'))}\n\n"


class _CountResponses:
    """Pure ASGI middleware (streams pass through untouched): counts responses by endpoint and status."""

    def __init__(self, app: ASGIApp, scheduler: Scheduler) -> None:
        self.app = app
        self.scheduler = scheduler

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        endpoint = path if path in ENDPOINTS else "other"
        status = 500

        async def counting_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        finally:
            self.scheduler.metrics.response(endpoint, status)
