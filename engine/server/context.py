"""What every route shares: the engine, settings, prompt handling, metrics and admission, and the
two ways of running a request's choices (collected, or streamed as server-sent events)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass

from pydantic import BaseModel
from starlette.requests import Request

from engine.llm import AsyncLLM
from engine.outputs import RequestOutput
from engine.server.errors import APIError, bad_request, error_body, from_value_error
from engine.server.metrics import ServerMetrics
from engine.server.middleware import ARRIVAL
from engine.server.params import REQUEST_FIELDS
from engine.server.prompts import Prompts
from engine.server.streams import (
    DONE,
    ChoiceStreams,
    EngineStream,
    ServerShuttingDown,
    SubRequest,
    sse,
    unless_disconnected,
)
from engine.server.tool_parsers import make_parser
from engine.structured import StructuredSpec

DEFAULT_MAX_REQUEST_BYTES = 32 * 2**20
SHUTDOWN_MESSAGE = "the server is shutting down; retry on another server or later"


@dataclass
class ServerSettings:
    model_name: str
    api_key: str | None = None
    # Engine requests allowed to wait beyond the engine's max_num_seqs running ones (each choice
    # counts); past that a request gets 429. None: no limit.
    max_queue: int | None = None
    # Larger bodies are answered 413 before they are parsed.
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    # Reads tool calls out of replies for tool_choice "auto" (engine/server/tool_parsers.py);
    # None: "auto" is a 400.
    tool_call_parser: str | None = None


class Admission:
    """Counts the engine requests the server has in flight and refuses those past capacity."""

    def __init__(self, capacity: int | None, on_reject: Callable[[], None] = lambda: None) -> None:
        self.capacity = capacity
        self.in_flight = 0
        self._on_reject = on_reject

    def acquire(self, count: int) -> None:
        if self.capacity is not None and self.in_flight + count > self.capacity:
            self._on_reject()
            raise APIError(
                429,
                f"the server is at capacity ({self.in_flight} requests in flight, limit "
                f"{self.capacity}); retry later",
                code="queue_full",
            )
        self.in_flight += count

    def release(self, count: int) -> None:
        self.in_flight -= count


class ServerContext:
    def __init__(self, llm: AsyncLLM, settings: ServerSettings) -> None:
        self.llm = llm
        self.settings = settings
        self.created = int(time.time())
        self.max_model_len: int = llm.engine.max_model_len
        parser = settings.tool_call_parser
        self.tool_parser = make_parser(parser) if parser is not None else None
        self.prompts = Prompts(llm.tokenizer, llm.engine.vocab_size, self.max_model_len)
        self.metrics = ServerMetrics(llm.state, settings.model_name)
        capacity = None
        if settings.max_queue is not None:
            capacity = llm.config.max_num_seqs + settings.max_queue
        self.admission = Admission(capacity, self.metrics.rejected_one)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._open: set[ChoiceStreams] = set()  # streamed requests' choices, to interrupt
        self.shutting_down = False

    def started(self) -> None:
        """The app runs on this event loop (called from its lifespan)."""
        self._loop = asyncio.get_running_loop()

    def begin_shutdown(self) -> None:
        """A graceful shutdown began: every open stream ends with an error event and [DONE],
        and new requests get 503. Safe from any thread and from a signal handler."""
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._interrupt_all)

    def _interrupt_all(self) -> None:
        self.shutting_down = True
        for streams in self._open:
            streams.interrupt(ServerShuttingDown())

    def _choice_streams(self, subs: list[SubRequest], priority: int, arrival: float | None):
        if self.shutting_down:
            raise APIError(503, SHUTDOWN_MESSAGE, code="server_shutdown")
        return ChoiceStreams(
            self.llm,
            subs,
            priority,
            on_finish=lambda out: self.metrics.observe(out, arrival),
            on_abort=self.metrics.aborted_one,
        )

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.settings.model_name:
            raise APIError(
                404,
                f"The model `{name}` does not exist; this server serves "
                f"`{self.settings.model_name}`.",
                param="model",
                code="model_not_found",
            )

    async def compile(self, spec: StructuredSpec | None, param: str = "response_format") -> None:
        """Compile the grammar off the event loop (the engine then finds it cached); 400 if it
        does not compile."""
        if spec is None:
            return
        backend = getattr(self.llm.engine, "grammars", None)
        if backend is None:
            raise bad_request("this engine does not support structured output")
        try:
            await asyncio.to_thread(backend.compile, spec)
        except ValueError as exc:
            raise bad_request(str(exc), param=param) from None

    async def collect(
        self, raw: Request, subs: list[SubRequest], priority: int
    ) -> dict[int, RequestOutput]:
        """Run every choice to the end; the final output of each, by choice index (the engine
        reports only that one)."""
        subs = [sub.final_only() for sub in subs]
        streams = self._choice_streams(subs, priority, arrival_of(raw))
        self.admission.acquire(len(subs))
        try:
            async with streams:
                finals = await unless_disconnected(raw, streams.finals())
        except ValueError as exc:
            raise from_value_error(exc, REQUEST_FIELDS) from None
        except RuntimeError as exc:
            raise APIError(500, str(exc), type="internal_error") from None
        finally:
            self.admission.release(len(subs))
        for out in finals.values():
            if out.finish_reason == "error":
                raise bad_request(f"generation failed: {out.error}")
        return finals

    def stream(
        self,
        raw: Request,
        subs: list[SubRequest],
        priority: int,
        chunks: Callable[[int, RequestOutput], Iterable[BaseModel]],
        first: Iterable[BaseModel] = (),
        last: Callable[[], Iterable[BaseModel]] = lambda: (),
    ) -> EngineStream:
        """Server-sent events: `first`, then `chunks(index, delta)` for every engine output, then
        `last()`, then [DONE]. A failure after the headers went out is sent as an error event,
        and so is a graceful shutdown of the server."""
        run = self._choice_streams(subs, priority, arrival_of(raw))
        self.admission.acquire(len(subs))

        async def body() -> AsyncIterator[str]:
            self._open.add(run)
            try:
                for chunk in first:
                    yield sse(chunk)
                async with run:
                    async for index, out in run.events():
                        if out.finish_reason == "error":
                            raise ValueError(f"generation failed: {out.error}")
                        for chunk in chunks(index, out):
                            yield sse(chunk)
                for chunk in last():
                    yield sse(chunk)
            except ValueError as exc:
                yield sse(from_value_error(exc, REQUEST_FIELDS).body())
            except RuntimeError as exc:
                yield sse(error_body(str(exc), "internal_error"))
            except ServerShuttingDown:
                kind = "server_unavailable"
                yield sse(error_body(SHUTDOWN_MESSAGE, kind, code="server_shutdown"))
            finally:
                self._open.discard(run)
            yield DONE

        count = len(subs)
        return EngineStream(body(), on_close=lambda: self.admission.release(count))


def arrival_of(raw: Request) -> float | None:
    """time.monotonic() when the request reached the server (stamped by RequestClock)."""
    return raw.scope.get("state", {}).get(ARRIVAL)
