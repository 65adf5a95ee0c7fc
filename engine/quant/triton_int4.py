"""Weight-only int4 GEMM in Triton, for ModelOpt's W4A16_AWQ and W4A8_AWQ layers (int4.py).

y[M, N] = x[M, K] @ W^T with W held as int4 nibbles, two output columns per byte, and one float32
scale per (group of K, column). The weight is read once per M-tile and never written back
dequantized: at decode (M of 1 to a few dozen) the kernel streams half a byte per weight.

Layout (int4.py stores it so): `qweight` uint8 [K, N / 2], byte [k, j] = column 2j in the low
nibble, 2j + 1 in the high one; `scales` float32 [K / group, N].

Per K-tile (BLOCK_K divides the group size, so one scale row covers the tile):
- W4A16: acc += tl.dot(x, q) * scale: the int4 values are exact in the compute dtype, and the
  scale multiplies the float32 partial sums, so no weight is rounded to the compute dtype;
- W4A8 (`w4a8_scales` given): x holds e4m3 values (quantized by the caller), the tile's weights
  are (q * scale) / weight_scale_2 (IEEE division, ModelOpt's order of roundings) rounded to e4m3
  (`_round_e4m3`, integer arithmetic: the same bits on the GPU and in the interpreter) and dotted
  in the compute dtype, where e4m3 values and their products are exact; the float32 result times
  out_scale[N] at the end. This is the fp8 arithmetic of TensorRT-LLM's W4A8 kernel, on any GPU
  with bf16 tensor cores.

Two kernels:
- `_int4_gemv_kernel`, M <= GEMV_MAX_ROWS (off for now, see there): no tensor cores, so no
  padding of M to 16 and no shuffling of nibbles into an MMA operand layout. Each program takes a
  strip of byte columns and a slice of K, unpacks the low and high nibbles as two separate
  [BLOCK_K, BLOCK_J] tiles (even and odd output columns), multiplies by x broadcast and sums
  over K in float32; every row of x uses the same weight tile, read once;
- `_int4_gemm_kernel`, larger M: the nibbles joined into a [BLOCK_K, BLOCK_N] tile and tl.dot.
Both split K over programs until the GPU has about two programs per SM (partial sums in float32,
added in a fixed order: deterministic). Checked against the torch path (int4.py) under
TRITON_INTERPRET=1 on the CPU and compiled on CUDA (tests/test_quant_linear.py).
"""

from __future__ import annotations

from functools import cache
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from engine.kernels.rounding import round_e4m3 as _round_e4m3

# M up to this takes the GEMV kernel. Off: at M = 1 on an H100 it measured 105 tok/s on the 8B
# shape against the tensor-core kernel's 117 (docs/performance.md); its tiles need tuning first.
GEMV_MAX_ROWS = 0


class TileConfig(NamedTuple):
    block_m: int
    block_n: int  # output columns per program (the GEMV covers block_n / 2 byte columns)
    block_k: int
    split_k: int
    num_warps: int
    num_stages: int
    gemv: bool = False


