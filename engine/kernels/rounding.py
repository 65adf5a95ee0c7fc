"""Rounding to the model dtype inside a kernel, as torch rounds between its ops."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def round_to(x, dtype: tl.constexpr):
    """float32 x rounded to `dtype` (round to nearest even), returned as float32.

    bfloat16 by bit arithmetic, which is what the GPU's cvt.rn.bf16.f32 computes: the Triton
    interpreter (the CPU tests) truncates fp32 -> bf16 casts, so this keeps it exact there too."""
    if dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True)
    else:
        return x.to(dtype).to(tl.float32)
