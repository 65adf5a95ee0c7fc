"""TTFT of a long prompt whose prefix blocks were evicted from the device pool: recomputed (no
tiers), restored from the host tier, and restored from the disk tier by a restarted engine.

    .venv/bin/python scripts/bench_kv_tiers.py --model tiny --prompt-len 960 --repeats 5
    python3 scripts/bench_kv_tiers.py --model <8B dir> --device cuda --prompt-len 8192
    python3 scripts/bench_kv_tiers.py --model llama-3.1-8b --load-format dummy --device cuda \
        --prompt-len 8192     # the 8B shape without a checkpoint

Each case serves the prompt, then two other prompts of the same length that evict it from a pool
just large enough for one, then times the prompt again (first token time - arrival). The disk
case restarts the engine on the same --kv-disk-dir (a host tier of 2 blocks makes every block
spill to disk first), so its restore reads files (from the OS page cache when they are recent).
The restore rate printed is the restored blocks' bytes over the TTFT: a lower bound.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine import LLM, SamplingParams  # noqa: E402

PARAMS = SamplingParams(max_tokens=1, ignore_eos=True)


def ttft(llm: LLM, prompt: list[int]) -> tuple[float, int]:
    out = llm.generate([prompt], PARAMS)[0]
    return out.metrics.first_token_time - out.metrics.arrival_time, out.metrics.num_cached_tokens


def evict(llm: LLM, prompt_len: int, vocab: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(2):
        llm.generate([torch.randint(0, vocab, (prompt_len,), generator=g).tolist()], PARAMS)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument(
        "--load-format", default="auto", help="dummy: random weights at a preset's shape"
    )
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=960)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--kv-disk-dir", default=None, help="default: a temporary directory")
    args = ap.parse_args()
    blocks = -(-(args.prompt_len + 1) // args.block_size) + 1
    cfg = {
        "device": args.device,
        "dtype": args.dtype,
        "load_format": args.load_format,
        "block_size": args.block_size,
        "num_kv_blocks": blocks,
        "max_num_tokens": args.prompt_len + 16,
    }
    disk_dir = args.kv_disk_dir or tempfile.mkdtemp(prefix="kv-tiers-")
    probe = LLM(args.model, **cfg)
    vocab = probe.engine.vocab_size
    bpb = probe.engine.kv_cache.layout.bytes_per_block
    host_bytes = 2 * blocks * bpb
    prompt = torch.randint(0, vocab, (args.prompt_len,), generator=torch.Generator()).tolist()
    del probe

    results: dict[str, list[tuple[float, int]]] = {"recompute": [], "host": [], "disk": []}
    plain = LLM(args.model, **cfg)
    host = LLM(args.model, kv_host_bytes=host_bytes, **cfg)
    for i in range(args.repeats):
        for name, llm in (("recompute", plain), ("host", host)):
            ttft(llm, prompt)  # computes it (the first round also warms the engine up)
            evict(llm, args.prompt_len, vocab, seed=100 + i)
            results[name].append(ttft(llm, prompt))
    del plain, host
    writer = LLM(args.model, kv_host_bytes=2 * bpb, kv_disk_dir=disk_dir, **cfg)
    ttft(writer, prompt)
    evict(writer, args.prompt_len, vocab, seed=7)
    writer.shutdown()  # its spills are written on a thread: the restarts must find every file
    disk_blocks = writer.engine.kv.tiers.disk.num_used
    del writer
    for _ in range(args.repeats):  # a restart each time: an empty device pool and host tier
        llm = LLM(args.model, kv_host_bytes=2 * bpb, kv_disk_dir=disk_dir, **cfg)
        llm.generate([prompt[-3:]], PARAMS)  # a first step's one-time costs, off the clock
        results["disk"].append(ttft(llm, prompt))
        llm.shutdown()
        del llm
    base = statistics.median(t for t, _ in results["recompute"])
    print(f"{args.model}, prompt {args.prompt_len} tokens, block {args.block_size}, {bpb} B/block")
    print(f"disk tier: {disk_blocks} blocks written ({disk_blocks * bpb / 2**20:.0f} MiB)")
    for name, runs in results.items():
        t = statistics.median(s for s, _ in runs)
        cached = runs[-1][1]
        # Restored bytes over the whole TTFT (which also computes the uncached tail): a floor
        # on the tier's restore rate.
        restored = cached // args.block_size * bpb
        rate = f"  restore >= {restored / t / 2**30:.2f} GiB/s" if name != "recompute" else ""
        print(
            f"{name:>9}: TTFT median {1e3 * t:8.1f} ms  ({t / base:.2f}x recompute)  "
            f"cached tokens {cached}{rate}"
        )


if __name__ == "__main__":
    main()
