"""The fused MoE for CUDA: (token, slot) pairs sorted by expert into blocks, two grouped-GEMM
Triton kernels (gate_up with SiLU-and-mul, then down with the routing weight), and the weighted
sum per token.

    align:    pairs grouped by expert, each expert's group padded to a multiple of BLOCK_M; every
              block of BLOCK_M sorted rows belongs to one expert (vLLM's moe_align_block_size)
    kernel 1: inter[row] = silu(x[token] @ gate[e]^T) * (x[token] @ up[e]^T)   per block, per N tile
    kernel 2: out[pair] = weight[pair] * (inter[row] @ down[e]^T)              in float32
    combine:  out.view(tokens, top_k, hidden).sum(1), cast to the hidden dtype (moe.combine's order)

Graph-safe: every shape, the grid included, follows from (num_tokens, top_k, num_experts) alone;
blocks past the last expert's group exit at once, and no step reads a value on the host.
Accumulation is float32; the intermediate is rounded to the hidden dtype (as the reference's is),
the down projection's output is not. Against moe.moe_reference: float32 within 1e-5, bf16/fp16
within their rounding (tests/test_fused_moe.py).

FP8 experts (`fp8` given, moe_fp8.py): the weights are e4m3 with a float32 scale per expert and
output row; each kernel quantizes its activation tile with the expert's static input scale (gate
and up have one each) as it loads it, multiplies e4m3 by e4m3 (on FP8 tensor cores where the GPU
has them; elsewhere widened to float16 or float32, both exact) and scales the float32 sums:
y = (x_q @ w_q^T) * s_x[e] * s_w[e, row], as moe_fp8.moe_reference_fp8 computes it.

Tiles come from `moe_tiles`, a small table by shape (rows per expert, output width).
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from engine.kernels.rounding import round_e4m3
from engine.model.moe import Routing

BLOCK_M = 16  # sorted rows per block at decode sizes: tl.dot's smallest tile
TARGET_PROGRAMS = 512  # ~4 per SM of an H100/H200: enough loads in flight to stream the weights


class MoeTiles(NamedTuple):
    block_m: int  # sorted rows per block (the alignment pads each expert's group to it)
    block_n: int  # output columns per program
    block_k: int  # reduction step
    num_warps: int = 4


class Fp8Scales(NamedTuple):
    """The float32 scales of FP8 experts (moe_fp8.Fp8Experts holds them)."""

    gate_up: torch.Tensor  # [E, 2 * inter] per output row
    down: torch.Tensor  # [E, hidden] per output row
    gate_up_input: torch.Tensor  # [E, 2] static input scale of gate and of up
    gate_up_input_inv: torch.Tensor  # [E, 2] what the input is multiplied by before rounding
    down_input: torch.Tensor  # [E]
    down_input_inv: torch.Tensor  # [E]


def moe_tiles(num_pairs: int, num_experts: int, n: int, k: int, fp8: bool) -> MoeTiles:
    """Tiles for one grouped GEMM of output width n and reduction k.

    Decode sizes (at most ~16 rows per expert): the product is a weight stream, read once per
    active expert, so the N tile narrows until the few active experts' tiles make about
    TARGET_PROGRAMS programs (Mixtral batch 1: 2 experts, down's 4096 columns in tiles of 16) and
    the K step is long (128; 256 for one-byte fp8 weights) so each row read is one contiguous run.
    Prefill sizes: 64-row blocks and 64x128 tiles, which reuse each weight tile over many rows.
    The rule follows vLLM's untuned defaults and the fp8 GEMV's measured widths
    (engine/quant/triton_fp8.gemv_tiles); scripts/gpu_bench.py's MoE rows measure it."""
    rows_per_expert = num_pairs / max(num_experts, 1)
    if rows_per_expert > 16:
        return MoeTiles(block_m=64, block_n=128, block_k=64 if not fp8 else 128, num_warps=8)
    active = min(num_pairs, num_experts)
    block_n = 128
    while block_n > 16 and active * triton.cdiv(n, block_n) < TARGET_PROGRAMS:
        block_n //= 2
    block_k = min(256 if fp8 else 128, max(16, triton.next_power_of_2(k)))
    return MoeTiles(block_m=BLOCK_M, block_n=block_n, block_k=block_k)


class Alignment(NamedTuple):
    sorted_pairs: torch.Tensor  # [max_rows] int64: pair index (token * top_k + slot), or P: padding
    block_experts: torch.Tensor  # [max_rows // BLOCK_M] int64: each block's expert, E past the end


def align_by_expert(
    expert_ids: torch.Tensor, num_experts: int, block_m: int = BLOCK_M
) -> Alignment:
    """expert_ids [num_tokens, top_k] -> the pairs sorted by expert, each group padded to a
    multiple of block_m. Torch ops of fixed shapes only: capturable in a CUDA graph."""
    pairs = expert_ids.reshape(-1)  # [P]
    num_pairs = pairs.numel()
    device = pairs.device
    counts = torch.zeros(num_experts, dtype=torch.int64, device=device)
    counts.scatter_add_(0, pairs, torch.ones_like(pairs))  # bincount would sync to size its output
    padded = (counts + block_m - 1) // block_m * block_m
    padded_ends = torch.cumsum(padded, 0)  # [E]
    order = torch.sort(pairs, stable=True).indices  # [P] pairs grouped by expert
    sorted_experts = pairs[order]
    first = torch.cumsum(counts, 0) - counts  # each expert's first position among sorted pairs
    rank = torch.arange(num_pairs, device=device) - first[sorted_experts]
    dest = padded_ends[sorted_experts] - padded[sorted_experts] + rank
    max_rows = triton.cdiv(num_pairs + num_experts * (block_m - 1), block_m) * block_m
    sorted_pairs = torch.full((max_rows,), num_pairs, dtype=torch.int64, device=device)
    sorted_pairs[dest] = order
    block_starts = torch.arange(0, max_rows, block_m, device=device)
    block_experts = torch.searchsorted(padded_ends, block_starts, right=True)  # E: past the end
    return Alignment(sorted_pairs, block_experts)


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    """a @ b accumulated in float32; float32 inputs multiplied in full precision, not TF32."""
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    return tl.dot(a, b)


# How the FP8 kernels multiply (DOT_MODE): e4m3 on FP8 tensor cores; both operands widened to
# float16 (exact: e4m3 fits in it, and a float16 product in the float32 accumulator); both in
# float32 (exact too; the interpreter, whose float16 dot rounds to float16).
DOT_E4M3, DOT_F16, DOT_F32 = 0, 1, 2
FP8_DOT_ENV_VAR = "WORKBENCH_MOE_FP8_DOT"  # "0": widened float16 even where FP8 dots exist


@triton.jit
def _quantize_e4m3(x, inv_scale, DOT_MODE: tl.constexpr):
    """x (float32) * inv_scale rounded to e4m3 (nearest even, saturating at +-448), as
    engine.quant.fp8.quantize_fp8: an e4m3 tensor for FP8 tensor cores, else its values (by
    integer arithmetic: the interpreter's float32 -> e4m3 cast drops the carry when the mantissa
    rounds up into the next power of two)."""
    # if/else, not an early return: the compiler types every return it reaches, and a constexpr
    # `if` only drops the untaken branch of its own statement.
    if DOT_MODE == 0:
        quantized = tl.clamp(x * inv_scale, -448.0, 448.0).to(tl.float8e4nv)
    else:
        quantized = round_e4m3(x * inv_scale)
    return quantized


@triton.jit
def _fp8_dot(a, b, DOT_MODE: tl.constexpr):
    """a (from _quantize_e4m3) @ e4m3 b, accumulated in float32: the same exact products and
    float32 sums whichever the mode, in another order."""
    if DOT_MODE == 0:
        return tl.dot(a, b)
    elif DOT_MODE == 1:
        return tl.dot(a.to(tl.float16), b.to(tl.float16))
    else:
        return tl.dot(a, b.to(tl.float32), input_precision="ieee")


@triton.jit
def _gate_up_kernel(
    x_ptr,  # [num_tokens, K] hidden
    w_ptr,  # [E, 2 * N, K] gate rows then up rows
    out_ptr,  # [max_rows, N] silu(gate) * up, in sorted-row order
    sorted_pairs_ptr,
    block_experts_ptr,
    w_scale_ptr,  # FP8: [E, 2 * N] float32 per output row
    in_scale_ptr,  # FP8: [E, 2] float32, gate's and up's
    in_inv_ptr,  # FP8: [E, 2] float32
    num_pairs,
    num_experts,
    N,
    K,
    stride_xt,
    stride_we,
    stride_wn,
    stride_om,
    TOP_K: tl.constexpr,
    IEEE: tl.constexpr,
    FP8: tl.constexpr,
    DOT_MODE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    block = tl.program_id(0)
    expert = tl.load(block_experts_ptr + block)
    if expert >= num_experts:
        return
    rows = block * BLOCK_M + tl.arange(0, BLOCK_M)
    pairs = tl.load(sorted_pairs_ptr + rows)
    valid = pairs < num_pairs
    tokens = tl.where(valid, pairs // TOP_K, 0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    w = w_ptr + expert.to(tl.int64) * stride_we
    gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if FP8:
        inv_gate = tl.load(in_inv_ptr + expert * 2)
        inv_up = tl.load(in_inv_ptr + expert * 2 + 1)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        a = tl.load(
            x_ptr + tokens[:, None] * stride_xt + ks[None, :],
            mask=valid[:, None] & k_ok[None, :],
            other=0.0,
        )
        b_mask = k_ok[:, None] & col_ok[None, :]
        b_gate = tl.load(w + cols[None, :] * stride_wn + ks[:, None], mask=b_mask, other=0.0)
        b_up = tl.load(w + (cols[None, :] + N) * stride_wn + ks[:, None], mask=b_mask, other=0.0)
        if FP8:
            a32 = a.to(tl.float32)
            gate += _fp8_dot(_quantize_e4m3(a32, inv_gate, DOT_MODE), b_gate, DOT_MODE)
            up += _fp8_dot(_quantize_e4m3(a32, inv_up, DOT_MODE), b_up, DOT_MODE)
        else:
            gate += _dot(a, b_gate, IEEE)
            up += _dot(a, b_up, IEEE)
    if FP8:  # (acc * s_x) * s_w, fp8_matmul's order
        w_scale = w_scale_ptr + expert.to(tl.int64) * 2 * N
        gate = gate * tl.load(in_scale_ptr + expert * 2)
        gate = gate * tl.load(w_scale + cols, mask=col_ok, other=0.0)[None, :]
        up = up * tl.load(in_scale_ptr + expert * 2 + 1)
        up = up * tl.load(w_scale + N + cols, mask=col_ok, other=0.0)[None, :]
    dtype = out_ptr.dtype.element_ty
    # Rounded to the dtype first, as F.linear's outputs are in the reference.
    gate = gate.to(dtype).to(tl.float32)
    up = up.to(dtype).to(tl.float32)
    act = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32) * up
    out = out_ptr + rows[:, None].to(tl.int64) * stride_om + cols[None, :]
    tl.store(out, act.to(dtype), mask=valid[:, None] & col_ok[None, :])


@triton.jit
def _down_kernel(
    x_ptr,  # [max_rows, K] the gate_up kernel's output, sorted-row order
    w_ptr,  # [E, N, K] down
    weights_ptr,  # [P] routing weight of each pair
    out_ptr,  # [P, N] float32, pair order
    sorted_pairs_ptr,
    block_experts_ptr,
    w_scale_ptr,  # FP8: [E, N] float32 per output row
    in_scale_ptr,  # FP8: [E] float32
    in_inv_ptr,  # FP8: [E] float32
    num_pairs,
    num_experts,
    N,
    K,
    stride_xm,
    stride_we,
    stride_wn,
    stride_op,
    IEEE: tl.constexpr,
    FP8: tl.constexpr,
    DOT_MODE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    block = tl.program_id(0)
    expert = tl.load(block_experts_ptr + block)
    if expert >= num_experts:
        return
    rows = block * BLOCK_M + tl.arange(0, BLOCK_M)
    pairs = tl.load(sorted_pairs_ptr + rows)
    valid = pairs < num_pairs
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    w = w_ptr + expert.to(tl.int64) * stride_we
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if FP8:
        inv = tl.load(in_inv_ptr + expert)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        a = tl.load(
            x_ptr + rows[:, None].to(tl.int64) * stride_xm + ks[None, :],
            mask=valid[:, None] & k_ok[None, :],
            other=0.0,
        )
        b = tl.load(
            w + cols[None, :] * stride_wn + ks[:, None],
            mask=k_ok[:, None] & col_ok[None, :],
            other=0.0,
        )
        if FP8:
            acc += _fp8_dot(_quantize_e4m3(a.to(tl.float32), inv, DOT_MODE), b, DOT_MODE)
        else:
            acc += _dot(a, b, IEEE)
    if FP8:
        acc = acc * tl.load(in_scale_ptr + expert)
        w_scale = w_scale_ptr + expert.to(tl.int64) * N
        acc = acc * tl.load(w_scale + cols, mask=col_ok, other=0.0)[None, :]
    safe_pairs = tl.where(valid, pairs, 0)
    weight = tl.load(weights_ptr + safe_pairs, mask=valid, other=0.0).to(tl.float32)
    acc = acc * weight[:, None]
    out = out_ptr + safe_pairs[:, None].to(tl.int64) * stride_op + cols[None, :]
    tl.store(out, acc, mask=valid[:, None] & col_ok[None, :])


def fused_moe(
    hidden: torch.Tensor,  # [num_tokens, hidden]
    gate_up: torch.Tensor,  # [num_experts, 2 * inter, hidden] (e4m3 with `fp8`)
    down: torch.Tensor,  # [num_experts, hidden, inter] (e4m3 with `fp8`)
    routing: Routing,
    fp8: Fp8Scales | None = None,
    tiles: tuple[MoeTiles, MoeTiles] | None = None,  # (gate_up's, down's); None: moe_tiles
) -> torch.Tensor:
    """The routed experts' weighted sum -> [num_tokens, hidden], as moe.moe_reference (or, with
    `fp8`, moe_fp8.moe_reference_fp8)."""
    num_tokens, top_k = routing.expert_ids.shape
    num_experts, two_inter, hidden_size = gate_up.shape
    inter = two_inter // 2
    num_pairs = num_tokens * top_k
    hidden, gate_up, down = hidden.contiguous(), gate_up.contiguous(), down.contiguous()
    is_fp8 = fp8 is not None
    if tiles is None:
        tiles = (
            moe_tiles(num_pairs, num_experts, inter, hidden_size, is_fp8),
            moe_tiles(num_pairs, num_experts, hidden_size, inter, is_fp8),
        )
    first, second = tiles
    if first.block_m != second.block_m:
        raise ValueError("both grouped GEMMs read the same alignment: one block_m")
    block_m = first.block_m
    align = align_by_expert(routing.expert_ids, num_experts, block_m)
    max_rows = align.sorted_pairs.numel()
    blocks = max_rows // block_m
    ieee = hidden.dtype == torch.float32
    dot_mode = _fp8_dot_mode(hidden.device)
    # Without fp8 the scale pointers are never read; any tensor stands in.
    scales = fp8 or Fp8Scales(*([gate_up] * 6))
    act = torch.empty(max_rows, inter, dtype=hidden.dtype, device=hidden.device)
    _gate_up_kernel[(blocks, triton.cdiv(inter, first.block_n))](
        hidden,
        gate_up,
        act,
        align.sorted_pairs,
        align.block_experts,
        scales.gate_up,
        scales.gate_up_input,
        scales.gate_up_input_inv,
        num_pairs,
        num_experts,
        inter,
        hidden_size,
        hidden.stride(0),
        gate_up.stride(0),
        gate_up.stride(1),
        act.stride(0),
        TOP_K=top_k,
        IEEE=ieee,
        FP8=is_fp8,
        DOT_MODE=dot_mode,
        BLOCK_M=block_m,
        BLOCK_N=first.block_n,
        BLOCK_K=first.block_k,
        num_warps=first.num_warps,
    )
    pair_out = torch.empty(num_pairs, hidden_size, dtype=torch.float32, device=hidden.device)
    weights = routing.weights.reshape(-1).contiguous()
    _down_kernel[(blocks, triton.cdiv(hidden_size, second.block_n))](
        act,
        down,
        weights,
        pair_out,
        align.sorted_pairs,
        align.block_experts,
        scales.down,
        scales.down_input,
        scales.down_input_inv,
        num_pairs,
        num_experts,
        hidden_size,
        inter,
        act.stride(0),
        down.stride(0),
        down.stride(1),
        pair_out.stride(0),
        IEEE=ieee,
        FP8=is_fp8,
        DOT_MODE=dot_mode,
        BLOCK_M=block_m,
        BLOCK_N=second.block_n,
        BLOCK_K=second.block_k,
        num_warps=second.num_warps,
    )
    return pair_out.view(num_tokens, top_k, hidden_size).sum(dim=1).to(hidden.dtype)


def _fp8_dot_mode(device: torch.device) -> int:
    """e4m3 dots on CUDA with compute capability 8.9 and up, float16 elsewhere on CUDA (or with
    WORKBENCH_MOE_FP8_DOT=0), float32 under the interpreter."""
    if device.type != "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        return DOT_F32
    if (
        torch.cuda.get_device_capability(device) >= (8, 9)
        and os.environ.get(FP8_DOT_ENV_VAR) != "0"
    ):
        return DOT_E4M3
    return DOT_F16
