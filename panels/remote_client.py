"""The engine of a running server, over HTTP: `workbench launch --attach URL` chats with and
monitors any Workbench server (`workbench serve`), local or remote, through the same
`EngineClient` protocol as the in-process engine.

- chat: a streamed POST /v1/chat/completions (usage included), read by a task per reply;
  `abort` cancels that task, which closes the connection, and the server aborts the request
  and frees its KV blocks when it sees the client go. `abort` takes the chat's request id or
  the server's (the Monitor shows the server's); another client's request is aborted through
  POST /v1/engine/abort.
- state: GET /v1/engine/state, polled by a daemon thread every `poll_interval` seconds and
  rebuilt with `EngineState.from_dict`; `state()` returns the latest one and never waits.
- failures: `connect` raises `ServerUnavailable` with one line that says what is wrong (nothing
  listens, the key is refused, it is not a Workbench server); once attached, a server that stops
  answering sets `error` (shown in the status bar) until it answers again.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import threading
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import httpx

from panels.client import ChatChunk, ChatMessage, ChatParams, ToolCall, add_tool_call_delta

if TYPE_CHECKING:
    from engine.state import EngineState

POLL_INTERVAL_S = 0.25
CONNECT_TIMEOUT_S = 5.0
_DONE = object()  # the stream ended with [DONE]
_ABORTED = object()  # abort() was called


class ServerUnavailable(RuntimeError):
    """The server cannot be used; the message says why, in one line."""


def base_url(url: str) -> str:
    """`http://host:port` from what a user may type (`host:port`, a trailing / or /v1)."""
    given = url
    url = url.strip().rstrip("/")
    if "://" not in url:
        url = "http://" + url
    url = url.removesuffix("/v1")
    scheme, _, rest = url.partition("://")
    if scheme not in ("http", "https") or not rest:
        raise ValueError(f"--attach needs an http:// or https:// address, got {given!r}")
    return url


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def _error_message(response: httpx.Response) -> str:
    try:
        error = response.json().get("error")
    except (ValueError, AttributeError):
        error = None
    if isinstance(error, dict) and error.get("message"):
        return _one_line(error["message"])
    return _one_line(response.text)[:200] or response.reason_phrase


def _no_room_for_max_tokens(response: httpx.Response) -> bool:
    try:
        error = response.json().get("error") or {}
    except (ValueError, AttributeError):
        return False
    return (
        response.status_code == 400
        and error.get("code") == "context_length_exceeded"
        and error.get("param") == "max_tokens"
    )


def _rejected(response: httpx.Response) -> Exception:
    """A refused request as the protocol raises it: ValueError when the request is at fault."""
    if response.status_code == 401:
        return ValueError("the server refused the API key (HTTP 401)")
    error = ValueError if response.status_code < 500 else RuntimeError
    return error(f"{_error_message(response)} (HTTP {response.status_code})")


def _http_failure(url: str, err: Exception) -> str:
    reason = _one_line(err) or type(err).__name__
    if isinstance(err, httpx.ConnectError):
        return f"cannot reach the server at {url} ({reason}); is 'workbench serve' running?"
    if isinstance(err, httpx.TimeoutException):
        return f"the server at {url} did not answer in time"
    return f"lost the server at {url} ({type(err).__name__}: {reason})"


class RemoteEngineClient:
    def __init__(
        self,
        url: str,
        api_key: str | None,
        model_name: str,
        state: EngineState,
        max_model_len: int | None = None,
        poll_interval: float = POLL_INTERVAL_S,
    ) -> None:
        self.url = url
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._model = model_name
        self._state = state
        self._max_model_len = max_model_len
        self._config = {
            "attached": url,
            "model": state.model,
            "device": state.device,
            "dtype": state.dtype,
            "block_size": state.block_size,
            "num_kv_blocks": state.kv_blocks_total,
            "max_model_len": max_model_len,
        }
        self.error: str | None = None  # why the server is not answering now
        self._streams: dict[str, tuple[asyncio.Task[None], asyncio.Queue[Any]]] = {}
        self._sent_ids: dict[str, str] = {}  # the request_id sent -> the chat's, per stream
        self._stop = threading.Event()
        self._http = httpx.Client(base_url=url, headers=self._headers, timeout=CONNECT_TIMEOUT_S)
        self._poller = threading.Thread(
            target=self._poll, args=(poll_interval,), name="remote-state", daemon=True
        )
        self._poller.start()

    @classmethod
    def connect(
        cls, url: str, api_key: str | None = None, poll_interval: float = POLL_INTERVAL_S
    ) -> RemoteEngineClient:
        """Check the server (its model list and engine state) and attach to it (blocking: run
        it in a worker). Raises ServerUnavailable."""
        from engine.state import EngineState

        url = base_url(url)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        try:
            with httpx.Client(base_url=url, headers=headers, timeout=CONNECT_TIMEOUT_S) as http:
                models = http.get("/v1/models")
                if models.status_code == 401:
                    raise ServerUnavailable(
                        f"the server at {url} refused the API key (HTTP 401): pass the right "
                        "--api-key"
                    )
                if models.status_code != 200:
                    raise ServerUnavailable(
                        f"GET {url}/v1/models answered HTTP {models.status_code} "
                        f"({_error_message(models)}): is it a Workbench server?"
                    )
                cards = models.json()["data"]
                if not cards:
                    raise ServerUnavailable(f"the server at {url} serves no model")
                state = http.get("/v1/engine/state")
                if state.status_code != 200:
                    raise ServerUnavailable(
                        f"{url} has no engine state (GET /v1/engine/state answered HTTP "
                        f"{state.status_code}): --attach needs a Workbench server "
                        "('workbench serve')"
                    )
                snapshot = EngineState.from_dict(state.json())
        except httpx.HTTPError as err:
            raise ServerUnavailable(_http_failure(url, err)) from None
        except (ValueError, KeyError, TypeError) as err:  # JSON, but not the expected JSON
            raise ServerUnavailable(
                f"the server at {url} answered something else than a Workbench server would "
                f"({_one_line(err)})"
            ) from None
        card = cards[0]
        return cls(
            url, api_key, str(card["id"]), snapshot, card.get("max_model_len"), poll_interval
        )

    # -- the protocol ---------------------------------------------------------------------------

    @property
    def model_name(self) -> str:
        return self._model

    @property
    def engine_config(self) -> dict[str, Any]:
        return dict(self._config)

    def state(self) -> EngineState:
        return self._state

    @property
    def max_model_len(self) -> int | None:
        return self._max_model_len

    def count_prompt_tokens(
        self, messages: list[ChatMessage], tools: list[dict[str, Any]] | None = None
    ) -> int | None:
        return None  # the tokenizer is the server's; it refuses a prompt past its context

    def abort(self, request_id: str) -> bool:
        """Abort a request: one of this app's chats by closing its stream, any other (another
        client's, as the Monitor lists it) through POST /v1/engine/abort."""
        stream = self._streams.get(self._chat_id(request_id))
        if stream is None:
            try:
                response = self._http.post("/v1/engine/abort", json={"request_id": request_id})
            except httpx.HTTPError:
                return False
            return response.status_code == 200
        task, queue = stream
        task.cancel()  # closes the connection: the server aborts the request
        queue.put_nowait(_ABORTED)
        return True

    def _chat_id(self, request_id: str) -> str:
        """The chat's request id for `request_id`: the chat's own, or the one the server's engine
        runs it under (`chatcmpl-<the request_id sent>-<choice>`, engine/server/chat.py)."""
        for sent, chat_id in self._sent_ids.items():
            if request_id.startswith(f"chatcmpl-{sent}-"):
                return chat_id
        return request_id

    def close(self) -> None:
        self._stop.set()
        for task, _ in list(self._streams.values()):
            with contextlib.suppress(RuntimeError):  # its event loop may be closed already
                task.cancel()
        self._poller.join(timeout=2)
        self._http.close()

    async def chat(
        self, messages: list[ChatMessage], params: ChatParams, request_id: str
    ) -> AsyncIterator[ChatChunk]:
        body: dict[str, Any] = {
            "model": self._model,
            "messages": messages,
            "max_tokens": params.max_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "stream": True,
            "stream_options": {"include_usage": True},
            # Names the request in the server's engine (its monitor shows it), made unique
            # against other clients that number their chats the same way.
            "request_id": f"{request_id}-{secrets.token_hex(2)}",
        }
        if params.top_k:
            body["top_k"] = params.top_k
        if params.seed is not None:
            body["seed"] = params.seed
        if params.ignore_eos:
            body["ignore_eos"] = True
        tools = params.tool_list  # ValueError for bad tools, as a request the engine refuses
        if tools is not None:
            body["tools"] = tools
            body["tool_choice"] = params.tool_choice
            body["parallel_tool_calls"] = params.parallel_tool_calls
        queue: asyncio.Queue[Any] = asyncio.Queue()
        task = asyncio.create_task(self._read(body, queue))
        self._streams[request_id] = (task, queue)
        self._sent_ids[body["request_id"]] = request_id
        reply = _Reply(request_id)
        try:
            while True:
                item = await queue.get()
                if item is _ABORTED:
                    yield reply.final("abort")
                    return
                if item is _DONE:
                    yield reply.final(reply.finish_reason or "stop")
                    return
                if isinstance(item, dict) and "error" in item:  # after the headers went out
                    error = item["error"]
                    message = error.get("message") if isinstance(error, dict) else error
                    item = RuntimeError(_one_line(message))
                if isinstance(item, BaseException):
                    if reply.started:  # mid-reply: the reply ends in an error, as the engine's
                        yield reply.final("error", str(item))
                        return
                    raise item
                chunk = reply.add(item)
                if chunk is not None:
                    yield chunk
        finally:
            task.cancel()
            self._streams.pop(request_id, None)
            self._sent_ids.pop(body["request_id"], None)

    # -- the work behind it ---------------------------------------------------------------------

    async def _read(self, body: dict[str, Any], queue: asyncio.Queue[Any]) -> None:
        """POST the request and put each streamed event (a dict) on `queue`, then _DONE or the
        exception that ends the reply: ValueError for a rejected request, RuntimeError else."""
        timeout = httpx.Timeout(CONNECT_TIMEOUT_S, read=None)  # a reply may wait in the queue
        try:
            async with httpx.AsyncClient(
                base_url=self.url, headers=self._headers, timeout=timeout
            ) as http:
                for attempt in range(2):
                    async with http.stream("POST", "/v1/chat/completions", json=body) as response:
                        if response.status_code != 200:
                            await response.aread()
                            if attempt == 0 and _no_room_for_max_tokens(response):
                                # The engine in-process stops at max_model_len; the server
                                # refuses instead, unless max_tokens is left to it.
                                body = {k: v for k, v in body.items() if k != "max_tokens"}
                                continue
                            queue.put_nowait(_rejected(response))
                            return
                        async for line in response.aiter_lines():
                            if not line.startswith("data:"):
                                continue
                            data = line[len("data:") :].strip()
                            if data == "[DONE]":
                                queue.put_nowait(_DONE)
                                return
                            queue.put_nowait(json.loads(data))
                        break
            queue.put_nowait(RuntimeError("the server closed the stream before it ended"))
        except asyncio.CancelledError:
            raise
        except httpx.HTTPError as err:
            queue.put_nowait(RuntimeError(_http_failure(self.url, err)))
        except ValueError as err:
            queue.put_nowait(RuntimeError(f"the server sent a malformed stream ({err})"))

    def _poll(self, interval: float) -> None:
        from engine.state import EngineState

        while not self._stop.wait(interval):
            try:
                response = self._http.get("/v1/engine/state")
                if response.status_code != 200:
                    self.error = f"GET /v1/engine/state answered HTTP {response.status_code}"
                    continue
                self._state = EngineState.from_dict(response.json())
                self.error = None
            except httpx.HTTPError as err:
                if not self._stop.is_set():
                    self.error = _http_failure(self.url, err)
            except (ValueError, TypeError) as err:
                self.error = f"the server sent a state this client cannot read ({err})"


