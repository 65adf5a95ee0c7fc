"""FP8 (E4M3) kernels for the small and the in-between work around the GEMMs.

- `quantize_fp8_static`: x * inv_scale, clamped to +-448, cast to e4m3 in one launch (torch takes
  four: float cast, multiply, clamp, fp8 cast), with the arithmetic of `quantize_fp8`.
- `fp8_gemv`: y = (e4m3(x) @ w_q^T) * s_x * s_w for a few rows (decode at batch 1, M <= 4). cuBLASLt
  runs a 128x128-tile kernel for M = 1 that reads the weights at about half the bandwidth; here one
  program reads BLOCK_N weight rows once, quantizes the activation as it loads it (no separate
  quantize kernel) and reduces on the CUDA cores: e4m3 x e4m3 products are exact in float32, so the
  result differs from the emulated path only in float32 summation order.

Graph-safe: no host syncs; outputs are allocated at the same size every replay.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from engine.kernels.pdl import pdl_launch, wait_for_predecessor
from engine.numeric import FP8_MAX

_FP8_MAX = tl.constexpr(FP8_MAX)  # what the kernels may read (a global must be a constexpr)
GEMV_MAX_ROWS = 4  # M above this goes to cuBLASLt's tensor-core kernels


@triton.jit
def _quantize_fp8_kernel(
    x_ptr,  # [M, K]
    out_ptr,  # [M, K] e4m3
    inv_scale_ptr,  # [] float32
    stride_x,
    stride_out,
    n_cols,
    BLOCK: tl.constexpr,
    USE_GDC: tl.constexpr,  # launched with PDL (engine/kernels/pdl.py)
):
    wait_for_predecessor(USE_GDC)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    y = tl.clamp(x * tl.load(inv_scale_ptr), -_FP8_MAX, _FP8_MAX)
    tl.store(out_ptr + row * stride_out + cols, y.to(tl.float8e4nv), mask=mask)


def quantize_fp8_static(x: torch.Tensor, inv_scale: torch.Tensor) -> torch.Tensor:
    """x [M, K] (rows contiguous), inv_scale [] float32 -> e4m3 [M, K]."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    out = torch.empty(x.shape, dtype=torch.float8_e4m3fn, device=x.device)
    m, k = x.shape
    if m == 0 or k == 0:
        return out
    block = min(2048, triton.next_power_of_2(k))
    _quantize_fp8_kernel[(m, triton.cdiv(k, block))](
        x,
        out,
        inv_scale,
        x.stride(0),
        out.stride(0),
        k,
        BLOCK=block,
        num_warps=4,
        **pdl_launch(x.device),
    )
    return out


@triton.jit
def _gemv_tile(acc, w, x_row, k, k_ok, inv, QUANTIZED: tl.constexpr):
    """acc [BLOCK_N] + w [BLOCK_N, BLOCK_K] e4m3 . e4m3(x[k]) [BLOCK_K], in float32."""
    x = tl.load(x_row + k, mask=k_ok, other=0.0)  # [BLOCK_K]
    if not QUANTIZED:
        x = tl.clamp(x.to(tl.float32) * inv, -_FP8_MAX, _FP8_MAX).to(tl.float8e4nv)
    return acc + tl.sum(w.to(tl.float32) * x.to(tl.float32)[None, :], axis=1)


