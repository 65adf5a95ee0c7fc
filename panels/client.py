"""The engine as the panels see it: a small protocol, so that a remote engine (`--attach URL`,
`panels.remote_client`) can replace the in-process one without the panels noticing.

Importing this module is cheap (no torch): the in-process engine is imported only when
`LocalEngineClient.load` runs, in a worker thread, so the UI is up before the model is.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol

if TYPE_CHECKING:
    from engine.llm import AsyncLLM
    from engine.outputs import RequestOutput
    from engine.state import EngineState

# Values of `EngineState.block_map` besides owner indices (engine.state.BLOCK_FREE and
# BLOCK_CACHED): part of the state protocol, repeated so that the panels do not import torch.
BLOCK_FREE = -1
BLOCK_CACHED = -2

# {"role": "user" | "assistant" | "system" | "tool", "content": ...}, as OpenAI's API has it: an
# assistant turn that called tools has "tool_calls", a tool turn the "tool_call_id" it answers.
ChatMessage = dict[str, Any]
ToolCall = dict[str, str]  # {"id": ..., "name": ..., "arguments": JSON text as the model wrote it}
TOOL_CHOICES = ("auto", "none", "required")
LOCAL_TOOL_PARSER = "hermes"  # the bundled model's template writes hermes tool calls
EngineStatus = Literal["loading", "ready", "failed"]


@dataclass(frozen=True)
class ChatParams:
    """The sampling parameters a chat exposes (the engine's SamplingParams has more)."""

    temperature: float = 0.7
    top_p: float = 0.95
    top_k: int = 0  # 0: no top-k cut
    max_tokens: int = 512
    seed: int | None = None  # None: a fresh random stream per reply
    ignore_eos: bool = False  # config file only: keep generating to max_tokens (load tests)
    drop_oldest: bool = True  # leave the oldest turns out of a prompt past the context
    tools: str = ""  # OpenAI's `tools` list as JSON text ("": no tools), see parse_tools
    tool_choice: str = "auto"  # auto | none | required (with tools)
    parallel_tool_calls: bool = True  # False: a reply makes one call at most

    def __post_init__(self) -> None:
        if not self.temperature >= 0.0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top-p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top-k must be 0 (off) or positive, got {self.top_k}")
        if self.max_tokens < 1:
            raise ValueError(f"max tokens must be >= 1, got {self.max_tokens}")
        if self.seed is not None and self.seed < 0:
            raise ValueError(f"seed must be >= 0 or empty, got {self.seed}")
        if self.tool_choice not in TOOL_CHOICES:
            raise ValueError(f"tool choice must be one of {', '.join(TOOL_CHOICES)}")

    @property
    def tool_list(self) -> list[dict[str, Any]] | None:
        """The tools as the API takes them; None without tools. ValueError for bad tools (kept
        as typed, so that the settings show why and a chat sends nothing until they are fixed)."""
        return parse_tools(self.tools)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], default: ChatParams | None = None) -> ChatParams:
        """Known keys of `data` over `default`; unknown keys are ignored, a bad value raises."""
        base = dataclasses.asdict(default or cls())
        base.update({k: v for k, v in data.items() if k in base})
        return cls(**base)

    def describe(self) -> str:
        """One short line for a chat's title bar."""
        parts = ["greedy"] if self.temperature == 0 else [f"T {self.temperature:g}"]
        if self.temperature and self.top_p < 1:
            parts.append(f"top-p {self.top_p:g}")
        if self.temperature and self.top_k:
            parts.append(f"top-k {self.top_k}")
        parts.append(f"max {self.max_tokens}")
        if self.seed is not None:
            parts.append(f"seed {self.seed}")
        if self.ignore_eos:
            parts.append("ignore EOS")
        if self.tools.strip():
            parts.append(f"tools: {self.tool_choice}")
        return " · ".join(parts)


@dataclass(frozen=True)
class ChatChunk:
    """One streamed delta of a reply, with the running totals a chat shows."""

    request_id: str
    delta: str
    text: str  # the whole reply so far
    num_tokens: int
    num_prompt_tokens: int
    finished: bool = False
    finish_reason: str | None = None  # stop | length | abort | error
    error: str | None = None
    ttft_s: float | None = None
    tokens_per_s: float | None = None  # decode rate after the first token
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    tool_calls: tuple[ToolCall, ...] = ()  # the reply's tool calls so far (the last may grow)


