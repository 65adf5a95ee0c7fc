"""GPU attention: decodes through the Triton paged kernel, prefill chunks through the reference
path (SDPA per sequence, flash attention on the GPU)."""

from __future__ import annotations

import torch

from engine.attention.metadata import AttentionMetadata
from engine.attention.torch_ref import TorchAttention, write_kv
from engine.attention.triton_decode import paged_decode_attention


class TritonAttention(TorchAttention):
    name = "triton"

    def forward(
        self,
        q: torch.Tensor,  # [num_tokens, heads, head_dim]
        k: torch.Tensor,  # [num_tokens, kv_heads, head_dim]
        v: torch.Tensor,
        kv_cache: tuple[torch.Tensor, torch.Tensor],
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        k_cache, v_cache = kv_cache
        write_kv(k_cache, v_cache, k, v, meta.slot_mapping)
        nd = meta.num_decodes
        out = torch.empty_like(q)
        if nd:
            paged_decode_attention(
                q[:nd],
                k_cache,
                v_cache,
                meta.block_tables[:nd],
                meta.seq_lens[:nd],
                scale,
                out=out[:nd],
            )
        starts = meta.query_start_loc
        for i in range(nd, meta.num_seqs):
            lo, hi = starts[i], starts[i + 1]
            out[lo:hi] = self._prefill(q[lo:hi], k_cache, v_cache, meta, i, scale)
        return out
