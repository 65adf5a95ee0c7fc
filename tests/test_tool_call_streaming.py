"""Tool calls streamed as the model writes them, without a model: a reply fed to a choice's
`ToolStream` in random pieces sends the content and calls its whole parse finds, each call as
OpenAI streams it (a first delta with its index, id, type and name, then pieces of its
arguments), for every parser and for tool_choice "required"."""

from __future__ import annotations

import json
import random

import pytest

from engine.server.protocol import ChatCompletionRequest
from engine.server.tool_parsers import ParsedCall, make_parser
from engine.server.tools import ToolPlan, ToolStream, plan_tools

TOOLS = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
ASK = [{"role": "user", "content": "hi"}]
LONG = '{"city": "S\\u00e3o \\"Paulo\\" {x}", "days": [1, {"n": "]}"}], "ok": true}'
REPLIES = {
    "hermes": [
        'Let me see.\n\n<tool_call>\n{"name": "get_time", "arguments": {"zone": "UTC"}}\n'
        "</tool_call>",
        f'<tool_call>\n{{"name": "a", "arguments": {LONG}}}\n</tool_call>\n'
        '<tool_call>\n{"name": "b", "arguments": {}}\n</tool_call>\n',
        '<tool_call>{"arguments": {"x": [1, 2]}, "id": 7, "name": "late"}</tool_call>',
        '<tool_call>{"name": "text", "arguments": "{\\"x\\": 1}"}</tool_call>',
        '<tool_call>\n{"name": "bare"}\n</tool_call>',
        f'Sure: <tool_call>\n{{"name": "open", "arguments": {LONG}}}',  # no end tag
    ],
    "llama3": [
        f'<|python_tag|>{{"name": "a", "parameters": {LONG}}}; {{"name": "b", "parameters": {{}}}}',
        '  {"name": "a", "parameters": {"x": "y"}};',
    ],
    "mistral": [
        f'Ok [TOOL_CALLS][{{"name": "a", "arguments": {LONG}}}, {{"name": "b", "arguments": {{}}}}'
        "]",
        f'[TOOL_CALLS]a[ARGS]{LONG}[TOOL_CALLS] b [ARGS] {{"x": 2}}',
    ],
}
CASES = [(name, text) for name, texts in REPLIES.items() for text in texts]
CASES.append(
    ("required", f'[{{"name": "a", "arguments": {LONG}}}, {{"name": "b", "arguments": {{}}}}]')
)
NOT_CALLS = [
    ("hermes", "Just text, with a < and <tool but no call.  "),
    ("hermes", "<tool_call>\n{broken\n</tool_call> and more"),
    ("hermes", '<tool_call>{"arguments": {}}</tool_call>'),  # no name
    ("llama3", "The answer is {x}"),
    ("llama3", "{x} is the answer"),
    ("mistral", "[TOOL_CALLS]not a call"),
]


def plan_for(name: str) -> ToolPlan:
    if name == "required":
        return plan_tools(
            ChatCompletionRequest(messages=ASK, tools=TOOLS, tool_choice="required"), None
        )
    return plan_tools(ChatCompletionRequest(messages=ASK, tools=TOOLS), make_parser(name))


def stream(plan: ToolPlan, pieces: list[str]) -> tuple[str | None, dict[int, list], ToolStream]:
    """(content, the tool-call deltas by index, the stream) for a reply fed in `pieces`, checking
    each call's deltas have OpenAI's shape."""
    tools = ToolStream(plan)
    content, deltas = "", {}
    for piece in [*pieces, None]:
        text, calls = tools.feed(piece) if piece is not None else tools.finish()
        content += text or ""
        for delta in calls:
            first = delta.index not in deltas
            assert delta.index == len(deltas) - (not first)  # calls come in order, one at a time
            assert (delta.id is not None, delta.type, delta.function.name is not None) == (
                (True, "function", True) if first else (False, None, False)
            )
            if first:
                assert delta.id.startswith("call_")
            deltas.setdefault(delta.index, []).append(delta)
    return content or None, deltas, tools


def joined(deltas: dict[int, list]) -> list[ParsedCall]:
    return [
        ParsedCall(ds[0].function.name, "".join(d.function.arguments or "" for d in ds))
        for ds in deltas.values()
    ]


def random_pieces(text: str, seed: int) -> list[str]:
    rng, pieces, at = random.Random(seed), [], 0
    while at < len(text):
        size = rng.randint(1, 9)
        pieces.append(text[at : at + size])
        at += size
    return pieces


@pytest.mark.parametrize(("parser", "text"), CASES)
def test_streamed_calls_join_to_the_parsed_calls_in_any_chunking(parser, text):
    plan = plan_for(parser)
    whole = plan.parse(text)
    assert whole.calls  # each case is a reply with calls
    assert all(isinstance(json.loads(call.arguments), dict) for call in whole.calls)
    for seed in range(25):
        content, deltas, tools = stream(plan, random_pieces(text, seed))
        assert content == whole.content
        assert joined(deltas) == whole.calls
        assert tools.has_calls


@pytest.mark.parametrize(("parser", "text"), [c for c in CASES if LONG in c[1]])
def test_arguments_go_out_as_they_are_written(parser, text):
    _, deltas, _ = stream(plan_for(parser), list(text))  # a character at a time
    pieces = [d.function.arguments for d in deltas[0][1:]]
    assert "".join(pieces) == LONG
    assert len(pieces) == len(LONG)  # each character as soon as it comes
    assert json.loads(LONG)["city"] == 'São "Paulo" {x}'


def test_content_before_a_call_streams_and_a_marker_is_held_back():
    tools = ToolStream(plan_for("hermes"))
    assert tools.feed("Let me ") == ("Let me", [])
    assert tools.feed("check. <tool") == (" check.", [])  # "<tool" may start a call
    assert tools.feed("_call>\n{") == (None, [])
    assert tools.feed('"name": "f') == (None, [])  # the name is not closed yet
    content, (first,) = tools.feed('", ')
    assert content is None and first.function.name == "f" and first.function.arguments == ""
    assert tools.feed('"arguments": {"a"')[1][0].function.arguments == '{"a"'
    assert tools.feed(": 1}}")[1][0].function.arguments == ": 1}"
    assert tools.finish() == (None, [])
    assert tools.has_calls


@pytest.mark.parametrize(("parser", "text"), NOT_CALLS)
def test_a_reply_that_is_not_calls_streams_as_all_content(parser, text):
    plan = plan_for(parser)
    assert plan.parse(text) == (text, [])
    for seed in range(10):
        content, deltas, tools = stream(plan, random_pieces(text, seed))
        assert content == text and deltas == {} and not tools.has_calls


def test_a_call_cut_short_keeps_what_was_sent_and_the_finish_reason():
    text = '[{"name": "a", "arguments": {"x": "abc'
    plan = plan_for("required")
    assert plan.parse(text) == (text, [])  # whole: content cut short
    content, deltas, tools = stream(plan, random_pieces(text, 0))
    assert content is None and joined(deltas) == [ParsedCall("a", '{"x": "abc')]
    assert not tools.has_calls  # finish_reason stays the model's ("length")


def test_one_call_only_without_parallel_tool_calls():
    request = ChatCompletionRequest(messages=ASK, tools=TOOLS, parallel_tool_calls=False)
    plan = plan_tools(request, make_parser("hermes"))
    text = REPLIES["hermes"][1]
    _, deltas, _ = stream(plan, random_pieces(text, 3))
    assert joined(deltas) == plan.parse(text).calls and list(deltas) == [0]
