"""The KV tensors themselves: one (K, V) pair of paged tensors per layer, and their sizing."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class KVLayout:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: torch.dtype

    @classmethod
    def of(cls, model, block_size: int, dtype: torch.dtype) -> KVLayout:
        """The layout a LlamaForCausalLM needs."""
        return cls(
            num_layers=model.config.num_hidden_layers,
            num_kv_heads=model.num_kv_heads,
            head_dim=model.head_dim,
            block_size=block_size,
            dtype=dtype,
        )

    @property
    def bytes_per_block(self) -> int:
        elem = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.block_size * self.num_kv_heads * self.head_dim * elem

    def blocks_for_bytes(self, num_bytes: int) -> int:
        return num_bytes // self.bytes_per_block


class KVCache:
    def __init__(self, layout: KVLayout, num_blocks: int, device: torch.device) -> None:
        self.layout = layout
        self.num_blocks = num_blocks
        shape = (num_blocks, layout.block_size, layout.num_kv_heads, layout.head_dim)
        # per layer (K, V), each [num_blocks, block_size, kv_heads, head_dim]
        self.layers: list[tuple[torch.Tensor, torch.Tensor]] = [
            (
                torch.zeros(shape, dtype=layout.dtype, device=device),
                torch.zeros(shape, dtype=layout.dtype, device=device),
            )
            for _ in range(layout.num_layers)
        ]

    @property
    def num_bytes(self) -> int:
        return self.num_blocks * self.layout.bytes_per_block
