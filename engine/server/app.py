"""The FastAPI app: OpenAI-compatible routes, /health, /metrics, /v1/engine/state and
/v1/engine/abort, OpenAPI.

    app = create_app(AsyncLLM(model), ServerSettings(model_name="tiny", api_key=None))

Every route but /health needs `Authorization: Bearer <api_key>` when a key is set."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response

from engine.llm import AsyncLLM
from engine.server import errors
from engine.server.chat import create_chat_completion
from engine.server.completions import create_completion
from engine.server.context import ServerContext, ServerSettings
from engine.server.errors import ERROR_RESPONSES, APIError, check_encodable
from engine.server.examples import SSE_EVENT, chat_examples, completion_examples
from engine.server.metrics import CONTENT_TYPE
from engine.server.middleware import OPEN_PATHS, BearerAuth, BodySizeLimit, RequestClock
from engine.server.protocol import (
    AbortRequest,
    AbortResponse,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    EngineStateResponse,
    HealthResponse,
    ModelCard,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
)
from engine.server.streams import ClientDisconnected
from engine.server.tokenization import detokenize, tokenize

_UNAUTHORIZED = {
    "description": "Missing or wrong API key",
    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}},
}
_SSE = {200: {"content": {"text/event-stream": {"schema": SSE_EVENT}}}}


def create_app(llm: AsyncLLM, settings: ServerSettings, shutdown_engine: bool = False) -> FastAPI:
    """`shutdown_engine`: stop the engine when the app shuts down (the CLI's case)."""
    ctx = ServerContext(llm, settings)
    model = settings.model_name

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        ctx.started()
        yield
        ctx.prompts.close()
        if shutdown_engine:
            llm.shutdown()

    app = FastAPI(
        title="Workbench",
        summary="OpenAI-compatible API of the Workbench engine",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.ctx = ctx
    errors.install(app)
    # add_middleware puts each outside the ones before it: the clock sees every response.
    if settings.api_key:
        app.add_middleware(BearerAuth, api_key=settings.api_key)
    app.add_middleware(BodySizeLimit, limit=settings.max_request_bytes)
    app.add_middleware(RequestClock, on_status=ctx.metrics.responded)

    @app.exception_handler(ClientDisconnected)
    async def _gone(_: Request, __: ClientDisconnected) -> Response:
        return Response(status_code=499)

    @app.get("/health", response_model=HealthResponse, responses={503: {"model": HealthResponse}})
    async def health() -> Any:
        thread = getattr(llm, "_thread", None)
        if thread is not None and not thread.is_alive():
            return JSONResponse({"status": "error", "detail": "the engine loop stopped"}, 503)
        return HealthResponse(status="ok")

    @app.get(
        "/metrics",
        response_class=Response,
        responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}},
    )
    async def metrics() -> Response:
        return Response(ctx.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models", response_model=ModelList, responses=ERROR_RESPONSES)
    async def list_models() -> ModelList:
        return ModelList(data=[_card(ctx)])

    @app.get("/v1/models/{model}", response_model=ModelCard, responses=ERROR_RESPONSES)
    async def get_model(model: str) -> ModelCard:
        check_encodable(model, "model")
        ctx.check_model(model)
        return _card(ctx)

    @app.get("/v1/engine/state", response_model=EngineStateResponse, responses=ERROR_RESPONSES)
    async def engine_state() -> JSONResponse:
        return JSONResponse(llm.state().to_dict())

    @app.post("/v1/engine/abort", response_model=AbortResponse, responses=ERROR_RESPONSES)
    async def abort_request(body: AbortRequest) -> AbortResponse:
        """Abort any running or waiting request by its engine id (the Monitor's abort key, over
        --attach); its stream, whoever holds it, ends with finish_reason "abort"."""
        check_encodable(body.request_id, "request_id")
        if not llm.abort(body.request_id):
            raise APIError(
                404,
                f"no running or waiting request {body.request_id!r}",
                param="request_id",
                code="request_not_found",
            )
        ctx.metrics.aborted_one()
        return AbortResponse(request_id=body.request_id, aborted=True)

    @app.post(
        "/v1/completions",
        response_model=CompletionResponse,
        responses={**ERROR_RESPONSES, **_SSE},
        openapi_extra=_examples(completion_examples(model)),
    )
    async def completions(body: CompletionRequest, raw: Request) -> Any:
        return await create_completion(ctx, body, raw)

    @app.post(
        "/v1/chat/completions",
        response_model=ChatCompletionResponse,
        responses={**ERROR_RESPONSES, **_SSE},
        openapi_extra=_examples(chat_examples(model)),
    )
    async def chat_completions(body: ChatCompletionRequest, raw: Request) -> Any:
        return await create_chat_completion(ctx, body, raw)

    @app.post("/tokenize", response_model=TokenizeResponse, responses=ERROR_RESPONSES)
    async def tokenize_route(body: TokenizeRequest) -> TokenizeResponse:
        return await tokenize(ctx, body)

    @app.post("/detokenize", response_model=DetokenizeResponse, responses=ERROR_RESPONSES)
    async def detokenize_route(body: DetokenizeRequest) -> DetokenizeResponse:
        return await detokenize(ctx, body)

    app.openapi = lambda: _openapi(app, secured=bool(settings.api_key))  # type: ignore[method-assign]
    return app


def _examples(examples: dict[str, Any]) -> dict[str, Any]:
    return {"requestBody": {"content": {"application/json": {"examples": examples}}}}


def _card(ctx: ServerContext) -> ModelCard:
    return ModelCard(
        id=ctx.settings.model_name, created=ctx.created, max_model_len=ctx.max_model_len
    )


def _openapi(app: FastAPI, secured: bool) -> dict[str, Any]:
    """FastAPI's schema, with our 400 in place of its 422 (validation errors answer 400) and
    the bearer scheme declared when a key is set."""
    if app.openapi_schema:
        return app.openapi_schema
    schema = get_openapi(
        title=app.title, version=app.version, summary=app.summary, routes=app.routes
    )
    components = schema.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    for path, item in schema.get("paths", {}).items():
        for operation in item.values():
            operation.get("responses", {}).pop("422", None)
            if secured and path not in OPEN_PATHS:
                operation["security"] = [{"bearerAuth": []}]
                operation["responses"].setdefault("401", _UNAUTHORIZED)
            elif secured:
                operation["security"] = []
    if secured:
        components["securitySchemes"] = {"bearerAuth": {"type": "http", "scheme": "bearer"}}
    app.openapi_schema = schema
    return schema


__all__ = ["APIError", "ServerSettings", "create_app"]
