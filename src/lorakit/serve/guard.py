"""The HTTP guard in front of every route: where the request comes from, who sends it, what it carries.

Checks, in order, each answered with OpenAI's error shape before any route runs:

1. `Host` (400): an IP literal, `localhost`, the address the server is bound to, or the host of an
   `--allowed-origins` entry. A DNS-rebinding page reaches the server under its own domain name, so its
   requests carry that name and are refused.
2. `Origin` (403), when a browser sends one: the server's own origin (same host and port as `Host`) or an
   `--allowed-origins` entry. Any other web page the user visits cannot drive the server.
3. `Authorization: Bearer KEY` (401) when the server has an API key (`--api-key`, `LORAKIT_API_KEY`), on
   every route, compared in constant time.
4. `Content-Type: application/json` (415) on requests with a body. A cross-site "simple" request
   (text/plain, form data) never gets a browser preflight, so it must not be accepted at all.
5. Body size (413): `Content-Length` over `--max-body-bytes` is refused before reading; a body without
   one is counted as it is read.

It also makes a failing route a 500 in OpenAI's error shape, answered without dropping the keep-alive
connection (the client's next request on it works). Starlette's last-resort handler re-raises after
answering, and uvicorn then closes the connection without `Connection: close`.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
from urllib.parse import urlsplit

from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lorakit.serve.errors import APIError
from lorakit.serve.settings import ServeSettings

log = logging.getLogger("lorakit.serve")
API_KEY_ENV = "LORAKIT_API_KEY"


class Guard:
    """ASGI middleware doing the checks above."""

    def __init__(self, app: ASGIApp, settings: ServeSettings) -> None:
        self.app, self.settings = app, settings
        self.any_origin = "*" in settings.allowed_origins
        self.origins = {o.rstrip("/").lower() for o in settings.allowed_origins if o != "*"}
        self.hosts = {"localhost", settings.host.strip("[]").lower(),
                      *(urlsplit(o).hostname for o in self.origins)}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracked(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            self._check(scope, Headers(scope=scope))
            await self.app(scope, self._counted(receive), tracked)
        except Exception as err:
            if started:
                raise  # half an answer is out: closing the connection is all that is left
            if not isinstance(err, APIError):
                log.exception("request failed")
                err = APIError(500, f"Internal error: {type(err).__name__}: {err}", type="server_error")
            answer = JSONResponse(err.body(), status_code=err.status, headers=_headers(err))
            await answer(scope, receive, send)

    def _check(self, scope: Scope, headers: Headers) -> None:
        host = headers.get("host", "")
        if not self.any_origin and not self._host_allowed(host):
            raise APIError(400, f"Host header {host!r} is not this server's address; start the server with "
                           "--allowed-origins to accept it.", code="invalid_host")
        origin = headers.get("origin")
        if origin is not None and not self.any_origin and not self._origin_allowed(origin, host):
            raise APIError(403, f"Cross-origin request from {origin!r} refused; start the server with "
                           "--allowed-origins to accept it.", code="origin_not_allowed")
        if self.settings.api_key is not None:
            scheme, _, key = headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(),
                                                                       self.settings.api_key.encode()):
                raise APIError(401, "Incorrect API key provided.", code="invalid_api_key")
        if scope["method"] in ("POST", "PUT", "PATCH"):
            media = headers.get("content-type", "").split(";")[0].strip().lower()
            if media != "application/json":
                raise APIError(415, f"Content-Type must be application/json, not {media or 'none'!r}.",
                               code="unsupported_media_type")
            length = headers.get("content-length")
            if length is not None and (not length.isdigit() or int(length) > self.settings.max_body_bytes):
                raise _too_large(self.settings.max_body_bytes)

    def _host_allowed(self, host: str) -> bool:
        try:
            name = urlsplit(f"//{host}").hostname
        except ValueError:
            return False
        if not name:
            return False
        if name in self.hosts:
            return True
        try:
            ipaddress.ip_address(name)  # an address needs no DNS, so it cannot be rebound
            return True
        except ValueError:
            return False

    def _origin_allowed(self, origin: str, host: str) -> bool:
        origin = origin.rstrip("/").lower()
        return origin in self.origins or urlsplit(origin).netloc == host.lower() != ""

    def _counted(self, receive: Receive) -> Receive:
        """`receive`, refusing a body that grows past the limit while it is read."""
        limit, seen = self.settings.max_body_bytes, 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > limit:
                raise _too_large(limit)
            return message

        return counted


def _too_large(limit: int) -> APIError:
    return APIError(413, f"The request body is larger than {limit} bytes (--max-body-bytes).",
                    code="request_too_large")


def _headers(err: APIError) -> dict[str, str]:
    return {"WWW-Authenticate": "Bearer"} if err.status == 401 else {}
