"""Prometheus metrics. Engine gauges and counters are read from the latest `EngineState` snapshot
at scrape time (never from the live engine); latency histograms are observed by the server as
each request finishes. Each app has its own registry, so several servers can share a process."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from engine.outputs import RequestOutput
from engine.server.expert_metrics import expert_load_metrics
from engine.state import EngineState

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
PREFIX = "workbench_"

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5)


class _StateCollector(Collector):
    def __init__(self, state: Callable[[], EngineState], model_name: str) -> None:
        self._state = state
        self._model = model_name

    def collect(self) -> Iterator[Metric]:
        s = self._state()
        labels = ["model_name"]
        values = [self._model]

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            metric = GaugeMetricFamily(PREFIX + name, doc, labels=labels)
            metric.add_metric(values, value)
            return metric

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            metric = CounterMetricFamily(PREFIX + name, doc, labels=labels)
            metric.add_metric(values, value)
            return metric

        yield gauge("kv_cache_usage_ratio", "Fraction of KV blocks held by requests.", s.kv_usage)
        blocks = GaugeMetricFamily(
            PREFIX + "kv_blocks", "KV blocks by state.", labels=[*labels, "state"]
        )
        blocks.add_metric([*values, "used"], s.kv_blocks_used)
        blocks.add_metric([*values, "cached_free"], s.kv_blocks_cached_free)
        blocks.add_metric([*values, "free"], s.kv_blocks_free)
        yield blocks
        yield gauge("kv_blocks_total", "KV blocks in the pool.", s.kv_blocks_total)
        yield gauge(
            "prefix_cache_hit_rate",
            "Prompt tokens served from the prefix cache, as a fraction.",
            s.prefix_cache_hit_rate,
        )
        yield gauge("num_requests_running", "Requests in the running batch.", len(s.running))
        yield gauge("num_requests_waiting", "Requests waiting to start.", len(s.waiting))
        yield gauge(
            "num_requests_preempted", "Requests preempted, waiting to resume.", len(s.preempted)
        )
        yield gauge(
            "prompt_throughput_tokens_per_second",
            "Prefill tokens/s, last seconds.",
            s.prompt_throughput,
        )
        yield gauge(
            "generation_throughput_tokens_per_second",
            "Generated tokens/s, last seconds.",
            s.generation_throughput,
        )
        yield gauge("device_memory_used_bytes", "Device memory in use.", s.device_memory_used)
        yield counter("prompt_tokens", "Prefill tokens computed.", s.total_prompt_tokens)
        yield counter("generation_tokens", "Tokens generated.", s.total_generated_tokens)
        yield counter("preemptions", "Requests preempted.", s.num_preemptions)
        yield counter("engine_steps", "Engine steps run.", s.step)
        yield from _tier_metrics(s, labels, values)
        if s.spec_acceptance_rate is not None:
            yield gauge(
                "spec_decode_acceptance_rate",
                "Fraction of draft tokens accepted.",
                s.spec_acceptance_rate,
            )
        if s.spec_mean_accepted is not None:
            yield gauge(
                "spec_decode_mean_accepted_tokens",
                "Draft tokens accepted per verify.",
                s.spec_mean_accepted,
            )
        if s.expert_load is not None:
            yield from expert_load_metrics(s.expert_load, PREFIX, labels, values)


def _tier_metrics(s: EngineState, labels: list[str], values: list[str]) -> Iterator[Metric]:
    """The KV tiers' blocks, hits and traffic, labelled by tier (host, disk)."""
    if not s.kv_tiers:
        return
    tier_labels = [*labels, "tier"]
    blocks = GaugeMetricFamily(
        PREFIX + "kv_tier_blocks", "KV tier blocks by state.", labels=[*tier_labels, "state"]
    )
    hits = CounterMetricFamily(
        PREFIX + "kv_tier_hits", "Blocks restored from the tier.", labels=tier_labels
    )
    moved = CounterMetricFamily(
        PREFIX + "kv_tier_bytes", "Bytes into and out of the tier.", labels=[*tier_labels, "way"]
    )
    rate = GaugeMetricFamily(
        PREFIX + "kv_tier_bytes_per_second", "Bytes moved, last seconds.", labels=tier_labels
    )
    for t in s.kv_tiers:
        blocks.add_metric([*values, t.name, "used"], t.blocks_used)
        blocks.add_metric([*values, t.name, "capacity"], t.blocks_capacity)
        hits.add_metric([*values, t.name], t.hits)
        moved.add_metric([*values, t.name, "in"], t.bytes_in)
        moved.add_metric([*values, t.name, "out"], t.bytes_out)
        rate.add_metric([*values, t.name], t.bytes_per_s)
    yield from (blocks, hits, moved, rate)


