"""Neox-style (rotate-half) rotary embedding of q and k, in place, in one Triton kernel.

cos and sin come from a float32 cache [max_positions, head_dim] (cos in the first half of a row,
sin in the second) that `RotaryEmbedding.build_cache` computes once with the torch path's own ops
on the model's device, so rope scaling (llama3, linear, yarn) and the values are exactly those of
the per-step torch computation. The kernel then rounds where torch rounds: cos/sin cast to the
model dtype, each product rounded to it, then the sum. With FMA contraction off this is bit-exact
against `q * cos + rotate_half(q) * sin` in every dtype.

Graph-safe: positions are read from a device tensor; nothing is allocated.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.kernels.pdl import pdl_launch, wait_for_predecessor
from engine.kernels.rounding import round_to


@triton.jit
def _rotate_heads(
    ptr,  # this token's first head
    stride_head,
    first_head,
    num_heads,
    cos,  # [HALF_PAD] float32, already rounded to the dtype
    sin,
    HALF: tl.constexpr,
    HALF_PAD: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    heads = first_head + tl.arange(0, BLOCK_H)
    dims = tl.arange(0, HALF_PAD)
    mask = (heads < num_heads)[:, None] & (dims < HALF)[None, :]
    ptrs = ptr + heads[:, None] * stride_head + dims[None, :]  # [BLOCK_H, HALF_PAD]
    dtype = ptr.dtype.element_ty
    x1 = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(ptrs + HALF, mask=mask, other=0.0).to(tl.float32)
    # torch: q * cos + cat(-x2, x1) * sin, every op rounded to the dtype.
    a1 = round_to(x1 * cos[None, :], dtype)
    a2 = round_to(x2 * cos[None, :], dtype)
    b1 = round_to(-x2 * sin[None, :], dtype)
    b2 = round_to(x1 * sin[None, :], dtype)
    tl.store(ptrs, round_to(a1 + b1, dtype).to(dtype), mask=mask)
    tl.store(ptrs + HALF, round_to(a2 + b2, dtype).to(dtype), mask=mask)


@triton.jit
def _rotary_kernel(
    q_ptr,  # [num_tokens, num_q_heads, head_dim], last dim contiguous
    k_ptr,  # [num_tokens, num_k_heads, head_dim]
    positions_ptr,  # [num_tokens]
    cache_ptr,  # [max_positions, head_dim] float32: cos | sin
    stride_q_tok,
    stride_q_head,
    stride_k_tok,
    stride_k_head,
    stride_cache,
    num_q_heads,
    num_k_heads,
    Q_BLOCKS: tl.constexpr,  # programs per token for q; the rest of axis 1 does k
    HALF: tl.constexpr,
    HALF_PAD: tl.constexpr,
    BLOCK_H: tl.constexpr,
    USE_GDC: tl.constexpr,  # launched with PDL (engine/kernels/pdl.py)
):
    wait_for_predecessor(USE_GDC)
    tok = tl.program_id(0).to(tl.int64)
    block = tl.program_id(1)
    pos = tl.load(positions_ptr + tok).to(tl.int64)
    dims = tl.arange(0, HALF_PAD)
    row = cache_ptr + pos * stride_cache
    cos = tl.load(row + dims, mask=dims < HALF, other=0.0)
    sin = tl.load(row + HALF + dims, mask=dims < HALF, other=0.0)
    dtype = q_ptr.dtype.element_ty
    cos = round_to(cos, dtype)  # torch casts cos/sin to the dtype first
    sin = round_to(sin, dtype)
    if block < Q_BLOCKS:
        _rotate_heads(
            q_ptr + tok * stride_q_tok,
            stride_q_head,
            block * BLOCK_H,
            num_q_heads,
            cos,
            sin,
            HALF,
            HALF_PAD,
            BLOCK_H,
        )
    else:
        _rotate_heads(
            k_ptr + tok * stride_k_tok,
            stride_k_head,
            (block - Q_BLOCKS) * BLOCK_H,
            num_k_heads,
            cos,
            sin,
            HALF,
            HALF_PAD,
            BLOCK_H,
        )


def rotary_embedding(
    positions: torch.Tensor,  # [num_tokens] int
    q: torch.Tensor,  # [num_tokens, num_q_heads, head_dim]: rotated in place
    k: torch.Tensor,  # [num_tokens, num_k_heads, head_dim]: rotated in place
    cos_sin_cache: torch.Tensor,  # [max_positions, head_dim] float32
) -> None:
    """q and k may be strided views (e.g. slices of the fused qkv output); their last dim must be
    contiguous. Every position must be < max_positions: the kernel does not check."""
    num_tokens, num_q_heads, head_dim = q.shape
    num_k_heads = k.shape[1]
    if q.stride(-1) != 1 or k.stride(-1) != 1:
        raise ValueError("rotary_embedding needs the head dim of q and k contiguous")
    if head_dim % 2 or cos_sin_cache.shape[1] != head_dim or k.dtype != q.dtype:
        raise ValueError(
            f"rotary_embedding: head_dim {head_dim}, cache width {cos_sin_cache.shape[1]}, "
            f"q {q.dtype}, k {k.dtype}"
        )
    if num_tokens == 0:
        return
    half = head_dim // 2
    half_pad = triton.next_power_of_2(half)
    # ~512 values per half and program: enough programs at batch 1, few at 4096 tokens.
    block_h = min(triton.next_power_of_2(max(num_q_heads, num_k_heads)), max(1, 512 // half_pad))
    q_blocks = triton.cdiv(num_q_heads, block_h)
    k_blocks = triton.cdiv(num_k_heads, block_h)
    _rotary_kernel[(num_tokens, q_blocks + k_blocks)](
        q,
        k,
        positions,
        cos_sin_cache,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        cos_sin_cache.stride(0),
        num_q_heads,
        num_k_heads,
        Q_BLOCKS=q_blocks,
        HALF=half,
        HALF_PAD=half_pad,
        BLOCK_H=block_h,
        num_warps=4,
        enable_fp_fusion=False,  # round each product as torch does
        **pdl_launch(q.device),
    )
