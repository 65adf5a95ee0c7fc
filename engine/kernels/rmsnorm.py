"""RMSNorm, and residual add + RMSNorm fused, in one Triton kernel: one program per row.

The arithmetic is transformers' LlamaRMSNorm step by step: the residual add rounded to the model
dtype (as `x + residual` in torch), mean of squares and rsqrt in float32, the normalized row rounded
to the dtype, then multiplied by the weight in the dtype: `weight * (x32 * rstd).to(dtype)`. Only
the order of the float32 sum differs from torch's reduction, so outputs agree within one ulp of
the dtype, and the new residual is bit-identical.

Graph-safe: no host syncs; the only allocation is `rms_norm`'s output, the same size every replay.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.kernels.pdl import pdl_launch, wait_for_predecessor
from engine.kernels.rounding import round_to
from engine.numeric import FP8_MAX

_FP8_MAX = tl.constexpr(FP8_MAX)  # the e4m3 bound the QUANT outputs saturate at


@triton.jit
def _rms_norm_kernel(
    x_ptr,  # [num_tokens, H, n_cols], last dim contiguous
    res_ptr,  # [num_tokens * H, n_cols] residual (HAS_RESIDUAL): read, then overwritten by x + res
    w_ptr,  # [n_cols]
    out_ptr,  # [num_tokens, H, n_cols]; may be x itself; e4m3 when QUANT
    inv_scale_ptr,  # [] float32 (QUANT): the next fp8 linear's 1 / input_scale
    stride_x_tok,
    stride_x_head,
    stride_res,
    stride_out_tok,
    stride_out_head,
    n_cols,
    inv_n,  # 1 / n_cols, as torch's mean multiplies by it
    eps,
    H: tl.constexpr,  # rows per token: 1 for hidden states, heads for Qwen3's per-head q/k norm
    BLOCK_N: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    QUANT: tl.constexpr,  # write e4m3(out * inv_scale) instead of out: quantize_fp8's arithmetic
    USE_GDC: tl.constexpr,  # launched with PDL (engine/kernels/pdl.py)
):
    wait_for_predecessor(USE_GDC)
    row = tl.program_id(0).to(tl.int64)
    tok = row // H
    head = row % H
    cols = tl.arange(0, BLOCK_N)
    mask = cols < n_cols
    dtype = x_ptr.dtype.element_ty
    x = tl.load(x_ptr + tok * stride_x_tok + head * stride_x_head + cols, mask=mask, other=0.0)
    x32 = x.to(tl.float32)
    if HAS_RESIDUAL:
        res_ptrs = res_ptr + row * stride_res + cols
        res = tl.load(res_ptrs, mask=mask, other=0.0).to(tl.float32)
        x32 = round_to(x32 + res, dtype)  # torch adds in the dtype
        tl.store(res_ptrs, x32.to(dtype), mask=mask)
    var = tl.sum(x32 * x32, axis=0) * inv_n
    normed = round_to(x32 * tl.rsqrt(var + eps), dtype)  # x32.to(dtype)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    out = round_to(w * normed, dtype)
    if QUANT:
        out = tl.clamp(out * tl.load(inv_scale_ptr), -_FP8_MAX, _FP8_MAX)
    tl.store(
        out_ptr + tok * stride_out_tok + head * stride_out_head + cols,
        out.to(out_ptr.dtype.element_ty),
        mask=mask,
    )


def _launch(
    x: torch.Tensor,  # [num_tokens, H, n]
    residual: torch.Tensor | None,  # [num_tokens, n]
    weight: torch.Tensor,
    eps: float,
    out: torch.Tensor,  # [num_tokens, H, n]
    inv_scale: torch.Tensor | None = None,  # [] float32: quantize the output to e4m3
) -> None:
    num_tokens, heads, n = x.shape
    if num_tokens * heads == 0:
        return
    block = triton.next_power_of_2(n)
    _rms_norm_kernel[(num_tokens * heads,)](
        x,
        residual if residual is not None else x,
        weight,
        out,
        inv_scale if inv_scale is not None else weight,
        x.stride(0),
        x.stride(1),
        residual.stride(0) if residual is not None else 0,
        out.stride(0),
        out.stride(1),
        n,
        1.0 / n,
        eps,
        H=heads,
        BLOCK_N=block,
        HAS_RESIDUAL=residual is not None,
        QUANT=inv_scale is not None,
        num_warps=min(16, max(1, block // 512)),
        enable_fp_fusion=False,  # no FMA contraction: round where torch rounds
        **pdl_launch(x.device),
    )


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, inv_scale: torch.Tensor | None = None
) -> torch.Tensor:
    """`weight * rms_normalized(x)` over the last dim of x ([..., n], or [num_tokens, heads, n]
    views with any token/head strides, as Qwen3's q/k slices of the fused qkv) -> a new contiguous
    tensor of x's shape and dtype (e4m3, quantized with `inv_scale`, when it is given)."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    shape = x.shape
    x3 = x.reshape(-1, 1, shape[-1]) if x.dim() != 3 else x  # [num_tokens, H, n]
    dtype = x.dtype if inv_scale is None else torch.float8_e4m3fn
    out = torch.empty(shape, dtype=dtype, device=x.device)
    _launch(x3, None, weight, eps, out.view(x3.shape), inv_scale)
    return out


def fused_add_rms_norm(
    x: torch.Tensor,  # [num_tokens, n]: the sublayer's output
    residual: torch.Tensor,  # [num_tokens, n]: the residual stream before it
    weight: torch.Tensor,
    eps: float,
    inv_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (rms_norm(x + residual), x + residual) in one pass, written in place: x becomes the
    normed rows and residual the sum. Use the returned tensors (a copy is made when an input's
    rows are not contiguous). With `inv_scale` ([] float32) the normed rows come back as a new
    e4m3 tensor, `quantize_fp8(normed, inv_scale)` bit for bit: the next fp8 linear's input."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    if residual.stride(-1) != 1 or residual.dim() != 2:
        residual = residual.reshape(-1, residual.shape[-1]).contiguous()
    x2 = x.view(-1, x.shape[-1]) if x.dim() != 2 else x
    out = x2 if inv_scale is None else torch.empty_like(x2, dtype=torch.float8_e4m3fn)
    _launch(x2.unsqueeze(1), residual, weight, eps, out.unsqueeze(1), inv_scale)
    return (x if inv_scale is None else out), residual
