"""Paged decode attention in Triton: one query token per sequence, K/V read through the block
table, online softmax over the pages. GQA: one program serves all query heads of one KV head,
so each K/V page is read once per group, not once per query head.

Graph-safe: every size that changes between steps (context lengths, block tables) is read from
device tensors, so a CUDA graph captured once replays for any contents.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _paged_decode_kernel(
    q_ptr,  # [num_seqs, num_heads, head_dim]
    k_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache_ptr,
    block_tables_ptr,  # [num_seqs, max_blocks] int64
    seq_lens_ptr,  # [num_seqs] int64
    out_ptr,  # [num_seqs, num_heads, head_dim]
    scale,
    stride_q_seq,
    stride_q_head,
    stride_k_block,
    stride_k_pos,
    stride_k_head,
    stride_bt_seq,
    stride_o_seq,
    stride_o_head,
    GROUP: tl.constexpr,  # query heads per KV head
    GROUP_PAD: tl.constexpr,  # GROUP rounded up to >= 16 for tl.dot
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,  # tokens per page
    PRECISION: tl.constexpr,  # "ieee" for float32 caches (no TF32 rounding), else "tf32"
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    seq_len = tl.load(seq_lens_ptr + seq).to(tl.int32)

    rows = tl.arange(0, GROUP_PAD)  # query heads of this group (padded)
    dims = tl.arange(0, HEAD_DIM)
    offs = tl.arange(0, BLOCK_SIZE)
    row_ok = rows < GROUP
    heads = kv_head * GROUP + rows
    q = tl.load(
        q_ptr + seq * stride_q_seq + heads[:, None] * stride_q_head + dims[None, :],
        mask=row_ok[:, None],
        other=0.0,
    )  # [GROUP_PAD, HEAD_DIM]

    m = tl.full([GROUP_PAD], float("-inf"), dtype=tl.float32)
    denom = tl.zeros([GROUP_PAD], dtype=tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], dtype=tl.float32)
    num_pages = tl.cdiv(seq_len, BLOCK_SIZE)
    for page in range(0, num_pages):
        block = tl.load(block_tables_ptr + seq * stride_bt_seq + page)
        pos = page * BLOCK_SIZE + offs
        pos_ok = pos < seq_len
        base = block * stride_k_block + kv_head * stride_k_head
        kv_offs = base + offs[:, None] * stride_k_pos + dims[None, :]  # [BLOCK_SIZE, HEAD_DIM]
        k = tl.load(k_cache_ptr + kv_offs, mask=pos_ok[:, None], other=0.0)
        v = tl.load(v_cache_ptr + kv_offs, mask=pos_ok[:, None], other=0.0)
        scores = (
            tl.dot(q, tl.trans(k), input_precision=PRECISION).to(tl.float32) * scale
        )  # [GROUP_PAD, BLOCK_SIZE]
        scores = tl.where(pos_ok[None, :], scores, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, axis=1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(scores - m_new[:, None])
        denom = denom * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m = m_new
    out = acc / denom[:, None]
    tl.store(
        out_ptr + seq * stride_o_seq + heads[:, None] * stride_o_head + dims[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=row_ok[:, None],
    )


def paged_decode_attention(
    q: torch.Tensor,  # [num_seqs, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [num_seqs, max_blocks]
    seq_lens: torch.Tensor,  # [num_seqs]
    scale: float,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    num_seqs, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    group = num_heads // num_kv_heads
    if out is None:
        out = torch.empty_like(q)
    if num_seqs == 0:
        return out
    q = q.contiguous()
    _paged_decode_kernel[(num_seqs, num_kv_heads)](
        q,
        k_cache,
        v_cache,
        block_tables,
        seq_lens,
        out,
        scale,
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        block_tables.stride(0),
        out.stride(0),
        out.stride(1),
        GROUP=group,
        GROUP_PAD=max(16, triton.next_power_of_2(group)),
        HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=4,
    )
    return out
