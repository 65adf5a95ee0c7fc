"""The public API: `LLM` (offline, blocking) and `AsyncLLM` (a background step loop with streams).

Both have the shape of vLLM's and TensorRT-LLM's LLM API:

    llm = LLM("tiny"); outs = llm.generate(["Once upon a time"], SamplingParams(max_tokens=32))
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

from engine.config import EngineConfig, SamplingParams
from engine.core import EngineCore
from engine.model.engine_dir import with_serving_defaults
from engine.outputs import RequestMetrics, RequestOutput
from engine.state import EngineState

Prompt = str | list[int]
Messages = list[dict[str, str]]

STATE_INTERVAL_S = 0.05  # snapshots are rebuilt at most this often while the engine is busy


def render_chat(tokenizer: Any, messages: Messages, **template_kwargs: Any) -> list[int]:
    """Messages -> prompt token ids through the checkpoint's own chat template."""
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise ValueError("this model has no chat template")
    text = tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True, **template_kwargs
    )
    # The template writes any BOS itself; adding special tokens again would double it.
    return tokenizer.encode(text, add_special_tokens=False)


def _error_output(request_id: str, prompt: Prompt, message: str) -> RequestOutput:
    return RequestOutput(
        request_id=request_id,
        prompt=prompt if isinstance(prompt, str) else None,
        prompt_token_ids=list(prompt) if isinstance(prompt, list) else [],
        finished=True,
        finish_reason="error",
        error=message,
        metrics=RequestMetrics(arrival_time=time.monotonic()),
    )


class LLM:
    """Offline inference: `generate` blocks until every prompt is done."""

    def __init__(self, model: str = "tiny", **kwargs: Any) -> None:
        self.config = EngineConfig(model=model, **with_serving_defaults(model, kwargs))
        self.engine = EngineCore(self.config)

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        priority: Sequence[int] | None = None,
    ) -> list[RequestOutput]:
        """One finished RequestOutput per prompt, in order. A prompt the engine rejects gets an
        output with finish_reason "error" and the reason; the others run normally."""
        if isinstance(prompts, str) or (
            isinstance(prompts, list) and prompts and isinstance(prompts[0], int)
        ):
            prompts = [prompts]  # one prompt, as text or as token ids
        prompts = list(prompts)
        if params is None or isinstance(params, SamplingParams):
            params = [params or SamplingParams()] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(params)} SamplingParams for {len(prompts)} prompts")
        params = _final_only(params)
        results: dict[str, RequestOutput] = {}
        order: list[str] = []
        for i, (prompt, p) in enumerate(zip(prompts, params, strict=True)):
            try:
                request = self.engine.add_request(
                    prompt, p, priority=priority[i] if priority else 0
                )
                order.append(request.request_id)
            except ValueError as exc:
                rid = f"rejected-{i}"
                results[rid] = _error_output(rid, prompt, str(exc))
                order.append(rid)
        while self.engine.has_unfinished():
            for out in self.engine.step():
                if out.finished:
                    results[out.request_id] = out
        return [results[rid] for rid in order]

    def chat(
        self,
        conversations: Messages | Sequence[Messages],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        **template_kwargs: Any,
    ) -> list[RequestOutput]:
        if conversations and isinstance(conversations[0], dict):
            conversations = [conversations]  # a single conversation
        prompts = [render_chat(self.tokenizer, c, **template_kwargs) for c in conversations]
        return self.generate(prompts, params)

    def state(self) -> EngineState:
        return self.engine.state()

    def shutdown(self) -> None:
        """Finish the engine's background work (the KV disk tier's queued writes) and stop the
        tensor-parallel worker processes, if any (also at exit); idempotent."""
        self.engine.shutdown()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


