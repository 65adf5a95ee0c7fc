"""What the paged Triton attention kernels share: loading one KV page (dequantizing an fp8 or
int8 cache as it is read), one page's step of the online softmax, and checking the scales that
come with a quantized cache."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def load_kv_page(
    k_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache_ptr,
    k_scale_ptr,  # SCALES 1: [] float32; 2: [num_blocks, block_size, num_kv_heads] float32
    v_scale_ptr,
    block,  # the page's block id
    kv_head,
    offs,  # [BLOCK_SIZE] positions within the page
    dims,  # [HEAD_DIM]
    pos_ok,  # [BLOCK_SIZE] bool: positions inside the context (others load as 0)
    like,  # any block in the compute dtype: quantized pages are dequantized to its dtype
    stride_k_block,
    stride_k_pos,
    stride_k_head,
    stride_s_block,
    stride_s_pos,
    SCALES: tl.constexpr,  # 0: unquantized cache; 1: one scale per layer (fp8); 2: per slot (int8)
):
    """-> k, v [BLOCK_SIZE, HEAD_DIM] of one page."""
    base = block * stride_k_block + kv_head * stride_k_head
    kv_offs = base + offs[:, None] * stride_k_pos + dims[None, :]  # [BLOCK_SIZE, HEAD_DIM]
    k = tl.load(k_cache_ptr + kv_offs, mask=pos_ok[:, None], other=0.0)
    v = tl.load(v_cache_ptr + kv_offs, mask=pos_ok[:, None], other=0.0)
    if SCALES == 1:  # dequantize in float32, then compute in the query's dtype
        k = (k.to(tl.float32) * tl.load(k_scale_ptr)).to(like.dtype)
        v = (v.to(tl.float32) * tl.load(v_scale_ptr)).to(like.dtype)
    elif SCALES == 2:
        s_offs = block * stride_s_block + offs * stride_s_pos + kv_head  # [BLOCK_SIZE]
        ks = tl.load(k_scale_ptr + s_offs, mask=pos_ok, other=0.0)
        vs = tl.load(v_scale_ptr + s_offs, mask=pos_ok, other=0.0)
        k = (k.to(tl.float32) * ks[:, None]).to(like.dtype)
        v = (v.to(tl.float32) * vs[:, None]).to(like.dtype)
    return k, v


@triton.jit
def attend_page(
    q,  # [ROWS, HEAD_DIM] queries in the compute dtype
    k,  # [BLOCK_SIZE, HEAD_DIM] one page, as load_kv_page returns it
    v,
    visible,  # [ROWS or 1, BLOCK_SIZE] bool: which query may see which key
    m,  # [ROWS] float32 running max of the scores
    denom,  # [ROWS] float32 running softmax denominator
    acc,  # [ROWS, HEAD_DIM] float32 running unnormalised output
    scale,
    PRECISION: tl.constexpr,  # "ieee" for float32 (no TF32 rounding), else "tf32"
):
    """One page of the online softmax -> the updated (m, denom, acc)."""
    scores = tl.dot(q, tl.trans(k), input_precision=PRECISION).to(tl.float32) * scale
    scores = tl.where(visible, scores, float("-inf"))  # [ROWS, BLOCK_SIZE]
    m_new = tl.maximum(m, tl.max(scores, axis=1))
    alpha = tl.exp(m - m_new)
    p = tl.exp(scores - m_new[:, None])
    denom = denom * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return m_new, denom, acc


def kv_scale_args(
    k_cache: torch.Tensor,
    k_scale: torch.Tensor | None,
    v_scale: torch.Tensor | None,
    placeholder: torch.Tensor,
) -> tuple[int, torch.Tensor, torch.Tensor, int, int]:
    """-> (SCALES, k_scale, v_scale, stride_s_block, stride_s_pos) for `load_kv_page`; an
    unquantized cache passes `placeholder` as its (unread) scales."""
    if (k_scale is None) != (v_scale is None):
        raise ValueError("k_scale and v_scale come together")
    if k_scale is None:
        return 0, placeholder, placeholder, 0, 0
    scales = 1 if k_scale.dim() == 0 else 2
    if scales == 2 and k_scale.shape != k_cache.shape[:3]:
        raise ValueError(
            f"per-slot scales must be {tuple(k_cache.shape[:3])}, got {tuple(k_scale.shape)}"
        )
    k_scale, v_scale = k_scale.contiguous(), v_scale.contiguous()
    if scales == 1:
        return 1, k_scale, v_scale, 0, 0
    return 2, k_scale, v_scale, k_scale.stride(0), k_scale.stride(1)
