"""Paged decode attention in Triton: one query token per sequence, K/V read through the block
table, online softmax over the pages. GQA: one program serves all query heads of one KV head,
so each K/V page is read once per group, not once per query head.

Split-K ("flash decoding"): a sequence's pages are cut into `num_splits` contiguous ranges, each
handled by its own program, which writes a partial result (running max, softmax denominator and
unnormalised output); a second kernel merges the splits. At batch 1 a one-program-per-KV-head
launch keeps 8 of the H100's 132 SMs busy and walks the pages one after another; the splits
spread them over the whole GPU. With one split the partials are merged by the same code, so the
numerics do not depend on how many splits ran (up to float32 rounding of the merge).

Graph-safe: every size that changes between steps (context lengths, block tables) is read from
device tensors, and `num_splits` depends only on the batch shape, so a CUDA graph captured once
replays for any contents.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.attention.triton_pages import attend_page, kv_scale_args, load_kv_page
from engine.numeric import cdiv

MAX_SPLITS = 16


@triton.jit
def _paged_decode_split_kernel(
    q_ptr,  # [num_seqs, num_heads, head_dim]
    k_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache_ptr,
    block_tables_ptr,  # [num_seqs, max_blocks] int64
    seq_lens_ptr,  # [num_seqs] int64
    part_acc_ptr,  # [num_seqs, num_heads, NUM_SPLITS, head_dim] float32
    part_max_ptr,  # [num_seqs, num_heads, NUM_SPLITS] float32
    part_sum_ptr,  # [num_seqs, num_heads, NUM_SPLITS] float32
    k_scale_ptr,  # SCALES 1: [] float32; 2: [num_blocks, block_size, num_kv_heads] float32
    v_scale_ptr,
    scale,
    stride_q_seq,
    stride_q_head,
    stride_k_block,
    stride_k_pos,
    stride_k_head,
    stride_bt_seq,
    stride_s_block,  # of the per-slot scales (SCALES 2)
    stride_s_pos,
    NUM_SPLITS: tl.constexpr,
    SCALES: tl.constexpr,  # 0: unquantized cache; 1: one scale per layer (fp8); 2: per slot (int8)
    GROUP: tl.constexpr,  # query heads per KV head
    GROUP_PAD: tl.constexpr,  # GROUP rounded up to >= 16 for tl.dot
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,  # tokens per page
    PRECISION: tl.constexpr,  # "ieee" for float32 caches (no TF32 rounding), else "tf32"
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + seq).to(tl.int32)
    num_pages = tl.cdiv(seq_len, BLOCK_SIZE)
    pages_per_split = tl.cdiv(num_pages, NUM_SPLITS)
    first_page = split * pages_per_split
    last_page = tl.minimum(first_page + pages_per_split, num_pages)

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
    for page in range(first_page, last_page):
        block = tl.load(block_tables_ptr + seq * stride_bt_seq + page)
        pos = page * BLOCK_SIZE + offs
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
        m, denom, acc = attend_page(q, k, v, pos_ok[None, :], m, denom, acc, scale, PRECISION)

    # An empty split (fewer pages than splits) leaves m = -inf and denom = 0: the merge skips it.
    part = (seq * (GROUP * tl.num_programs(1)) + heads) * NUM_SPLITS + split  # [GROUP_PAD]
    tl.store(part_max_ptr + part, m, mask=row_ok)
    tl.store(part_sum_ptr + part, denom, mask=row_ok)
    tl.store(part_acc_ptr + part[:, None] * HEAD_DIM + dims[None, :], acc, mask=row_ok[:, None])


@triton.jit
def _merge_splits_kernel(
    part_acc_ptr,  # [num_seqs, num_heads, NUM_SPLITS, head_dim] float32
    part_max_ptr,  # [num_seqs, num_heads, NUM_SPLITS] float32
    part_sum_ptr,  # [num_seqs, num_heads, NUM_SPLITS] float32
    out_ptr,  # [num_seqs, num_heads, head_dim]
    stride_o_seq,
    stride_o_head,
    NUM_SPLITS: tl.constexpr,
    SPLITS_PAD: tl.constexpr,  # NUM_SPLITS rounded up to a power of two
    HEAD_DIM: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    splits = tl.arange(0, SPLITS_PAD)
    dims = tl.arange(0, HEAD_DIM)
    split_ok = splits < NUM_SPLITS
    part = (seq * tl.num_programs(1) + head) * NUM_SPLITS + splits  # [SPLITS_PAD]
    m = tl.load(part_max_ptr + part, mask=split_ok, other=float("-inf"))
    s = tl.load(part_sum_ptr + part, mask=split_ok, other=0.0)
    m_all = tl.max(m, axis=0)
    weight = tl.where(split_ok & (s > 0), tl.exp(m - m_all), 0.0)  # [SPLITS_PAD]
    acc = tl.load(
        part_acc_ptr + part[:, None] * HEAD_DIM + dims[None, :], mask=split_ok[:, None], other=0.0
    )  # [SPLITS_PAD, HEAD_DIM]
    out = tl.sum(acc * weight[:, None], axis=0) / tl.sum(s * weight, axis=0)
    tl.store(
        out_ptr + seq * stride_o_seq + head * stride_o_head + dims,
        out.to(out_ptr.dtype.element_ty),
    )


def choose_num_splits(num_seqs: int, num_kv_heads: int, max_pages: int, num_sms: int) -> int:
    """Enough programs to cover the GPU about twice, never more splits than pages."""
    programs = num_seqs * num_kv_heads
    wanted = cdiv(2 * num_sms, programs)
    return max(1, min(MAX_SPLITS, wanted, max_pages))


_SM_COUNT: dict[int, int] = {}


def _sm_count(device: torch.device) -> int:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNT[index]


def paged_decode_attention(
    q: torch.Tensor,  # [num_seqs, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [num_seqs, max_blocks]
    seq_lens: torch.Tensor,  # [num_seqs]
    scale: float,
    out: torch.Tensor | None = None,
    num_splits: int | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """`num_splits` None: chosen from the batch shape and the GPU (see `choose_num_splits`).
    Quantized caches (fp8, int8) come with their scales: `k_scale`/`v_scale` [] float32 (one per
    layer) or [num_blocks, block_size, num_kv_heads] float32 (one per slot and KV head)."""
    num_seqs, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    group = num_heads // num_kv_heads
    if out is None:
        out = torch.empty_like(q)
    if num_seqs == 0:
        return out
    if num_splits is None:
        sms = _sm_count(q.device) if q.device.type == "cuda" else 4
        num_splits = choose_num_splits(num_seqs, num_kv_heads, block_tables.shape[1], sms)
    q = q.contiguous()
    scales, k_scale, v_scale, stride_s_block, stride_s_pos = kv_scale_args(
        k_cache, k_scale, v_scale, q
    )
    f32 = dict(dtype=torch.float32, device=q.device)
    part_acc = torch.empty(num_seqs, num_heads, num_splits, head_dim, **f32)
    part_max = torch.empty(num_seqs, num_heads, num_splits, **f32)
    part_sum = torch.empty(num_seqs, num_heads, num_splits, **f32)
    _paged_decode_split_kernel[(num_seqs, num_kv_heads, num_splits)](
        q,
        k_cache,
        v_cache,
        block_tables,
        seq_lens,
        part_acc,
        part_max,
        part_sum,
        k_scale,
        v_scale,
        scale,
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        block_tables.stride(0),
        stride_s_block,
        stride_s_pos,
        NUM_SPLITS=num_splits,
        SCALES=scales,
        GROUP=group,
        GROUP_PAD=max(16, triton.next_power_of_2(group)),
        HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=4,
    )
    _merge_splits_kernel[(num_seqs, num_heads)](
        part_acc,
        part_max,
        part_sum,
        out,
        out.stride(0),
        out.stride(1),
        NUM_SPLITS=num_splits,
        SPLITS_PAD=triton.next_power_of_2(num_splits),
        HEAD_DIM=head_dim,
        num_warps=1,
    )
    return out
