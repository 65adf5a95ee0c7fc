"""The server under hostile input: huge prompts, bodies past the limit, unbounded stop lists,
unencodable text, wrong `param`s, a graceful shutdown with streams open, and the metrics that
count what happened. After each bad input the pool is whole (checked through /v1/engine/state)."""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Iterator

import httpx
import openai
import pytest
import torch
from server_support import wait_idle, wait_running

from engine import AsyncLLM
from engine.outputs import RequestMetrics, RequestOutput
from engine.server import BackgroundServer, ServerSettings, create_app
from engine.server.metrics import ServerMetrics
from engine.server.params import MAX_STOP_STRINGS

KEY = "hardening-key"
MODEL = "tiny-llama"
ENGINE = {"block_size": 4, "max_model_len": 512}
LIMIT = 64 * 2**20  # the module's server takes bodies up to 64 MiB (a 20 MB prompt gets in)


@pytest.fixture(scope="module")
def llm(llama_checkpoint) -> Iterator[AsyncLLM]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    engine = AsyncLLM(str(llama_checkpoint), **ENGINE)
    yield engine
    engine.shutdown()
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def server(llm) -> Iterator[BackgroundServer]:
    settings = ServerSettings(model_name=MODEL, api_key=KEY, max_request_bytes=LIMIT)
    with BackgroundServer(create_app(llm, settings)) as running:
        yield running


@pytest.fixture
def http(server) -> Iterator[httpx.Client]:
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.Client(base_url=server.url, headers=headers, timeout=120) as c:
        yield c


@pytest.fixture
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def post_error(http: httpx.Client, body: object, path: str = "/v1/completions", status=400):
    raw = body if isinstance(body, (str, bytes)) else json.dumps(body)
    r = http.post(path, content=raw, headers={"Content-Type": "application/json"})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


class Stream(threading.Thread):
    """A long completion streamed in the background; the arrival time of every chunk."""

    def __init__(self, url: str, max_tokens: int = 300) -> None:
        super().__init__(daemon=True)
        self.url, self.max_tokens = url, max_tokens
        self.arrivals: list[float] = []
        self.events: list[str] = []

    def run(self) -> None:
        body = {
            "prompt": "a long story",
            "max_tokens": self.max_tokens,
            "ignore_eos": True,
            "stream": True,
        }
        headers = {"Authorization": f"Bearer {KEY}"}
        with httpx.stream(
            "POST", self.url + "/v1/completions", json=body, headers=headers, timeout=120
        ) as response:
            for line in response.iter_lines():
                if line.startswith("data: "):
                    self.arrivals.append(time.monotonic())
                    self.events.append(line[len("data: ") :])


# --- a huge prompt stalls nobody -----------------------------------------------------------------