class _Reply:
    """One reply's running totals, from the streamed chat chunks."""

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self.start = time.monotonic()
        self.text = ""
        self.num_chunks = 0  # chunks with content: the token count until usage says
        self.usage: dict[str, Any] | None = None
        self.finish_reason: str | None = None
        self.first: float | None = None
        self.last: float | None = None
        self.tool_calls: list[ToolCall] = []

    @property
    def started(self) -> bool:
        return self.num_chunks > 0

    def add(self, event: dict[str, Any]) -> ChatChunk | None:
        if event.get("usage"):
            self.usage = event["usage"]
        delta, called = "", False
        for choice in event.get("choices") or []:
            message = choice.get("delta") or {}
            delta += message.get("content") or ""
            for call in message.get("tool_calls") or []:
                function = call.get("function") or {}
                add_tool_call_delta(
                    self.tool_calls,
                    int(call.get("index") or 0),
                    call.get("id"),
                    function.get("name"),
                    function.get("arguments") or "",
                )
                called = True
            self.finish_reason = choice.get("finish_reason") or self.finish_reason
        if not delta and not called:
            return None
        now = time.monotonic()
        self.first = self.first or now
        self.last = now
        self.num_chunks += 1
        self.text += delta
        return self._chunk(delta)

    def final(self, reason: str, error: str | None = None) -> ChatChunk:
        return self._chunk("", finished=True, reason=reason, error=error)

    def _chunk(
        self,
        delta: str,
        finished: bool = False,
        reason: str | None = None,
        error: str | None = None,
    ) -> ChatChunk:
        usage = self.usage or {}
        tokens = int(usage.get("completion_tokens") or self.num_chunks)
        rate = None
        if self.first is not None and self.last is not None and self.last > self.first:
            rate = (tokens - 1) / (self.last - self.first)
        details = usage.get("prompt_tokens_details") or {}
        return ChatChunk(
            request_id=self.request_id,
            delta=delta,
            text=self.text,
            num_tokens=tokens,
            num_prompt_tokens=int(usage.get("prompt_tokens") or 0),
            finished=finished,
            finish_reason=reason,
            error=error,
            ttft_s=self.first - self.start if self.first is not None else None,
            tokens_per_s=rate,
            num_cached_tokens=int(details.get("cached_tokens") or 0),
            tool_calls=tuple(dict(c) for c in self.tool_calls),
        )
