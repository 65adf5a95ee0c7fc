"""Prometheus families of a MoE model's expert load (`EngineState.expert_load`)."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from engine.state import ExpertLoad


def expert_load_metrics(
    load: ExpertLoad, prefix: str, labels: list[str], values: list[str]
) -> Iterator[Metric]:
    """A counter per (sparse layer, expert) of the pairs routed to it, and per layer a gauge of
    how uneven the routing was since the previous snapshot."""
    tokens = CounterMetricFamily(
        prefix + "moe_expert_tokens",
        "(token, expert) pairs routed to each expert of each sparse layer.",
        labels=[*labels, "layer", "expert"],
    )
    imbalance = GaugeMetricFamily(
        prefix + "moe_expert_load_imbalance",
        "Busiest expert's share of a sparse layer's recent pairs over the even share (1: even).",
        labels=[*labels, "layer"],
    )
    for layer, total, recent in zip(load.layers, load.total, load.recent, strict=True):
        for expert, count in enumerate(total):
            tokens.add_metric([*values, str(layer), str(expert)], count)
        routed = sum(recent)
        imbalance.add_metric(
            [*values, str(layer)], max(recent) * len(recent) / routed if routed else 0.0
        )
    yield tokens
    yield imbalance
