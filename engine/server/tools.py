"""Tool calling on /v1/chat/completions: what `tools` and `tool_choice` make of a request, and of
each choice's output (whole, or as a stream of OpenAI's tool-call deltas).

- `none`: the tools go to the chat template, the reply is plain content.
- `auto` (the default with tools): the reply is free text; the server's tool-call parser
  (`--tool-call-parser`) reads calls out of it.
- `required`: the reply is constrained (xgrammar) to a JSON list of one or more calls
  `[{"name": ..., "arguments": {...}}]`, each name one of the tools and its arguments valid
  against that tool's schema (at most one call when parallel_tool_calls is false).
- a named function: the reply is constrained to that function's arguments.

A reply that carries calls finishes with finish_reason `tool_calls`."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

from engine.server.errors import bad_request
from engine.server.protocol import (
    ChatCompletionRequest,
    DeltaFunctionCall,
    DeltaToolCall,
    FunctionCall,
    ToolCall,
)
from engine.server.tool_call_reader import CallPiece, CallReader, read_calls
from engine.server.tool_parsers import Parsed, ParsedCall, ToolParser
from engine.structured import StructuredSpec

ANY_OBJECT: dict[str, Any] = {"type": "object"}


def call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass
class ToolPlan:
    mode: str  # none | auto | required | named
    template_tools: list[dict[str, Any]] | None = None  # for apply_chat_template(tools=...)
    spec: StructuredSpec | None = None  # the constraint of required and named calls
    parser: ToolParser | None = None  # auto
    function: str | None = None  # named
    parallel: bool = True

    @property
    def calls_tools(self) -> bool:
        return self.mode in ("auto", "required", "named")

    def parse(self, text: str) -> Parsed:
        """A whole reply -> its content and calls."""
        if self.mode == "named":
            try:
                json.loads(text)
            except json.JSONDecodeError:  # cut short (length): not a call
                return Parsed(text, [])
            # As streamed: the grammar already made it the arguments' JSON text.
            return Parsed(None, [ParsedCall(self.function or "", text)])
        if self.mode == "required":
            calls = read_calls(CallReader.call_list, text)
            return Parsed(text, []) if calls is None else Parsed(None, calls)
        if self.mode == "auto" and self.parser is not None:
            parsed = self.parser.parse(text)
            return parsed if self.parallel else Parsed(parsed.content, parsed.calls[:1])
        return Parsed(text, [])


def plan_tools(req: ChatCompletionRequest, parser: ToolParser | None) -> ToolPlan:
    """The request's tool plan; 400 for a choice that its tools or the server cannot serve."""
    choice = req.tool_choice
    if not req.tools:
        if choice not in (None, "none"):
            raise bad_request("tool_choice needs tools", param="tool_choice")
        return ToolPlan("none")
    tools = [t.model_dump(exclude_none=True) for t in req.tools]
    by_name = {t.function.name: t.function for t in req.tools}
    if len(by_name) < len(req.tools):
        raise bad_request("tool function names must be unique", param="tools")
    for i, tool in enumerate(req.tools):
        try:
            if tool.function.parameters is not None:
                StructuredSpec.json_schema(tool.function.parameters)
        except ValueError as exc:
            raise bad_request(str(exc), param=f"tools.{i}.function.parameters") from None
    choice = choice or "auto"
    if choice == "none":
        return ToolPlan("none", tools)
    constrained = choice != "auto"
    if constrained and _has_other_constraint(req):
        raise bad_request(
            "tool_choice required or a named function cannot be combined with response_format "
            "or guided decoding",
            param="tool_choice",
        )
    if choice == "auto":
        if parser is None:
            raise bad_request(
                'tool_choice "auto" needs the server started with --tool-call-parser '
                '(hermes, llama3 or mistral); use "required", a named function or "none"',
                param="tool_choice",
            )
        return ToolPlan("auto", tools, parser=parser, parallel=req.parallel_tool_calls)
    if choice == "required":
        calls = [
            {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "enum": [name]},
                    "arguments": function.parameters or ANY_OBJECT,
                },
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
            for name, function in by_name.items()
        ]
        schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": calls}}
        if not req.parallel_tool_calls:
            schema["maxItems"] = 1
        # As text, keeping "name" before "arguments" (json_schema(dict) sorts the keys).
        return ToolPlan("required", tools, spec=StructuredSpec.json_schema(json.dumps(schema)))
    name = choice.function.name
    if name not in by_name:
        raise bad_request(
            f"tool_choice names {name!r}, which is not one of the tools", param="tool_choice"
        )
    spec = StructuredSpec.json_schema(by_name[name].parameters or ANY_OBJECT)
    return ToolPlan("named", tools, spec=spec, function=name)


