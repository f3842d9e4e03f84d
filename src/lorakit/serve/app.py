"""The HTTP side of `lorakit serve`: OpenAI's routes on FastAPI, in front of a `Server`.

Routes: GET /v1/models, POST /v1/completions and POST /v1/chat/completions (`generation`; both stream as
server-sent events with `"stream": true`), POST /v1/adapters {"name", "path"} (only with an adapter root),
DELETE /v1/adapters/{name}, GET /health and GET /metrics (Prometheus). Every route sits behind the
`guard.Guard` checks (host, origin, API key, content type, body size). Bodies are parsed by hand
(`protocol.parse_body`) rather than by FastAPI, so that every error — bad JSON, a missing field, an
unknown route — has OpenAI's error shape instead of FastAPI's.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException
from starlette.middleware.cors import CORSMiddleware

from lorakit.serve import generation
from lorakit.serve.errors import APIError
from lorakit.serve.guard import Guard
from lorakit.serve.protocol import AdapterRequest, parse_body
from lorakit.serve.server import Server


def create_app(server: Server) -> FastAPI:
    """The FastAPI app serving `server`; its lifespan runs the batching scheduler."""

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        scheduler = asyncio.create_task(server.scheduler.run())
        try:
            yield
        finally:
            scheduler.cancel()
            server.shutdown()

    app = FastAPI(title="lorakit serve", lifespan=lifespan)
    app.add_middleware(Guard, settings=server.settings)
    if server.settings.allowed_origins:
        # Outside the guard: answers the browsers' preflight requests for the allowed origins.
        origins = list(server.settings.allowed_origins)
        app.add_middleware(CORSMiddleware, allow_origins=origins, allow_methods=["GET", "POST", "DELETE"],
                           allow_headers=["Authorization", "Content-Type"])
    started = int(time.time())

    @app.exception_handler(APIError)
    async def _api_error(_: Request, err: APIError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, err: HTTPException) -> JSONResponse:
        message = f"{request.method} {request.url.path}: {err.detail}"
        return JSONResponse(APIError(err.status_code, message, code=None).body(), status_code=err.status_code)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", **server.describe()}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(server.metrics.exposition(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models() -> dict:
        def entry(name: str, parent: str | None) -> dict:
            return {"id": name, "object": "model", "created": started, "owned_by": "lorakit", "root": name,
                    "parent": parent, "max_model_len": server.max_model_len}

        base = server.base_name
        return {"object": "list", "data": [entry(base, None), *(entry(n, base) for n in server.pool.names())]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await generation.completions(server, request)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await generation.chat_completions(server, request)

    @app.post("/v1/adapters")
    async def load_adapter(request: Request) -> dict:
        body = parse_body(await request.body(), AdapterRequest)
        evicted = await server.pool.load(body.name, body.path)
        return {"id": body.name, "object": "model", "loaded": True, "evicted": evicted}

    @app.delete("/v1/adapters/{name}")
    async def unload_adapter(name: str) -> dict:
        await server.pool.unload(name)
        return {"id": name, "object": "model", "deleted": True}

    return app
