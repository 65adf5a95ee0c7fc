"""This step's K and V into their pages in one Triton launch, quantizing on the way in.

The same arithmetic as `engine.kv.quant.write_quantized` (which is the reference and the CPU
path): auto stores the value cast to the page dtype; fp8 stores saturate(x / scale) with one
scale per layer; int8 stores round(x / s) with s = amax / 127 per token and KV head, written
beside the pages. One program per (token, KV head) writes that head's K and V. Replaces two
index_put kernels (four to ten with quantization) per layer of every step.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.kernels.pdl import pdl_launch, wait_for_predecessor
from engine.kv.cache import LayerKV
from engine.kv.quant import _MIN_AMAX
from engine.numeric import FP8_MAX, INT8_MAX


@triton.jit
def _kv_write_kernel(
    k_ptr,  # [num_tokens, kv_heads, head_dim] compute dtype
    v_ptr,
    k_pages_ptr,  # [num_blocks * block_size, kv_heads, head_dim] storage dtype
    v_pages_ptr,
    k_scale_ptr,  # MODE 1: [] float32; MODE 2: [num_blocks * block_size, kv_heads] float32
    v_scale_ptr,
    slots_ptr,  # [num_tokens] int64
    stride_k_tok,
    stride_k_head,
    stride_v_tok,
    stride_v_head,
    KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    MODE: tl.constexpr,  # 0 auto, 1 fp8 (per-layer scale), 2 int8 (per-token-and-head scale)
    FP8_MAX: tl.constexpr,
    INT8_MAX: tl.constexpr,
    MIN_AMAX: tl.constexpr,
    USE_GDC: tl.constexpr,  # launched with PDL (engine/kernels/pdl.py)
):
    wait_for_predecessor(USE_GDC)
    token = tl.program_id(0)
    head = tl.program_id(1)
    slot = tl.load(slots_ptr + token)
    dims = tl.arange(0, HEAD_DIM_PAD)
    ok = dims < HEAD_DIM
    k = tl.load(k_ptr + token * stride_k_tok + head * stride_k_head + dims, mask=ok, other=0.0)
    v = tl.load(v_ptr + token * stride_v_tok + head * stride_v_head + dims, mask=ok, other=0.0)
    out_dtype = k_pages_ptr.dtype.element_ty
    dst = (slot * KV_HEADS + head) * HEAD_DIM + dims
    scale_off = slot * KV_HEADS + head
    if MODE == 0:
        tl.store(k_pages_ptr + dst, k.to(out_dtype), mask=ok)
        tl.store(v_pages_ptr + dst, v.to(out_dtype), mask=ok)
    else:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
        if MODE == 1:
            kq = tl.minimum(tl.maximum(tl.math.div_rn(k, tl.load(k_scale_ptr)), -FP8_MAX), FP8_MAX)
            vq = tl.minimum(tl.maximum(tl.math.div_rn(v, tl.load(v_scale_ptr)), -FP8_MAX), FP8_MAX)
        else:
            ks = tl.math.div_rn(tl.maximum(tl.max(tl.abs(k), axis=0), MIN_AMAX), INT8_MAX)
            vs = tl.math.div_rn(tl.maximum(tl.max(tl.abs(v), axis=0), MIN_AMAX), INT8_MAX)
            tl.store(k_scale_ptr + scale_off, ks)
            tl.store(v_scale_ptr + scale_off, vs)
            kq = tl.minimum(
                tl.maximum(_round_half_even(tl.math.div_rn(k, ks)), -INT8_MAX), INT8_MAX
            )
            vq = tl.minimum(
                tl.maximum(_round_half_even(tl.math.div_rn(v, vs)), -INT8_MAX), INT8_MAX
            )
        tl.store(k_pages_ptr + dst, kq.to(out_dtype), mask=ok)
        tl.store(v_pages_ptr + dst, vq.to(out_dtype), mask=ok)


@triton.jit
def _round_half_even(x):
    """torch.round's rounding (ties to even) without libdevice, so the interpreter runs it too.
    x - floor(x) is exact for |x| < 2**23 (here |x| <= 127), so no float rounding can move a tie."""
    r = tl.floor(x)
    frac = x - r
    odd = (r - 2.0 * tl.floor(r * 0.5)) != 0.0
    up = (frac > 0.5) | ((frac == 0.5) & odd)
    return tl.where(up, r + 1.0, r)


def write_kv_triton(kv: LayerKV, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
    """k, v [num_tokens, kv_heads, head_dim] -> their slots of `kv`'s pages (and scales)."""
    num_tokens, kv_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    pages = kv.k
    mode = {torch.float8_e4m3fn: 1, torch.int8: 2}.get(pages.dtype, 0)
    k_scale = kv.k_scale if mode else pages
    v_scale = kv.v_scale if mode else pages
    if k.stride(2) != 1 or v.stride(2) != 1:
        k, v = k.contiguous(), v.contiguous()
    _kv_write_kernel[(num_tokens, kv_heads)](
        k,
        v,
        kv.k,
        kv.v,
        k_scale,
        v_scale,
        slots,
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        KV_HEADS=kv_heads,
        HEAD_DIM=head_dim,
        HEAD_DIM_PAD=triton.next_power_of_2(head_dim),
        MODE=mode,
        FP8_MAX=FP8_MAX,
        INT8_MAX=INT8_MAX,
        MIN_AMAX=_MIN_AMAX,
        num_warps=1,
        **pdl_launch(k.device),
    )