def _has_other_constraint(req: ChatCompletionRequest) -> bool:
    fmt = req.response_format
    return (
        (fmt is not None and fmt.type != "text")
        or any(
            v is not None
            for v in (req.guided_json, req.guided_regex, req.guided_grammar, req.guided_choice)
        )
        or req.structured_outputs is not None
    )


def tool_calls(calls: list[ParsedCall]) -> list[ToolCall]:
    return [
        ToolCall(id=call_id(), function=FunctionCall(name=c.name, arguments=c.arguments))
        for c in calls
    ]


@dataclass
class ToolStream:
    """One choice's stream under a tool plan: text deltas in, (content delta, tool-call deltas)
    out. Content goes out until a call starts (text that may be a call's start is held back);
    from there a `CallReader` sends each call's name, then its arguments as they are written.
    A named call's reply is its arguments, sent as they come."""

    plan: ToolPlan
    text: str = ""
    sent: int = 0  # characters of `text` sent as content
    reader: CallReader | None = None  # reading calls
    plain: bool = False  # no calls in this reply: all of it is content
    named_started: bool = False

    def __post_init__(self) -> None:
        if self.plan.mode == "required":
            self.reader = CallReader(CallReader.call_list)
        self.plain = self.plan.mode == "none" or (
            self.plan.mode == "auto" and self.plan.parser is None
        )

    def feed(self, delta: str) -> tuple[str | None, list[DeltaToolCall]]:
        self.text += delta
        if self.plan.mode == "named":
            return None, self._named(delta)
        if self.reader is not None:
            calls = self._deltas(self.reader.feed(delta))
            if not (self.reader.failed and not self.reader.calls):
                return None, calls
            self.reader, self.plain = None, True  # not a call after all (and none was sent)
        if self.plain:
            return self._content(len(self.text)), []
        parser = self.plan.parser
        assert parser is not None
        at = parser.call_start(self.text)
        if at is not None and at >= self.sent:
            content = self._content(len(self.text[:at].rstrip()))
            self.reader = parser.reader()
            return content, self._deltas(self.reader.feed(self.text[at:]))
        return self._content(max(parser.safe_end(self.text), self.sent)), []

    def finish(self) -> tuple[str | None, list[DeltaToolCall]]:
        """At the end of the reply: what is left to send; `has_calls` says if it made calls."""
        if self.plan.mode == "named":
            return None, []
        if self.reader is not None:
            calls = self._deltas(self.reader.finish())
            if self.reader.calls:
                return None, calls
        return self._content(len(self.text)), []

    @property
    def has_calls(self) -> bool:
        """The reply made its calls whole (a stream cut short keeps the model's finish reason)."""
        if self.plan.mode == "named":
            return bool(self.plan.parse(self.text).calls)
        return self.reader is not None and self.reader.valid

    def _named(self, delta: str) -> list[DeltaToolCall]:
        if not delta and self.named_started:
            return []
        start = not self.named_started
        self.named_started = True
        name = self.plan.function if start else None
        return [_delta(CallPiece(0, name, delta))]

    def _deltas(self, pieces: list[CallPiece]) -> list[DeltaToolCall]:
        return [_delta(p) for p in pieces if self.plan.parallel or p.index == 0]

    def _content(self, end: int) -> str | None:
        piece = self.text[self.sent : end]
        self.sent = max(self.sent, end)
        return piece or None


def _delta(piece: CallPiece) -> DeltaToolCall:
    """OpenAI's stream delta: a call's first with its id, type and name."""
    first = piece.name is not None
    return DeltaToolCall(
        index=piece.index,
        id=call_id() if first else None,
        type="function" if first else None,
        function=DeltaFunctionCall(name=piece.name, arguments=piece.arguments),
    )
