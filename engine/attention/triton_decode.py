"""Paged decode attention in Triton: one query token per sequence, K/V read through the block
table, online softmax over the pages. GQA: one program serves all query heads of one KV head,
so each K/V page is read once per group, not once per query head.

Split-K ("flash decoding"): a sequence's pages are cut into `num_splits` contiguous ranges, each
handled by its own program, which writes a partial result (running max, softmax denominator and
unnormalised output); a second kernel merges the splits. At batch 1 a one-program-per-KV-head
launch keeps 8 of the H100's 132 SMs busy and walks the pages one after another; the splits
spread them over the whole GPU. With one split the partials are merged by the same code, so the
numerics do not depend on how many splits ran (up to float32 rounding of the merge).

Quantized pages are not dequantized element by element: e4m3 and int8 values are exact in the
compute dtype (for fp8, float16 stands in for bfloat16: the conversion is cheaper, as exact),
so fp8's per-layer scales multiply the scores (K) and the output (V), and int8's per-token
scales the scores' and the softmax weights' columns.

Graph-safe: every size that changes between steps (context lengths, block tables) is read from
device tensors, and `num_splits` depends only on the batch shape, so a CUDA graph captured once
replays for any contents.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from engine.attention.triton_pages import kv_scale_args
from engine.kernels.pdl import pdl_launch, wait_for_predecessor
from engine.numeric import cdiv

MAX_SPLITS = 16


@dataclass(frozen=True)
class DecodeTuning:
    """Launch shape of the split kernel. `tile_tokens` K/V rows are read per loop iteration
    (several pages at once: one 16-token page of fp8 K is only 2 KB, too little to keep the
    memory system busy); scripts/bench_decode_kernels.py times the choices."""

    tile_tokens: int = 64
    num_warps: int = 4
    num_stages: int = 2

    def tile_pages(self, block_size: int) -> int:
        return max(1, self.tile_tokens // block_size)


TUNING_ENV_VAR = "WORKBENCH_DECODE_TUNING"  # "TILE_TOKENS:WARPS:STAGES" for every launch (A/B runs)


def default_tuning(num_splits: int, fp8_pages: bool) -> DecodeTuning:
    """64-token tiles, 4 warps, 2 stages for every shape. In isolation (scripts/
    bench_decode_kernels.py, H200) unsplit fp8 batches read faster with 2 warps (0.65 of the copy
    bandwidth against 0.56) and one long split sequence with 128-token tiles (bf16 0.56 against
    0.46); end to end the 2-warp choice lost (fp8 128/128 at 1,024 running: 14,277 against 16,075
    tok/s on one machine, docs/performance.md), so the kernel keeps one shape until the split
    case is timed end to end on its own. `WORKBENCH_DECODE_TUNING` forces one for A/B runs."""
    forced = os.environ.get(TUNING_ENV_VAR)
    if forced:
        return DecodeTuning(*map(int, forced.split(":")))
    return DecodeTuning()


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
    TILE_PAGES: tl.constexpr,  # pages read per loop iteration
    PRECISION: tl.constexpr,  # "ieee" for float32 caches (no TF32 rounding), else "tf32"
    USE_GDC: tl.constexpr,  # launched with PDL (engine/kernels/pdl.py)
):
    wait_for_predecessor(USE_GDC)
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + seq).to(tl.int32)
    num_pages = tl.cdiv(seq_len, BLOCK_SIZE)
    # Whole tiles per split: a split's last tile is the only one that may be partly masked.
    pages_per_split = tl.cdiv(tl.cdiv(num_pages, NUM_SPLITS), TILE_PAGES) * TILE_PAGES
    first_page = split * pages_per_split
    last_page = tl.minimum(first_page + pages_per_split, num_pages)
    end = tl.minimum(last_page * BLOCK_SIZE, seq_len)  # this split's tokens: [first, end)

    rows = tl.arange(0, GROUP_PAD)  # query heads of this group (padded)
    dims = tl.arange(0, HEAD_DIM)
    TILE: tl.constexpr = TILE_PAGES * BLOCK_SIZE
    t = tl.arange(0, TILE)  # token of the tile
    page_of_t = t // BLOCK_SIZE  # [TILE] which of the tile's pages holds token t
    slot_of_t = t % BLOCK_SIZE
    row_ok = rows < GROUP
    heads = kv_head * GROUP + rows
    q = tl.load(
        q_ptr + seq * stride_q_seq + heads[:, None] * stride_q_head + dims[None, :],
        mask=row_ok[:, None],
        other=0.0,
    )  # [GROUP_PAD, HEAD_DIM]
    dtype = q.dtype
    if SCALES == 1 and dtype == tl.bfloat16:
        # e4m3 pages convert to float16 in one instruction per pair (to bfloat16 through
        # float32), and their values are exact in it: the dots run in float16, float32
        # accumulation (H200, batch 512: 0.56 of the copy bandwidth against 0.48; int8 pages
        # were slower this way). The query is clamped to float16's range (never near it).
        dtype = tl.float16
        q = tl.clamp(q.to(tl.float32), -65504.0, 65504.0).to(dtype)
    # fp8 (one scale per layer): the scales are folded into the score scale and the output
    # instead of multiplying every element; e4m3 values are exact in the compute dtype.
    score_scale = scale
    if SCALES == 1:
        score_scale = scale * tl.load(k_scale_ptr)

    m = tl.full([GROUP_PAD], float("-inf"), dtype=tl.float32)
    denom = tl.zeros([GROUP_PAD], dtype=tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], dtype=tl.float32)
    bt_row = block_tables_ptr + seq * stride_bt_seq
    for tile_page in range(first_page, last_page, TILE_PAGES):
        pos = tile_page * BLOCK_SIZE + t  # [TILE]
        pos_ok = pos < end
        block = tl.load(bt_row + tile_page + page_of_t, mask=pos_ok, other=0)  # [TILE]
        kv_offs = (
            block[:, None] * stride_k_block
            + slot_of_t[:, None] * stride_k_pos
            + kv_head * stride_k_head
            + dims[None, :]
        )  # [TILE, HEAD_DIM]
        k = tl.load(k_cache_ptr + kv_offs, mask=pos_ok[:, None], other=0.0).to(dtype)
        v = tl.load(v_cache_ptr + kv_offs, mask=pos_ok[:, None], other=0.0).to(dtype)
        scores = tl.dot(q, tl.trans(k), input_precision=PRECISION).to(tl.float32)
        if SCALES == 2:  # int8: per-token scales scale the scores' and the weights' columns
            s_offs = block * stride_s_block + slot_of_t * stride_s_pos + kv_head  # [TILE]
            ks = tl.load(k_scale_ptr + s_offs, mask=pos_ok, other=0.0)
            vs = tl.load(v_scale_ptr + s_offs, mask=pos_ok, other=0.0)
            scores = scores * ks[None, :]
        scores = tl.where(pos_ok[None, :], scores * score_scale, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, axis=1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(scores - m_new[:, None])  # [GROUP_PAD, TILE]
        denom = denom * alpha + tl.sum(p, axis=1)
        if SCALES == 2:
            p = p * vs[None, :]
        acc = acc * alpha[:, None] + tl.dot(p.to(dtype), v, input_precision=PRECISION)
        m = m_new
    if SCALES == 1:
        acc = acc * tl.load(v_scale_ptr)

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
    USE_GDC: tl.constexpr,  # launched with PDL (engine/kernels/pdl.py)
):
    wait_for_predecessor(USE_GDC)
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
    tuning: DecodeTuning | None = None,
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
    if q.stride(-1) != 1:  # a strided view (the fused qkv's q) is read through its strides
        q = q.contiguous()
    scales, k_scale, v_scale, stride_s_block, stride_s_pos = kv_scale_args(
        k_cache, k_scale, v_scale, q
    )
    tuning = tuning or default_tuning(num_splits, scales == 1)
    f32 = dict(dtype=torch.float32, device=q.device)
    pdl = pdl_launch(q.device)
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
        TILE_PAGES=tuning.tile_pages(block_size),
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=tuning.num_warps,
        num_stages=tuning.num_stages,
        **pdl,
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
        **pdl,
    )
    return out
