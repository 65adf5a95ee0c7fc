"""The reference attention backend: plain torch over the paged KV cache, on CPU and GPU.

Slow but obviously right; the Triton backend is checked against it. Decodes are batched into one
masked SDPA call; each prefill chunk is its own call over its gathered context.

Every query, prefill or decode, attends to K/V read back from the cache after this step's tokens
are written: with a quantized cache the new tokens too are seen dequantized, exactly as later steps
will see them, so the output does not depend on how a prompt is split into chunks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.attention.metadata import AttentionMetadata
from engine.kv.cache import LayerKV
from engine.kv.quant import dequantize, has_slot_scales, write_quantized
from engine.numeric import cdiv


class TorchAttention:
    name = "torch"

    @staticmethod
    def write_kv(kv: LayerKV, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
        write_kv(kv, k, v, slots)

    def forward(
        self,
        q: torch.Tensor,  # [num_tokens, heads, head_dim]
        k: torch.Tensor,  # [num_tokens, kv_heads, head_dim]
        v: torch.Tensor,
        kv_cache: LayerKV,
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        self.write_kv(kv_cache, k, v, meta.slot_mapping)
        out = torch.empty_like(q)
        nd = meta.num_decodes
        if nd:
            self._decode(q[:nd], kv_cache, meta, scale, out[:nd])
        if meta.num_seqs > nd:
            self._prefills(q, kv_cache, meta, scale, out)
        return out

    def _prefills(
        self, q: torch.Tensor, kv: LayerKV, meta: AttentionMetadata, scale: float, out: torch.Tensor
    ) -> None:
        """Fill out's rows of the prefill chunks (the sequences after the decodes)."""
        starts = meta.query_start_loc
        for i in range(meta.num_decodes, meta.num_seqs):
            lo, hi = starts[i], starts[i + 1]
            out[lo:hi] = self._prefill(q[lo:hi], kv, meta, i, scale)

    def _decode(
        self, q, kv: LayerKV, meta: AttentionMetadata, scale: float, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The decodes' attention [nd, heads, head_dim], written into `out` when given."""
        nd = q.shape[0]
        tables = meta.block_tables[:nd]  # [nd, max_blocks]
        keys, values = gather_kv(kv, tables, q.dtype)  # each [nd, ctx, kv_heads, head_dim]
        ctx = keys.shape[1]
        valid = torch.arange(ctx, device=q.device)[None, :] < meta.seq_lens[:nd, None]  # [nd, ctx]
        attended = F.scaled_dot_product_attention(
            q[:, :, None, :],  # [nd, heads, 1, head_dim]
            keys.transpose(1, 2),  # [nd, kv_heads, ctx, head_dim]
            values.transpose(1, 2),
            attn_mask=valid[:, None, None, :],
            scale=scale,
            enable_gqa=True,
        )
        if out is None:
            return attended[:, :, 0, :]
        return out.copy_(attended[:, :, 0, :])

    def _prefill(self, q, kv: LayerKV, meta: AttentionMetadata, i: int, scale: float):
        seq_len = meta.seq_lens_host[i]
        q_len = q.shape[0]
        nblocks = cdiv(seq_len, meta.block_size)
        table = meta.block_tables[i : i + 1, :nblocks]
        keys, values = gather_kv(kv, table, q.dtype)
        keys, values = keys[0, :seq_len], values[0, :seq_len]  # [seq_len, kv_heads, head_dim]
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


def write_kv(kv: LayerKV, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Scatter this step's K/V [num_tokens, kv_heads, head_dim] into their pages, quantized to the
    cache's dtype."""
    write_quantized(kv.k, kv.k_scale, k, slot_mapping)
    write_quantized(kv.v, kv.v_scale, v, slot_mapping)


def gather_kv(
    kv: LayerKV, tables: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """[n, max_blocks] block tables -> keys, values [n, max_blocks * bs, kv, d] in `dtype`."""
    return (
        dequantize(_gather(kv.k, tables), _gather_scale(kv.k, kv.k_scale, tables), dtype),
        dequantize(_gather(kv.v, tables), _gather_scale(kv.v, kv.v_scale, tables), dtype),
    )


def _gather(cache: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
    """[num_blocks, bs, ...] pages + [n, max_blocks] tables -> [n, max_blocks * bs, ...]."""
    n, max_blocks = tables.shape
    pages = cache[tables]  # [n, max_blocks, bs, ...]
    return pages.reshape(n, max_blocks * cache.shape[1], *cache.shape[2:])


def _gather_scale(
    pages: torch.Tensor, scale: torch.Tensor | None, tables: torch.Tensor
) -> torch.Tensor | None:
    """Per-slot scales follow their pages through the tables; a per-layer scale stays as is."""
    return _gather(scale, tables) if has_slot_scales(pages) else scale
