"""Tool calling on /v1/chat/completions with the real `openai` client, on the bundled model (whose
chat template takes tools): required and named calls constrained so their arguments validate
against the schema, auto calls read by the hermes parser, tool turns in the history, streamed
deltas in OpenAI's shape; the parsers on their own."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import jsonschema
import openai
import pytest
import torch
from server_support import wait_idle
from transformers import AutoTokenizer

from engine import AsyncLLM
from engine.server import BackgroundServer, ServerSettings, create_app
from engine.server.protocol import ChatCompletionRequest
from engine.server.tool_parsers import make_parser
from engine.server.tools import plan_tools

KEY = "tools-key"
MODEL = "tiny"
WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 12},
        "unit": {"enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TIME = {
    "type": "object",
    "properties": {"zone": {"type": "string", "pattern": "^[A-Z]{3}$"}},
    "required": ["zone"],
    "additionalProperties": False,
}
TOOLS = [
    {
        "type": "function",
        "function": {"name": "get_weather", "description": "Weather now", "parameters": WEATHER},
    },
    {"type": "function", "function": {"name": "get_time", "parameters": TIME}},
]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
# The bundled template before it took tools: plain conversations must render byte for byte so.
CHATML = (
    "{{ '<|endoftext|>' }}{% for message in messages %}{{ '<|im_start|>' + message['role'] + "
    "'\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt "
    "%}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@pytest.fixture(scope="module")
def llm() -> Iterator[AsyncLLM]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    engine = AsyncLLM("tiny", block_size=16, max_model_len=1024)
    yield engine
    engine.shutdown()
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def server(llm) -> Iterator[BackgroundServer]:
    settings = ServerSettings(model_name=MODEL, api_key=KEY, tool_call_parser="hermes")
    with BackgroundServer(create_app(llm, settings)) as running:
        yield running


@pytest.fixture
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture
def http(server) -> Iterator[httpx.Client]:
    with httpx.Client(
        base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60
    ) as c:
        yield c


def assert_valid(call) -> None:
    assert call.type == "function" and call.id.startswith("call_")
    jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


def collect_stream(stream) -> tuple[str, dict[int, dict], list[str | None]]:
    """(content, tool calls by index with id, name, argument pieces and their join, finish
    reasons), checking OpenAI's delta shape: a call's first delta alone has its id, type and
    name, and calls come in index order."""
    content, calls, finishes = "", {}, []
    for chunk in stream:
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        content += choice.delta.content or ""
        for delta in choice.delta.tool_calls or ():
            first = delta.index not in calls
            assert delta.index == len(calls) - (not first)
            assert (delta.id is not None, delta.type, delta.function.name is not None) == (
                (True, "function", True) if first else (False, None, False)
            )
            call = calls.setdefault(
                delta.index, {"id": delta.id, "name": delta.function.name, "pieces": []}
            )
            if delta.function.arguments:
                call["pieces"].append(delta.function.arguments)
            call["arguments"] = "".join(call["pieces"])
        finishes.append(choice.finish_reason)
    return content, calls, [f for f in finishes if f]


# --- the template ---------------------------------------------------------------------------------


def test_the_bundled_template_takes_tools_and_keeps_plain_chatml():
    tokenizer = AutoTokenizer.from_pretrained("engine/bundled/tiny")
    old = AutoTokenizer.from_pretrained("engine/bundled/tiny")
    old.chat_template = CHATML
    conversations = [
        [{"role": "user", "content": "hi"}],
        [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "hello"},
            {"role": "assistant", "content": "yes"},
            {"role": "user", "content": ""},
        ],
    ]
    for messages in conversations:
        for generation in (True, False):
            new = tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=generation
            )
            assert new == old.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=generation
            )
    history = [
        {"role": "system", "content": "be brief"},
        *ASK,
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": {"city": "Paris"}},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]
    text = tokenizer.apply_chat_template(
        history, tools=TOOLS, tokenize=False, add_generation_prompt=True
    )
    assert text.startswith("<|endoftext|><|im_start|>system\nbe brief\n\n# Tools")
    assert json.dumps(TOOLS[0], ensure_ascii=False) in text
    assert (
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in text
    )
    assert "<|im_start|>tool\n<tool_response>\nsunny\n</tool_response><|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n")


# --- required and named: constrained ------------------------------------------------------------


def test_required_calls_validate_against_their_schemas(client, http):
    # parallel_tool_calls false: one call each (the tiny model, free to, never closes the list:
    # a list of calls past max_tokens is content cut short, finish_reason length).
    out = client.chat.completions.create(
        model=MODEL,
        messages=ASK,
        tools=TOOLS,
        tool_choice="required",
        parallel_tool_calls=False,
        max_tokens=300,
        temperature=1.0,
        seed=5,
        n=4,
    )
    names = set()
    for choice in out.choices:
        assert choice.finish_reason == "tool_calls"
        assert choice.message.content is None and len(choice.message.tool_calls) == 1
        assert_valid(choice.message.tool_calls[0])
        names.add(choice.message.tool_calls[0].function.name)
    content, calls, finishes = collect_stream(
        client.chat.completions.create(
            model=MODEL,
            messages=ASK,
            tools=TOOLS,
            tool_choice="required",
            parallel_tool_calls=False,
            max_tokens=300,
            temperature=0,
            stream=True,
        )
    )
    assert content == "" and finishes == ["tool_calls"] and list(calls) == [0]
    assert calls[0]["id"].startswith("call_")
    jsonschema.validate(json.loads(calls[0]["arguments"]), SCHEMAS[calls[0]["name"]])
    cut = client.chat.completions.create(
        model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required", max_tokens=60
    )
    assert cut.choices[0].finish_reason == "length" and cut.choices[0].message.tool_calls is None
    assert cut.choices[0].message.content.startswith('[{"name": "get_')
    wait_idle(http)


def test_a_required_list_of_calls_parses_into_each_call():
    request = ChatCompletionRequest(messages=ASK, tools=TOOLS, tool_choice="required")
    plan = plan_tools(request, None)
    text = json.dumps(
        [
            {"name": "get_time", "arguments": {"zone": "UTC"}},
            {"name": "get_weather", "arguments": {"city": "Oslo", "unit": "celsius"}},
        ]
    )
    parsed = plan.parse(text)
    assert parsed.content is None
    assert [(c.name, json.loads(c.arguments)) for c in parsed.calls] == [
        ("get_time", {"zone": "UTC"}),
        ("get_weather", {"city": "Oslo", "unit": "celsius"}),
    ]
    # The constraint is a JSON schema: valid lists pass it, lists with a bad call do not.
    schema = json.loads(plan.spec.value)
    jsonschema.validate(json.loads(text), schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate([{"name": "get_time", "arguments": {"zone": "utc"}}], schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate([], schema)


def test_a_named_function_is_called_with_valid_arguments(client, http):
    choice = {"type": "function", "function": {"name": "get_time"}}
    out = client.chat.completions.create(
        model=MODEL, messages=ASK, tools=TOOLS, tool_choice=choice, max_tokens=100, temperature=0
    )
    (call,) = out.choices[0].message.tool_calls
    assert call.function.name == "get_time" and out.choices[0].finish_reason == "tool_calls"
    assert_valid(call)
    content, calls, finishes = collect_stream(
        client.chat.completions.create(
            model=MODEL,
            messages=ASK,
            tools=TOOLS,
            tool_choice=choice,
            max_tokens=100,
            temperature=0,
            stream=True,
        )
    )
    assert content == "" and finishes == ["tool_calls"] and list(calls) == [0]
    assert calls[0]["name"] == "get_time" and calls[0]["id"].startswith("call_")
    assert calls[0]["arguments"] == call.function.arguments  # greedy: the same call, streamed
    wait_idle(http)


# --- auto: parsed -------------------------------------------------------------------------------


def test_auto_calls_are_parsed_streamed_and_not(client, http):
    # The reply is steered into the hermes format (the tiny model would not call on its own);
    # the parser must find the call in it.
    steer = {
        "guided_regex": r'Let me check\.\n<tool_call>\n\{"name": "get_weather", "arguments": '
        r'\{"city": "[a-z]{1,8}", "unit": "celsius"\}\}\n</tool_call>'
    }
    out = client.chat.completions.create(
        model=MODEL, messages=ASK, tools=TOOLS, max_tokens=120, temperature=0, extra_body=steer
    )
    message = out.choices[0].message
    assert out.choices[0].finish_reason == "tool_calls"
    assert message.content == "Let me check."
    (call,) = message.tool_calls
    assert call.function.name == "get_weather"
    assert_valid(call)
    content, calls, finishes = collect_stream(
        client.chat.completions.create(
            model=MODEL,
            messages=ASK,
            tools=TOOLS,
            tool_choice="auto",
            max_tokens=120,
            temperature=0,
            stream=True,
            extra_body=steer,
        )
    )
    assert content == "Let me check." and finishes == ["tool_calls"]
    assert calls[0]["name"] == "get_weather"
    assert json.loads(calls[0]["arguments"]) == json.loads(call.function.arguments)
    # No call in the reply: plain content, the usual finish reason.
    plain = client.chat.completions.create(
        model=MODEL, messages=ASK, tools=TOOLS, max_tokens=8, temperature=0
    )
    assert plain.choices[0].message.tool_calls is None
    assert plain.choices[0].finish_reason in ("stop", "length")
    none = client.chat.completions.create(
        model=MODEL, messages=ASK, tools=TOOLS, tool_choice="none", max_tokens=8, temperature=0
    )
    assert none.choices[0].message.content == plain.choices[0].message.content
    wait_idle(http)


def test_streamed_calls_send_their_arguments_as_they_are_written(client, http):
    # Greedy, so the stream makes the same calls: its pieces join to the non-streamed arguments.
    required = {"tool_choice": "required", "parallel_tool_calls": False, "max_tokens": 300}
    steer = (  # two hermes calls after some text
        r'Let me check\.\n<tool_call>\n\{"name": "get_weather", "arguments": \{"city": '
        r'"[a-z]{4,8}", "unit": "celsius"\}\}\n</tool_call>\n<tool_call>\n\{"name": "get_time", '
        r'"arguments": \{"zone": "[A-Z]{3}"\}\}\n</tool_call>'
    )
    auto = {"max_tokens": 300, "extra_body": {"guided_regex": steer}}
    for kwargs, text in ((required, None), (auto, "Let me check.")):
        ask = {"model": MODEL, "messages": ASK, "tools": TOOLS, "temperature": 0, **kwargs}
        out = client.chat.completions.create(**ask)
        assert out.choices[0].finish_reason == "tool_calls"
        assert out.choices[0].message.content == text
        whole = out.choices[0].message.tool_calls
        content, calls, finishes = collect_stream(
            client.chat.completions.create(**ask, stream=True)
        )
        assert content == (text or "") and finishes == ["tool_calls"]
        assert list(calls) == list(range(len(whole)))
        for call, streamed in zip(whole, calls.values(), strict=True):
            assert_valid(call)
            assert streamed["name"] == call.function.name and streamed["id"].startswith("call_")
            assert streamed["arguments"] == call.function.arguments
            assert json.loads(streamed["arguments"]) == json.loads(call.function.arguments)
            assert len(streamed["pieces"]) >= 3  # sent as generated, not whole at the end
    assert [c["name"] for c in calls.values()] == ["get_weather", "get_time"]
    assert calls[0]["id"] != calls[1]["id"]
    wait_idle(http)


def test_tools_and_tool_turns_reach_the_template(client, http):
    history = [
        *ASK,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_7",
                    "type": "function",
                    "function": {
                        "name": "get_weather",
                        "arguments": '{"city": "Paris", "unit": "celsius"}',
                    },
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_7", "content": "18 degrees, sunny"},
    ]
    out = client.chat.completions.create(
        model=MODEL, messages=history, tools=TOOLS, max_tokens=4, temperature=0
    )
    counted = http.post("/tokenize", json={"messages": history, "tools": TOOLS}).json()
    assert out.usage.prompt_tokens == counted["count"]
    bare = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=1, temperature=0)
    with_tools = client.chat.completions.create(
        model=MODEL, messages=ASK, tools=TOOLS, tool_choice="none", max_tokens=1, temperature=0
    )
    assert with_tools.usage.prompt_tokens > bare.usage.prompt_tokens + 50
    wait_idle(http)


def test_bad_tool_requests_are_400s_naming_the_field(client, http, llm):
    def param(**kwargs) -> str:
        with pytest.raises(openai.BadRequestError) as caught:
            client.chat.completions.create(
                **{"model": MODEL, "messages": ASK, "max_tokens": 2, **kwargs}
            )
        return caught.value.body["param"]

    named = {"type": "function", "function": {"name": "nope"}}
    assert param(tools=TOOLS, tool_choice=named) == "tool_choice"
    assert param(tool_choice="required") == "tool_choice"
    assert param(tools=TOOLS, tool_choice="required", response_format={"type": "json_object"}) == (
        "tool_choice"
    )
    bad_schema = [{"type": "function", "function": {"name": "f", "parameters": {"type": 5}}}]
    assert param(tools=bad_schema, tool_choice="required") == "tools"  # does not compile
    assert param(tools=[TOOLS[0], TOOLS[0]]) == "tools"
    call = {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{oops"}}
    broken = [*ASK, {"role": "assistant", "tool_calls": [call]}]
    assert param(messages=broken) == "messages.1.tool_calls.0.function.arguments"
    # A server without a parser refuses "auto" (and tools with no tool_choice, which mean auto).
    settings = ServerSettings(model_name=MODEL)
    with BackgroundServer(create_app(llm, settings)) as bare:
        plain = openai.OpenAI(base_url=bare.url + "/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.BadRequestError, match="--tool-call-parser"):
            plain.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, max_tokens=2)
        made = plain.chat.completions.create(
            model=MODEL,
            messages=ASK,
            tools=TOOLS,
            tool_choice="required",
            parallel_tool_calls=False,
            max_tokens=200,
        )
        assert made.choices[0].message.tool_calls
    wait_idle(http)


# --- the parsers on their own -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "text", "content", "calls"),
    [
        (
            "hermes",
            'Sure.\n<tool_call>\n{"name": "a", "arguments": {"x": 1}}\n</tool_call>\n'
            '<tool_call>\n{"name": "b", "arguments": {}}\n</tool_call>',
            "Sure.",
            [("a", {"x": 1}), ("b", {})],
        ),
        ("hermes", "<tool_call>\n{not json}\n</tool_call>", None, []),
        ("hermes", "no call here", "no call here", []),
        (
            "llama3",
            '<|python_tag|>{"name": "a", "parameters": {"x": 1}}; {"name": "b", "parameters": {}}',
            None,
            [("a", {"x": 1}), ("b", {})],
        ),
        ("llama3", ' {"name": "a", "parameters": {"x": "y"}}', None, [("a", {"x": "y"})]),
        ("llama3", "The answer is {x}", "The answer is {x}", []),
        (
            "mistral",
            'Ok [TOOL_CALLS][{"name": "a", "arguments": {"x": 1}}, {"name": "b", "arguments": {}}]',
            "Ok",
            [("a", {"x": 1}), ("b", {})],
        ),
        ("mistral", '[TOOL_CALLS]a[ARGS]{"x": 2}', None, [("a", {"x": 2})]),
        ("mistral", "[TOOL_CALLS]not a call", None, []),
    ],
)
def test_parsers(name, text, content, calls):
    parsed = make_parser(name).parse(text)
    if not calls:  # not readable as calls: all of it stays content
        assert parsed.calls == [] and parsed.content == text
        return
    assert parsed.content == content
    assert [(c.name, json.loads(c.arguments)) for c in parsed.calls] == calls
