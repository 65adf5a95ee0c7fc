"""OpenAI-style errors: every failure answers `{"error": {"message", "type", "param", "code"}}`
with a 4xx status for bad input, so no request can get a bare 500 or take the server down."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from engine.server.protocol import ErrorResponse

log = logging.getLogger("engine.server")

_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
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
    # A message may quote the client's text: lone surrogates in it would make the body itself
    # unencodable (a 500 in place of the 4xx), so they are written as escapes.
    param = None if param is None else encodable(param)
    return {"error": {"message": encodable(message), "type": type, "param": param, "code": code}}


def encodable(text: str) -> str:
    """`text` with anything UTF-8 cannot encode (lone surrogates) written as \\u escapes."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def check_encodable(value: Any, where: str) -> None:
    """400 naming the first field (a dotted path) whose text UTF-8 cannot encode: a lone UTF-16
    surrogate from a JSON escape such as \\ud800, which the tokenizer and the response encoder
    would fail on. Walks pydantic models, lists, dicts and strings."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise bad_request(
                f"{where} is not valid Unicode text: a lone surrogate at character {exc.start}",
                param=where,
                code="invalid_text",
            ) from None
    elif isinstance(value, BaseModel):
        for name in type(value).model_fields:
            check_encodable(getattr(value, name), f"{where}.{name}" if where else name)
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            check_encodable(item, f"{where}.{i}")
    elif isinstance(value, dict):
        for key, item in value.items():
            check_encodable(key, where)
            check_encodable(item, f"{where}.{encodable(str(key))}")


class BodyTooLarge(StarletteHTTPException):
    """Raised while the body is read, so FastAPI passes it on as it is (a 413, not a 400)."""

    def __init__(self, limit: int) -> None:
        message = f"the request body is larger than the server's limit of {limit} bytes"
        super().__init__(413, message)


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def prompt_too_long(
    max_model_len: int, num_tokens: int, param: str, at_least: bool = False
) -> APIError:
    """The 400 for a prompt with no room to generate."""
    has = f"at least {num_tokens}" if at_least else f"{num_tokens}"
    return APIError(
        400,
        f"This model's maximum context length is {max_model_len} tokens, and the prompt has "
        f"{has}, leaving no room to generate. Please shorten the prompt.",
        param=param,
        code="context_length_exceeded",
    )


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
        413: "The request body is larger than the server's limit",
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
            # loc holds a character offset into the body, not a field: no param.
            message = f"the body is not valid JSON: {first.get('ctx', {}).get('error', '')}"
            return bad_request(message.strip()).response()
        where = ".".join(loc) or "body"
        message = f"{where}: {first.get('msg', 'invalid value')}"
        if len(errors) > 1:
            message += f" (and {len(errors) - 1} more problems)"
        return bad_request(message.strip(), param=".".join(loc) or None).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = "request_too_large" if exc.status_code == 413 else None
        kind = _TYPES.get(exc.status_code, "invalid_request_error")
        body = error_body(str(exc.detail), kind, code=code)
        return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def _internal(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        body = error_body(f"internal error: {type(exc).__name__}: {exc}", "internal_error")
        return JSONResponse(body, status_code=500)
