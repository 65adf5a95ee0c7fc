"""The HTTP server end to end: the real `openai` client against uvicorn on 127.0.0.1, serving a
tiny random checkpoint. Texts are checked against the engine's own offline greedy output."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import time
from collections.abc import Iterator

import httpx
import jsonschema
import openai
import pytest
import torch
from server_support import wait_idle, wait_running

from engine import LLM, AsyncLLM, SamplingParams
from engine.server import BackgroundServer, ServerSettings, create_app

KEY = "test-key"
MODEL = "tiny-llama"
ENGINE = {"block_size": 4, "max_model_len": 512}
LONG = 480  # tokens: a request that runs long enough to be caught running


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    # Tiny matmuls lose to thread hand-offs, badly so on a busy 2-core CI machine.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def server(llama_checkpoint, one_torch_thread) -> Iterator[BackgroundServer]:
    llm = AsyncLLM(str(llama_checkpoint), **ENGINE)
    app = create_app(llm, ServerSettings(model_name=MODEL, api_key=KEY))
    with BackgroundServer(app) as running:
        yield running
    llm.shutdown()


@pytest.fixture(scope="module")
def reference(llama_checkpoint, one_torch_thread) -> LLM:
    return LLM(str(llama_checkpoint), **ENGINE)


@pytest.fixture
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture
def http(server) -> Iterator[httpx.Client]:
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.Client(base_url=server.url, headers=headers, timeout=60) as c:
        yield c


def greedy(reference: LLM, prompts: list[str], max_tokens: int) -> list[str]:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    return [out.text for out in reference.generate(prompts, params)]


# --- basics -----------------------------------------------------------------------------------


def test_health_models_and_api_key(server, client):
    assert httpx.get(server.url + "/health").json()["status"] == "ok"  # no key needed
    denied = httpx.get(server.url + "/v1/models")
    assert denied.status_code == 401
    assert denied.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(server.url + "/openapi.json").status_code == 401
    assert [m.id for m in client.models.list().data] == [MODEL]
    wrong = openai.OpenAI(base_url=server.url + "/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="other", prompt="x", max_tokens=2)


def test_completion_is_the_engines_greedy_output(client, reference):
    prompt = "Once upon a time"
    out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0)
    assert out.choices[0].text == greedy(reference, [prompt], 12)[0]
    assert out.choices[0].finish_reason in ("length", "stop")
    ids = reference.tokenizer.encode(prompt)
    assert out.usage.prompt_tokens == len(ids)
    assert out.usage.total_tokens == len(ids) + out.usage.completion_tokens
    batch = client.completions.create(
        model=MODEL, prompt=["ab", "hi"], max_tokens=5, n=2, temperature=0
    )
    assert [c.index for c in batch.choices] == [0, 1, 2, 3]
    assert batch.choices[0].text == batch.choices[1].text == greedy(reference, ["ab"], 5)[0]
    by_ids = client.completions.create(model=MODEL, prompt=[104, 105], max_tokens=5, temperature=0)
    assert by_ids.choices[0].text == batch.choices[2].text == greedy(reference, ["hi"], 5)[0]


def test_chat_streaming_equals_non_streaming(client):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
    whole = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=10, temperature=0
    )
    stream = client.chat.completions.create(
        model=MODEL,
        messages=messages,
        max_tokens=10,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finish = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert finish == [whole.choices[0].finish_reason]
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage.prompt_tokens == whole.usage.prompt_tokens
    assert usage.completion_tokens == whole.usage.completion_tokens
    assert usage.total_tokens == whole.usage.total_tokens
    # The same prompt again: its full KV pages come from the prefix cache, and usage says so.
    cached = usage.prompt_tokens_details.cached_tokens
    block = ENGINE["block_size"]
    assert cached == (usage.prompt_tokens - 1) // block * block > 0
    assert whole.usage.prompt_tokens_details.cached_tokens <= cached


def test_stop_seed_and_n(client, reference):
    prompt = "The sky"
    free = greedy(reference, [prompt], 16)[0]
    stop = free[4:6]
    cut = client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=16, temperature=0, stop=[stop]
    )
    assert cut.choices[0].text == free[: free.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    many = client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=8, temperature=1.0, n=3, seed=7
    )
    singles = [
        client.completions.create(
            model=MODEL, prompt=prompt, max_tokens=8, temperature=1.0, seed=7 + i
        )
        .choices[0]
        .text
        for i in range(3)
    ]
    assert [c.text for c in many.choices] == singles  # choice i runs with seed + i
    assert len(set(singles)) > 1


def test_logprobs(client):
    out = client.completions.create(
        model=MODEL, prompt="abc", max_tokens=4, temperature=0, logprobs=2
    )
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    assert all(x <= 0 for x in lp.token_logprobs) and all(len(t) <= 2 for t in lp.top_logprobs)
    chat = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "x"}],
        max_tokens=3,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
    )
    content = chat.choices[0].logprobs.content
    assert len(content) == 3
    assert all(len(c.top_logprobs) == 3 and c.logprob == c.top_logprobs[0].logprob for c in content)


# --- structured output ------------------------------------------------------------------------

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3},
    },
    "required": ["name", "age", "tags"],
    "additionalProperties": False,
}


def test_json_schema_output_validates(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    chat = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "a person"}],
        max_tokens=100,
        temperature=1.0,
        seed=3,
        n=3,
        response_format=fmt,
    )
    for choice in chat.choices:
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.message.content), PERSON)
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "a person"}],
        max_tokens=100,
        temperature=0,
        stream=True,
        response_format=fmt,
    )
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    jsonschema.validate(json.loads(text), PERSON)


def test_regex_grammar_and_choice_extensions(client):
    def complete(**extra) -> str:
        out = client.completions.create(
            model=MODEL, prompt="id:", max_tokens=40, temperature=1.0, seed=1, extra_body=extra
        )
        return out.choices[0].text

    assert re.fullmatch(r"[A-Z]{2}-[0-9]{4}", complete(guided_regex=r"[A-Z]{2}-[0-9]{4}"))
    assert complete(guided_grammar='root ::= "yes" | "no"') in ("yes", "no")
    choice = complete(structured_outputs={"choice": ["left", "right"]})
    assert choice in ("left", "right")
    assert complete(guided_json={"type": "boolean"}) in ("true", "false")
    with pytest.raises(openai.BadRequestError, match="invalid regex"):
        complete(guided_regex="(")
    with pytest.raises(openai.BadRequestError, match="only one"):
        complete(guided_regex="a", guided_grammar='root ::= "a"')


# --- load, disconnects, limits ----------------------------------------------------------------


def test_32_concurrent_streams_complete_with_the_right_texts(server, reference, http):
    prompts = [f"request {i}: " + "xyz"[: i % 4] for i in range(32)]
    expected = greedy(reference, prompts, 12)

    async def run() -> list[str]:
        async with openai.AsyncOpenAI(
            base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120
        ) as aclient:

            async def one(prompt: str) -> str:
                stream = await aclient.completions.create(
                    model=MODEL, prompt=prompt, max_tokens=12, temperature=0, stream=True
                )
                return "".join([chunk.choices[0].text async for chunk in stream if chunk.choices])

            return await asyncio.gather(*(one(p) for p in prompts))

    assert asyncio.run(run()) == expected
    wait_idle(http)


def test_disconnect_mid_stream_frees_the_requests_blocks(server, http):
    body = {
        "model": MODEL,
        "prompt": "a long story",
        "max_tokens": LONG,
        "ignore_eos": True,
        "stream": True,
    }
    before = http.get("/v1/engine/state").json()["total_generated_tokens"]
    with http.stream("POST", "/v1/completions", json=body) as response:
        lines = response.iter_lines()
        while not next(lines).startswith("data: {"):
            pass
        assert wait_running(http)["kv_blocks_used"] > 0
    state = wait_idle(http)  # the client is gone: the request was aborted, its blocks freed
    assert state["total_generated_tokens"] - before < LONG

    # Not streaming: a client that hangs up while its request runs aborts it too.
    payload = json.dumps({**body, "stream": False}).encode()
    head = (
        f"POST /v1/completions HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer {KEY}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
    )
    before = state["total_generated_tokens"]
    with socket.create_connection((server.host, server.port)) as sock:
        sock.sendall(head.encode() + payload)
        assert wait_running(http)["kv_blocks_used"] > 0
    state = wait_idle(http)
    assert state["total_generated_tokens"] - before < LONG


def test_bad_input_gets_openai_errors_and_the_server_lives(server, http, client):
    def post(body: object, path: str = "/v1/completions", status: int = 400) -> dict:
        raw = body if isinstance(body, str) else json.dumps(body)
        r = http.post(path, content=raw, headers={"Content-Type": "application/json"})
        assert r.status_code == status, r.text
        error = r.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        return error

    assert "not valid JSON" in post('{"prompt": ')["message"]
    post([1, 2])
    post({"max_tokens": 3})  # no prompt
    assert post({"model": "nope", "prompt": "x"}, status=404)["code"] == "model_not_found"
    long = post({"prompt": "x", "max_tokens": 512})
    assert long["code"] == "context_length_exceeded" and long["param"] == "max_tokens"
    assert post({"prompt": [5] * 600})["code"] == "context_length_exceeded"
    bad_t = post({"prompt": "x", "temperature": -1})
    assert bad_t["message"] == "temperature must be >= 0, got -1.0"
    assert bad_t["param"] == "temperature"
    assert post({"prompt": "x", "top_p": 0})["param"] == "top_p"
    assert post({"prompt": "x", "n": 0})["param"] == "n"
    assert post({"prompt": [999999]})["param"] == "prompt"
    assert post({"prompt": "x", "stop": [""]})["param"] == "stop"
    chat = "/v1/chat/completions"
    post({"messages": []}, chat)
    post({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, chat)
    post({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, chat)
    fmt = {"type": "json_schema", "json_schema": {"name": "x"}}
    post({"messages": [{"role": "user", "content": "x"}], "response_format": fmt}, chat)
    assert http.get("/health").status_code == 200
    assert client.completions.create(model=MODEL, prompt="x", max_tokens=2).choices


def test_queue_limit_answers_429(llama_checkpoint):
    llm = AsyncLLM(str(llama_checkpoint), max_num_seqs=1, **ENGINE)
    app = create_app(llm, ServerSettings(model_name=MODEL, max_queue=1))  # 2 in flight at most
    body = {"prompt": "x", "max_tokens": LONG, "ignore_eos": True}

    async def together(url: str) -> list[int]:
        """Both sent at once, each held open until both have answered, then dropped."""
        statuses: list[int] = []
        both = asyncio.Event()

        async def one(aclient: httpx.AsyncClient, payload: dict) -> None:
            async with aclient.stream("POST", "/v1/completions", json=payload) as response:
                statuses.append(response.status_code)
                if len(statuses) == 2:
                    both.set()
                await asyncio.wait_for(both.wait(), 60)

        async with httpx.AsyncClient(base_url=url, timeout=120) as aclient:
            await asyncio.gather(
                one(aclient, {**body, "n": 2, "stream": True}),
                one(aclient, {**body, "stream": True}),
            )
        return sorted(statuses)

    try:
        with BackgroundServer(app) as running, httpx.Client(base_url=running.url) as http:
            too_many = http.post("/v1/completions", json={**body, "n": 3})
            assert too_many.status_code == 429
            assert too_many.json()["error"]["code"] == "queue_full"
            # Sent at once: whichever comes second finds the 2 slots taken by the other.
            assert asyncio.run(together(running.url)) == [200, 429]
            wait_idle(http)
            deadline = time.monotonic() + 20  # the dropped stream gives its slots back
            while app.state.ctx.admission.in_flight:
                assert time.monotonic() < deadline
                time.sleep(0.02)
            assert http.post("/v1/completions", json={"prompt": "x", "max_tokens": 2}).is_success
            assert "workbench_request_rejected_total" in http.get("/metrics").text
    finally:
        llm.shutdown()


# --- observability ----------------------------------------------------------------------------


def test_metrics_state_and_openapi(http, client):
    client.completions.create(model=MODEL, prompt="metrics", max_tokens=4, temperature=0)
    text = http.get("/metrics").text
    for name in (
        "workbench_kv_cache_usage_ratio",
        "workbench_prefix_cache_hit_rate",
        "workbench_num_requests_running",
        "workbench_num_requests_waiting",
        "workbench_num_requests_preempted",
        "workbench_time_to_first_token_seconds_bucket",
        "workbench_time_per_output_token_seconds_bucket",
        "workbench_e2e_request_latency_seconds_bucket",
        "workbench_prompt_tokens_total",
        "workbench_generation_tokens_total",
    ):
        assert name in text, name
    count = re.search(
        r'workbench_e2e_request_latency_seconds_count\{model_name="tiny-llama"\} '
        r"(\S+)",
        text,
    )
    assert count and float(count.group(1)) >= 1
    state = http.get("/v1/engine/state").json()
    assert state["model"] and state["kv_blocks_total"] > 0 and "kv_usage" in state
    schema = http.get("/openapi.json").json()
    paths = schema["paths"]
    for path in (
        "/v1/models",
        "/v1/completions",
        "/v1/chat/completions",
        "/health",
        "/metrics",
        "/v1/engine/state",
    ):
        assert path in paths
    assert "422" not in json.dumps(paths)
    assert schema["components"]["securitySchemes"]["bearerAuth"]["scheme"] == "bearer"


# --- tokenize -----------------------------------------------------------------------------------


def test_tokenize_and_detokenize_in_vllms_shapes(http, reference):
    tokenizer = reference.tokenizer
    text = "héllo <|im_start|> world"
    r = http.post("/tokenize", json={"model": MODEL, "prompt": text, "return_token_strs": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["tokens"] == tokenizer.encode(text) and body["count"] == len(body["tokens"])
    assert body["max_model_len"] == ENGINE["max_model_len"]
    assert body["token_strs"] == tokenizer.convert_ids_to_tokens(body["tokens"])
    plain = http.post("/tokenize", json={"prompt": text, "add_special_tokens": False}).json()
    assert plain["tokens"] == tokenizer.encode(text, add_special_tokens=False)
    assert plain["token_strs"] is None
    messages = [{"role": "user", "content": "hi"}]
    chat = http.post("/tokenize", json={"messages": messages}).json()
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert chat["tokens"] == tokenizer.encode(rendered, add_special_tokens=False)
    bare = http.post("/tokenize", json={"messages": messages, "add_generation_prompt": False})
    assert len(bare.json()["tokens"]) < chat["count"]
    # Counting is allowed past max_model_len (nothing is generated).
    long = http.post("/tokenize", json={"prompt": "x" * 2000}).json()
    assert long["count"] == len(tokenizer.encode("x" * 2000)) > ENGINE["max_model_len"]
    back = http.post("/detokenize", json={"model": MODEL, "tokens": body["tokens"]})
    assert back.json() == {"prompt": tokenizer.decode(body["tokens"])}
    for path, payload, param in [
        ("/tokenize", {}, "prompt"),
        ("/tokenize", {"prompt": "x", "messages": messages}, "prompt"),
        ("/detokenize", {"tokens": [10**7]}, "tokens"),
    ]:
        error = http.post(path, json=payload)
        assert error.status_code == 400 and error.json()["error"]["param"] == param
    assert http.post("/tokenize", json={"model": "other", "prompt": "x"}).status_code == 404
    models = http.get("/v1/models").json()["data"][0]
    assert models["max_model_len"] == ENGINE["max_model_len"]
