"""The reference attention backend: plain torch over the paged KV cache, on CPU and GPU.

Slow but obviously right; the Triton backend is checked against it. Decodes are batched into one
masked SDPA call; each prefill chunk is its own call over its gathered context.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.attention.metadata import AttentionMetadata


class TorchAttention:
    name = "torch"

    def forward(
        self,
        q: torch.Tensor,  # [num_tokens, heads, head_dim]
        k: torch.Tensor,  # [num_tokens, kv_heads, head_dim]
        v: torch.Tensor,
        kv_cache: tuple[torch.Tensor, torch.Tensor],
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        k_cache, v_cache = kv_cache  # each [num_blocks, block_size, kv_heads, head_dim]
        write_kv(k_cache, v_cache, k, v, meta.slot_mapping)
        out = torch.empty_like(q)
        nd = meta.num_decodes
        if nd:
            out[:nd] = self._decode(q[:nd], k_cache, v_cache, meta, scale)
        starts = meta.query_start_loc
        for i in range(nd, meta.num_seqs):
            lo, hi = starts[i], starts[i + 1]
            out[lo:hi] = self._prefill(q[lo:hi], k_cache, v_cache, meta, i, scale)
        return out

    def _decode(self, q, k_cache, v_cache, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        nd = q.shape[0]
        tables = meta.block_tables[:nd]  # [nd, max_blocks]
        keys = _gather(k_cache, tables)  # [nd, ctx, kv_heads, head_dim]
        values = _gather(v_cache, tables)
        ctx = keys.shape[1]
        valid = torch.arange(ctx, device=q.device)[None, :] < meta.seq_lens[:nd, None]  # [nd, ctx]
        out = F.scaled_dot_product_attention(
            q[:, :, None, :],  # [nd, heads, 1, head_dim]
            keys.transpose(1, 2),  # [nd, kv_heads, ctx, head_dim]
            values.transpose(1, 2),
            attn_mask=valid[:, None, None, :],
            scale=scale,
            enable_gqa=True,
        )
        return out[:, :, 0, :]

    def _prefill(self, q, k_cache, v_cache, meta: AttentionMetadata, i: int, scale: float):
        seq_len = meta.seq_lens_host[i]
        q_len = q.shape[0]
        nblocks = -(-seq_len // meta.block_size)
        table = meta.block_tables[i : i + 1, :nblocks]
        keys = _gather(k_cache, table)[0, :seq_len]  # [seq_len, kv_heads, head_dim]
        values = _gather(v_cache, table)[0, :seq_len]
        if q_len == seq_len:
            mask, causal = None, True
        else:
            # Query j sits at absolute position seq_len - q_len + j and sees keys up to there.
            qpos = torch.arange(seq_len - q_len, seq_len, device=q.device)
            mask = torch.arange(seq_len, device=q.device)[None, :] <= qpos[:, None]
            causal = False
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1),  # [heads, q_len, head_dim]
            keys.transpose(0, 1),  # [kv_heads, seq_len, head_dim]
            values.transpose(0, 1),
            attn_mask=mask,
            is_causal=causal,
            scale=scale,
            enable_gqa=True,
        )
        return out.transpose(0, 1)


def write_kv(k_cache, v_cache, k, v, slot_mapping: torch.Tensor) -> None:
    """Scatter this step's K/V into their pages."""
    kv_heads, head_dim = k_cache.shape[-2:]
    k_cache.view(-1, kv_heads, head_dim)[slot_mapping] = k.to(k_cache.dtype)
    v_cache.view(-1, kv_heads, head_dim)[slot_mapping] = v.to(v_cache.dtype)


def _gather(cache: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
    """[num_blocks, bs, kv, d] pages + [n, max_blocks] tables -> [n, max_blocks * bs, kv, d]."""
    n, max_blocks = tables.shape
    pages = cache[tables]  # [n, max_blocks, bs, kv, d]
    return pages.reshape(n, max_blocks * cache.shape[1], *cache.shape[2:])