class ServerMetrics:
    def __init__(self, state: Callable[[], EngineState], model_name: str) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_StateCollector(state, model_name))
        self._model = model_name
        kw = {"labelnames": ["model_name"], "registry": self.registry}
        self.ttft = Histogram(
            PREFIX + "time_to_first_token_seconds",
            "Time to first token.",
            buckets=_LATENCY_BUCKETS,
            **kw,
        )
        self.tpot = Histogram(
            PREFIX + "time_per_output_token_seconds",
            "Mean time per output token after the first.",
            buckets=_TOKEN_BUCKETS,
            **kw,
        )
        self.e2e = Histogram(
            PREFIX + "e2e_request_latency_seconds",
            "Arrival to finish.",
            buckets=_LATENCY_BUCKETS,
            **kw,
        )
        self.finished = Counter(
            PREFIX + "request_success",
            "Finished requests by finish reason.",
            labelnames=["model_name", "finish_reason"],
            registry=self.registry,
        )
        self.prompt_tokens = Counter(
            PREFIX + "request_prompt_tokens", "Prompt tokens of finished requests.", **kw
        )
        self.completion_tokens = Counter(
            PREFIX + "request_generation_tokens", "Tokens generated by finished requests.", **kw
        )
        self.rejected = Counter(
            PREFIX + "request_rejected", "Requests refused because the queue was full.", **kw
        )
        self.aborted = Counter(
            PREFIX + "request_aborted",
            "Engine requests aborted before they finished (client gone, server shutting down, "
            "/v1/engine/abort).",
            **kw,
        )
        self.responses = Counter(
            PREFIX + "http_responses",
            "HTTP responses by status class (2xx, 4xx, 5xx; 499: the client went away).",
            labelnames=["model_name", "status_class"],
            registry=self.registry,
        )

    def observe(self, out: RequestOutput, arrival: float | None = None) -> None:
        """Record one finished request. `arrival`: time.monotonic() when its HTTP request reached
        the server (latencies count the time before the engine saw it: tokenizing, queueing);
        None: the engine's own arrival time."""
        m = out.metrics
        self.finished.labels(self._model, out.finish_reason or "unknown").inc()
        self.prompt_tokens.labels(self._model).inc(len(out.prompt_token_ids))
        self.completion_tokens.labels(self._model).inc(len(out.token_ids))
        if m is None:
            return
        start = m.arrival_time if arrival is None else min(arrival, m.arrival_time)
        if m.first_token_time is not None:
            self.ttft.labels(self._model).observe(m.first_token_time - start)
            if m.last_token_time is not None and len(out.token_ids) > 1:
                per_token = (m.last_token_time - m.first_token_time) / (len(out.token_ids) - 1)
                self.tpot.labels(self._model).observe(per_token)
        if m.finish_time is not None:
            self.e2e.labels(self._model).observe(m.finish_time - start)

    def rejected_one(self) -> None:
        self.rejected.labels(self._model).inc()

    def aborted_one(self) -> None:
        self.aborted.labels(self._model).inc()

    def responded(self, status: int) -> None:
        self.responses.labels(self._model, f"{status // 100}xx").inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