def parse_tools(text: str) -> list[dict[str, Any]] | None:
    """OpenAI's `tools` JSON text -> the list (None for empty text); ValueError says what is
    wrong: not JSON, not a list of {"type": "function", "function": {"name", "parameters"}}."""
    if not text.strip():
        return None
    try:
        tools = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"tools: not JSON ({e.msg}, line {e.lineno} column {e.colno})") from None
    if not isinstance(tools, list) or not tools:
        raise ValueError("tools: must be a non-empty JSON list of functions")
    names = set()
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type") != "function":
            raise ValueError(f'tools[{i}]: must be {{"type": "function", "function": {{...}}}}')
        if not isinstance(function, dict):
            raise ValueError(f'tools[{i}]: "function" must be an object')
        name = function.get("name")
        if not isinstance(name, str) or not name:
            raise ValueError(f'tools[{i}]: the function needs a "name" (a string)')
        if not isinstance(function.get("parameters"), dict):
            raise ValueError(f'tools[{i}] ({name}): "parameters" must be a JSON schema object')
        if name in names:
            raise ValueError(f"tools[{i}]: the name {name!r} is used twice")
        names.add(name)
    return tools


def add_tool_call_delta(
    calls: list[ToolCall], index: int, call_id: str | None, name: str | None, arguments: str
) -> None:
    """Grow `calls` by one streamed tool-call delta (OpenAI's: the first piece of a call has
    its id and name, the next ones more of its arguments' text)."""
    while len(calls) <= index:
        calls.append({"id": "", "name": "", "arguments": ""})
    call = calls[index]
    call["id"] = call_id or call["id"]
    call["name"] = name or call["name"]
    call["arguments"] += arguments


class EngineClient(Protocol):
    """What the panels need from an engine, local or remote."""

    @property
    def model_name(self) -> str: ...

    @property
    def engine_config(self) -> dict[str, Any]: ...

    @property
    def error(self) -> str | None:
        """Why the engine cannot be reached now (a server that stopped answering); else None."""
        ...

    @property
    def max_model_len(self) -> int | None:
        """The context in tokens (prompt + reply); None if the engine does not say."""
        ...

    def count_prompt_tokens(
        self, messages: list[ChatMessage], tools: list[dict[str, Any]] | None = None
    ) -> int | None:
        """How many tokens `messages` (and `tools`) take through the chat template; None if
        unknown here."""
        ...

    def chat(
        self, messages: list[ChatMessage], params: ChatParams, request_id: str
    ) -> AsyncIterator[ChatChunk]:
        """Stream a reply. A bad request raises ValueError on the first iteration; leaving the
        stream early aborts the request."""
        ...

    def abort(self, request_id: str) -> bool:
        """Stop a request now and free its KV blocks; its stream ends with reason "abort"."""
        ...

    def state(self) -> EngineState:
        """The engine's latest published snapshot (cheap: never waits for a step)."""
        ...

    def close(self) -> None: ...


