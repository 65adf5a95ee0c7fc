"""Speculative decoding benchmark: the same greedy requests with and without speculation, in one
run, on one engine configuration.

Both runs use `bench.offline`'s loop (`run_requests`) on the same prompts. Reported: output tok/s
and TPOT of each, the speedup (speculative over plain output tok/s), the acceptance rate (accepted
draft tokens / proposed), the mean tokens per verifying step (accepted + the corrected or bonus
token), the time spent drafting and verifying, and whether every request produced the same tokens
(greedy speculation is lossless, so anything else is a bug).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import gc
from dataclasses import replace
from typing import Any

import torch

from bench.offline import (
    BenchConfig,
    make_prompts,
    run_requests,
    summarize,
    system_info,
    versions,
)
from engine.config import EngineConfig


def run_speculative_benchmark(
    engine_config: EngineConfig, config: BenchConfig, speculative: dict[str, Any], command: str = ""
) -> dict[str, Any]:
    from engine.core import EngineCore

    runs: dict[str, dict[str, Any]] = {}
    outputs: dict[str, list[list[int]]] = {}
    prompts: list[list[int]] | None = None
    warmup: list[list[int]] = []
    for name, spec in (("plain", None), ("speculative", speculative)):
        core = EngineCore(replace(engine_config, speculative=spec))
        if prompts is None:
            generator = torch.Generator().manual_seed(config.seed)
            count = config.num_requests or 8
            prompts = make_prompts(core, config, count, generator)
            warmup = make_prompts(core, config, config.warmup, generator) if config.warmup else []
        concurrency = min(config.concurrency or len(prompts), len(prompts))
        if warmup:
            run_requests(core, warmup, config.output_len, min(concurrency, len(warmup)))
        core.speculator.reset_stats()  # count the measured requests only
        run = run_requests(core, prompts, config.output_len, concurrency)
        result = summarize(run.records, run.wall_s)
        result["num_steps"] = run.num_steps
        if core.speculator.enabled:
            stats = core.speculator.stats
            result["spec"] = {
                **dataclasses.asdict(stats),
                "acceptance_rate": stats.acceptance_rate,
                "mean_tokens_per_verify": stats.mean_accepted,
            }
        runs[name] = result
        outputs[name] = run.output_token_ids
        device = core.device
        del core
        gc.collect()
    same = sum(a == b for a, b in zip(outputs["plain"], outputs["speculative"], strict=True))
    return {
        "command": command,
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "bench": dataclasses.asdict(config),
        "speculative": speculative,
        "engine_config": dataclasses.asdict(engine_config),
        "system": system_info(device),
        "versions": versions(),
        "plain": runs["plain"],
        "results": runs["speculative"],
        "speedup": runs["speculative"]["output_tok_s"] / runs["plain"]["output_tok_s"],
        "same_tokens": same,
        "num_requests": len(outputs["plain"]),
    }


def format_speculative_report(report: dict[str, Any]) -> str:
    plain, spec = report["plain"], report["results"]
    s = spec["spec"]
    lines = [
        f"speculative decoding: {report['speculative']}",
        f"  requests {report['num_requests']}, concurrency {report['bench']['concurrency']}, "
        f"output {report['bench']['output_len']} tokens each",
        f"  plain        output tok/s {plain['output_tok_s']:9.1f}   "
        f"TPOT p50 {plain['tpot_ms']['p50']:8.2f} ms",
        f"  speculative  output tok/s {spec['output_tok_s']:9.1f}   "
        f"TPOT p50 {spec['tpot_ms']['p50']:8.2f} ms",
        f"  speedup {report['speedup']:.2f}x   acceptance {s['acceptance_rate']:.1%}   "
        f"tokens per verify step {s['mean_tokens_per_verify']:.2f}",
        f"  draft time {s['draft_time_s']:.2f} s, verify steps {s['verify_time_s']:.2f} s",
        f"  same greedy tokens {report['same_tokens']}/{report['num_requests']}",
    ]
    return "\n".join(lines)
