"""The pool of KV pages: reference counts, prefix hashes and the LRU order of free blocks.

Invariant: a block is in `free_queue` exactly when its ref_cnt is 0. A free block may still hold a
cached prefix (it has a `block_hash` and sits in `cached`); it is reused only when it reaches the
head of the queue, and then loses its hash. The queue's head is the least recently freed block.
`on_evict`, when set (the KV tiers, engine/kv/offload.py), is told which (block id, hash) pairs an
`allocate` evicted, before the blocks are returned, so their pages can be copied out first.
"""

from __future__ import annotations

import hashlib
import pickle
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any


class NoFreeBlocksError(RuntimeError):
    pass


@dataclass(eq=False)
class KVBlock:
    block_id: int
    ref_cnt: int = 0
    block_hash: int | None = None  # set while the block is registered in the prefix cache


def hash_block_tokens(
    parent_hash: int | None, token_ids: Sequence[int], extra_keys: Any = None
) -> int:
    """Chained block hash: equal hashes mean equal token prefixes (and equal extra keys, e.g. a
    LoRA or a cache salt). Stable across processes, unlike Python's hash() of strings."""
    payload = pickle.dumps((parent_hash, tuple(token_ids), extra_keys), protocol=4)
    return int.from_bytes(hashlib.sha256(payload).digest()[:8], "little")


class BlockPool:
    def __init__(self, num_blocks: int, enable_caching: bool = True) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        self.free_queue: OrderedDict[int, KVBlock] = OrderedDict(
            (b.block_id, b) for b in self.blocks
        )
        self.cached: dict[int, KVBlock] = {}
        self.num_evictions = 0
        self.on_evict: Callable[[list[tuple[int, int]]], None] | None = None

    @property
    def num_free_blocks(self) -> int:
        """Blocks that can be handed out now, cached-free ones included."""
        return len(self.free_queue)

    @property
    def num_cached_free_blocks(self) -> int:
        return sum(1 for b in self.free_queue.values() if b.block_hash is not None)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self.free_queue)

    def allocate(self, n: int) -> list[KVBlock]:
        """Take n blocks from the LRU head, evicting whatever prefix they cached."""
        if n > len(self.free_queue):
            raise NoFreeBlocksError(f"asked for {n} blocks, {len(self.free_queue)} free")
        out = []
        evicted: list[tuple[int, int]] = []
        for _ in range(n):
            _, block = self.free_queue.popitem(last=False)
            if block.block_hash is not None:
                evicted.append((block.block_id, block.block_hash))
                del self.cached[block.block_hash]
                block.block_hash = None
                self.num_evictions += 1
            block.ref_cnt = 1
            out.append(block)
        if evicted and self.on_evict is not None:
            self.on_evict(evicted)
        return out

    def touch(self, blocks: Iterable[KVBlock]) -> None:
        """Take a reference on blocks found in the prefix cache (pulling free ones out of the
        queue so they cannot be evicted while in use)."""
        for block in blocks:
            if block.ref_cnt == 0:
                del self.free_queue[block.block_id]
            block.ref_cnt += 1

    def free(self, blocks: Iterable[KVBlock]) -> None:
        """Drop a reference on each block, in the given order: blocks that reach zero join the
        queue's tail in that order, so the first given is the first evicted."""
        for block in blocks:
            if block.ref_cnt <= 0:
                raise RuntimeError(f"block {block.block_id} freed more often than taken")
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self.free_queue[block.block_id] = block

    def lookup(self, block_hash: int) -> KVBlock | None:
        return self.cached.get(block_hash) if self.enable_caching else None

    def register(self, block: KVBlock, block_hash: int) -> None:
        """Make a full block findable by its hash. A second block with the same content (two
        requests computed the same prefix at once) stays unregistered: the first one wins."""
        if not self.enable_caching or block.block_hash is not None or block_hash in self.cached:
            return
        block.block_hash = block_hash
        self.cached[block_hash] = block

    def reset_prefix_cache(self) -> None:
        for block in self.cached.values():
            block.block_hash = None
        self.cached.clear()
