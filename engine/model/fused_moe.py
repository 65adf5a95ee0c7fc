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
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from engine.model.moe import Routing

BLOCK_M = 16  # sorted rows per block: tl.dot's smallest tile


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


@triton.jit
def _gate_up_kernel(
    x_ptr,  # [num_tokens, K] hidden
    w_ptr,  # [E, 2 * N, K] gate rows then up rows
    out_ptr,  # [max_rows, N] silu(gate) * up, in sorted-row order
    sorted_pairs_ptr,
    block_experts_ptr,
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
        gate += _dot(a, b_gate, IEEE)
        up += _dot(a, b_up, IEEE)
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
    num_pairs,
    num_experts,
    N,
    K,
    stride_xm,
    stride_we,
    stride_wn,
    stride_op,
    IEEE: tl.constexpr,
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
        acc += _dot(a, b, IEEE)
    safe_pairs = tl.where(valid, pairs, 0)
    weight = tl.load(weights_ptr + safe_pairs, mask=valid, other=0.0).to(tl.float32)
    acc = acc * weight[:, None]
    out = out_ptr + safe_pairs[:, None].to(tl.int64) * stride_op + cols[None, :]
    tl.store(out, acc, mask=valid[:, None] & col_ok[None, :])


def fused_moe(
    hidden: torch.Tensor,  # [num_tokens, hidden]
    gate_up: torch.Tensor,  # [num_experts, 2 * inter, hidden]
    down: torch.Tensor,  # [num_experts, hidden, inter]
    routing: Routing,
    block_n: int = 64,
    block_k: int = 32,
) -> torch.Tensor:
    """The routed experts' weighted sum -> [num_tokens, hidden], as moe.moe_reference."""
    num_tokens, top_k = routing.expert_ids.shape
    num_experts, two_inter, hidden_size = gate_up.shape
    inter = two_inter // 2
    num_pairs = num_tokens * top_k
    hidden, gate_up, down = hidden.contiguous(), gate_up.contiguous(), down.contiguous()
    align = align_by_expert(routing.expert_ids, num_experts)
    max_rows = align.sorted_pairs.numel()
    blocks = max_rows // BLOCK_M
    ieee = hidden.dtype == torch.float32
    act = torch.empty(max_rows, inter, dtype=hidden.dtype, device=hidden.device)
    _gate_up_kernel[(blocks, triton.cdiv(inter, block_n))](
        hidden,
        gate_up,
        act,
        align.sorted_pairs,
        align.block_experts,
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
        BLOCK_M=BLOCK_M,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
    )
    pair_out = torch.empty(num_pairs, hidden_size, dtype=torch.float32, device=hidden.device)
    weights = routing.weights.reshape(-1).contiguous()
    _down_kernel[(blocks, triton.cdiv(hidden_size, block_n))](
        act,
        down,
        weights,
        pair_out,
        align.sorted_pairs,
        align.block_experts,
        num_pairs,
        num_experts,
        hidden_size,
        inter,
        act.stride(0),
        down.stride(0),
        down.stride(1),
        pair_out.stride(0),
        IEEE=ieee,
        BLOCK_M=BLOCK_M,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
    )
    return pair_out.view(num_tokens, top_k, hidden_size).sum(dim=1).to(hidden.dtype)
