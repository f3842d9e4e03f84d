"""The HTTP side of `lorakit serve`: OpenAI's routes on FastAPI, in front of a `Server`.

Routes: GET /v1/models, POST /v1/completions, POST /v1/chat/completions (both streaming as server-sent
events with `"stream": true`), POST /v1/adapters {"name", "path"}, DELETE /v1/adapters/{name}, and
GET /health. Bodies are parsed by hand (`protocol.parse_body`) rather than by FastAPI, so that every error
— bad JSON, a missing field, an unknown route — has OpenAI's error shape instead of FastAPI's.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException

from lorakit.serve import protocol
from lorakit.serve.engine import Delta, Failed, Finished
from lorakit.serve.protocol import AdapterRequest, APIError, ChatRequest, CompletionRequest
from lorakit.serve.server import DEFAULT_COMPLETION_TOKENS, Job, Server

log = logging.getLogger("lorakit.serve")


def create_app(server: Server) -> FastAPI:
    """The FastAPI app serving `server`; its lifespan runs the batching scheduler."""

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        import asyncio

        scheduler = asyncio.create_task(server.run_scheduler())
        try:
            yield
        finally:
            scheduler.cancel()
            server.shutdown()

    app = FastAPI(title="lorakit serve", lifespan=lifespan)
    started = int(time.time())

    @app.exception_handler(APIError)
    async def _api_error(_: Request, err: APIError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, err: HTTPException) -> JSONResponse:
        message = f"{request.method} {request.url.path}: {err.detail}"
        return JSONResponse(APIError(err.status_code, message, code=None).body(), status_code=err.status_code)

    @app.exception_handler(Exception)
    async def _server_error(_: Request, err: Exception) -> JSONResponse:
        log.exception("request failed")
        return JSONResponse(APIError(500, f"Internal error: {err}", type="server_error").body(), status_code=500)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", **server.describe()}

    @app.get("/v1/models")
    async def models() -> dict:
        entries = [{"id": server.base_name, "object": "model", "created": started, "owned_by": "lorakit", "root": None}]
        entries += [{"id": name, "object": "model", "created": started, "owned_by": "lorakit",
                     "root": str(server.pool.path(name)), "parent": server.base_name} for name in server.pool.names()]
        return {"object": "list", "data": entries}

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = protocol.parse_body(await request.body(), CompletionRequest)
        job = _start(server, body, lambda: server.completion_prompt(body.prompt_text()), body.max_tokens,
                     DEFAULT_COMPLETION_TOKENS, "prompt")
        request_id = protocol.new_id("cmpl")
        if body.stream:
            def chunk(text: str, reason: str | None = None, counts: dict | None = None) -> dict:
                return protocol.completion_chunk(request_id, body.model, text, reason, counts)

            return _stream(job, body, first=None, piece=chunk, last=lambda reason: chunk("", reason),
                           usage=lambda counts: chunk("", counts=counts))
        text, reason, counts = await _collect(job)
        return protocol.completion_body(request_id, body.model, text, reason, counts)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = protocol.parse_body(await request.body(), ChatRequest)
        messages = [m.as_template_message() for m in body.messages]
        job = _start(server, body, lambda: server.chat_prompt(messages), body.token_limit(), None, "messages")
        request_id = protocol.new_id("chatcmpl")
        if body.stream:
            def chunk(delta: dict, reason: str | None = None, counts: dict | None = None) -> dict:
                return protocol.chat_chunk(request_id, body.model, delta, reason, counts)

            return _stream(job, body, first=chunk({"role": "assistant", "content": ""}),
                           piece=lambda text: chunk({"content": text}), last=lambda reason: chunk({}, reason),
                           usage=lambda counts: chunk({}, counts=counts))
        text, reason, counts = await _collect(job)
        return protocol.chat_body(request_id, body.model, text, reason, counts)

    @app.post("/v1/adapters")
    async def load_adapter(request: Request) -> dict:
        body = protocol.parse_body(await request.body(), AdapterRequest)
        evicted = await server.pool.load(body.name, body.path)
        return {"id": body.name, "object": "model", "loaded": True, "evicted": evicted}

    @app.delete("/v1/adapters/{name}")
    async def unload_adapter(name: str) -> dict:
        await server.pool.unload(name)
        return {"id": name, "object": "model", "deleted": True}

    return app


def _start(server: Server, body: protocol.SamplingRequest, prompt, requested: int | None, default: int | None,
           param: str) -> Job:
    """Resolve the adapter (pinned), build and check the prompt, and queue the row."""
    adapter = server.pool.acquire(body.model)
    try:
        prompt_ids = prompt()
        max_tokens = server.token_budget(prompt_ids, requested, default, param)
        return server.start(adapter, prompt_ids, max_tokens, body)
    except BaseException:
        server.pool.release(adapter)
        raise


async def _collect(job: Job) -> tuple[str, str, dict[str, int]]:
    """(text, finish_reason, usage) of a non-streamed request."""
    pieces: list[str] = []
    try:
        async for event in job.events():
            if isinstance(event, Delta):
                pieces.append(event.text)
            elif isinstance(event, Failed):
                raise APIError(500, f"Generation failed: {event.error}", type="server_error")
            else:
                return "".join(pieces), event.reason, protocol.usage(event.prompt_tokens, event.completion_tokens)
    finally:
        job.close()
    raise APIError(500, "Generation ended without a result.", type="server_error")


def _stream(job: Job, body: protocol.SamplingRequest, *, first: dict | None, piece, last, usage) -> StreamingResponse:
    """Server-sent events: `first` (if any), one `piece` per text delta, `last` with the finish reason, the
    usage chunk when stream_options.include_usage, then [DONE]. Closing the stream cancels the row."""
    include_usage = body.stream_options is not None and body.stream_options.include_usage

    async def events() -> AsyncIterator[str]:
        try:
            if first is not None:
                yield protocol.sse(first)
            async for event in job.events():
                if isinstance(event, Delta):
                    yield protocol.sse(piece(event.text))
                elif isinstance(event, Finished):
                    yield protocol.sse(last(event.reason))
                    if include_usage:
                        yield protocol.sse(usage(protocol.usage(event.prompt_tokens, event.completion_tokens)))
                else:
                    yield protocol.sse(APIError(500, f"Generation failed: {event.error}", type="server_error").body())
            yield protocol.sse("[DONE]")
        finally:
            job.close()

    async def close() -> None:  # async, so that it runs on the event loop like all pool bookkeeping
        job.close()

    # The background task also closes the job when the stream never started (client gone at once).
    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"},
                             background=BackgroundTask(close))
