"""What the attention backend needs to know about one flat step."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Protocol

import torch

from engine.host_transfer import to_device
from engine.kv.cache import LayerKV


class AttentionBackend(Protocol):
    def forward(
        self,
        q: torch.Tensor,  # [num_tokens, heads, head_dim]
        k: torch.Tensor,  # [num_tokens, kv_heads, head_dim]
        v: torch.Tensor,  # [num_tokens, kv_heads, head_dim]
        kv_cache: LayerKV,  # this layer's pages (and scales, when quantized)
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:  # [num_tokens, heads, head_dim]
        """Write k/v into the cache at meta.slot_mapping, then attend each sequence's queries to
        its whole context (cached prefix plus the new tokens, all read back from the cache),
        causally."""
        ...


@dataclass
class AttentionMetadata:
    """Sequences are ordered decodes first: the first `num_decodes` have exactly one query token."""

    backend: AttentionBackend
    slot_mapping: (
        torch.Tensor
    )  # [num_tokens] int64: block_id * block_size + offset of each new token
    block_tables: torch.Tensor  # [num_seqs, max_blocks] int64, padded with 0
    seq_lens: torch.Tensor  # [num_seqs] int64: context length once this step's tokens are in
    query_start_loc: list[int]  # num_seqs + 1 offsets into the flat tokens (host side)
    seq_lens_host: list[int]
    num_decodes: int
    block_size: int

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_host)

    @cached_property
    def prefill_starts(self) -> torch.Tensor:
        """[num_prefills + 1] int64 on the device: the prefill chunks' offsets into the tokens
        after the decodes (made once per step, shared by every layer)."""
        starts = self.query_start_loc[self.num_decodes :]
        return to_device([s - starts[0] for s in starts], torch.int64, self.seq_lens.device)

    @property
    def max_prefill_len(self) -> int:
        starts = self.query_start_loc[self.num_decodes :]
        return max((b - a for a, b in zip(starts, starts[1:], strict=False)), default=0)
