"""ASGI middleware, outermost first: `RequestClock` (arrival time, responses by status class),
`BodySizeLimit` (413 past the limit, before the body is parsed) and `BearerAuth` (401)."""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable

from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from engine.server.errors import BodyTooLarge, error_body

OPEN_PATHS = frozenset({"/health"})
ARRIVAL = "arrival_time"  # key in the request's scope["state"]: time.monotonic() on arrival


class RequestClock:
    """Stamps each request's arrival (the engine's clock, time.monotonic, so TTFT can be taken
    from it) and reports each response's status to `on_status`."""

    def __init__(self, app: ASGIApp, on_status: Callable[[int], None]) -> None:
        self.app = app
        self.on_status = on_status

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        scope.setdefault("state", {})[ARRIVAL] = time.monotonic()

        async def counted(message: Message) -> None:
            if message["type"] == "http.response.start":
                self.on_status(message["status"])
            await send(message)

        await self.app(scope, receive, counted)


class BodySizeLimit:
    """413 for a body over `limit` bytes: at once when Content-Length says so, else as soon as
    the bytes read pass it (a chunked body), so the oversized body is never parsed."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            exc = BodyTooLarge(self.limit)
            body = error_body(exc.detail, "invalid_request_error", code="request_too_large")
            # Connection: close, so the server need not read the body it refuses.
            headers = {"Connection": "close"}
            await JSONResponse(body, status_code=413, headers=headers)(scope, receive, send)
            return
        received = 0

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise BodyTooLarge(self.limit)
            return message

        await self.app(scope, limited, send)


class BearerAuth:
    """401 unless the request carries the API key (paths in OPEN_PATHS are free). The scheme is
    case-insensitive (RFC 7235); the key is compared in constant time."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self.expected = api_key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        given = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, token = given.strip().partition(b" ")
        if scheme.lower() != b"bearer" or not secrets.compare_digest(token.strip(), self.expected):
            body = error_body(
                "Invalid or missing API key: send 'Authorization: Bearer <key>'.",
                "invalid_request_error",
                code="invalid_api_key",
            )
            response = JSONResponse(body, status_code=401, headers={"WWW-Authenticate": "Bearer"})
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)
