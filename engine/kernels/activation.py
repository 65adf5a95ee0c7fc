"""SiLU-and-mul over the fused gate_up projection, in one Triton kernel: out = silu(gate) * up.

As torch's `F.silu(gate) * up`: silu in float32 as x / (1 + exp(-x)) with libdevice's expf and an
IEEE division (the functions torch's CUDA kernel calls), rounded to the model dtype, then the
product rounded. Expected bit-exact against torch on CUDA; under the Triton interpreter (CPU
tests) numpy's exp stands in, within one ulp.

Graph-safe: no host syncs; the output is allocated at the same size every replay.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from engine.kernels.pdl import pdl_launch, wait_for_predecessor
from engine.kernels.rounding import round_to
from engine.numeric import FP8_MAX

_FP8_MAX = tl.constexpr(FP8_MAX)  # the e4m3 bound the QUANT outputs saturate at


@triton.jit
def _silu_and_mul_kernel(
    x_ptr,  # [num_tokens, 2 * n_cols]: gate | up
    out_ptr,  # [num_tokens, n_cols]; e4m3 when QUANT
    inv_scale_ptr,  # [] float32 (QUANT): the down projection's 1 / input_scale
    stride_x,
    stride_out,
    n_cols,
    BLOCK: tl.constexpr,
    PRECISE: tl.constexpr,  # libdevice expf and IEEE division (compiled GPU code only)
    QUANT: tl.constexpr,  # write e4m3(out * inv_scale): quantize_fp8's arithmetic
    USE_GDC: tl.constexpr,  # launched with PDL (engine/kernels/pdl.py)
):
    wait_for_predecessor(USE_GDC)
    tok = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    row = x_ptr + tok * stride_x
    gate = tl.load(row + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(row + n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    dtype = x_ptr.dtype.element_ty
    if PRECISE:
        silu = tl.math.div_rn(gate, 1.0 + libdevice.exp(-gate))
    else:
        silu = gate / (1.0 + tl.exp(-gate))
    silu = round_to(silu, dtype)  # F.silu returns the dtype
    out = round_to(silu * up, dtype)
    if QUANT:
        out = tl.clamp(out * tl.load(inv_scale_ptr), -_FP8_MAX, _FP8_MAX)
    tl.store(out_ptr + tok * stride_out + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(x: torch.Tensor, inv_scale: torch.Tensor | None = None) -> torch.Tensor:
    """[..., 2 * n] (gate | up) -> [..., n] = silu(gate) * up, a new contiguous tensor; with
    `inv_scale` ([] float32) quantized to e4m3 as `quantize_fp8(out, inv_scale)`."""
    n = x.shape[-1] // 2
    if x.stride(-1) != 1:
        x = x.contiguous()
    x2 = x.reshape(-1, x.shape[-1])
    dtype = x.dtype if inv_scale is None else torch.float8_e4m3fn
    out = torch.empty((*x.shape[:-1], n), dtype=dtype, device=x.device)
    if x2.shape[0] == 0 or n == 0:
        return out
    block = min(1024, triton.next_power_of_2(n))
    _silu_and_mul_kernel[(x2.shape[0], triton.cdiv(n, block))](
        x2,
        out,
        inv_scale if inv_scale is not None else x2,
        x2.stride(0),
        n,
        n,
        BLOCK=block,
        PRECISE=x.is_cuda,
        QUANT=inv_scale is not None,
        num_warps=4,
        enable_fp_fusion=False,
        **pdl_launch(x.device),
    )
    return out