@triton.jit
def _fp8_gemv_kernel(
    x_ptr,  # [M, K]: the compute dtype (quantized here) or e4m3 (QUANTIZED)
    w_ptr,  # [N, K] e4m3
    out_ptr,  # [M, N]
    inv_scale_ptr,  # [] float32: 1 / s_x
    x_scale_ptr,  # [] float32: s_x
    w_scale_ptr,  # [N] float32
    bias_ptr,  # [N] (HAS_BIAS)
    N,
    K,
    stride_x,
    stride_w,
    stride_out,
    QUANTIZED: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    USE_GDC: tl.constexpr,  # launched with PDL (engine/kernels/pdl.py)
):
    row = tl.program_id(0)  # fastest: the rows of one weight tile run together and share it in L2
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # output features
    col_ok = cols < N
    ks = tl.arange(0, BLOCK_K)
    w_rows = w_ptr + cols.to(tl.int64)[:, None] * stride_w  # [BLOCK_N, 1]
    x_row = x_ptr + row * stride_x
    # The first weight tile is read before waiting on the kernel before: no step writes weights,
    # so with PDL this load overlaps that kernel's last programs.
    k_ok = ks < K
    w = tl.load(w_rows + ks[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
    wait_for_predecessor(USE_GDC)
    inv = tl.load(inv_scale_ptr)
    acc = _gemv_tile(tl.zeros([BLOCK_N], dtype=tl.float32), w, x_row, ks, k_ok, inv, QUANTIZED)
    for k0 in range(BLOCK_K, K, BLOCK_K):
        k = k0 + ks
        k_ok = k < K
        w = tl.load(w_rows + k[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        acc = _gemv_tile(acc, w, x_row, k, k_ok, inv, QUANTIZED)
    y = acc * tl.load(x_scale_ptr) * tl.load(w_scale_ptr + cols, mask=col_ok, other=0.0)
    y = y.to(out_ptr.dtype.element_ty)
    if HAS_BIAS:
        y = y + tl.load(bias_ptr + cols, mask=col_ok, other=0.0)
    tl.store(out_ptr + row * stride_out + cols, y, mask=col_ok)


TILES_ENV_VAR = "WORKBENCH_GEMV_TILES"  # "BLOCK_N:BLOCK_K" for every shape, for A/B runs


def gemv_tiles(n: int) -> tuple[int, int]:
    """(BLOCK_N, BLOCK_K) for a GEMV of output width n. 4 x 2048 is within 2% of the best of
    scripts/bench_decode_kernels.py's grid at every Llama-3.1-8B shape on the H200 (M = 1, weights
    read past the L2 cache; share of the copy bandwidth, quantize + cuBLASLt in brackets): qkv
    0.60 (0.53), o 0.55 (0.45), gate_up 0.90 (0.81), down 0.78 (0.65). The small ones are bound by a
    ~3 us launch-and-ramp cost per kernel, which PDL (engine/kernels/pdl.py) overlaps."""
    forced = os.environ.get(TILES_ENV_VAR)
    if forced:
        block_n, block_k = map(int, forced.split(":"))
        return block_n, block_k
    return 4, 2048


def fp8_gemv(
    x: torch.Tensor,  # [M, K], M <= GEMV_MAX_ROWS: compute dtype, or e4m3 already quantized
    inv_scale: torch.Tensor,  # [] float32
    x_scale: torch.Tensor,  # [] float32
    w_q: torch.Tensor,  # [N, K] e4m3, rows contiguous
    w_scale: torch.Tensor,  # [N] float32
    bias: torch.Tensor | None,  # [N] in out_dtype
    out_dtype: torch.dtype,
    block_n: int | None = None,
    block_k: int | None = None,
    num_warps: int = 4,
) -> torch.Tensor:
    """-> e4m3(x / s_x) @ w_q^T * s_x * s_w (+ bias), [M, N] in out_dtype. The bias is added in
    out_dtype after the rounding, as `y + bias` in torch. Tiles default to `gemv_tiles`."""
    m, k = x.shape
    n = w_q.shape[0]
    if block_n is None or block_k is None:
        block_n, block_k = gemv_tiles(n)
    if x.stride(-1) != 1:
        x = x.contiguous()
    out = torch.empty(m, n, dtype=out_dtype, device=x.device)
    if m == 0:
        return out
    _fp8_gemv_kernel[(m, triton.cdiv(n, block_n))](
        x,
        w_q,
        out,
        inv_scale,
        x_scale,
        w_scale,
        bias if bias is not None else w_scale,
        n,
        k,
        x.stride(0),
        w_q.stride(0),
        out.stride(0),
        QUANTIZED=x.dtype == torch.float8_e4m3fn,
        HAS_BIAS=bias is not None,
        BLOCK_N=block_n,
        BLOCK_K=min(block_k, triton.next_power_of_2(k)),
        num_warps=num_warps,
        **pdl_launch(x.device),
    )
    return out
