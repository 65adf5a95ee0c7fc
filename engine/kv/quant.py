"""How K/V values are stored in the pages: as computed ("auto"), or quantized to 8 bits.

- fp8: float8_e4m3fn with one float32 scale per layer for K and one for V (per tensor, static):
  stored = saturate(x / scale), read = stored * scale. The scales come from the checkpoint when it
  carries them (ModelOpt FP8 KV: `k_proj.k_scale`, `v_proj.v_scale` = amax / 448), else 1.0 (vLLM's
  default too).
- int8: symmetric int8 with a float32 scale per token and KV head, computed when the token is
  written (amax / 127 over its head_dim values) and kept beside the pages, so a token's stored
  form depends on nothing but its own values.

Dequantization multiplies in float32 and rounds once to the compute dtype; the Triton decode kernel
does the same, so both backends see the same K/V.
"""

from __future__ import annotations

import torch

from engine.config import KV_CACHE_DTYPES
from engine.numeric import FP8_MAX, INT8_MAX

_MIN_AMAX = 1e-12  # an all-zero token gets a tiny scale, not 0 / 0


def storage_dtype(kv_cache_dtype: str, compute_dtype: torch.dtype) -> torch.dtype:
    if kv_cache_dtype == "auto":
        return compute_dtype
    if kv_cache_dtype == "fp8":
        return torch.float8_e4m3fn
    if kv_cache_dtype == "int8":
        return torch.int8
    raise ValueError(
        f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, got {kv_cache_dtype!r}"
    )


def has_slot_scales(pages: torch.Tensor) -> bool:
    """int8 pages carry a scale per token and head; fp8 pages one per layer."""
    return pages.dtype == torch.int8


def write_quantized(
    pages: torch.Tensor,  # [num_blocks, block_size, kv_heads, head_dim] storage dtype
    scale: torch.Tensor | None,  # fp8: [] float32; int8: [num_blocks, block_size, kv_heads]
    x: torch.Tensor,  # [num_tokens, kv_heads, head_dim] compute dtype
    slots: torch.Tensor,  # [num_tokens] int64 flat slot of each token
) -> None:
    """Scatter x into its slots, quantizing on the way in."""
    kv_heads, head_dim = pages.shape[-2:]
    flat = pages.view(-1, kv_heads, head_dim)  # [num_blocks * block_size, kv_heads, head_dim]
    if pages.dtype == torch.float8_e4m3fn:
        # Saturate: a float8_e4m3fn cast of an out-of-range value is NaN on some builds.
        flat[slots] = (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(pages.dtype)
    elif pages.dtype == torch.int8:
        x32 = x.float()
        token_scale = x32.abs().amax(-1).clamp(min=_MIN_AMAX) / INT8_MAX  # [num_tokens, kv_heads]
        q = (x32 / token_scale[..., None]).round().clamp(-INT8_MAX, INT8_MAX)
        flat[slots] = q.to(torch.int8)
        scale.view(-1, kv_heads)[slots] = token_scale
    else:
        flat[slots] = x.to(pages.dtype)


def dequantize(
    stored: torch.Tensor,  # [..., kv_heads, head_dim] storage dtype
    scale: torch.Tensor | None,  # fp8: []; int8: [..., kv_heads] matching `stored`
    dtype: torch.dtype,
) -> torch.Tensor:  # [..., kv_heads, head_dim] in dtype
    if stored.dtype == torch.float8_e4m3fn:
        return (stored.float() * scale).to(dtype)
    if stored.dtype == torch.int8:
        return (stored.float() * scale[..., None]).to(dtype)
    return stored.to(dtype)
