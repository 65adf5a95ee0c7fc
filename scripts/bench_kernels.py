"""Time each fused Triton kernel (engine/kernels/) against the torch ops it replaces, on CUDA.

At the Llama-3.1-8B shape by default (hidden 4096, 32 q / 8 kv heads, head_dim 128, intermediate
14336) and token counts 1, 64, 512, 4096. Each op runs `--inner` times back to back inside a CUDA
graph, so the times are GPU time per call as a graph-captured decode step sees it, without the
host's launch overhead (`--eager` adds triton.testing.do_bench times of plain launches). The
torch side is the engine's own reference code (RMSNorm / RotaryEmbedding with the kernels off,
`F.silu(gate) * up`). Also prints the max difference of each kernel to the torch output, the
fused kernel's bandwidth (bytes it must move / time), and the sum over one decoder layer (two add +
RMSNorm, rotary, SiLU-and-mul) times the layer count.

    python3 scripts/bench_kernels.py                      # bf16, 8B shape
    python3 scripts/bench_kernels.py --dtype float16 --tokens 1,64 --eager
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine import kernels  # noqa: E402
from engine.model.llama import RMSNorm  # noqa: E402
from engine.model.rope import RotaryEmbedding  # noqa: E402

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def graph_time_us(fn: Callable[[], object], inner: int, replays: int) -> float:
    """GPU microseconds per call of fn, captured `inner` times in one CUDA graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()  # compile and settle the allocator outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(inner):
            fn()
    for _ in range(3):
        graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    del graph
    return start.elapsed_time(end) * 1000 / (replays * inner)


def eager_time_us(fn: Callable[[], object]) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=100) * 1000


def make_rope(args, device: torch.device) -> RotaryEmbedding:
    from transformers import LlamaConfig

    config = LlamaConfig(  # Llama 3.1's rope scaling
        hidden_size=args.heads * args.head_dim,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        head_dim=args.head_dim,
        max_position_embeddings=131072,
        rope_theta=500000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    )
    with torch.device(device):
        return RotaryEmbedding(config, args.head_dim)


