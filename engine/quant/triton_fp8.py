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

import torch
import triton
import triton.language as tl

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
):
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
        x, out, inv_scale, x.stride(0), out.stride(0), k, BLOCK=block, num_warps=4
    )
    return out


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
):
    row = tl.program_id(0)  # fastest: the rows of one weight tile run together and share it in L2
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # output features
    col_ok = cols < N
    ks = tl.arange(0, BLOCK_K)
    inv = tl.load(inv_scale_ptr)
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    w_rows = w_ptr + cols.to(tl.int64)[:, None] * stride_w  # [BLOCK_N, 1]
    x_row = x_ptr + row * stride_x
    for k0 in range(0, K, BLOCK_K):
        k = k0 + ks
        k_ok = k < K
        x = tl.load(x_row + k, mask=k_ok, other=0.0)  # [BLOCK_K]
        if not QUANTIZED:
            x = tl.clamp(x.to(tl.float32) * inv, -_FP8_MAX, _FP8_MAX).to(tl.float8e4nv)
        w = tl.load(w_rows + k[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        acc += tl.sum(w.to(tl.float32) * x.to(tl.float32)[None, :], axis=1)  # [BLOCK_N]
    y = acc * tl.load(x_scale_ptr) * tl.load(w_scale_ptr + cols, mask=col_ok, other=0.0)
    y = y.to(out_ptr.dtype.element_ty)
    if HAS_BIAS:
        y = y + tl.load(bias_ptr + cols, mask=col_ok, other=0.0)
    tl.store(out_ptr + row * stride_out + cols, y, mask=col_ok)


def gemv_tiles(n: int) -> tuple[int, int]:
    """(BLOCK_N, BLOCK_K) by output width, the best of scripts/bench_decode_kernels.py's grid on
    the H200 at the Llama-3.1-8B shapes (M = 1, share of the copy bandwidth; cuBLASLt's in
    brackets): gate_up N 28672 32x256 0.90 (0.86); qkv N 6144 16x512 0.81 (0.63); o and down
    N 4096 8x1024 0.66 (0.55, 0.65)."""
    if n >= 16384:
        return 32, 256
    if n > 4096:
        return 16, 512
    return 8, 1024


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
    )
    return out
