"""Paged prefill attention in Triton: every prefill chunk of a step in one launch, each query
attending causally to its sequence's cached prefix and to the chunk itself, K/V read through the
block table (no gathered copy of the context).

One program per (sequence, block of BLOCK_M queries, query head); it walks the pages its queries
can see (up to the causal limit of its last query) with an online softmax. Query j of a chunk of
q_len tokens sits at absolute position seq_len - q_len + j. Quantized caches are dequantized as
they are loaded, with the decode kernel's conventions (SCALES 1: one scale per layer, fp8;
SCALES 2: one per slot and KV head, int8).

The Triton backend uses it unless `WORKBENCH_TRITON_PREFILL=0` (then the reference,
`TorchAttention._prefill`: one SDPA call per sequence over gathered pages); on the H200 it was
faster in every throughput row measured (docs/performance.md).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.attention.triton_pages import attend_page, kv_scale_args, load_kv_page


@triton.jit
def _paged_prefill_kernel(
    q_ptr,  # [num_tokens, num_heads, head_dim], the prefill chunks back to back
    k_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache_ptr,
    out_ptr,  # like q
    block_tables_ptr,  # [num_seqs, max_blocks] int64
    seq_lens_ptr,  # [num_seqs] int64: context length including this chunk
    q_starts_ptr,  # [num_seqs + 1] int64: offsets of the chunks in q
    k_scale_ptr,  # SCALES 1: [] float32; 2: [num_blocks, block_size, num_kv_heads] float32
    v_scale_ptr,
    scale,
    stride_q_tok,
    stride_q_head,
    stride_o_tok,
    stride_o_head,
    stride_k_block,
    stride_k_pos,
    stride_k_head,
    stride_bt_seq,
    stride_s_block,
    stride_s_pos,
    SCALES: tl.constexpr,
    GROUP: tl.constexpr,  # query heads per KV head
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,  # tokens per page
    BLOCK_M: tl.constexpr,  # queries per program
    PRECISION: tl.constexpr,  # "ieee" for float32 (no TF32 rounding), else "tf32"
):
    seq = tl.program_id(0)
    m_block = tl.program_id(1)
    head = tl.program_id(2)
    q_start = tl.load(q_starts_ptr + seq).to(tl.int32)
    q_len = tl.load(q_starts_ptr + seq + 1).to(tl.int32) - q_start
    if m_block * BLOCK_M >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq).to(tl.int32)
    prefix = seq_len - q_len
    kv_head = head // GROUP

    rows = m_block * BLOCK_M + tl.arange(0, BLOCK_M)  # query index within the chunk
    row_ok = rows < q_len
    dims = tl.arange(0, HEAD_DIM)
    offs = tl.arange(0, BLOCK_SIZE)
    q = tl.load(
        q_ptr + (q_start + rows)[:, None] * stride_q_tok + head * stride_q_head + dims[None, :],
        mask=row_ok[:, None],
        other=0.0,
    )  # [BLOCK_M, HEAD_DIM]
    q_pos = prefix + rows  # absolute positions; padding rows see the whole context (no NaN)

    m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    denom = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    last_key = tl.minimum(prefix + (m_block + 1) * BLOCK_M, seq_len)  # exclusive
    for page in range(0, tl.cdiv(last_key, BLOCK_SIZE)):
        block = tl.load(block_tables_ptr + seq * stride_bt_seq + page)
        pos = page * BLOCK_SIZE + offs  # [BLOCK_SIZE] key positions
        pos_ok = pos < seq_len
        k, v = load_kv_page(
            k_cache_ptr,
            v_cache_ptr,
            k_scale_ptr,
            v_scale_ptr,
            block,
            kv_head,
            offs,
            dims,
            pos_ok,
            q,
            stride_k_block,
            stride_k_pos,
            stride_k_head,
            stride_s_block,
            stride_s_pos,
            SCALES,
        )
        visible = pos_ok[None, :] & (pos[None, :] <= q_pos[:, None])  # [BLOCK_M, BLOCK_SIZE]
        m, denom, acc = attend_page(q, k, v, visible, m, denom, acc, scale, PRECISION)

    out = acc / denom[:, None]
    tl.store(
        out_ptr + (q_start + rows)[:, None] * stride_o_tok + head * stride_o_head + dims[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=row_ok[:, None],
    )


def paged_prefill_attention(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim]: the chunks back to back
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [num_seqs, max_blocks]
    seq_lens: torch.Tensor,  # [num_seqs]: context lengths including the chunks
    q_starts: torch.Tensor,  # [num_seqs + 1]: chunk offsets into q, q_starts[0] == 0
    max_q_len: int,  # the longest chunk (sizes the launch grid)
    scale: float,
    out: torch.Tensor | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention of each chunk's queries to its whole context -> [num_tokens, heads, d].
    Quantized caches come with their scales, as for `paged_decode_attention`."""
    num_tokens, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    num_seqs = seq_lens.shape[0]
    if out is None:
        out = torch.empty_like(q)
    if num_seqs == 0 or num_tokens == 0:
        return out
    scales, k_scale, v_scale, stride_s_block, stride_s_pos = kv_scale_args(
        k_cache, k_scale, v_scale, q
    )
    if q.stride(-1) != 1:
        q = q.contiguous()
    block_m = max(16, min(64, triton.next_power_of_2(max_q_len)))
    grid = (num_seqs, triton.cdiv(max_q_len, block_m), num_heads)
    _paged_prefill_kernel[grid](
        q,
        k_cache,
        v_cache,
        out,
        block_tables,
        seq_lens,
        q_starts,
        k_scale,
        v_scale,
        scale,
        q.stride(0),
        q.stride(1),
        out.stride(0),
        out.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        block_tables.stride(0),
        stride_s_block,
        stride_s_pos,
        SCALES=scales,
        GROUP=num_heads // num_kv_heads,
        HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size,
        BLOCK_M=block_m,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=4,
    )
    return out
