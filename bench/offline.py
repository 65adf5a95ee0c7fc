"""Offline benchmark: a fixed set of requests through the engine, at a fixed concurrency.

Method
------
Prompts: `num_requests` synthetic prompts of exactly `input_len` token ids drawn uniformly from the
vocabulary (special tokens left out) by a `torch.Generator` seeded with `seed`, so two runs with the
same arguments send the same tokens and no two prompts share a cached prefix; or the lines of a
text file (one prompt per line, tokenized by the model's tokenizer, cycled if fewer than
`num_requests`). Every request is greedy with ignore_eos and max_tokens = `output_len`, so each one
emits exactly `output_len` tokens whatever the weights say.

Load: the benchmark drives `EngineCore` itself, with no thread or queue between it and the engine:
it keeps at most `concurrency` requests in flight, adding a new one (`add_request`) as soon as a
`step` reports one finished, so the engine sees a closed loop of `concurrency` users with zero
think time. `warmup` extra requests (other prompts of the same shape) run first, unmeasured.

Per request, from the engine's own timestamps (`time.monotonic`): arrival = the `add_request`
call; TTFT = first token - arrival (queueing, prefill and the first sample); TPOT = (finish - first
token) / (n - 1), the mean gap between later tokens; E2E = finish - arrival. Reported as mean, p50,
p90 and p99 (linear interpolation between order statistics) in milliseconds.

Totals, over the wall time from the first `add_request` to the last request's finish: output
tokens/s (generated tokens / wall), total tokens/s ((prompt + generated tokens) / wall) and
requests/s.

Peer (`compare="hf"`, see `bench.hf`): transformers `generate` on the same weights, dtype,
device and prompts, `concurrency` prompts per batch, left-padded, greedy, exactly `output_len` new
tokens each; its output tokens/s is the sum of generated tokens over the summed `generate` wall
time, and the ratio is ours over it. It also counts how many requests produced the same tokens as
ours (up to the first EOS we ignored, where the two decoders legitimately part).

Everything, with the EngineConfig, versions, device name, date and command line, goes into one
JSON report (`write_report`); `format_report` renders the table the CLI prints.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import gc
import json
import os
import platform
import sys
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from engine.config import EngineConfig, SamplingParams
from engine.model.builder import parameter_bytes
from engine.model.moe_model import idle_expert_bytes
from engine.model.presets import num_active_parameters

__all__ = [
    "BenchConfig",
    "RequestRecord",
    "device_name",
    "format_report",
    "make_prompts",
    "run_benchmark",
    "read_prompt_lines",
    "run_requests",
    "stats_ms",
    "summarize",
    "synthetic_prompts",
    "write_report",
]

DEFAULT_NUM_REQUESTS = 32


@dataclass
class BenchConfig:
    num_requests: int | None = None  # default: 32 synthetic, or one per line of `prompts_file`
    input_len: int = 128
    output_len: int = 128
    concurrency: int | None = None  # None: every request at once
    warmup: int = 0
    seed: int = 0
    prompts_file: str | None = None
    compare: str | None = None  # None | "hf"
    threads: int | None = None  # torch intra-op threads for both runs; None: torch's default

    def __post_init__(self) -> None:
        _check(
            self.num_requests is None or self.num_requests >= 1,
            f"num_requests must be >= 1, got {self.num_requests}",
        )
        _check(self.input_len >= 1, f"input_len must be >= 1, got {self.input_len}")
        _check(self.output_len >= 1, f"output_len must be >= 1, got {self.output_len}")
        _check(
            self.concurrency is None or self.concurrency >= 1,
            f"concurrency must be >= 1, got {self.concurrency}",
        )
        _check(self.warmup >= 0, f"warmup must be >= 0, got {self.warmup}")
        _check(
            self.threads is None or self.threads >= 1,
            f"threads must be >= 1, got {self.threads}",
        )
        _check(self.compare in (None, "hf"), f"compare must be None or 'hf', got {self.compare!r}")


class RequestRecord(NamedTuple):
    prompt_len: int
    output_len: int
    arrival_s: float  # since the benchmark's start: when a slot freed and it was added
    ttft_s: float
    tpot_s: float | None  # None with a single output token
    e2e_s: float


class RunResult(NamedTuple):
    records: list[RequestRecord]
    output_token_ids: list[list[int]]  # per prompt, in prompt order
    wall_s: float
    num_steps: int
    num_preemptions: int


# --- prompts ----------------------------------------------------------------------------------


def make_prompts(
    core: Any, config: BenchConfig, count: int, generator: torch.Generator
) -> list[list[int]]:
    """`count` prompts as token ids: lines of `config.prompts_file` (cycled), or synthetic."""
    if config.prompts_file is not None:
        lines = read_prompt_lines(config.prompts_file)
        return [core.encode_prompt(lines[i % len(lines)])[1] for i in range(count)]
    special = set(getattr(core.tokenizer, "all_special_ids", None) or []) | set(core.eos_token_ids)
    return synthetic_prompts(core.vocab_size, special, count, config.input_len, generator)


def synthetic_prompts(
    vocab_size: int,
    special_ids: set[int],
    count: int,
    input_len: int,
    generator: torch.Generator,
) -> list[list[int]]:
    """`count` prompts of `input_len` ids drawn uniformly from the vocabulary without the special
    tokens (the online benchmark draws the same ones for the same seed and tokenizer)."""
    allowed = torch.tensor([t for t in range(vocab_size) if t not in special_ids])
    picks = torch.randint(0, len(allowed), (count, input_len), generator=generator)
    return allowed[picks].tolist()


def read_prompt_lines(path: str) -> list[str]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as err:
        raise ValueError(f"cannot read prompts file {path}: {err.strerror or err}") from None
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"prompts file {path} has no non-empty line")
    return lines


# --- the measured loop ------------------------------------------------------------------------


def run_requests(
    core: Any, prompts: Sequence[list[int]], output_len: int, concurrency: int
) -> RunResult:
    """Run `prompts` through `core` with at most `concurrency` in flight; every request must end
    with exactly `output_len` tokens."""
    # Only finished outputs are read, as trtllm-bench reads them: no per-step text.
    params = SamplingParams(
        max_tokens=output_len, temperature=0.0, ignore_eos=True, output_kind="final"
    )
    waiting = deque(enumerate(prompts))
    in_flight: dict[str, int] = {}
    finished: list[Any] = [None] * len(prompts)
    first_step = core.step_index
    start = time.monotonic()
    while waiting or in_flight:
        while waiting and len(in_flight) < concurrency:
            index, prompt = waiting.popleft()
            in_flight[core.add_request(prompt, params).request_id] = index
        if not core.has_unfinished():
            raise RuntimeError(f"the engine went idle with {len(in_flight)} requests in flight")
        for out in core.step():
            if out.finished and out.request_id in in_flight:
                finished[in_flight.pop(out.request_id)] = out
    wall = time.monotonic() - start

    records: list[RequestRecord] = []
    for out in finished:
        m = out.metrics
        n = len(out.token_ids)
        if out.finish_reason != "length" or n != output_len:
            raise RuntimeError(
                f"request {out.request_id} ended with {n} tokens ({out.finish_reason}"
                f"{': ' + out.error if out.error else ''}), expected {output_len}"
            )
        records.append(
            RequestRecord(
                prompt_len=len(out.prompt_token_ids),
                output_len=n,
                arrival_s=m.arrival_time - start,
                ttft_s=m.first_token_time - m.arrival_time,
                tpot_s=(m.finish_time - m.first_token_time) / (n - 1) if n > 1 else None,
                e2e_s=m.finish_time - m.arrival_time,
            )
        )
    return RunResult(
        records=records,
        output_token_ids=[list(out.token_ids) for out in finished],
        wall_s=wall,
        num_steps=core.step_index - first_step,
        num_preemptions=sum(out.metrics.num_preemptions for out in finished),
    )


def stats_ms(values_s: Sequence[float | None]) -> dict[str, float | None]:
    values = np.array([v for v in values_s if v is not None], dtype=np.float64) * 1e3
    if values.size == 0:
        return {"mean": None, "p50": None, "p90": None, "p99": None}
    p50, p90, p99 = np.percentile(values, [50, 90, 99])
    return {"mean": float(values.mean()), "p50": float(p50), "p90": float(p90), "p99": float(p99)}


def summarize(records: Sequence[RequestRecord], wall_s: float) -> dict[str, Any]:
    """Totals over the wall time and latency statistics in ms."""
    input_tokens = sum(r.prompt_len for r in records)
    output_tokens = sum(r.output_len for r in records)
    return {
        "num_requests": len(records),
        "wall_s": wall_s,
        "total_input_tokens": input_tokens,
        "total_output_tokens": output_tokens,
        "request_throughput": len(records) / wall_s,
        "output_tok_s": output_tokens / wall_s,
        "total_tok_s": (input_tokens + output_tokens) / wall_s,
        "ttft_ms": stats_ms([r.ttft_s for r in records]),
        "tpot_ms": stats_ms([r.tpot_s for r in records]),
        "e2e_ms": stats_ms([r.e2e_s for r in records]),
    }


# --- the whole benchmark ----------------------------------------------------------------------


def run_benchmark(
    engine_config: EngineConfig, config: BenchConfig, command: str = ""
) -> dict[str, Any]:
    """Build the engine, run the benchmark (and its peer) and return the JSON-ready report."""
    threads = torch.get_num_threads()
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    try:
        return _run_benchmark(engine_config, config, command)
    finally:
        torch.set_num_threads(threads)


def _run_benchmark(
    engine_config: EngineConfig, config: BenchConfig, command: str
) -> dict[str, Any]:
    from engine.core import EngineCore

    load_before = load_average()
    started = time.perf_counter()
    core = EngineCore(engine_config)  # load, KV sizing, CUDA graph capture
    startup_s = time.perf_counter() - started
    if config.compare == "hf" and getattr(core.model, "quant", None) is not None:
        raise ValueError(
            "--compare hf runs transformers on the engine's own weights, and these are quantized "
            f"({core.model.quant.algo}); compare against the unquantized model's run instead"
        )
    num_requests = config.num_requests
    if num_requests is None:
        num_requests = (
            len(read_prompt_lines(config.prompts_file))
            if config.prompts_file
            else DEFAULT_NUM_REQUESTS
        )
    concurrency = min(config.concurrency or num_requests, num_requests)
    generator = torch.Generator().manual_seed(config.seed)
    prompts = make_prompts(core, config, num_requests, generator)
    warmup = make_prompts(core, config, config.warmup, generator) if config.warmup else []
    longest = max(len(p) for p in prompts + warmup)
    if longest + config.output_len > core.max_model_len:
        raise ValueError(
            f"a prompt of {longest} tokens plus output_len {config.output_len} exceeds the "
            f"engine's max_model_len {core.max_model_len}"
        )

    if warmup:
        run_requests(core, warmup, config.output_len, min(concurrency, len(warmup)))
    run = run_requests(core, prompts, config.output_len, concurrency)
    results = summarize(run.records, run.wall_s)
    results["num_steps"] = run.num_steps
    results["num_preemptions"] = run.num_preemptions

    report: dict[str, Any] = {
        "command": command,
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "bench": {**dataclasses.asdict(config), "num_requests": num_requests},
        "concurrency": concurrency,
        "engine_config": dataclasses.asdict(engine_config),
        "engine": {
            "model": core.model_name,
            "device": str(core.device),
            "dtype": str(core.dtype).removeprefix("torch."),
            "num_kv_blocks": core.kv.pool.num_blocks,
            "block_size": engine_config.block_size,
            "max_model_len": core.max_model_len,
            "max_num_seqs": engine_config.max_num_seqs,
            "max_num_tokens": engine_config.max_num_tokens,
            "weight_bytes": parameter_bytes(core.model),
            "active_parameters": num_active_parameters(core.model.config),  # MoE: per token
            # What a batch-1 decode step reads: a MoE's routed experts only (its roofline).
            "active_weight_bytes": parameter_bytes(core.model) - idle_expert_bytes(core.model),
            "startup_s": startup_s,
        },
        "system": {**system_info(core.device), "loadavg_before": load_before},
        "versions": versions(),
        "results": results,
        "requests": [r._asdict() for r in run.records],
        "peer": None,
    }
    if config.compare == "hf":
        report["peer"] = _run_hf_peer(core, engine_config, prompts, warmup, config, run)
        del core
        gc.collect()
    report["system"]["loadavg_after"] = load_average()
    return report


def _run_hf_peer(
    core: Any,
    engine_config: EngineConfig,
    prompts: list[list[int]],
    warmup: list[list[int]],
    config: BenchConfig,
    ours: RunResult,
) -> dict[str, Any]:
    from bench.hf import build_hf_model, hf_generate

    concurrency = min(config.concurrency or len(prompts), len(prompts))
    # The engine's KV cache is no longer needed; on a GPU it holds most of the free memory.
    core.kv_cache = None
    core.runner = None
    gc.collect()
    if core.device.type == "cuda":
        torch.cuda.empty_cache()
    hf_model = build_hf_model(engine_config, core.model, core.device, core.dtype)
    tokenizer = core.tokenizer
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        pad = core.eos_token_ids[0] if core.eos_token_ids else 0
    eos = list(core.eos_token_ids)
    if warmup:
        hf_generate(hf_model, warmup[:concurrency], config.output_len, concurrency, pad, eos)
    hf = hf_generate(hf_model, prompts, config.output_len, concurrency, pad, eos)
    output_tokens = sum(len(t) for t in hf.output_token_ids)
    input_tokens = sum(len(p) for p in prompts)
    ours_tok_s = sum(r.output_len for r in ours.records) / ours.wall_s
    hf_tok_s = output_tokens / hf.wall_s
    agree = sum(
        _same_until_eos(a, b, core.eos_token_ids)
        for a, b in zip(ours.output_token_ids, hf.output_token_ids, strict=True)
    )
    return {
        "name": "hf",
        "method": "transformers generate, greedy, left padding, min_new_tokens=max_new_tokens",
        "batch_size": concurrency,
        "num_batches": hf.num_batches,
        "wall_s": hf.wall_s,
        "total_output_tokens": output_tokens,
        "output_tok_s": hf_tok_s,
        "total_tok_s": (input_tokens + output_tokens) / hf.wall_s,
        "request_throughput": len(prompts) / hf.wall_s,
        "ratio": ours_tok_s / hf_tok_s,  # ours over HF, output tokens/s
        "same_tokens": agree,  # requests whose greedy tokens equal ours (up to a skipped EOS)
    }


def _same_until_eos(ours: list[int], theirs: list[int], eos_ids: Sequence[int]) -> bool:
    """Ours ignores EOS and keeps going from it; HF suppresses EOS and picks the runner-up, so
    the two may only be compared up to the first EOS we emitted."""
    cut = next((i for i, t in enumerate(ours) if t in eos_ids), len(ours))
    return ours[:cut] == theirs[:cut]


# --- environment ------------------------------------------------------------------------------


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def system_info(device: torch.device) -> dict[str, Any]:
    return {
        "device_name": device_name(device),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
    }


def load_average() -> list[float] | None:
    """1, 5 and 15 minute load averages: on a shared host, the neighbours' share of the CPU."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    import transformers

    try:
        ours = version("llm-workbench")
    except PackageNotFoundError:
        ours = None
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "workbench": ours,
    }


