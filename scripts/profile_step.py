"""Where a decode step's time goes: host phases (cProfile) and device kernels (torch.profiler).

Runs `--batch` requests of `--input-len` random tokens on dummy weights at a preset's shape,
lets them prefill, then profiles `--steps` decode-only steps twice: once under cProfile (host
functions by cumulative time), once under torch.profiler (CUDA kernels by total time, and the
step's wall time against the GPU's busy time). Prints both; `--out DIR` also writes them.

    python3 scripts/profile_step.py --model llama-3.1-8b --batch 1 --steps 64
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.config import OUTPUT_KINDS, EngineConfig, SamplingParams  # noqa: E402
from engine.core import EngineCore  # noqa: E402


def start_requests(
    core: EngineCore, batch: int, input_len: int, output_len: int, output_kind: str
) -> None:
    generator = torch.Generator().manual_seed(0)
    params = SamplingParams(
        max_tokens=output_len, temperature=0.0, ignore_eos=True, output_kind=output_kind
    )
    for _ in range(batch):
        prompt = torch.randint(0, core.vocab_size, (input_len,), generator=generator).tolist()
        core.add_request(prompt, params)
    # Run until every request has its first token: the steps after that are decode-only.
    while any(r.num_output_tokens == 0 for r in core.scheduler.running) or core.scheduler.waiting:
        core.step()


def timed_steps(core: EngineCore, steps: int) -> float:
    torch.cuda.synchronize() if core.device.type == "cuda" else None
    start = time.perf_counter()
    for _ in range(steps):
        core.step()
    torch.cuda.synchronize() if core.device.type == "cuda" else None
    return (time.perf_counter() - start) / steps


def host_split(core: EngineCore, steps: int) -> dict[str, float]:
    """ms per step in the model (runner.run), in sampling, and in everything else: the host's
    bookkeeping (scheduling, inputs, stop checks, detokenizing, outputs). On the CPU the first two
    are the computation itself; on a GPU, the time to queue it."""
    spent = {"model": 0.0, "sampling": 0.0}

    def timed(name: str, fn):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[name] += time.perf_counter() - start

        return wrapper

    run, sample, collect = core.runner.run, core.sampler.sample, core.sampler.collect
    core.runner.run = timed("model", run)
    core.sampler.sample = timed("sampling", sample)
    core.sampler.collect = timed("sampling", collect)
    try:
        total = timed_steps(core, steps)
    finally:
        core.runner.run, core.sampler.sample, core.sampler.collect = run, sample, collect
    split = {name: 1e3 * value / steps for name, value in spent.items()}
    split["host"] = 1e3 * total - split["model"] - split["sampling"]
    split["step"] = 1e3 * total
    recent = list(core.recent_steps)[-steps:]
    split["batch"] = sum(s.batch_size for s in recent) / max(len(recent), 1)
    return split


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama-3.1-8b")
    parser.add_argument("--load-format", default="dummy")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--quantization", default=None)
    parser.add_argument("--kv-cache-dtype", default="auto")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--max-model-len", type=int, default=1024)
    parser.add_argument("--out", default=None)
    parser.add_argument(
        "--host-only", action="store_true", help="only the model / sampling / host split"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--async-scheduling", action="store_true", help="overlap scheduling")
    parser.add_argument(
        "--output-kind",
        choices=OUTPUT_KINDS,
        default="final",
        help="final (as the benchmarks run): no per-step outputs; stream: an output (and its "
        "detokenized text) for every request every step, as a server stream has",
    )
    parser.add_argument(
        "--enforce-eager",
        action="store_true",
        help="no CUDA graphs: torch.profiler sees each kernel (it sees none inside a graph)",
    )
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    extra = {"quantization": args.quantization} if args.quantization else {}
    t0 = time.perf_counter()
    core = EngineCore(
        EngineConfig(
            model=args.model,
            load_format=args.load_format,
            dtype=args.dtype,
            max_model_len=args.max_model_len,
            max_num_seqs=max(args.batch, 1),
            async_scheduling=args.async_scheduling,
            kv_cache_dtype=args.kv_cache_dtype,
            enforce_eager=args.enforce_eager,
            **extra,
        )
    )
    startup = time.perf_counter() - t0
    output_len = 3 * args.steps + 8
    lines = [
        f"start-up {startup:.1f} s; batch {args.batch}, {args.steps} decode steps each, "
        f"{args.output_kind} outputs"
    ]
    start_requests(core, args.batch, args.input_len, output_len, args.output_kind)
    timed_steps(core, 8)  # warm-up
    per_step = timed_steps(core, args.steps)
    lines.append(f"plain: {per_step * 1e3:.2f} ms per step")
    split = host_split(core, args.steps)
    lines.append(
        "split, ms per step: "
        + ", ".join(f"{name} {value:.2f}" for name, value in split.items() if name != "batch")
        + f"; {split['batch']:.0f} requests a step, "
        + f"{split['host'] / split['batch'] * 1e3:.1f} us of host work per request"
    )
    if args.host_only:
        print("\n".join(lines))
        return 0

    profiler = cProfile.Profile()
    profiler.enable()
    timed_steps(core, args.steps)
    profiler.disable()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats(45)
    lines.append("== host, cProfile, by cumulative time\n" + text.getvalue())

    if core.device.type == "cuda":
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            wall = timed_steps(core, args.steps)
        events = prof.key_averages()
        busy_us = sum(e.self_device_time_total for e in events) / args.steps
        lines.append(
            f"== device: {busy_us / 1e3:.2f} ms of kernels per step, wall {wall * 1e3:.2f} ms "
            f"per step under the profiler"
        )
        lines.append(events.table(sort_by="self_cuda_time_total", row_limit=40))
    report = "\n".join(lines)
    print(report)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        Path(args.out, f"profile-b{args.batch}.txt").write_text(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
