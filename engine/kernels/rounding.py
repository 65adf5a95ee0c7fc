"""Rounding inside a kernel: to the model dtype, as torch rounds between its ops, and to e4m3."""

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


@triton.jit
def round_e4m3(v):
    """float32 -> nearest float8_e4m3fn value (ties to even, saturating at +-448), as float32.
    Normal e4m3 numbers (|v| >= 2^-6) keep 3 of float32's 23 mantissa bits: add half an ulp (plus
    the kept LSB, for ties to even) and truncate. Below 2^-6 e4m3 is subnormal, multiples of 2^-9:
    |v| * 2^9 (exact) is rounded to an integer by adding and subtracting 1.5 * 2^23, where the
    float32 step is 1 (one rounding, to nearest even)."""
    v = tl.minimum(tl.maximum(v, -448.0), 448.0)
    a = tl.abs(v)
    bits = a.to(tl.int32, bitcast=True)
    bits = (bits + 0x7FFFF + ((bits >> 20) & 1)) & -1048576  # keep exponent and 3 bits
    normal = bits.to(tl.float32, bitcast=True)
    subnormal = ((a * 512.0 + 12582912.0) - 12582912.0) * 0.001953125
    r = tl.where(a < 0.015625, subnormal, normal)
    return tl.where(v < 0, -r, r)
