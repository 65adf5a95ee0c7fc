"""The KV tensors themselves: per layer a paged K and V (and their scales when quantized), and
their sizing. engine/kv/quant.py says how values are stored in each `kv_cache_dtype`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch

from engine.kv.quant import storage_dtype

SCALE_DTYPE = torch.float32


@dataclass(frozen=True)
class KVLayout:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: torch.dtype  # the model's compute dtype
    kv_cache_dtype: str = "auto"  # auto (= dtype) | fp8 | int8

    @classmethod
    def of(
        cls, model, block_size: int, dtype: torch.dtype, kv_cache_dtype: str = "auto"
    ) -> KVLayout:
        """The layout a LlamaForCausalLM needs."""
        return cls(
            num_layers=model.config.num_hidden_layers,
            num_kv_heads=model.num_kv_heads,
            head_dim=model.head_dim,
            block_size=block_size,
            dtype=dtype,
            kv_cache_dtype=kv_cache_dtype,
        )

    @property
    def storage_dtype(self) -> torch.dtype:
        return storage_dtype(self.kv_cache_dtype, self.dtype)

    @property
    def slot_scales(self) -> bool:
        """int8 keeps a float32 scale per token and KV head beside the pages."""
        return self.kv_cache_dtype == "int8"

    @property
    def bytes_per_block(self) -> int:
        """K and V of every layer for one page; fp8's per-layer scalar scales are not per page."""
        elem = torch.empty((), dtype=self.storage_dtype).element_size()
        per_head = self.head_dim * elem + (SCALE_DTYPE.itemsize if self.slot_scales else 0)
        return 2 * self.num_layers * self.block_size * self.num_kv_heads * per_head

    def blocks_for_bytes(self, num_bytes: int) -> int:
        return num_bytes // self.bytes_per_block


class LayerKV(NamedTuple):
    """One layer's pages, as the attention backends receive them."""

    k: torch.Tensor  # [num_blocks, block_size, kv_heads, head_dim] storage dtype
    v: torch.Tensor
    # None unquantized; fp8: [] float32; int8: [num_blocks, block_size, kv_heads] float32
    k_scale: torch.Tensor | None = None
    v_scale: torch.Tensor | None = None


class KVCache:
    def __init__(
        self,
        layout: KVLayout,
        num_blocks: int,
        device: torch.device,
        fp8_scales: Sequence[tuple[float, float]] | None = None,
    ) -> None:
        """`fp8_scales`: per layer (k_scale, v_scale) for an fp8 cache; default 1.0 each."""
        if fp8_scales is not None and layout.kv_cache_dtype != "fp8":
            raise ValueError("fp8_scales are for an fp8 KV cache")
        if fp8_scales is not None and len(fp8_scales) != layout.num_layers:
            raise ValueError(
                f"{len(fp8_scales)} layers of KV scales for a model of {layout.num_layers} layers"
            )
        self.layout = layout
        self.num_blocks = num_blocks
        shape = (num_blocks, layout.block_size, layout.num_kv_heads, layout.head_dim)
        self.fp8_scales = (
            list(fp8_scales or [(1.0, 1.0)] * layout.num_layers)
            if layout.kv_cache_dtype == "fp8"
            else None
        )

        def pages() -> torch.Tensor:
            return torch.zeros(shape, dtype=layout.storage_dtype, device=device)

        def scales(layer: int, which: int) -> torch.Tensor | None:
            if self.fp8_scales is not None:
                return torch.tensor(self.fp8_scales[layer][which], dtype=SCALE_DTYPE, device=device)
            if layout.slot_scales:
                return torch.zeros(shape[:3], dtype=SCALE_DTYPE, device=device)
            return None

        self.layers: list[LayerKV] = [
            LayerKV(pages(), pages(), scales(i, 0), scales(i, 1)) for i in range(layout.num_layers)
        ]

    @property
    def num_bytes(self) -> int:
        return self.num_blocks * self.layout.bytes_per_block