def template_messages(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """Messages as chat templates take them (transformers' convention, as the server renders
    them): a tool call's arguments as a dict."""
    out = []
    for m in messages:
        if m.get("tool_calls"):
            calls = [
                {**c, "function": {**c["function"], "arguments": _arguments(c)}}
                for c in m["tool_calls"]
            ]
            m = {**m, "tool_calls": calls}
        out.append(m)
    return out


def _arguments(call: dict[str, Any]) -> Any:
    try:
        return json.loads(call["function"]["arguments"])
    except json.JSONDecodeError:  # a reply cut short: the template writes the text as it is
        return call["function"]["arguments"]


def _chunk(out: RequestOutput) -> ChatChunk:
    metrics = out.metrics
    ttft = metrics.ttft if metrics else None
    rate = None
    if metrics and metrics.first_token_time is not None and out.num_tokens > 1:
        last = metrics.last_token_time or metrics.first_token_time
        if last > metrics.first_token_time:
            rate = (out.num_tokens - 1) / (last - metrics.first_token_time)
    return ChatChunk(
        request_id=out.request_id,
        delta=out.delta_text,
        text=out.text,
        num_tokens=out.num_tokens,
        num_prompt_tokens=len(out.prompt_token_ids),
        finished=out.finished,
        finish_reason=out.finish_reason,
        error=out.error,
        ttft_s=ttft,
        tokens_per_s=rate,
        num_cached_tokens=metrics.num_cached_tokens if metrics else 0,
    )


class LocalEngineClient:
    """The in-process engine (`AsyncLLM`): it steps in its own thread, so awaiting a stream
    never blocks the UI on a forward pass."""

    def __init__(self, llm: AsyncLLM) -> None:
        self._llm = llm
        # A fast tokenizer must not be used by two threads at once: the engine's thread
        # detokenizes with its own, the UI counts with this copy.
        self._tokenizer = copy.deepcopy(llm.tokenizer)
        state = llm.state()
        self._config = {
            **dataclasses.asdict(llm.config),
            "device": state.device,
            "dtype": state.dtype,
            "num_kv_blocks": state.kv_blocks_total,
        }

    @classmethod
    def load(cls, model: str, **options: Any) -> LocalEngineClient:
        """Build the engine (blocking: imports torch and loads weights; run it in a worker)."""
        from engine.llm import AsyncLLM

        return cls(AsyncLLM(model, **options))

    @property
    def model_name(self) -> str:
        return self._llm.state().model

    @property
    def engine_config(self) -> dict[str, Any]:
        return dict(self._config)

    @property
    def error(self) -> str | None:
        return None  # in this process: it is there as long as the app is

    @property
    def max_model_len(self) -> int:
        return self._llm.engine.max_model_len

    def count_prompt_tokens(
        self, messages: list[ChatMessage], tools: list[dict[str, Any]] | None = None
    ) -> int | None:
        from engine.llm import render_chat

        with_tools = {"tools": tools} if tools else {}
        try:
            return len(render_chat(self._tokenizer, template_messages(messages), **with_tools))
        except ValueError:  # no chat template: the engine says so when the reply starts
            return None

    async def chat(
        self, messages: list[ChatMessage], params: ChatParams, request_id: str
    ) -> AsyncIterator[ChatChunk]:
        from engine.config import SamplingParams

        sampling = SamplingParams(
            max_tokens=params.max_tokens,
            temperature=params.temperature,
            top_p=params.top_p,
            top_k=params.top_k,
            seed=params.seed,
            ignore_eos=params.ignore_eos,
        )
        if params.tool_list is None:
            async for out in self._llm.chat(
                template_messages(messages), sampling, request_id=request_id
            ):
                yield _chunk(out)
            return
        async for chunk in self._chat_with_tools(messages, params, sampling, request_id):
            yield chunk

    async def _chat_with_tools(
        self, messages: list[ChatMessage], params: ChatParams, sampling: Any, request_id: str
    ) -> AsyncIterator[ChatChunk]:
        """As the server does it (engine/server/tools.py): the tools go to the chat template,
        `required` constrains the reply with its grammar, and a `ToolStream` (the hermes parser,
        the bundled model's format) reads the calls out of the reply as it streams."""
        from engine.llm import render_chat
        from engine.server.errors import APIError
        from engine.server.protocol import ChatCompletionRequest
        from engine.server.tool_parsers import make_parser
        from engine.server.tools import ToolStream, plan_tools

        try:
            request = ChatCompletionRequest(
                messages=messages,
                tools=params.tool_list,
                tool_choice=params.tool_choice,
                parallel_tool_calls=params.parallel_tool_calls,
            )
            plan = plan_tools(request, make_parser(LOCAL_TOOL_PARSER))
        except (APIError, ValueError) as e:  # pydantic's ValidationError is a ValueError
            raise ValueError(f"tools: {e}") from None
        prompt = render_chat(
            self._tokenizer, template_messages(messages), tools=plan.template_tools
        )
        if plan.spec is not None:  # off the event loop, as the server does (then it is cached)
            await asyncio.to_thread(self._llm.engine.grammars.compile, plan.spec)
        special = plan.parser is not None and plan.parser.needs_special_tokens
        sampling = dataclasses.replace(
            sampling, structured=plan.spec, skip_special_tokens=not special
        )
        stream, text, calls = ToolStream(plan), "", []
        async for out in self._llm.generate(prompt, sampling, request_id=request_id):
            content, deltas = stream.feed(out.delta_text)
            if out.finished:
                rest, last = stream.finish()
                content, deltas = (content or "") + (rest or ""), deltas + last
            for d in deltas:
                add_tool_call_delta(
                    calls, d.index, d.id, d.function.name, d.function.arguments or ""
                )
            text += content or ""
            reason = "tool_calls" if out.finished and stream.has_calls else out.finish_reason
            chunk = _chunk(out)
            yield dataclasses.replace(
                chunk,
                delta=content or "",
                text=text,
                finish_reason=reason,
                tool_calls=tuple(dict(c) for c in calls),
            )

    def abort(self, request_id: str) -> bool:
        return self._llm.abort(request_id)

    def state(self) -> EngineState:
        return self._llm.state()

    def close(self) -> None:
        self._llm.shutdown()


class EngineUnavailable(RuntimeError):
    """The engine failed to load; the message says why, in one line."""


class EngineHandle:
    """The engine slot the app fills once the model has loaded (in a worker).

    Panels hold the handle from the start, so the UI is usable while the model loads: a reply
    asked for early simply awaits `wait()`.
    """

    def __init__(
        self, model: str, options: dict[str, Any] | None = None, remote: str | None = None
    ) -> None:
        self.model = model  # what was asked for; the client's model_name once ready
        self.options = dict(options or {})  # the engine options asked for
        self.remote = remote  # the server's URL when attached to one (`launch --attach`)
        self.client: EngineClient | None = None
        self.error: str | None = None
        self._settled = asyncio.Event()

    @property
    def status(self) -> EngineStatus:
        if self.client is not None:
            return "ready"
        return "failed" if self.error is not None else "loading"

    def set_ready(self, client: EngineClient) -> None:
        self.client, self.error = client, None
        self._settled.set()

    def set_failed(self, error: str) -> None:
        self.client, self.error = None, error
        self._settled.set()

    async def wait(self) -> EngineClient:
        await self._settled.wait()
        if self.client is None:
            raise EngineUnavailable(self.error or "the engine is not available")
        return self.client

    def state(self) -> EngineState | None:
        return self.client.state() if self.client is not None else None