class AsyncLLM:
    """The engine stepping in a background thread; each `generate` is an async stream of
    RequestOutput deltas. Leaving the stream early (client gone, task cancelled) aborts the
    request and frees its pages."""

    def __init__(self, model: str = "tiny", **kwargs: Any) -> None:
        self.config = EngineConfig(model=model, **with_serving_defaults(model, kwargs))
        self.engine = EngineCore(self.config)
        self._lock = threading.Lock()  # guards the engine between the loop thread and callers
        self._work = threading.Event()
        self._stopped = False
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._state = self.engine.state()
        self._state_time = 0.0
        self.last_error: str | None = None
        self._thread = threading.Thread(target=self._loop, name="engine-loop", daemon=True)
        self._thread.start()

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    async def generate(
        self,
        prompt: Prompt,
        params: SamplingParams | None = None,
        request_id: str | None = None,
        priority: int = 0,
    ) -> AsyncIterator[RequestOutput]:
        """Raises ValueError at once for a bad request; otherwise yields deltas until finished."""
        if self._stopped:
            raise RuntimeError("the engine is shut down")
        queue: asyncio.Queue = asyncio.Queue()
        with self._lock:
            request = self.engine.add_request(prompt, params, request_id, priority)
            rid = request.request_id
            self._streams[rid] = (asyncio.get_running_loop(), queue)
        self._work.set()
        finished = False
        try:
            while not finished:
                out = await queue.get()
                if isinstance(out, BaseException):
                    raise out
                finished = out.finished
                yield out
        finally:
            if not finished:
                self.abort(rid)
            self._streams.pop(rid, None)

    async def chat(
        self, messages: Messages, params: SamplingParams | None = None, **kwargs: Any
    ) -> AsyncIterator[RequestOutput]:
        async for out in self.generate(render_chat(self.tokenizer, messages), params, **kwargs):
            yield out

    def abort(self, request_id: str) -> bool:
        with self._lock:
            aborted = self.engine.abort(request_id)
        self._work.set()
        return aborted

    def state(self) -> EngineState:
        return self._state

    def shutdown(self) -> None:
        self._stopped = True
        self._work.set()
        self._thread.join(timeout=10)
        with self._lock:
            self.engine.shutdown()

    # --- the loop thread ----------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stopped:
            if not self.engine.has_unfinished():
                self._publish_state(force=True)
                self._work.wait(timeout=0.5)
                self._work.clear()
                continue
            try:
                with self._lock:
                    outputs = self.engine.step()
            except Exception as exc:  # a broken step fails its requests, not the engine
                self._fail_all(exc)
                continue
            for out in outputs:
                self._deliver(out.request_id, out)
            self._publish_state()

    def _publish_state(self, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self._state_time >= STATE_INTERVAL_S:
            with self._lock:
                self._state = self.engine.state()
            self._state_time = now

    def _deliver(self, request_id: str, item: RequestOutput | BaseException) -> None:
        stream = self._streams.get(request_id)
        if stream is not None:
            loop, queue = stream
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the caller's loop is closed: nobody is listening
                self._streams.pop(request_id, None)

    def _fail_all(self, exc: Exception) -> None:
        self.last_error = f"{type(exc).__name__}: {exc}"
        with self._lock:
            ids = list(self.engine.requests)
            for rid in ids:
                self.engine.abort(rid)
            self.engine.step()  # flush the aborted outputs
        for rid in ids:
            self._deliver(rid, RuntimeError(f"engine step failed: {self.last_error}"))


__all__ = ["LLM", "AsyncLLM", "EngineConfig", "SamplingParams", "render_chat"]


def _final_only(params: Sequence[SamplingParams]) -> list[SamplingParams]:
    """`generate` returns only finished outputs: the engine need not report (nor detokenize)
    the ones in between. One copy per distinct SamplingParams (a shared one stays shared)."""
    copies: dict[int, SamplingParams] = {}
    for p in params:
        if id(p) not in copies and isinstance(p, SamplingParams):
            copies[id(p)] = dataclasses.replace(p, output_kind="final")
    return [copies.get(id(p), p) for p in params]
