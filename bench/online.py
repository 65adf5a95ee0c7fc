"""Online benchmark: load on any OpenAI-compatible server over HTTP, the way its users see it.

Method (that of vLLM's `benchmark_serving.py`)
------
Prompts: the offline benchmark's (`bench.offline`): `num_requests` synthetic prompts of exactly
`input_len` token ids drawn from the tokenizer's vocabulary (special tokens left out) with a
generator seeded by `seed`, so the same seed sends the same ids online and offline; or the lines
of a text file, cycled. /v1/completions gets synthetic prompts as token-id lists (exactly
`input_len` tokens); /v1/chat/completions gets them decoded to text as one user message (the
server's chat template adds its tokens; usage says how many). Every request asks for
`max_tokens = output_len` at temperature 0, streamed, with `stream_options.include_usage`; with
`ignore_eos` it also sends the vLLM extension field `ignore_eos`, so each request emits exactly
`output_len` tokens.

Load: arrivals are a Poisson process of `request_rate` requests/s (exponential gaps drawn up front
from a generator seeded by `seed`; inf sends them all at once) and, with `max_concurrency`, at
most that many are in flight (a request that arrives at a full house waits for a slot, and its
clock starts when it gets one).

Per request, on the client (`time.perf_counter`): start = the request is sent; TTFT = the first
streamed chunk with content - start; ITL = the gaps between later chunks with content; E2E = the
end of the stream - start; output tokens = the usage chunk's completion_tokens (or the count of
content chunks when a server sends no usage); TPOT = (E2E - TTFT) / (output tokens - 1). A
request fails when the server answers an error status, sends an error event, closes the stream
early or times out; it is counted and its message kept, and the run goes on.

Totals over the duration (the first request sent to the last one answered): requests/s, output
tokens/s and total tokens/s of the successful requests; goodput = successful requests that meet
every given SLO (TTFT, TPOT, E2E in ms; a request with one token has no TPOT and meets that one)
per second. Latencies are reported as mean, p50, p90 and p99 in ms, as offline.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import json
import math
import platform
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np

from bench.offline import load_average, read_prompt_lines, stats_ms, versions

__all__ = [
    "ENDPOINTS",
    "SLO_METRICS",
    "OnlineBenchConfig",
    "OnlineBenchError",
    "RequestResult",
    "format_online_report",
    "parse_goodput",
    "run_online_benchmark",
    "summarize_online",
]

ENDPOINTS = ("completions", "chat")
SLO_METRICS = ("ttft", "tpot", "e2e")
DEFAULT_NUM_REQUESTS = 32
CONNECT_TIMEOUT_S = 10.0
MAX_ERRORS_SHOWN = 5


class OnlineBenchError(RuntimeError):
    """The benchmark cannot run at all (server unreachable, key refused, no tokenizer); one line."""


@dataclass
class OnlineBenchConfig:
    url: str  # the server's base URL, with or without /v1
    model: str | None = None  # the served model name; None: the first of GET /v1/models
    endpoint: str = "completions"  # completions | chat
    num_requests: int | None = None  # default: 32 synthetic, or one per line of `prompts_file`
    request_rate: float = math.inf  # Poisson arrivals, requests/s; inf: all at once
    max_concurrency: int | None = None  # None: no limit
    input_len: int = 128
    output_len: int = 128
    prompts_file: str | None = None
    tokenizer: str | None = None  # for synthetic prompts; None: the model name
    seed: int = 0
    ignore_eos: bool = False
    goodput: dict[str, float] = field(default_factory=dict)  # SLOs in ms: ttft, tpot, e2e
    timeout_s: float = 600.0  # the longest wait for the next byte of a response

    def __post_init__(self) -> None:
        self.url = base_url(self.url)
        _check(self.endpoint in ENDPOINTS, f"endpoint must be one of {', '.join(ENDPOINTS)}")
        _check(
            self.num_requests is None or self.num_requests >= 1,
            f"num_requests must be >= 1, got {self.num_requests}",
        )
        _check(self.request_rate > 0, f"request_rate must be > 0, got {self.request_rate}")
        _check(
            self.max_concurrency is None or self.max_concurrency >= 1,
            f"max_concurrency must be >= 1, got {self.max_concurrency}",
        )
        _check(self.input_len >= 1, f"input_len must be >= 1, got {self.input_len}")
        _check(self.output_len >= 1, f"output_len must be >= 1, got {self.output_len}")
        _check(self.timeout_s > 0, f"timeout must be > 0, got {self.timeout_s}")
        for name, value in self.goodput.items():
            _check(name in SLO_METRICS, f"goodput metric must be one of {', '.join(SLO_METRICS)}")
            _check(value >= 0, f"goodput SLO {name} must be >= 0 ms, got {value}")

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["request_rate"] = _rate_json(self.request_rate)
        return out


def base_url(url: str) -> str:
    """`http://host:port` from what a user may type (a trailing slash or /v1 is dropped)."""
    given = url
    url = url.strip().rstrip("/")
    if "://" not in url:
        url = "http://" + url  # host:port, as one types it
    if url.endswith("/v1"):
        url = url[: -len("/v1")]
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in ("http", "https") or not rest:
        raise ValueError(f"--url must be an http:// or https:// address, got {given!r}")
    return url


def parse_goodput(items: Sequence[str]) -> dict[str, float]:
    """["ttft:500", "tpot:50"] -> {"ttft": 500.0, "tpot": 50.0} (milliseconds)."""
    slos: dict[str, float] = {}
    for item in items:
        name, sep, value = item.partition(":")
        name = name.strip().lower()
        if not sep or name not in SLO_METRICS:
            raise ValueError(
                f"goodput SLO {item!r}: expected METRIC:MS with METRIC one of "
                f"{', '.join(SLO_METRICS)} (e.g. ttft:500)"
            )
        try:
            ms = float(value)
        except ValueError:
            raise ValueError(f"goodput SLO {item!r}: {value!r} is not a number of ms") from None
        if not ms >= 0 or math.isinf(ms):
            raise ValueError(f"goodput SLO {item!r}: must be a finite number of ms >= 0")
        slos[name] = ms
    return slos


# --- prompts ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class BenchPrompt:
    text: str | None  # a file's line, or synthetic ids decoded (chat)
    token_ids: list[int] | None  # synthetic ids (completions)

    @property
    def known_len(self) -> int | None:
        return len(self.token_ids) if self.token_ids is not None else None


def build_prompts(config: OnlineBenchConfig, model: str, count: int) -> list[BenchPrompt]:
    if config.prompts_file is not None:
        lines = read_prompt_lines(config.prompts_file)
        return [BenchPrompt(lines[i % len(lines)], None) for i in range(count)]
    import torch

    from bench.offline import synthetic_prompts

    tokenizer = _load_tokenizer(config.tokenizer or model)
    special = set(tokenizer.all_special_ids or [])
    if tokenizer.eos_token_id is not None:
        special.add(tokenizer.eos_token_id)
    generator = torch.Generator().manual_seed(config.seed)
    ids = synthetic_prompts(len(tokenizer), special, count, config.input_len, generator)
    if config.endpoint == "chat":
        return [BenchPrompt(tokenizer.decode(p), None) for p in ids]
    return [BenchPrompt(None, p) for p in ids]


def _load_tokenizer(name: str) -> Any:
    from engine.model.loader import load_tokenizer

    try:
        return load_tokenizer(name)
    except Exception as err:  # not found, no tokenizer files, offline Hub: all one message
        raise OnlineBenchError(
            f"synthetic prompts need the served model's tokenizer, and {name!r} has none here "
            f"({_one_line(err)}); pass --tokenizer NAME_OR_DIR, or --prompts FILE"
        ) from None


# --- one request ------------------------------------------------------------------------------


@dataclass
class RequestResult:
    ok: bool = False
    error: str | None = None
    prompt_len: int | None = None
    output_len: int = 0
    start_s: float = 0.0  # since the benchmark's start, when the request was sent
    ttft_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    e2e_s: float | None = None
    usage_reported: bool = False

    @property
    def tpot_s(self) -> float | None:
        if self.ttft_s is None or self.e2e_s is None or self.output_len < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_len - 1)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["tpot_s"] = self.tpot_s
        return out


def _payload(config: OnlineBenchConfig, model: str, prompt: BenchPrompt) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": model,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if config.endpoint == "chat":
        body["messages"] = [{"role": "user", "content": prompt.text}]
        body["max_completion_tokens"] = config.output_len
    else:
        body["prompt"] = prompt.token_ids if prompt.token_ids is not None else prompt.text
        body["max_tokens"] = config.output_len
    if config.ignore_eos:
        body["ignore_eos"] = True
    return body


def _content(chunk: dict[str, Any], endpoint: str) -> str:
    text = ""
    for choice in chunk.get("choices") or []:
        if endpoint == "chat":
            text += (choice.get("delta") or {}).get("content") or ""
        else:
            text += choice.get("text") or ""
    return text


async def send_request(
    client: httpx.AsyncClient,
    config: OnlineBenchConfig,
    model: str,
    prompt: BenchPrompt,
    t0: float,
) -> RequestResult:
    """One streamed request, timed; never raises (a failure is a result with `error`)."""
    path = "/v1/chat/completions" if config.endpoint == "chat" else "/v1/completions"
    result = RequestResult(prompt_len=prompt.known_len)
    start = time.perf_counter()
    result.start_s = start - t0
    chunks = 0
    last = start
    done = False
    try:
        async with client.stream("POST", path, json=_payload(config, model, prompt)) as response:
            if response.status_code != 200:
                await response.aread()
                result.error = f"HTTP {response.status_code}: {_error_message(response)}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue  # blank separators, comments, event names
                data = line[len("data:") :].strip()
                if data == "[DONE]":
                    done = True
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    error = chunk["error"]
                    message = error.get("message") if isinstance(error, dict) else error
                    result.error = f"error event: {_one_line(message)}"
                    return result
                now = time.perf_counter()
                if _content(chunk, config.endpoint):
                    if result.ttft_s is None:
                        result.ttft_s = now - start
                    else:
                        result.itl_s.append(now - last)
                    last = now
                    chunks += 1
                usage = chunk.get("usage")
                if usage:
                    result.usage_reported = True
                    result.output_len = int(usage.get("completion_tokens") or 0)
                    if usage.get("prompt_tokens") is not None:
                        result.prompt_len = int(usage["prompt_tokens"])
    except httpx.TimeoutException:
        result.error = f"timed out (no byte for {config.timeout_s:g} s)"
        return result
    except httpx.HTTPError as err:
        result.error = f"{type(err).__name__}: {_one_line(err) or 'connection failed'}"
        return result
    except (ValueError, AttributeError, TypeError) as err:  # not JSON, or not the expected shape
        result.error = f"malformed stream: {_one_line(err)}"
        return result
    except Exception as err:  # whatever else goes wrong fails this request, not the run
        result.error = f"{type(err).__name__}: {_one_line(err)}"
        return result
    end = time.perf_counter()
    if not done:
        result.error = "the stream ended before [DONE]"
        return result
    result.e2e_s = end - start
    if result.ttft_s is None:  # no content at all (an immediate EOS): the end is the first token
        result.ttft_s = result.e2e_s
    if not result.usage_reported:
        result.output_len = chunks
    result.ok = True
    return result


def _error_message(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return _one_line(response.text)[:200] or response.reason_phrase
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict) and error.get("message"):
        return _one_line(error["message"])
    if isinstance(error, str):
        return _one_line(error)
    if isinstance(body, dict) and body.get("detail"):
        return _one_line(body["detail"])
    return _one_line(response.text)[:200]


# --- the load ---------------------------------------------------------------------------------


def arrival_times(count: int, rate: float, seed: int) -> list[float]:
    """When each request is due (s since the start): a Poisson process of `rate` per second."""
    if math.isinf(rate):
        return [0.0] * count
    gaps = np.random.default_rng(seed).exponential(1.0 / rate, size=count)
    gaps[0] = 0.0  # the first request goes at once
    return np.cumsum(gaps).tolist()


class _Load:
    """The requests in flight, and the most there ever were."""

    def __init__(self) -> None:
        self.in_flight = 0
        self.peak = 0

    @contextlib.contextmanager
    def one(self) -> Any:
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        try:
            yield
        finally:
            self.in_flight -= 1


async def run_load(
    client: httpx.AsyncClient, config: OnlineBenchConfig, model: str, prompts: list[BenchPrompt]
) -> tuple[list[RequestResult], float, int]:
    """Send `prompts` at their arrival times under the concurrency limit; (results in prompt
    order, duration in s, peak requests in flight)."""
    arrivals = arrival_times(len(prompts), config.request_rate, config.seed)
    slots = asyncio.Semaphore(config.max_concurrency) if config.max_concurrency else None
    load = _Load()
    t0 = time.perf_counter()

    async def one(prompt: BenchPrompt) -> RequestResult:
        if slots is None:
            with load.one():
                return await send_request(client, config, model, prompt, t0)
        async with slots:
            with load.one():
                return await send_request(client, config, model, prompt, t0)

    tasks = []
    for prompt, due in zip(prompts, arrivals, strict=True):
        delay = t0 + due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(prompt)))
    results = await asyncio.gather(*tasks)
    return list(results), time.perf_counter() - t0, load.peak


# --- the server -------------------------------------------------------------------------------


def _client(config: OnlineBenchConfig, api_key: str | None) -> httpx.AsyncClient:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    timeout = httpx.Timeout(config.timeout_s, connect=CONNECT_TIMEOUT_S, pool=None)
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    return httpx.AsyncClient(base_url=config.url, headers=headers, timeout=timeout, limits=limits)


async def discover(client: httpx.AsyncClient, config: OnlineBenchConfig) -> dict[str, Any]:
    """The served model (checked, or the first listed) and what the server says of itself."""
    url = config.url
    try:
        response = await client.get("/v1/models", timeout=CONNECT_TIMEOUT_S)
    except httpx.HTTPError as err:
        raise OnlineBenchError(
            f"cannot reach the server at {url} ({type(err).__name__}: "
            f"{_one_line(err) or 'no answer'}); is it running? ('workbench serve' starts one)"
        ) from None
    if response.status_code == 401:
        raise OnlineBenchError(
            f"the server at {url} refused the API key (HTTP 401): pass the right --api-key"
        )
    if response.status_code != 200:
        raise OnlineBenchError(
            f"GET {url}/v1/models answered HTTP {response.status_code} "
            f"({_error_message(response)}); is it an OpenAI-compatible server?"
        )
    try:
        cards = [card for card in response.json()["data"] if isinstance(card, dict)]
        names = [str(card["id"]) for card in cards]
    except (ValueError, KeyError, TypeError):
        raise OnlineBenchError(f"GET {url}/v1/models did not return a model list") from None
    if not names:
        raise OnlineBenchError(f"the server at {url} lists no model")
    model = config.model or names[0]
    if model not in names:
        raise OnlineBenchError(
            f"the server at {url} serves {', '.join(names)}, not {model!r}: pass --model"
        )
    card = cards[names.index(model)]
    info: dict[str, Any] = {"url": url, "model": model, "max_model_len": card.get("max_model_len")}
    info["engine"] = await _engine_info(client)
    return info


async def _engine_info(client: httpx.AsyncClient) -> dict[str, Any] | None:
    """A Workbench server's engine (device, dtype, KV cache); None from other servers."""
    try:
        response = await client.get("/v1/engine/state", timeout=CONNECT_TIMEOUT_S)
        state = response.json() if response.status_code == 200 else None
    except (httpx.HTTPError, ValueError):
        return None
    if not isinstance(state, dict):
        return None
    keys = ("model", "device", "dtype", "block_size", "kv_blocks_total")
    return {key: state.get(key) for key in keys}


