"""GPU attention: K/V written by one Triton kernel, decodes through the Triton paged kernel,
prefill chunks through the reference path (SDPA per sequence, flash attention on the GPU)."""

from __future__ import annotations

import torch

from engine.attention.metadata import AttentionMetadata
from engine.attention.torch_ref import TorchAttention
from engine.attention.triton_decode import paged_decode_attention
from engine.attention.triton_kv_write import write_kv_triton
from engine.kv.cache import LayerKV


class TritonAttention(TorchAttention):
    name = "triton"
    write_kv = staticmethod(write_kv_triton)  # K and V of a layer in one launch

    def _decode(self, q, kv: LayerKV, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        nd = q.shape[0]
        return paged_decode_attention(
            q,
            kv.k,
            kv.v,
            meta.block_tables[:nd],
            meta.seq_lens[:nd],
            scale,
            k_scale=kv.k_scale,
            v_scale=kv.v_scale,
        )
