"""Decode-step kernels against the bytes they must read, on CUDA: paged decode attention over
bf16, fp8 and int8 pages, and the fp8 GEMV against cuBLASLt (`torch._scaled_mm`) and the bf16
GEMM at the Llama-3.1-8B projection shapes.

The copy bandwidth (bytes read + written per second of a device-to-device copy) is measured in
the same run, and every kernel is reported as the bytes it must move per second and as a
fraction of that bandwidth. Times are GPU time per call inside a CUDA graph (scripts/
bench_kernels.py's `graph_time_us`), so launch overhead is left out as a decode graph leaves it.

    python3 scripts/bench_decode_kernels.py --attention --gemv
    python3 scripts/bench_decode_kernels.py --attention --tunings 64:4:2,128:4:2,128:8:3
"""

from __future__ import annotations

import argparse
import json
import sys
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_kernels import graph_time_us  # noqa: E402
from gpu_bench import copy_bandwidth  # noqa: E402

from engine.attention.triton_decode import DecodeTuning, paged_decode_attention  # noqa: E402
from engine.quant.fp8 import quantize_fp8  # noqa: E402
from engine.quant.triton_fp8 import fp8_gemv, quantize_fp8_static  # noqa: E402

GEMV_SHAPES = {  # name: (K, N) of the Llama-3.1-8B projections (q/k/v and gate/up fused)
    "qkv": (4096, 6144),
    "o": (4096, 4096),
    "gate_up": (4096, 28672),
    "down": (14336, 4096),
    "lm_head": (4096, 128256),
}
L2_DEFEATING_BYTES = 160 << 20  # more than three times the H200's 50 MB L2


