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
from dataclasses import dataclass, field
from typing import Any

from engine.server.errors import bad_request
from engine.server.protocol import (
    ChatCompletionRequest,
    DeltaFunctionCall,
    DeltaToolCall,
    FunctionCall,
    ToolCall,
)
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
            try:
                items = json.loads(text)
                calls = [ParsedCall(i["name"], json.dumps(i["arguments"])) for i in items]
            except (json.JSONDecodeError, KeyError, TypeError):
                return Parsed(text, [])
            return Parsed(None, calls)
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


def call_deltas(calls: list[ParsedCall], first_index: int = 0) -> list[DeltaToolCall]:
    """Whole calls as OpenAI's stream deltas: each with its id, name and all its arguments."""
    return [
        DeltaToolCall(
            index=first_index + i,
            id=call_id(),
            type="function",
            function=DeltaFunctionCall(name=c.name, arguments=c.arguments),
        )
        for i, c in enumerate(calls)
    ]


@dataclass
class ToolStream:
    """One choice's stream under a tool plan: text deltas in, (content delta, tool-call deltas)
    out. A named call streams its arguments as they come; auto sends content until a call
    starts, then the calls once the reply is complete; required sends its calls at the end."""

    plan: ToolPlan
    text: str = ""
    sent: int = 0  # characters of `text` sent as content
    in_calls: bool = False
    named_started: bool = False
    calls_sent: list[ParsedCall] = field(default_factory=list)

    def feed(self, delta: str) -> tuple[str | None, list[DeltaToolCall]]:
        self.text += delta
        mode = self.plan.mode
        if mode == "named":
            if not delta and self.named_started:
                return None, []
            start = not self.named_started
            self.named_started = True
            function = DeltaFunctionCall(
                name=self.plan.function if start else None, arguments=delta
            )
            call = DeltaToolCall(
                index=0,
                id=call_id() if start else None,
                type="function" if start else None,
                function=function,
            )
            return None, [call]
        if mode == "required" or self.in_calls:
            return None, []
        if mode != "auto" or self.plan.parser is None:
            return self._content(len(self.text)), []
        parser = self.plan.parser
        at = parser.call_start(self.text)
        if at is not None and at >= self.sent:
            self.in_calls = True
            return self._content(len(self.text[:at].rstrip())), []
        return self._content(max(parser.safe_end(self.text), self.sent)), []

    def finish(self) -> tuple[str | None, list[DeltaToolCall]]:
        """At the end of the reply: what is left to send; `has_calls` says if it made calls."""
        mode = self.plan.mode
        if mode == "named":
            parsed = self.plan.parse(self.text)
            self.calls_sent = parsed.calls
            return None, []
        if mode in ("required", "auto"):
            parsed = self.plan.parse(self.text)
            if parsed.calls:
                self.calls_sent = parsed.calls
                return None, call_deltas(parsed.calls)
        return self._content(len(self.text)), []

    @property
    def has_calls(self) -> bool:
        return bool(self.calls_sent)

    def _content(self, end: int) -> str | None:
        piece = self.text[self.sent : end]
        self.sent = max(self.sent, end)
        return piece or None