def rows_for(
    tokens: int, args, dtype: torch.dtype, dev: torch.device
) -> list[tuple[str, Callable, Callable, int, float]]:
    """-> (op, torch fn, fused fn, bytes the fused kernel moves, max |fused - torch|)."""
    gen = torch.Generator(device=dev).manual_seed(tokens)
    size = dtype.itemsize
    hidden, inter = args.hidden, args.intermediate
    heads, kv_heads, head_dim = args.heads, args.kv_heads, args.head_dim

    def randn(*shape):
        return torch.randn(*shape, device=dev, generator=gen).to(dtype)

    norm = RMSNorm(hidden, 1e-5).to(device=dev, dtype=dtype)
    norm.weight.data = (torch.rand(hidden, device=dev, generator=gen) + 0.5).to(dtype)
    x, residual = randn(tokens, hidden), randn(tokens, hidden)
    xf, rf = x.clone(), residual.clone()
    want, _ = norm(x, residual)
    got, _ = kernels.fused_add_rms_norm(xf.clone(), rf.clone(), norm.weight, norm.eps)
    add_norm_err = (got.float() - want.float()).abs().max().item()
    norm_err = (
        (kernels.rms_norm(x, norm.weight, norm.eps).float() - norm(x).float()).abs().max().item()
    )

    rope = make_rope(args, dev)
    rope_fused = make_rope(args, dev)
    rope_fused.build_cache(args.max_positions)
    positions = torch.randint(0, args.max_positions, (tokens,), device=dev, generator=gen)
    width = (heads + 2 * kv_heads) * head_dim
    qkv = randn(tokens, width)
    q = qkv[:, : heads * head_dim].view(tokens, heads, head_dim)
    k = qkv[:, heads * head_dim : (heads + kv_heads) * head_dim].view(tokens, kv_heads, head_dim)
    want_q, want_k = rope(positions, q, k)
    qkv_f = qkv.clone()
    q_f = qkv_f[:, : heads * head_dim].view(tokens, heads, head_dim)
    k_f = qkv_f[:, heads * head_dim : (heads + kv_heads) * head_dim].view(
        tokens, kv_heads, head_dim
    )
    rope_fused(positions, q_f, k_f)
    rope_err = max(
        (q_f.float() - want_q.float()).abs().max().item(),
        (k_f.float() - want_k.float()).abs().max().item(),
    )

    gate_up = randn(tokens, 2 * inter)
    gate, up = gate_up.split(inter, dim=-1)
    silu_err = (
        (kernels.silu_and_mul(gate_up).float() - (F.silu(gate) * up).float()).abs().max().item()
    )

    rotated = tokens * (heads + kv_heads) * head_dim
    return [
        (
            "rms_norm",
            lambda: norm(x),
            lambda: kernels.rms_norm(x, norm.weight, norm.eps),
            2 * tokens * hidden * size,
            norm_err,
        ),
        (
            "add+rms_norm",
            lambda: norm(x, residual),
            lambda: kernels.fused_add_rms_norm(xf, rf, norm.weight, norm.eps),
            4 * tokens * hidden * size,
            add_norm_err,
        ),
        (
            "rotary q,k",
            lambda: rope(positions, q, k),
            lambda: rope_fused(positions, q_f, k_f),
            2 * rotated * size + tokens * head_dim * 4,
            rope_err,
        ),
        (
            "silu_and_mul",
            lambda: F.silu(gate) * up,
            lambda: kernels.silu_and_mul(gate_up),
            3 * tokens * inter * size,
            silu_err,
        ),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="bfloat16", choices=list(DTYPES))
    parser.add_argument("--tokens", default="1,64,512,4096")
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--intermediate", type=int, default=14336)
    parser.add_argument("--layers", type=int, default=32, help="for the per-step sum")
    parser.add_argument("--max-positions", type=int, default=8192)
    parser.add_argument("--inner", type=int, default=20, help="calls per CUDA graph")
    parser.add_argument("--replays", type=int, default=50)
    parser.add_argument("--eager", action="store_true", help="also time plain launches")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_kernels needs a CUDA GPU", file=sys.stderr)
        return 1
    dtype = DTYPES[args.dtype]
    torch.backends.cuda.matmul.allow_tf32 = False
    print(
        f"{torch.cuda.get_device_name()}  torch {torch.__version__}  {args.dtype}  "
        f"hidden {args.hidden}, heads {args.heads}/{args.kv_heads}x{args.head_dim}, "
        f"intermediate {args.intermediate}; GPU us per call in CUDA graphs ({args.inner} calls x "
        f"{args.replays} replays)"
    )
    header = f"{'op':<14}{'tokens':>7}{'torch us':>10}{'fused us':>10}{'speedup':>9}{'GB/s':>8}"
    header += f"{'max diff':>10}"
    if args.eager:
        header += f"{'eager torch':>13}{'eager fused':>13}"
    print(header)
    for tokens in [int(t) for t in args.tokens.split(",")]:
        layer_torch = layer_fused = 0.0
        for op, torch_fn, fused_fn, nbytes, err in rows_for(
            tokens, args, dtype, torch.device("cuda")
        ):
            t_torch = graph_time_us(torch_fn, args.inner, args.replays)
            t_fused = graph_time_us(fused_fn, args.inner, args.replays)
            if op != "rms_norm":  # a decoder layer: two add+norms, rotary, silu
                weight = 2 if op == "add+rms_norm" else 1
                layer_torch += weight * t_torch
                layer_fused += weight * t_fused
            line = (
                f"{op:<14}{tokens:>7}{t_torch:>10.2f}{t_fused:>10.2f}"
                f"{t_torch / t_fused:>8.1f}x{nbytes / t_fused / 1e3:>8.0f}{err:>10.3g}"
            )
            if args.eager:
                line += f"{eager_time_us(torch_fn):>13.2f}{eager_time_us(fused_fn):>13.2f}"
            print(line, flush=True)
        print(
            f"{'per layer':<14}{tokens:>7}{layer_torch:>10.2f}{layer_fused:>10.2f}"
            f"{layer_torch / layer_fused:>8.1f}x   x {args.layers} layers: "
            f"{layer_torch * args.layers / 1000:.2f} -> {layer_fused * args.layers / 1000:.2f} ms"
        )
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