@triton.jit
def _int4_gemm_kernel(
    x_ptr,  # [M, K] compute dtype, rows strided by stride_xm
    qw_ptr,  # [K, N // 2] uint8
    s_ptr,  # [K // GROUP, N] float32
    s2_ptr,  # [N] float32, W4A8: the e4m3 unit of each column (weight_scale_2)
    col_ptr,  # [N] float32, W4A8: the output scale (input_scale * weight_scale_2)
    out_ptr,  # SPLIT_K == 1: [M, N] compute dtype; else [SPLIT_K, M, N] float32
    M,
    N,
    K,
    stride_xm,
    GROUP: tl.constexpr,
    W4A8: tl.constexpr,
    SPLIT_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,  # "ieee" for float32 inputs (no TF32 rounding), else "tf32"
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    half_n = N // 2
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rj = pid_n * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)  # byte columns
    m_mask = rm < M
    n_mask = rn < N
    j_mask = rj < half_n

    k_tiles = K // BLOCK_K
    per_split = tl.cdiv(k_tiles, SPLIT_K)
    t_begin = pid_k * per_split
    t_end = tl.minimum(t_begin + per_split, k_tiles)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if W4A8:
        unit = tl.load(s2_ptr + rn, mask=n_mask, other=1.0)
    for t in range(t_begin, t_end):
        rk = t * BLOCK_K + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=m_mask[:, None], other=0.0)
        packed = tl.load(qw_ptr + rk[:, None] * half_n + rj[None, :], mask=j_mask[None, :], other=0)
        low = (packed & 0xF).to(tl.int8)
        high = (packed >> 4).to(tl.int8)
        low = tl.where(low > 7, low - 16, low)
        high = tl.where(high > 7, high - 16, high)
        q = tl.join(low, high).reshape(BLOCK_K, BLOCK_N)  # [BLOCK_K, BLOCK_N] int8
        scale = tl.load(s_ptr + (t * BLOCK_K // GROUP) * N + rn, mask=n_mask, other=0.0)
        if W4A8:
            w = _round_e4m3(tl.math.div_rn(q.to(tl.float32) * scale[None, :], unit[None, :]))
            acc += tl.dot(x, w.to(x.dtype), input_precision=PRECISION)
        else:
            acc += tl.dot(x, q.to(x.dtype), input_precision=PRECISION) * scale[None, :]
    if W4A8:
        acc *= tl.load(col_ptr + rn, mask=n_mask, other=0.0)[None, :]
    mask = m_mask[:, None] & n_mask[None, :]
    if SPLIT_K == 1:
        tl.store(out_ptr + rm[:, None] * N + rn[None, :], acc.to(out_ptr.dtype.element_ty), mask)
    else:
        tl.store(out_ptr + (pid_k * M + rm[:, None]) * N + rn[None, :], acc, mask)


@triton.jit
def _int4_gemv_kernel(
    x_ptr,  # [M, K] compute dtype, rows strided by stride_xm
    qw_ptr,  # [K, N // 2] uint8
    s_ptr,  # [K // GROUP, N] float32
    s2_ptr,  # [N] float32, W4A8: weight_scale_2 per column
    col_ptr,  # [N] float32, W4A8: input_scale * weight_scale_2
    out_ptr,  # SPLIT_K == 1: [M, N] compute dtype; else [SPLIT_K, M, N] float32
    M,
    N,
    K,
    stride_xm,
    GROUP: tl.constexpr,
    W4A8: tl.constexpr,
    SPLIT_K: tl.constexpr,
    BLOCK_M: tl.constexpr,  # >= M, a power of two
    BLOCK_J: tl.constexpr,  # byte columns per program: output columns 2j (low), 2j + 1 (high)
    BLOCK_K: tl.constexpr,
):
    pid_j = tl.program_id(0)
    pid_k = tl.program_id(1)
    half_n = N // 2
    rm = tl.arange(0, BLOCK_M)
    rj = pid_j * BLOCK_J + tl.arange(0, BLOCK_J)
    m_mask = rm < M
    j_mask = rj < half_n
    even = 2 * rj  # output columns of the low nibbles; the high ones are even + 1

    k_tiles = K // BLOCK_K
    per_split = tl.cdiv(k_tiles, SPLIT_K)
    t_begin = pid_k * per_split
    t_end = tl.minimum(t_begin + per_split, k_tiles)
    acc_lo = tl.zeros((BLOCK_M, BLOCK_J), dtype=tl.float32)
    acc_hi = tl.zeros((BLOCK_M, BLOCK_J), dtype=tl.float32)
    if W4A8:
        unit_lo = tl.load(s2_ptr + even, mask=j_mask, other=1.0)
        unit_hi = tl.load(s2_ptr + even + 1, mask=j_mask, other=1.0)
    for t in range(t_begin, t_end):
        rk = t * BLOCK_K + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=m_mask[:, None], other=0.0)
        x = x.to(tl.float32)[:, :, None]  # [BLOCK_M, BLOCK_K, 1]
        packed = tl.load(qw_ptr + rk[:, None] * half_n + rj[None, :], mask=j_mask[None, :], other=0)
        low = (packed & 0xF).to(tl.int8)
        high = (packed >> 4).to(tl.int8)
        low = tl.where(low > 7, low - 16, low).to(tl.float32)  # [BLOCK_K, BLOCK_J]
        high = tl.where(high > 7, high - 16, high).to(tl.float32)
        row = (t * BLOCK_K // GROUP) * N
        s_lo = tl.load(s_ptr + row + even, mask=j_mask, other=0.0)[None, :]
        s_hi = tl.load(s_ptr + row + even + 1, mask=j_mask, other=0.0)[None, :]
        if W4A8:
            low = _round_e4m3(tl.math.div_rn(low * s_lo, unit_lo[None, :]))
            high = _round_e4m3(tl.math.div_rn(high * s_hi, unit_hi[None, :]))
            acc_lo += tl.sum(x * low[None, :, :], axis=1)
            acc_hi += tl.sum(x * high[None, :, :], axis=1)
        else:
            acc_lo += tl.sum(x * low[None, :, :], axis=1) * s_lo
            acc_hi += tl.sum(x * high[None, :, :], axis=1) * s_hi
    if W4A8:
        acc_lo *= tl.load(col_ptr + even, mask=j_mask, other=0.0)[None, :]
        acc_hi *= tl.load(col_ptr + even + 1, mask=j_mask, other=0.0)[None, :]
    mask = m_mask[:, None] & j_mask[None, :]
    if SPLIT_K == 1:
        rows = out_ptr + rm[:, None] * N
        tl.store(rows + even[None, :], acc_lo.to(out_ptr.dtype.element_ty), mask)
        tl.store(rows + even[None, :] + 1, acc_hi.to(out_ptr.dtype.element_ty), mask)
    else:
        rows = out_ptr + (pid_k * M + rm[:, None]) * N
        tl.store(rows + even[None, :], acc_lo, mask)
        tl.store(rows + even[None, :] + 1, acc_hi, mask)


@triton.jit
def _round_e4m3_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(out_ptr + offs, _round_e4m3(tl.load(x_ptr + offs, mask=mask)), mask=mask)


def round_e4m3(x: torch.Tensor) -> torch.Tensor:
    """float32 -> e4m3 values through the kernel's rounding (tests compare it with torch's)."""
    x = x.contiguous()
    out = torch.empty_like(x)
    _round_e4m3_kernel[(triton.cdiv(x.numel(), 1024),)](x, out, x.numel(), BLOCK=1024)
    return out


@cache
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 8
    return torch.cuda.get_device_properties(device).multi_processor_count


def pick_config(m: int, n: int, k: int, group: int, device: torch.device) -> TileConfig:
    """Tiles for an [m, k] x [k, n] product: BLOCK_K the largest of 128/64/32/16 dividing the
    group (large M: at most 64; the GEMV: 32, its [BLOCK_M, BLOCK_K, BLOCK_J] products live in
    registers); decode shapes split K until there are ~2 programs per SM."""

    def block_k(limit: int) -> int:
        return next(b for b in (128, 64, 32, 16) if b <= limit and group % b == 0)

    if m <= GEMV_MAX_ROWS:
        bm, bn, bk, warps, stages = triton.next_power_of_2(max(m, 1)), 128, block_k(32), 4, 3
    elif m <= 16:
        bm, bn, bk, warps, stages = 16, 64, block_k(128), 4, 3
    elif m <= 64:
        bm, bn, bk, warps, stages = 64, 64, block_k(128), 4, 3
    elif m <= 256:
        bm, bn, bk, warps, stages = 64, 128, block_k(64), 4, 3
    else:
        bm, bn, bk, warps, stages = 128, 128, block_k(64), 8, 3
    split = 1
    if m <= 64:
        programs = triton.cdiv(n, bn) * triton.cdiv(m, bm)
        k_tiles = k // bk
        while programs * split < 2 * _num_sms(device) and split * 2 <= min(16, k_tiles):
            split *= 2
    return TileConfig(bm, bn, bk, split, warps, stages, gemv=m <= GEMV_MAX_ROWS)


def int4_gemm(
    x: torch.Tensor,  # [M, K] bfloat16 / float16 / float32 (W4A8: e4m3 values in that dtype)
    qweight: torch.Tensor,  # [K, N / 2] uint8
    scales: torch.Tensor,  # [K / group, N] float32
    group: int,
    w4a8_scales: tuple[torch.Tensor, torch.Tensor] | None = None,  # W4A8: ([N] unit, [N] out)
    config: TileConfig | None = None,
) -> torch.Tensor:
    """-> [M, N] in x's dtype. W4A8: `w4a8_scales` = (weight_scale_2, input_scale *
    weight_scale_2), per column."""
    m, k = x.shape
    n = qweight.shape[1] * 2
    if qweight.shape[0] != k or scales.shape != (k // group, n) or k % group:
        raise ValueError(
            f"int4_gemm: x {tuple(x.shape)}, qweight {tuple(qweight.shape)}, scales "
            f"{tuple(scales.shape)} and group {group} do not fit"
        )
    if x.stride(1) != 1:
        x = x.contiguous()
    cfg = config or pick_config(m, n, k, group, x.device)
    if group % cfg.block_k:
        raise ValueError(f"block_k {cfg.block_k} must divide the group size {group}")
    if cfg.split_k == 1:
        out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    else:
        out = torch.empty((cfg.split_k, m, n), dtype=torch.float32, device=x.device)
    if m == 0:
        return out if cfg.split_k == 1 else out.sum(0).to(x.dtype)
    args = (
        x,
        qweight,
        scales,
        w4a8_scales[0] if w4a8_scales is not None else scales,
        w4a8_scales[1] if w4a8_scales is not None else scales,
        out,
        m,
        n,
        k,
        x.stride(0),
    )
    common = dict(GROUP=group, W4A8=w4a8_scales is not None, SPLIT_K=cfg.split_k)
    launch = dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if cfg.gemv:
        if cfg.block_m < m:
            raise ValueError(f"the GEMV takes at most block_m={cfg.block_m} rows, got {m}")
        grid = (triton.cdiv(n // 2, cfg.block_n // 2), cfg.split_k)
        _int4_gemv_kernel[grid](
            *args,
            **common,
            BLOCK_M=cfg.block_m,
            BLOCK_J=cfg.block_n // 2,
            BLOCK_K=cfg.block_k,
            **launch,
        )
    else:
        grid = (triton.cdiv(n, cfg.block_n), triton.cdiv(m, cfg.block_m), cfg.split_k)
        _int4_gemm_kernel[grid](
            *args,
            **common,
            BLOCK_M=cfg.block_m,
            BLOCK_N=cfg.block_n,
            BLOCK_K=cfg.block_k,
            PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
            **launch,
        )
    return out if cfg.split_k == 1 else out.sum(0).to(x.dtype)