# --- the whole benchmark ----------------------------------------------------------------------


def run_online_benchmark(
    config: OnlineBenchConfig, api_key: str | None = None, command: str = ""
) -> dict[str, Any]:
    """Run the benchmark and return the JSON-ready report (see the module's docstring)."""
    return asyncio.run(_run(config, api_key, command))


async def _run(config: OnlineBenchConfig, api_key: str | None, command: str) -> dict[str, Any]:
    load_before = load_average()
    async with _client(config, api_key) as client:
        server = await discover(client, config)
        model = server["model"]
        count = config.num_requests
        if count is None:
            count = (
                len(read_prompt_lines(config.prompts_file))
                if config.prompts_file
                else DEFAULT_NUM_REQUESTS
            )
        prompts = await asyncio.to_thread(build_prompts, config, model, count)
        results, duration, peak = await run_load(client, config, model, prompts)
    summary = summarize_online(results, duration, config.goodput)
    summary["peak_concurrency"] = peak
    bench = {**config.to_dict(), "model": model, "num_requests": count}
    return {
        "kind": "online",
        "command": command,
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "bench": bench,
        "server": server,
        "system": {
            "client": platform.node(),
            "platform": platform.platform(),
            "loadavg_before": load_before,
            "loadavg_after": load_average(),
        },
        "versions": {**versions(), "httpx": httpx.__version__},
        "results": summary,
        "requests": [r.to_dict() for r in results],
    }