# --- output -----------------------------------------------------------------------------------


def default_report_path(now: dt.datetime | None = None) -> Path:
    now = now or dt.datetime.now()
    return Path.cwd() / f"bench-{now.strftime('%Y%m%d-%H%M%S')}.json"


def write_report(report: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    path = Path(path)
    path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return path


def format_report(report: dict[str, Any]) -> str:
    bench, engine, res = report["bench"], report["engine"], report["results"]
    system = report["system"]
    if bench["prompts_file"]:
        shape = f"prompts from {bench['prompts_file']}"
    else:
        shape = f"ISL {bench['input_len']} (random ids)"
    load = system.get("loadavg_before")
    lines = [
        f"Model {engine['model']} on {engine['device']} ({system['device_name']}, "
        f"{system['torch_threads']} threads), {engine['dtype']}"
        + (f"; load average {load[0]:.2f} at start" if load else ""),
        f"{res['num_requests']} requests, {shape}, OSL {bench['output_len']}, "
        f"concurrency {report['concurrency']}, warmup {bench['warmup']}",
        "",
        f"  wall time          {res['wall_s']:10.2f} s",
        *(
            [f"  engine start-up    {engine['startup_s']:10.2f} s   (load, KV sizing, graphs)"]
            if "startup_s" in engine  # reports saved before it was measured lack it
            else []
        ),
        f"  requests/s         {res['request_throughput']:10.2f}",
        f"  output tokens/s    {res['output_tok_s']:10.1f}",
        f"  total tokens/s     {res['total_tok_s']:10.1f}",
        f"  engine steps       {res['num_steps']:10d}   preemptions {res['num_preemptions']}",
        "",
        f"  {'ms':<6}{'mean':>10}{'p50':>10}{'p90':>10}{'p99':>10}",
    ]
    for label, key in (("TTFT", "ttft_ms"), ("TPOT", "tpot_ms"), ("E2E", "e2e_ms")):
        s = res[key]
        cells = "".join(f"{v:10.2f}" if v is not None else f"{'-':>10}" for v in s.values())
        lines.append(f"  {label:<6}{cells}")
    if report["concurrency"] > engine["max_num_seqs"]:
        lines.append(
            f"  note: concurrency {report['concurrency']} > max_num_seqs {engine['max_num_seqs']};"
            " the engine queues the rest, and their TTFT includes the wait"
        )
    peer = report.get("peer")
    if peer:
        lines += [
            "",
            f"  HF transformers generate (batches of {peer['batch_size']}, left padding, greedy):",
            f"  output tokens/s    {peer['output_tok_s']:10.1f}   "
            f"(wall {peer['wall_s']:.2f} s, {peer['num_batches']} batches)",
            f"  ours / HF          {peer['ratio']:10.2f}x",
            f"  same greedy tokens {peer['same_tokens']:>7d}/{res['num_requests']}",
        ]
    return "\n".join(lines)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


if __name__ == "__main__":  # pragma: no cover - the CLI is `workbench bench`
    sys.exit("run it as: workbench bench --help")