def attention_rows(args, bandwidth: float) -> list[dict]:
    heads, kv_heads, head_dim, block = 32, 8, 128, args.block_size
    tunings = [
        None if t == "auto" else DecodeTuning(*map(int, t.split(":")))
        for t in args.tunings.split(",")
    ]
    rows = []
    for batch, ctx in [tuple(map(int, c.split("x"))) for c in args.attention_cases.split(",")]:
        pages = -(-ctx // block)
        num_blocks = batch * pages + 1
        gen = torch.Generator(device="cuda").manual_seed(0)
        q = torch.randn(batch, heads, head_dim, device="cuda", dtype=torch.bfloat16)
        tables = torch.randperm(num_blocks - 1, device="cuda", generator=gen)[: batch * pages]
        tables = tables.view(batch, pages).contiguous()
        seq_lens = torch.full((batch,), ctx, device="cuda", dtype=torch.int64)
        shape = (num_blocks, block, kv_heads, head_dim)
        for store in ("bf16", "fp8", "int8"):
            k = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
            scales = {}
            if store == "fp8":
                k = k.to(torch.float8_e4m3fn)
                half = torch.tensor(0.5, device="cuda")
                scales = dict(k_scale=half, v_scale=half.clone())
            elif store == "int8":
                k = (k * 30).to(torch.int8)
                s = torch.full(shape[:3], 0.03, device="cuda")
                scales = dict(k_scale=s, v_scale=s.clone())
            v = k.clone()
            elem = k.element_size()
            per_token = kv_heads * head_dim * 2 * elem  # K and V of one token
            per_token += kv_heads * 2 * 4 if store == "int8" else 0  # its float32 scales
            moved = batch * ctx * per_token + q.numel() * 4  # K/V pages, q in and out
            for tuning in tunings:
                call = partial(
                    paged_decode_attention,
                    q,
                    k,
                    v,
                    tables,
                    seq_lens,
                    head_dim**-0.5,
                    tuning=tuning,
                    **scales,
                )
                us = graph_time_us(call, inner=args.inner, replays=args.replays)
                row = dict(
                    kernel="decode_attention",
                    pages=store,
                    batch=batch,
                    context=ctx,
                    tuning="auto"
                    if tuning is None
                    else f"{tuning.tile_tokens}:{tuning.num_warps}:{tuning.num_stages}",
                    us=round(us, 2),
                    bytes_per_s=moved / us * 1e6,
                    of_copy_bandwidth=round(moved / us * 1e6 / bandwidth, 3),
                )
                rows.append(row)
                print(json.dumps(row), flush=True)
            del k, v
    return rows


def _quantize_and_scaled_mm(x, inv, w_q, x_scale, w_scale_scalar):
    """The engine's M > 4 path: one quantize kernel, then cuBLASLt."""
    x_q = quantize_fp8_static(x, inv)
    return torch._scaled_mm(
        x_q, w_q.t(), scale_a=x_scale, scale_b=w_scale_scalar, out_dtype=torch.bfloat16
    )


def _cycling(fn, copies: list[tuple]):
    """fn over the weight copies in turn, so that a graph of several calls reads a working set
    larger than the L2 cache (a decode step never finds a layer's weights there)."""
    state = {"i": 0}

    def call():
        args = copies[state["i"] % len(copies)]
        state["i"] += 1
        return fn(*args)

    return call


def gemv_rows(args, bandwidth: float) -> list[dict]:
    rows = []
    for name, (k, n) in GEMV_SHAPES.items():
        count = max(1, -(-L2_DEFEATING_BYTES // (n * k)))  # fp8 copies past the L2 cache
        ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(count)]
        w_scale = torch.full((n,), float(ws[0].abs().max()) / 448, device="cuda")
        w_qs = [quantize_fp8(w, 1 / w_scale[:1]) for w in ws]
        x_scale = torch.tensor(4.0 / 448, device="cuda")
        inv = 1 / x_scale
        one = w_scale[:1].reshape(())
        for m in args.rows_list:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            variants = {
                "bf16 F.linear": (
                    _cycling(torch.nn.functional.linear, [(x, w) for w in ws]),
                    n * k * 2,
                ),
                "fp8 quantize+_scaled_mm": (
                    _cycling(
                        _quantize_and_scaled_mm, [(x, inv, w_q, x_scale, one) for w_q in w_qs]
                    ),
                    n * k,
                ),
            }
            for config in args.gemv_configs.split(","):
                bn, bk, warps = map(int, config.split(":"))
                gemv = partial(fp8_gemv, block_n=bn, block_k=bk, num_warps=warps)
                variants[f"fp8 gemv {config}"] = (
                    _cycling(
                        gemv,
                        [(x, inv, x_scale, w_q, w_scale, None, torch.bfloat16) for w_q in w_qs],
                    ),
                    n * k,
                )
            for label, (fn, weight_bytes) in variants.items():
                us = graph_time_us(fn, inner=max(args.inner, count), replays=args.replays)
                row = dict(
                    kernel=label,
                    shape=name,
                    m=m,
                    k=k,
                    n=n,
                    us=round(us, 2),
                    of_copy_bandwidth=round(weight_bytes / us * 1e6 / bandwidth, 3),
                )
                rows.append(row)
                print(json.dumps(row), flush=True)
        del ws, w_qs
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--attention", action="store_true")
    parser.add_argument("--gemv", action="store_true")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument(
        "--attention-cases",
        default="1x1024,1x8192,1x20000,64x1024,512x1024,512x2048,2048x256",
        help="BATCHxCONTEXT,...",
    )
    parser.add_argument(
        "--tunings",
        default="auto",
        help="TILE_TOKENS:WARPS:STAGES,... of the decode kernel, or auto (default_tuning)",
    )
    parser.add_argument(
        "--rows",
        dest="rows_list",
        default="1,2,4",
        type=lambda s: [int(x) for x in s.split(",")],
        help="activation rows M of the GEMV cases",
    )
    parser.add_argument("--gemv-configs", default="16:512:4", help="BLOCK_N:BLOCK_K:WARPS,...")
    parser.add_argument("--inner", type=int, default=10)
    parser.add_argument("--replays", type=int, default=20)
    parser.add_argument("--out", default=None, help="append the rows as JSON lines")
    args = parser.parse_args(argv)
    bandwidth = copy_bandwidth()
    print(json.dumps(dict(card=torch.cuda.get_device_name(), copy_bandwidth=bandwidth)), flush=True)
    rows = []
    if args.attention:
        rows += attention_rows(args, bandwidth)
    if args.gemv:
        rows += gemv_rows(args, bandwidth)
    if args.out:
        with open(args.out, "a") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