def summarize_online(
    results: Sequence[RequestResult], duration_s: float, slos: dict[str, float] | None = None
) -> dict[str, Any]:
    """Totals over the duration, latency statistics in ms, goodput and the failures."""
    ok = [r for r in results if r.ok]
    failed = [r for r in results if not r.ok]
    input_tokens = sum(r.prompt_len or 0 for r in ok)
    output_tokens = sum(r.output_len for r in ok)
    duration = max(duration_s, 1e-9)
    slos = dict(slos or {})
    good = sum(_meets(r, slos) for r in ok) if slos else None
    errors = Counter(r.error or "unknown" for r in failed)
    return {
        "num_requests": len(results),
        "completed": len(ok),
        "failed": len(failed),
        "wall_s": duration_s,
        "total_input_tokens": input_tokens,
        "total_output_tokens": output_tokens,
        "request_throughput": len(ok) / duration,
        "output_tok_s": output_tokens / duration,
        "total_tok_s": (input_tokens + output_tokens) / duration,
        "ttft_ms": stats_ms([r.ttft_s for r in ok]),
        "tpot_ms": stats_ms([r.tpot_s for r in ok]),
        "itl_ms": stats_ms([gap for r in ok for gap in r.itl_s]),
        "e2e_ms": stats_ms([r.e2e_s for r in ok]),
        "goodput_slo_ms": slos or None,
        "good_requests": good,
        "goodput": good / duration if good is not None else None,
        "usage_reported": all(r.usage_reported for r in ok),
        "errors": dict(errors.most_common()),
    }


