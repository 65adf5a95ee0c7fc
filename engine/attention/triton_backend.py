"""GPU attention: K/V written by one Triton kernel, decodes through the Triton paged kernel,
prefill chunks, all of a step's, through one paged Triton kernel (WORKBENCH_TRITON_PREFILL=0:
the reference path instead, SDPA per sequence over gathered pages)."""

from __future__ import annotations

import os

import torch

from engine.attention.metadata import AttentionMetadata
from engine.attention.torch_ref import TorchAttention
from engine.attention.triton_decode import paged_decode_attention
from engine.attention.triton_kv_write import write_kv_triton
from engine.attention.triton_prefill import paged_prefill_attention
from engine.kv.cache import LayerKV

PREFILL_ENV_VAR = "WORKBENCH_TRITON_PREFILL"


class TritonAttention(TorchAttention):
    name = "triton"
    write_kv = staticmethod(write_kv_triton)  # K and V of a layer in one launch

    def __init__(self, prefill_kernel: bool | None = None) -> None:
        if prefill_kernel is None:
            prefill_kernel = os.environ.get(PREFILL_ENV_VAR, "1") != "0"
        self.prefill_kernel = prefill_kernel

    def _decode(
        self, q, kv: LayerKV, meta: AttentionMetadata, scale: float, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        nd = q.shape[0]
        return paged_decode_attention(
            q,
            kv.k,
            kv.v,
            meta.block_tables[:nd],
            meta.seq_lens[:nd],
            scale,
            out=out,  # written in place: no copy kernel into the step's output
            k_scale=kv.k_scale,
            v_scale=kv.v_scale,
        )

    def _prefills(
        self, q: torch.Tensor, kv: LayerKV, meta: AttentionMetadata, scale: float, out: torch.Tensor
    ) -> None:
        if not self.prefill_kernel:
            super()._prefills(q, kv, meta, scale, out)
            return
        nd = meta.num_decodes
        lo = meta.query_start_loc[nd]
        paged_prefill_attention(
            q[lo:],
            kv.k,
            kv.v,
            meta.block_tables[nd:],
            meta.seq_lens[nd:],
            meta.prefill_starts,
            meta.max_prefill_len,
            scale,
            out=out[lo:],
            k_scale=kv.k_scale,
            v_scale=kv.v_scale,
        )
