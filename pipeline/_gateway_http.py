"""The gateway's HTTP side: a Starlette app (served by hypercorn's trio worker, see
`pipeline._gateway.serve_gateway`).

    GET  /                      the swarm map page (pipeline/_gateway_static/, no build step, no CDN)
    GET  /api/swarm             the same map as JSON (`pipeline._swarm_map`)
    GET  /metrics               Prometheus text format (`pipeline._metrics`)
    GET  /health                200 when a generation can start now, else 503 saying why
    GET  /v1/models, /v1/models/{id}
    POST /v1/completions, /v1/chat/completions      (``"stream": true``: server-sent events)

A generation request is answered by a `GenerationResponse`, an ASGI callable holding a trio
nursery of two tasks: the generation (pushing text into a channel) and a watcher of the client's
connection. The response sends the channel's pieces as they come (SSE chunks, ``data: [DONE]``
last) or, unstreamed, one JSON body at the end. When the client goes away the watcher cancels
the nursery: the generation stops and its inference session is closed on the nodes. A streamed
response sends its 200 header with the first piece of text, so a failure before any text (no
route through the swarm, a node refusing the session) still gets its own status code; a failure
after it is one last SSE event ``data: {"error": {...}}``, as OpenAI's API sends it.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import trio
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from ._gateway import Gateway, Job, Outcome, as_api_error, error_kind
from ._metrics import render
from ._openai import ApiError, bad_request, chat_body, chat_chunk, completion_body, parse_chat, \
    parse_completion, usage

log = logging.getLogger("lamina.gateway")

STATIC = Path(__file__).with_name("_gateway_static")
MAX_BODY = 4 << 20           # bytes of a request body
SSE_HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
               (b"x-accel-buffering", b"no")]


def _json_bytes(data: Any) -> bytes:
    return json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode()


def _sse(data: Any) -> bytes:
    return b"data: " + (data if isinstance(data, bytes) else _json_bytes(data)) + b"\n\n"


class GenerationResponse:
    """Answers one completion or chat completion request (see the module docstring)."""

    def __init__(self, gateway: Gateway, job: Job) -> None:
        self.gateway, self.job = gateway, job
        self.endpoint = "chat" if job.request.kind == "chat" else "completions"
        self.status = 200
        self.disconnected = False
        self.complete = False        # the last byte is on its way: a disconnect now is the normal end
        self.first_piece_at: float | None = None

    async def __call__(self, scope, receive, send) -> None:
        metrics = self.gateway.metrics
        pieces_in, pieces_out = trio.open_memory_channel[tuple[str, Any]](math.inf)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._watch, receive, nursery.cancel_scope)
                nursery.start_soon(self._generate, pieces_in)
                try:
                    if self.job.request.stream:
                        await self._stream(pieces_out, send)
                    else:
                        await self._whole(pieces_out, send)
                except OSError:            # the client went away while we wrote
                    self.disconnected = not self.complete
                nursery.cancel_scope.cancel()
        finally:
            if self.disconnected:
                metrics.errors.labels("client_disconnected").inc()
                log.info("%s: the client went away; its session was closed", self.job.id)
            metrics.requests.labels(self.endpoint, "499" if self.disconnected else str(self.status)).inc()
            metrics.duration.observe(time.perf_counter() - self.job.t0)
            if self.first_piece_at is not None:
                metrics.ttft.observe(self.first_piece_at - self.job.t0)

    async def _watch(self, receive, cancel_scope: trio.CancelScope) -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                self.disconnected = not self.complete
                cancel_scope.cancel()
                return

    async def _generate(self, pieces: trio.MemorySendChannel) -> None:
        gateway = self.gateway
        async with pieces:
            try:
                async with gateway.admit():
                    gateway.check_swarm()
                    outcome = await gateway.generate(self.job, lambda text: pieces.send_nowait(("text", text)))
            except Exception as exc:       # an error is an answer, never a crash of the server
                error = as_api_error(exc)
                if error.status >= 500:
                    log.warning("%s failed: %s", self.job.id, exc, exc_info=error.status == 500)
                gateway.metrics.errors.labels(error_kind(exc)).inc()
                pieces.send_nowait(("error", error))
                return
            gateway.metrics.tokens.labels("prompt").inc(outcome.prompt_tokens)
            gateway.metrics.tokens.labels("completion").inc(outcome.completion_tokens)
            pieces.send_nowait(("done", outcome))

    def _mark_first(self) -> None:
        if self.first_piece_at is None:
            self.first_piece_at = time.perf_counter()

    async def _send_json(self, send, status: int, body: Any) -> None:
        self.status = status
        data = _json_bytes(body)
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})
        self.complete = True
        await send({"type": "http.response.body", "body": data, "more_body": False})

    async def _whole(self, pieces: trio.MemoryReceiveChannel, send) -> None:
        job, text = self.job, []
        async for kind, value in pieces:
            self._mark_first()
            if kind == "text":
                text.append(value)
            elif kind == "error":
                await self._send_json(send, value.status, value.body())
                return
            else:
                outcome: Outcome = value
                use = usage(outcome.prompt_tokens, outcome.completion_tokens)
                name = self.gateway.name
                body = (chat_body(job.id, job.created, name, "".join(text), outcome.finish_reason, use)
                        if job.request.kind == "chat" else
                        completion_body(job.id, job.created, name, "".join(text), outcome.finish_reason, use))
                await self._send_json(send, 200, body)
                return

    async def _stream(self, pieces: trio.MemoryReceiveChannel, send) -> None:
        started = False
        async for kind, value in pieces:
            self._mark_first()
            if kind == "error" and not started:
                await self._send_json(send, value.status, value.body())
                return
            if not started:
                await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})
                started = True
                if self.job.request.kind == "chat":
                    await self._chunk(send, {"role": "assistant", "content": ""}, None)
            if kind == "text":
                await self._chunk(send, value, None)
            elif kind == "error":
                await send({"type": "http.response.body", "body": _sse(value.body()), "more_body": True})
                break
            else:
                await self._finish(send, value)
                break
        self.complete = True
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _chunk(self, send, content: str | dict, finish: str | None) -> None:
        job, name = self.job, self.gateway.name
        with_usage = job.request.include_usage
        if job.request.kind == "chat":
            delta = content if isinstance(content, dict) else {"content": content}
            body = chat_chunk(job.id, job.created, name, delta, finish, with_usage=with_usage)
        else:
            body = completion_body(job.id, job.created, name, content, finish, None, chunk=True)
            if with_usage:
                body["usage"] = None
        await send({"type": "http.response.body", "body": _sse(body), "more_body": True})

    async def _finish(self, send, outcome: Outcome) -> None:
        job = self.job
        await self._chunk(send, {} if job.request.kind == "chat" else "", outcome.finish_reason)
        if job.request.include_usage:
            use = usage(outcome.prompt_tokens, outcome.completion_tokens)
            if job.request.kind == "chat":
                body = chat_chunk(job.id, job.created, self.gateway.name, None, None, use)
            else:
                body = completion_body(job.id, job.created, self.gateway.name, "", None, use, chunk=True)
                body["choices"] = []
            await send({"type": "http.response.body", "body": _sse(body), "more_body": True})
        self.complete = True
        await send({"type": "http.response.body", "body": _sse(b"[DONE]"), "more_body": True})


async def _json_body(request: Request) -> Any:
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY:
            raise ApiError(413, f"the request body is larger than {MAX_BODY} bytes", code="request_too_large")
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise bad_request(f"We could not parse the JSON body of your request ({e}). The body must be a JSON "
                          f"object; see https://platform.openai.com/docs/api-reference") from None


def create_app(gateway: Gateway) -> Starlette:
    """The ASGI app of one gateway."""
    metrics = gateway.metrics

    async def generation(request: Request, parse, endpoint: str):
        try:
            job = gateway.prepare(parse(await _json_body(request)))
        except ApiError as e:
            metrics.errors.labels(error_kind(e)).inc()
            metrics.requests.labels(endpoint, str(e.status)).inc()
            raise
        return GenerationResponse(gateway, job)

    async def completions(request: Request):
        return await generation(request, parse_completion, "completions")

    async def chat_completions(request: Request):
        return await generation(request, parse_chat, "chat")

    def model_card() -> dict[str, Any]:
        return {"id": gateway.name, "object": "model", "created": gateway.created, "owned_by": "lamina",
                "context_length": gateway.context, "blocks": gateway.blocks}

    async def models(request: Request) -> Response:
        metrics.requests.labels("models", "200").inc()
        return JSONResponse({"object": "list", "data": [model_card()]})

    async def model(request: Request) -> Response:
        if request.path_params["model"] not in gateway.aliases:
            raise ApiError(404, f"The model '{request.path_params['model']}' does not exist", param="model",
                           code="model_not_found")
        return JSONResponse(model_card())

    async def swarm(request: Request) -> Response:
        return JSONResponse(gateway.swarm(), headers={"cache-control": "no-store"})

    async def prometheus(request: Request) -> Response:
        body, content_type = render(gateway.registry)
        return Response(body, media_type=content_type)

    async def health(request: Request) -> Response:
        status, body = gateway.health()
        return JSONResponse(body, status_code=status, headers={"cache-control": "no-store"})

    async def page(request: Request) -> Response:
        return FileResponse(STATIC / "index.html", headers={"cache-control": "no-store"})

    routes = [
        Route("/", page), Route("/api/swarm", swarm), Route("/metrics", prometheus), Route("/health", health),
        Route("/v1/models", models), Route("/v1/models/{model:path}", model),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Mount("/static", StaticFiles(directory=STATIC)),
    ]
    return Starlette(routes=routes, exception_handlers={
        ApiError: _api_error, HTTPException: _http_error, Exception: _server_error})


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return JSONResponse(exc.body(), status_code=exc.status)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    kind = "not_found" if exc.status_code == 404 else "method_not_allowed" if exc.status_code == 405 else None
    message = (f"{request.method} {request.url.path} is not an endpoint of this server" if exc.status_code in (404, 405)
               else str(exc.detail))
    return JSONResponse(ApiError(exc.status_code, message, code=kind).body(), status_code=exc.status_code,
                        headers=exc.headers)


async def _server_error(request: Request, exc: Exception) -> Response:
    log.exception("%s %s failed", request.method, request.url.path, exc_info=exc)
    return JSONResponse(as_api_error(exc).body(), status_code=500)
