"""Rotary position embedding, with the frequencies computed by transformers' own rope functions so
that every scaling type it supports (llama3, linear, yarn) matches it bit for bit."""

from __future__ import annotations

import torch
from torch import nn

from engine import kernels

# Types whose frequencies depend on the running sequence length; a paged engine that caches K/V
# across steps cannot follow them exactly.
_UNSUPPORTED_ROPE = {"dynamic", "longrope"}


def rope_parameters(config) -> dict:
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None)
    return dict(params or {})


def inverse_frequencies(config, head_dim: int) -> tuple[torch.Tensor, float]:
    """-> (inv_freq [head_dim // 2], attention scaling of cos/sin)."""
    params = rope_parameters(config)
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type in _UNSUPPORTED_ROPE:
        raise ValueError(f"rope type {rope_type!r} is not supported by the paged engine")
    if rope_type == "default":
        base = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
        exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
        return 1.0 / (base**exponents), 1.0
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, "cpu")
    return inv_freq.float(), float(scaling)


class RotaryEmbedding(nn.Module):
    """Neox-style (rotate-half) rotary embedding over flat [num_tokens, heads, head_dim] tensors."""

    def __init__(self, config, head_dim: int) -> None:
        super().__init__()
        inv_freq, self.scaling = inverse_frequencies(config, head_dim)
        # transformers computes on the CPU; follow the device the model is being built on.
        inv_freq = inv_freq.to(torch.empty(0).device)
        self.register_buffer("inv_freq", inv_freq, persistent=False)  # [head_dim // 2]
        # [max_positions, head_dim] float32, cos | sin: set by build_cache for the fused kernel.
        self.register_buffer("cos_sin_cache", None, persistent=False)

    def build_cache(self, max_positions: int | None) -> None:
        """Precompute cos/sin of every position < max_positions for the fused Triton kernel
        (engine/kernels/rotary.py), which then rotates q and k in place; None drops the cache and
        goes back to the torch path. Same ops and device as `forward`, so the same values."""
        if max_positions is None:
            self.cos_sin_cache = None
            return
        positions = torch.arange(max_positions, device=self.inv_freq.device)
        # [max_positions, head_dim // 2]
        freqs = positions[:, None].float() * self.inv_freq[None, :]
        self.cos_sin_cache = torch.cat((freqs.cos() * self.scaling, freqs.sin() * self.scaling), -1)

    def forward(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.cos_sin_cache is not None:
            kernels.rotary_embedding(positions, q, k, self.cos_sin_cache)  # in place
            return q, k
        # Computed per step as transformers does (positions x inv_freq in float32, then cos/sin),
        # so the rounding is identical to its.
        freqs = positions[:, None].float() * self.inv_freq[None, :]  # [num_tokens, head_dim // 2]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = (emb.cos() * self.scaling).to(q.dtype)[:, None, :]  # [num_tokens, 1, head_dim]
        sin = (emb.sin() * self.scaling).to(q.dtype)[:, None, :]
        return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