def _meets(result: RequestResult, slos: dict[str, float]) -> bool:
    values = {"ttft": result.ttft_s, "tpot": result.tpot_s, "e2e": result.e2e_s}
    for name, limit_ms in slos.items():
        value = values[name]
        if value is None:
            if name == "tpot":
                continue  # one token: no time per output token to hold against the SLO
            return False
        if value * 1e3 > limit_ms:
            return False
    return True


# --- output -----------------------------------------------------------------------------------


def format_online_report(report: dict[str, Any]) -> str:
    bench, server, res = report["bench"], report["server"], report["results"]
    endpoint = "/v1/chat/completions" if bench["endpoint"] == "chat" else "/v1/completions"
    if bench["prompts_file"]:
        shape = f"prompts from {bench['prompts_file']}"
    else:
        shape = f"ISL {bench['input_len']} (random ids)"
    rate = bench["request_rate"]
    rate_text = "all at once" if rate == "inf" else f"Poisson {rate:g}/s"
    limit = bench["max_concurrency"]
    lines = [
        f"Online benchmark of {server['model']} at {server['url']} ({endpoint}, streaming)",
        f"{res['num_requests']} requests, {shape}, OSL {bench['output_len']}"
        + (" (ignore_eos)" if bench["ignore_eos"] else "")
        + f", arrivals {rate_text}, max concurrency {limit or 'unlimited'}",
    ]
    engine = server.get("engine")
    if engine:
        lines.append(
            f"server engine: {engine.get('model')} on {engine.get('device')} "
            f"{engine.get('dtype')}, {engine.get('kv_blocks_total')} KV blocks of "
            f"{engine.get('block_size')} tokens"
        )
    lines += [
        "",
        f"  successful requests {res['completed']:10d}   failed {res['failed']}",
        f"  duration            {res['wall_s']:10.2f} s   peak concurrency "
        f"{res.get('peak_concurrency', '-')}",
        f"  requests/s          {res['request_throughput']:10.2f}",
        f"  output tokens/s     {res['output_tok_s']:10.1f}   "
        f"({res['total_output_tokens']} tokens)",
        f"  total tokens/s      {res['total_tok_s']:10.1f}   "
        f"({res['total_input_tokens']} prompt tokens)",
    ]
    if res["goodput"] is not None:
        slo = ", ".join(f"{k.upper()} <= {v:g} ms" for k, v in res["goodput_slo_ms"].items())
        lines.append(
            f"  goodput             {res['goodput']:10.2f} req/s   "
            f"({res['good_requests']}/{res['completed']} within {slo})"
        )
    lines += ["", f"  {'ms':<6}{'mean':>10}{'p50':>10}{'p90':>10}{'p99':>10}"]
    for label, key in (("TTFT", "ttft_ms"), ("TPOT", "tpot_ms"), ("ITL", "itl_ms")):
        lines.append(_stats_line(label, res[key]))
    lines.append(_stats_line("E2E", res["e2e_ms"]))
    if not res["usage_reported"] and res["completed"]:
        lines.append("  note: the server sent no usage; output tokens are content chunks")
    if res["errors"]:
        lines += ["", "  errors:"]
        for message, count in list(res["errors"].items())[:MAX_ERRORS_SHOWN]:
            lines.append(f"  {count:5d} × {message[:160]}")
        if len(res["errors"]) > MAX_ERRORS_SHOWN:
            lines.append(f"        … and {len(res['errors']) - MAX_ERRORS_SHOWN} other messages")
    return "\n".join(lines)


def _stats_line(label: str, stats: dict[str, float | None]) -> str:
    cells = "".join(f"{v:10.2f}" if v is not None else f"{'-':>10}" for v in stats.values())
    return f"  {label:<6}{cells}"


def _rate_json(rate: float) -> float | str:
    return "inf" if math.isinf(rate) else rate


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)
