"""The GPU benchmark table of docs/performance.md, in one run on the GPU machine.

Measures the device-to-device copy bandwidth first (bytes read + written per second), so the
batch-1 roofline (weight bytes / bandwidth) comes from the same run as the numbers held against it.
Then runs `bench.offline.run_benchmark` on dummy weights at a real shape for each row and appends
one JSON row per result to --out (the schema of docs/results/):

    python3 scripts/gpu_bench.py --model llama-3.1-8b --out docs/results/h100-bf16.json \
        --rows decode1:128:128 tput:128:128:64:hf tput:128:128:512 [--quantization fp8]

MoE presets (the roofline counts the experts a batch-1 step is routed to, not all of them):

    python3 scripts/gpu_bench.py --model mixtral-8x7b --out docs/results/h200-moe.json \
        --rows decode1:128:128
    python3 scripts/gpu_bench.py --model qwen3-30b-a3b --quantization fp8 \
        --out docs/results/h200-moe-fp8.json --rows tput:1000:1000:1000
    python3 scripts/gpu_bench.py --model qwen3-30b-a3b --out docs/results/h200-moe-bf16.json \
        --rows tput:1000:1000:64:hf     # transformers' peer runs unquantized weights only
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.offline import BenchConfig, device_name, run_benchmark, versions  # noqa: E402
from engine.config import EngineConfig  # noqa: E402


def copy_bandwidth(num_bytes: int = 2**30, repeats: int = 20) -> float:
    """Bytes moved per second by a device-to-device copy (each byte read once, written once)."""
    src = torch.empty(num_bytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        dst.copy_(src)
    torch.cuda.synchronize()
    return 2 * num_bytes * repeats / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama-3.1-8b")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument(
        "--quantization",
        default=None,
        help="weights: fp8, int4_awq, ... (dummy weights quantized as ModelOpt would)",
    )
    parser.add_argument(
        "--async-scheduling",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="overlap scheduling: queue step n+1 before reading step n's tokens (default: on)",
    )
    parser.add_argument("--kv-cache-dtype", default="auto", help="KV pages: auto, fp8 or int8")
    parser.add_argument(
        "--max-num-seqs",
        type=int,
        default=None,
        help="most requests running at once (default: all of a row's requests)",
    )
    parser.add_argument(
        "--max-num-tokens", type=int, default=8192, help="token budget of one step (8192)"
    )
    parser.add_argument("--out", required=True)
    parser.add_argument(
        "--rows",
        nargs="+",
        required=True,
        help="decode1:ISL:OSL or tput:ISL:OSL:REQUESTS[:hf]: every request queued at once, "
        "at most --max-num-seqs running (trtllm-bench throughput's method)",
    )
    args = parser.parse_args(argv)

    bandwidth = copy_bandwidth()
    card = device_name(torch.device("cuda"))
    precision = args.quantization or ("bf16" if args.dtype == "bfloat16" else args.dtype)
    print(f"{card}: copy bandwidth {bandwidth / 1e12:.2f} TB/s", flush=True)
    rows: list[dict] = []
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for spec in args.rows:
        kind, isl, osl, *rest = spec.split(":")
        isl, osl = int(isl), int(osl)
        requests = 2 if kind == "decode1" else int(rest[0])
        batch = 1 if kind == "decode1" else min(requests, args.max_num_seqs or requests)
        # The peer runs transformers on the same weights: only for unquantized rows.
        peer = not args.quantization and (kind == "decode1" or (len(rest) > 1 and rest[1] == "hf"))
        engine = EngineConfig(
            model=args.model,
            load_format="dummy",
            dtype=args.dtype,
            max_num_seqs=batch,
            max_model_len=isl + osl,
            max_num_tokens=max(args.max_num_tokens, isl),
            quantization=args.quantization,
            async_scheduling=args.async_scheduling,
            kv_cache_dtype=args.kv_cache_dtype,
        )
        bench = BenchConfig(
            num_requests=requests,
            input_len=isl,
            output_len=osl,
            concurrency=1 if kind == "decode1" else requests,
            warmup=1 if kind == "decode1" else 0,
            compare="hf" if peer else None,
        )
        command = " ".join(["python3", "scripts/gpu_bench.py", *sys.argv[1:]])
        started = time.perf_counter()
        try:
            report = run_benchmark(engine, bench, command)
        except Exception:  # one failed row must not lose the others
            traceback.print_exc()
            continue
        finally:
            torch.cuda.empty_cache()
        result = report["results"]
        # The roofline: every weight byte a batch-1 step reads (a MoE's routed experts only:
        # active_weight_bytes), read once per step at the bandwidth measured above.
        weight_bytes = report["engine"]["weight_bytes"]
        active_bytes = report["engine"]["active_weight_bytes"]
        roofline = bandwidth / active_bytes
        row = {
            "card": card,
            "model": args.model,
            "precision": precision,
            "kv_cache_dtype": args.kv_cache_dtype,
            "async_scheduling": args.async_scheduling is not False,
            "isl": isl,
            "osl": osl,
            "batch": batch,
            "requests": requests,
            "output_tok_s": result["output_tok_s"],
            "roofline_tok_s": roofline if kind == "decode1" else None,
            "bandwidth_tb_s": bandwidth / 1e12,
            "weight_bytes": weight_bytes,
            "active_weight_bytes": active_bytes,
            "startup_s": report["engine"]["startup_s"],
            "ttft_ms_p50": (result.get("ttft_ms") or {}).get("p50"),
            "tpot_ms_p50": (result.get("tpot_ms") or {}).get("p50"),
            "max_num_tokens": engine.max_num_tokens,
            "peer": "transformers generate" if peer else None,
            "peer_output_tok_s": report["peer"]["output_tok_s"] if report["peer"] else None,
            "versions": versions(),
            "command": command,
            "date": dt.date.today().isoformat(),
            "wall_s": time.perf_counter() - started,
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
        out.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
