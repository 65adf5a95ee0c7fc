"""Running one API request's choices on the engine, and noticing when its client goes away.

`ChoiceStreams` runs the n engine requests of one API request (n choices, or n per prompt) as
tasks feeding one queue; closing it cancels the tasks, which leaves each `AsyncLLM.generate`
stream early and so aborts its request and frees its KV blocks. `EngineStream` is a
StreamingResponse that always closes its body and runs its release callback, even when the
client disconnects before the first byte."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from engine.config import SamplingParams
from engine.llm import AsyncLLM
from engine.outputs import RequestOutput

T = TypeVar("T")
DONE = "data: [DONE]\n\n"


@dataclasses.dataclass(frozen=True)
class SubRequest:
    index: int  # the choice index in the response
    prompt_token_ids: list[int]
    params: SamplingParams
    request_id: str

    def final_only(self) -> SubRequest:
        """The same choice, reported by the engine only when it finishes."""
        return dataclasses.replace(
            self, params=dataclasses.replace(self.params, output_kind="final")
        )


class StreamProgress:
    """What a stream has sent so far, per choice: logprobs already in earlier chunks, and the
    completion tokens of finished choices (for the final usage chunk)."""

    def __init__(self) -> None:
        self.sent_logprobs: dict[int, int] = {}
        self.completion_tokens: dict[int, int] = {}
        self.cached_tokens: dict[int, int] = {}

    def advance(self, index: int, out: RequestOutput) -> list | None:
        """The logprobs new since the last chunk of this choice, or None when the output brings
        nothing to send (no text, no logprobs, not finished)."""
        start = self.sent_logprobs.get(index, 0)
        new = (out.logprobs or [])[start:]
        if not out.delta_text and not new and not out.finished:
            return None
        self.sent_logprobs[index] = start + len(new)
        if out.finished:
            self.completion_tokens[index] = len(out.token_ids)
            self.cached_tokens[index] = cached_prompt_tokens({index: out})
        return new

    @property
    def num_completion_tokens(self) -> int:
        return sum(self.completion_tokens.values())

    @property
    def num_cached_tokens(self) -> int:
        return self.cached_tokens[min(self.cached_tokens)] if self.cached_tokens else 0


def cached_prompt_tokens(finals: dict[int, RequestOutput]) -> int:
    """Prompt tokens served from the prefix cache, as usage reports them: the prompt is counted
    once however many choices share it, so the first choice's hit (as vLLM reports it)."""
    if not finals:
        return 0
    metrics = finals[min(finals)].metrics
    return metrics.num_cached_tokens if metrics is not None else 0


class ClientDisconnected(Exception):
    pass


class ServerShuttingDown(Exception):
    """Delivered to every open ChoiceStreams when the server begins a graceful shutdown."""


class ChoiceStreams:
    def __init__(
        self,
        llm: AsyncLLM,
        subs: list[SubRequest],
        priority: int = 0,
        on_finish: Callable[[RequestOutput], None] | None = None,
        on_abort: Callable[[], None] | None = None,
    ) -> None:
        """`on_finish`: each choice's final output; `on_abort`: once per choice cancelled before
        it finished (its engine request is aborted)."""
        self._llm = llm
        self._subs = subs
        self._priority = priority
        self._on_finish = on_finish
        self._on_abort = on_abort
        self._queue: asyncio.Queue[tuple[int, RequestOutput | BaseException | None]] = (
            asyncio.Queue()
        )
        self._tasks: list[asyncio.Task[None]] = []

    async def __aenter__(self) -> ChoiceStreams:
        self._tasks = [asyncio.create_task(self._pump(sub)) for sub in self._subs]
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def interrupt(self, exc: BaseException) -> None:
        """Make `events` raise `exc` now (call on the event loop's thread)."""
        self._queue.put_nowait((-1, exc))

    async def _pump(self, sub: SubRequest) -> None:
        finished = False
        try:
            async for out in self._llm.generate(
                sub.prompt_token_ids, sub.params, sub.request_id, self._priority
            ):
                finished = out.finished
                if out.finished and self._on_finish is not None:
                    self._on_finish(out)
                self._queue.put_nowait((sub.index, out))
        except asyncio.CancelledError:
            if not finished and self._on_abort is not None:
                self._on_abort()
            raise
        except Exception as exc:  # delivered to the consumer, which fails the API request
            self._queue.put_nowait((sub.index, exc))
        finally:
            self._queue.put_nowait((sub.index, None))

    async def events(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        """(choice index, delta) in arrival order until every choice is done. Re-raises the
        first failure (a ValueError from add_request, an engine failure)."""
        remaining = len(self._subs)
        while remaining:
            index, item = await self._queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield index, item

    async def finals(self) -> dict[int, RequestOutput]:
        """Each choice's last output (outputs are cumulative: it holds all tokens and text)."""
        last: dict[int, RequestOutput] = {}
        async for index, out in self.events():
            last[index] = out
        return last


async def _wait_disconnect(request: Request) -> None:
    # The body is already read, so the next message is the disconnect.
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """`work`'s result; cancels it and raises ClientDisconnected if the client leaves first."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait({task})  # let a cancelled task unwind (abort its requests)
    if task.cancelled():
        raise ClientDisconnected
    return task.result()


def sse(payload: BaseModel | dict[str, Any]) -> str:
    if isinstance(payload, BaseModel):
        text = payload.model_dump_json()
    else:
        text = json.dumps(payload, ensure_ascii=False)
    return f"data: {text}\n\n"


class EngineStream(StreamingResponse):
    """Server-sent events whose body is closed, and `on_close` run, however the response ends."""

    def __init__(self, body: AsyncIterator[str], on_close: Callable[[], None]) -> None:
        super().__init__(
            body, media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )
        self._body = body
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            try:
                aclose = getattr(self._body, "aclose", None)
                if aclose is not None:
                    await aclose()
            finally:
                self._on_close()