def test_a_20mb_prompt_delays_neither_health_nor_a_running_stream(server, http):
    stream = Stream(server.url, max_tokens=400)
    stream.start()
    wait_running(http)
    while not stream.arrivals:
        time.sleep(0.01)
    result: dict[str, httpx.Response] = {}
    huge = json.dumps({"model": MODEL, "prompt": "lorem ipsum " * (20 * 2**20 // 12)})

    def send() -> None:
        result["r"] = http.post(
            "/v1/completions", content=huge, headers={"Content-Type": "application/json"}
        )

    sender = threading.Thread(target=send)
    start = time.monotonic()
    sender.start()
    health_times = []
    while sender.is_alive() or len(health_times) < 10:
        t0 = time.monotonic()
        assert httpx.get(server.url + "/health", timeout=5).status_code == 200
        health_times.append(time.monotonic() - t0)
        time.sleep(0.05)
    sender.join()
    end = time.monotonic()
    assert max(health_times) < 1.0, health_times
    error = result["r"].json()["error"]
    assert result["r"].status_code == 400 and error["code"] == "context_length_exceeded"
    assert error["param"] == "prompt" and "at least" in error["message"]
    during = [t for t in stream.arrivals if start <= t <= end + 0.5]
    gaps = [b - a for a, b in zip(during, during[1:], strict=False)]
    assert gaps and max(gaps) < 1.0, gaps  # the stream kept going while the prompt was handled
    stream.join(timeout=120)
    assert stream.events[-1] == "[DONE]"
    wait_idle(http)


def test_tokenizing_runs_off_the_event_loop(llama_checkpoint):
    """A prompt that fits the length bound is tokenized on a worker thread: the event loop
    keeps ticking while it runs (on the loop it could not tick at all), and the ids are the
    tokenizer's own."""
    import asyncio

    from transformers import AutoTokenizer

    from engine.server.prompts import Prompts

    tokenizer = AutoTokenizer.from_pretrained(str(llama_checkpoint))
    text = "a fairly long text, tokenized byte by byte. " * 40_000  # 1.8 MB
    prompts = Prompts(tokenizer, 256, max_model_len=10**8)

    async def run() -> tuple[list[int], int]:
        ticks = 0
        done = asyncio.Event()

        async def tick() -> None:
            nonlocal ticks
            while not done.is_set():
                await asyncio.sleep(0.005)
                ticks += 1

        ticker = asyncio.create_task(tick())
        await asyncio.sleep(0)  # the ticker is waiting before the work starts
        ids = await prompts.off_loop(prompts.encode, text, True, "prompt")
        ticked = ticks
        done.set()
        await ticker
        return ids, ticked

    ids, ticks = asyncio.run(run())
    prompts.close()
    assert ids == tokenizer.encode(text)
    assert ticks >= 3, ticks  # the loop ran while the text was tokenized
    for sample in ("", "héllo <|im_start|> wörld\n\n  x", "<|bos|>a"):
        for special in (True, False):
            expected = tokenizer.encode(sample, add_special_tokens=special)
            assert prompts.encode(sample, special, "prompt") == expected


# --- limits ---------------------------------------------------------------------------------------


def test_body_over_the_limit_is_413_before_it_is_parsed(llm, http):
    settings = ServerSettings(model_name=MODEL, max_request_bytes=10_000)
    with BackgroundServer(create_app(llm, settings)) as small:
        big = json.dumps({"prompt": "x" * 20_000, "max_tokens": 2}).encode()
        r = httpx.post(small.url + "/v1/completions", content=big, timeout=30)
        assert r.status_code == 413, r.text
        assert r.json()["error"]["code"] == "request_too_large"

        def chunked() -> Iterator[bytes]:  # no Content-Length: counted while it is read
            for i in range(0, len(big), 1000):
                yield big[i : i + 1000]

        r = httpx.post(small.url + "/v1/completions", content=chunked(), timeout=30)
        assert r.status_code == 413, r.text
        assert r.json()["error"]["code"] == "request_too_large"
        ok = httpx.post(
            small.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=30
        )
        assert ok.status_code == 200
        assert 'status_class="4xx"' in httpx.get(small.url + "/metrics").text
    wait_idle(http)


def test_stop_lists_n_and_batches_are_bounded(http):
    many = post_error(http, {"prompt": "x", "stop": [f"s{i}" for i in range(100_000)]})
    assert many["param"] == "stop" and str(MAX_STOP_STRINGS) in many["message"]
    assert post_error(http, {"prompt": "x", "stop": ["y" * 5000]})["param"] == "stop"
    ids = post_error(http, {"prompt": "x", "stop_token_ids": list(range(5000))})
    assert ids["param"] == "stop_token_ids"
    assert post_error(http, {"prompt": "x", "n": 100_000})["param"] == "n"
    batch = post_error(http, {"prompt": [[5, 6]] * 600, "n": 2})
    assert batch["param"] == "n" and "1200 choices" in batch["message"]
    chat = "/v1/chat/completions"
    msgs = [{"role": "user", "content": "x"}]
    assert post_error(http, {"messages": msgs, "stop": ["z"] * 65}, chat)["param"] == "stop"
    wait_idle(http)


# --- unencodable text and the right param ---------------------------------------------------------


def test_lone_surrogates_are_a_400_naming_the_field(http):
    # JSON escapes of a lone UTF-16 surrogate: valid JSON, not valid Unicode text.
    prompt = post_error(http, '{"prompt": "ab\\ud800cd", "max_tokens": 2}')
    assert prompt["param"] == "prompt" and prompt["code"] == "invalid_text"
    batch = post_error(http, '{"prompt": ["ok", "\\udfff"], "max_tokens": 2}')
    assert batch["param"] == "prompt.1"
    chat = post_error(
        http, '{"messages": [{"role": "user", "content": "hi \\ud83d"}]}', "/v1/chat/completions"
    )
    assert chat["param"] == "messages.0.content"
    model = post_error(http, '{"model": "tiny\\ud800", "prompt": "x"}')
    assert model["param"] == "model"
    stop = post_error(http, '{"prompt": "x", "stop": ["\\ud800"]}')
    assert stop["param"] == "stop.0"
    r = http.get("/v1/models/%ED%A0%80")  # a path that decodes to no valid text
    assert 400 <= r.status_code < 500
    wait_idle(http)


def test_params_name_the_field_the_client_sent(http):
    broken = post_error(http, '{"prompt": "x", "max_tokens": ')
    assert broken["param"] is None and "not valid JSON" in broken["message"]
    chat = "/v1/chat/completions"
    msgs = [{"role": "user", "content": "x"}]
    zero = post_error(http, {"messages": msgs, "max_completion_tokens": 0}, chat)
    assert zero["param"] == "max_completion_tokens"
    assert zero["message"].startswith("max_completion_tokens")
    assert post_error(http, {"messages": msgs, "max_tokens": 0}, chat)["param"] == "max_tokens"
    top = post_error(http, {"messages": msgs, "logprobs": True, "top_logprobs": 50}, chat)
    assert top["param"] == "top_logprobs" and top["message"].startswith("top_logprobs")
    wait_idle(http)


def test_bearer_scheme_is_case_insensitive(server):
    for scheme in ("Bearer", "bearer", "BEARER"):
        r = httpx.get(server.url + "/v1/models", headers={"Authorization": f"{scheme} {KEY}"})
        assert r.status_code == 200, scheme
    for header in (f"Basic {KEY}", f"Bearer {KEY}x", "Bearer", KEY):
        r = httpx.get(server.url + "/v1/models", headers={"Authorization": header})
        assert r.status_code == 401, header


# --- shutdown and metrics -------------------------------------------------------------------------


def test_graceful_shutdown_ends_every_open_stream_with_an_error_and_done(llm):
    app = create_app(llm, ServerSettings(model_name=MODEL, api_key=KEY))
    running = BackgroundServer(app).start()
    streams = [Stream(running.url, max_tokens=480) for _ in range(2)]
    try:
        for s in streams:
            s.start()
        deadline = time.monotonic() + 30
        while not all(len(s.events) > 2 for s in streams):
            assert time.monotonic() < deadline
            time.sleep(0.02)
    finally:
        running.stop()
    for s in streams:
        s.join(timeout=30)
        assert s.events[-1] == "[DONE]"
        error = json.loads(s.events[-2])["error"]
        assert error["code"] == "server_shutdown" and error["type"] == "server_unavailable"
        assert len(s.events) < 480  # cut short, not run to the end
    deadline = time.monotonic() + 20
    while llm.state().kv_blocks_used:  # the aborted requests gave their blocks back
        assert time.monotonic() < deadline
        time.sleep(0.05)


def metric(text: str, name: str, **labels: str) -> float:
    wanted = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pattern = rf"^{name}\{{[^}}]*{wanted}[^}}]*\}} (\S+)$" if wanted else rf"^{name}\{{.*\}} (\S+)$"
    found = re.search(pattern, text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def test_metrics_count_aborts_and_responses_by_status_class(server, http, client):
    before = http.get("/metrics").text
    client.completions.create(model=MODEL, prompt="metrics", max_tokens=2)
    post_error(http, {"prompt": "x", "temperature": -1})
    body = {"prompt": "a long story", "max_tokens": 400, "ignore_eos": True, "stream": True}
    with http.stream("POST", "/v1/completions", json=body) as response:
        lines = response.iter_lines()
        while not next(lines).startswith("data: {"):
            pass
    wait_idle(http)
    after = http.get("/metrics").text
    name = "workbench_http_responses_total"
    assert metric(after, name, status_class="2xx") >= metric(before, name, status_class="2xx") + 2
    assert metric(after, name, status_class="4xx") >= metric(before, name, status_class="4xx") + 1
    aborted = "workbench_request_aborted_total"
    assert metric(after, aborted) == metric(before, aborted) + 1


def test_any_request_can_be_aborted_by_its_engine_id(server, http):
    """POST /v1/engine/abort stops another client's stream (it ends with finish_reason abort
    and [DONE]) and frees its blocks; an unknown id is a 404 naming request_id."""
    before = http.get("/metrics").text
    stream = Stream(server.url, max_tokens=400)
    stream.start()
    (running,) = wait_running(http)["running"]
    r = http.post("/v1/engine/abort", json={"request_id": running["request_id"]})
    assert r.status_code == 200 and r.json() == {
        "request_id": running["request_id"],
        "aborted": True,
    }
    stream.join(timeout=30)
    assert not stream.is_alive() and stream.events[-1] == "[DONE]"
    last = json.loads(stream.events[-2])
    assert last["choices"][0]["finish_reason"] == "abort"
    generated = sum(len(json.loads(e)["choices"][0]["text"]) > 0 for e in stream.events[:-1])
    assert generated < 400  # cut short
    wait_idle(http)
    aborted = "workbench_request_aborted_total"
    assert metric(http.get("/metrics").text, aborted) == metric(before, aborted) + 1
    error = post_error(
        http, {"request_id": running["request_id"]}, path="/v1/engine/abort", status=404
    )
    assert error["param"] == "request_id" and error["code"] == "request_not_found"


def test_ttft_is_measured_from_arrival_at_the_server():
    metrics = ServerMetrics(lambda: None, "m")  # type: ignore[arg-type, return-value]
    out = RequestOutput(
        request_id="r",
        prompt=None,
        prompt_token_ids=[1, 2],
        token_ids=[3, 4],
        finished=True,
        finish_reason="length",
        metrics=RequestMetrics(
            arrival_time=10.0, first_token_time=10.25, last_token_time=10.5, finish_time=10.5
        ),
    )
    metrics.observe(out, arrival=9.0)  # tokenized and queued in the server for 1 s
    ttft = metrics.ttft.labels("m")
    assert ttft._sum.get() == pytest.approx(1.25)
    assert metrics.e2e.labels("m")._sum.get() == pytest.approx(1.5)
