"""OpenAI-style errors: every failure answers `{"error": {"message", "type", "param", "code"}}`
with a 4xx status for bad input, so no request can get a bare 500 or take the server down."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from engine.server.protocol import ErrorResponse

log = logging.getLogger("engine.server")

_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    429: "rate_limit_exceeded",
    503: "server_unavailable",
}


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str | None = None,
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type or _TYPES.get(status, "internal_error")
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


def error_body(
    message: str, type: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def from_value_error(exc: ValueError, fields: frozenset[str] = frozenset()) -> APIError:
    """A ValueError from SamplingParams or the engine -> 400; `param` is the field its message
    starts with ("temperature must be >= 0, ...")."""
    message = str(exc)
    first = message.split(" ", 1)[0]
    return bad_request(message, param=first if first in fields else None)


# Documented on every route, so the OpenAPI schema lists each status a route can answer.
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": description}
    for status, description in {
        400: "Invalid request: malformed JSON, bad values, prompt too long",
        401: "Missing or wrong API key",
        404: "Unknown model",
        429: "The request queue is full",
        500: "The engine failed while running the request",
    }.items()
}


def install(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        if first.get("type") == "json_invalid":
            message = f"the body is not valid JSON: {first.get('ctx', {}).get('error', '')}"
        else:
            where = ".".join(loc) or "body"
            message = f"{where}: {first.get('msg', 'invalid value')}"
            if len(errors) > 1:
                message += f" (and {len(errors) - 1} more problems)"
        return bad_request(message.strip(), param=".".join(loc) or None).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        body = error_body(str(exc.detail), _TYPES.get(exc.status_code, "invalid_request_error"))
        return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def _internal(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        body = error_body(f"internal error: {type(exc).__name__}: {exc}", "internal_error")
        return JSONResponse(body, status_code=500)
