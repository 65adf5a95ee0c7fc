"""Per-request page tables on top of the block pool: prefix-cache lookup, slot allocation,
registration of full blocks, and freeing.

A request's blocks cover its computed tokens plus the tokens scheduled this step. Only full blocks
whose every token is computed are registered in the prefix cache, so a cache hit never returns a
page with missing K/V.

With KV tiers attached (`attach_tiers`), a lookup that misses the device pool continues in the host
and disk tiers: those blocks come back into fresh pages when the request's slots are allocated,
before any prefill reads them, and count as cached tokens like device hits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from engine.kv.block_pool import BlockPool, KVBlock, hash_block_tokens
from engine.numeric import cdiv
from engine.request import Request
from engine.state import BLOCK_CACHED, BLOCK_FREE, KVStats


class KVSequence(Protocol):
    """What allocation, trimming and freeing read of a sequence: a `Request` (the target's
    scheduler), or the draft model's own record of one (`engine.spec.draft.DraftSeq`)."""

    @property
    def request_id(self) -> str: ...

    @property
    def num_computed_tokens(self) -> int: ...


if TYPE_CHECKING:
    from engine.kv.offload import KVOffloader


@dataclass(frozen=True)
class CachedPrefix:
    blocks: list[KVBlock]  # device hits, in order
    num_tokens: int  # of the device hits and the restored blocks together
    restore: tuple[int, ...] = ()  # hashes of the blocks after them held by the KV tiers


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool) -> None:
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.pool = BlockPool(num_blocks, enable_caching=enable_prefix_caching)
        self.req_blocks: dict[str, list[KVBlock]] = {}
        self.req_hashes: dict[str, list[int]] = {}  # chained hashes of the request's full blocks
        self.req_num_registered: dict[str, int] = {}
        self.prefix_queries = 0  # prompt tokens looked up
        self.prefix_hits = 0  # of which found cached
        self.tiers: KVOffloader | None = None

    def attach_tiers(self, tiers: KVOffloader) -> None:
        """Cached blocks the pool evicts go to `tiers`; lookups continue there."""
        self.tiers = tiers
        self.pool.on_evict = tiers.save

    def close(self) -> None:
        """Let the tiers finish what they queued (the disk tier's writes, bounded)."""
        if self.tiers is not None:
            self.tiers.close()

    # --- lookup -------------------------------------------------------------------------------

    def _hashes(self, request: Request, num_full_blocks: int) -> list[int]:
        hashes = self.req_hashes.setdefault(request.request_id, [])
        bs = self.block_size
        while len(hashes) < num_full_blocks:
            i = len(hashes)
            parent = hashes[-1] if hashes else None
            hashes.append(hash_block_tokens(parent, request.all_token_ids[i * bs : (i + 1) * bs]))
        return hashes

    def find_cached_prefix(self, request: Request) -> CachedPrefix:
        """Longest run of cached full blocks at the start of the request's tokens. At least one
        token is always left to compute, since its logits are needed."""
        if not self.enable_prefix_caching:
            return CachedPrefix([], 0)
        max_blocks = (request.num_tokens - 1) // self.block_size
        hashes = self._hashes(request, max_blocks)
        blocks: list[KVBlock] = []
        for block_hash in hashes[:max_blocks]:
            block = self.pool.lookup(block_hash)
            if block is None:
                break
            blocks.append(block)
        restore: list[int] = []
        if self.tiers is not None and len(blocks) < max_blocks:
            restore = self.tiers.find(hashes[len(blocks) : max_blocks])
        num_tokens = (len(blocks) + len(restore)) * self.block_size
        return CachedPrefix(blocks, num_tokens, tuple(restore))

    def record_prefix_query(self, num_tokens: int, num_hit: int) -> None:
        self.prefix_queries += num_tokens
        self.prefix_hits += num_hit

    # --- allocation ---------------------------------------------------------------------------

    def allocate_slots(
        self,
        request: KVSequence,
        num_new_tokens: int,
        cached: CachedPrefix | None = None,
        num_lookahead_tokens: int = 0,
    ) -> bool:
        """Make room for `num_new_tokens` (+ lookahead) beyond the computed ones. On False
        nothing changed. `cached` is the prefix found for a request being admitted."""
        blocks = self.req_blocks.setdefault(request.request_id, [])
        cached_blocks = cached.blocks if cached else []
        num_computed = request.num_computed_tokens + (cached.num_tokens if cached else 0)
        total = num_computed + num_new_tokens + num_lookahead_tokens
        num_needed = cdiv(total, self.block_size) - len(blocks) - len(cached_blocks)
        # Cached blocks sitting free in the queue are about to be taken, so they can't also be
        # counted as room for new ones.
        num_reclaimable = sum(1 for b in cached_blocks if b.ref_cnt == 0)
        if num_needed > self.pool.num_free_blocks - num_reclaimable:
            if not blocks:
                del self.req_blocks[request.request_id]
            return False
        self.pool.touch(cached_blocks)
        blocks.extend(cached_blocks)
        if num_needed > 0:
            blocks.extend(self.pool.allocate(num_needed))
        restore = cached.restore if cached else ()
        if restore:  # the first new blocks take the tiers' records, then join the prefix cache
            restored = blocks[len(cached_blocks) : len(cached_blocks) + len(restore)]
            self.tiers.restore(restore, [b.block_id for b in restored])
            for block, block_hash in zip(restored, restore, strict=True):
                self.pool.register(block, block_hash)
        if cached_blocks or restore:  # admission: the request held no blocks before
            self.req_num_registered[request.request_id] = len(cached_blocks) + len(restore)
        return True

    def register_full_blocks(self, request: Request) -> None:
        """Register the request's blocks that are now full of computed tokens."""
        blocks = self.req_blocks.get(request.request_id)
        if not self.enable_prefix_caching or not blocks:
            return  # no caching, or the request holds no pages (preempted)
        rid = request.request_id
        # Hashes need the tokens' values: blocks holding a placeholder wait for it to resolve.
        num_known = min(request.num_computed_tokens, request.num_resolved_tokens)
        num_full = min(num_known // self.block_size, len(blocks))
        start = self.req_num_registered.get(rid, 0)
        if num_full <= start:
            return
        hashes = self._hashes(request, num_full)
        for i in range(start, num_full):
            self.pool.register(blocks[i], hashes[i])
        self.req_num_registered[rid] = num_full

    def trim(self, request: KVSequence, num_tokens: int) -> None:
        """Give back blocks beyond the first `num_tokens` tokens (rejected speculative slots)."""
        blocks = self.req_blocks.get(request.request_id, [])
        keep = cdiv(num_tokens, self.block_size)
        if len(blocks) > keep:
            self.pool.free(reversed(blocks[keep:]))
            del blocks[keep:]

    def free(self, request: KVSequence) -> None:
        """Release the request's pages, tail first, so that its last blocks (least likely to be
        shared) are evicted before its first ones."""
        rid = request.request_id
        blocks = self.req_blocks.pop(rid, [])
        self.pool.free(reversed(blocks))
        self.req_num_registered.pop(rid, None)
        self.req_hashes.pop(rid, None)

    def block_ids(self, request_id: str) -> list[int]:
        return [b.block_id for b in self.req_blocks.get(request_id, [])]

    @property
    def prefix_hit_rate(self) -> float:
        return self.prefix_hits / self.prefix_queries if self.prefix_queries else 0.0

    def make_stats(self, running: list[Request]) -> KVStats:
        """The pool's occupancy as `EngineState` reports it; `running` in the scheduler's order
        (the block map's owner indices point into it)."""
        pool = self.pool
        block_map = [BLOCK_FREE] * pool.num_blocks
        for block in pool.free_queue.values():
            if block.block_hash is not None:
                block_map[block.block_id] = BLOCK_CACHED
        for index, request in enumerate(running):
            for block_id in self.block_ids(request.request_id):
                # A shared prefix block shows its oldest owner.
                if block_map[block_id] < 0:
                    block_map[block_id] = index
        cached_free = pool.num_cached_free_blocks
        return KVStats(
            block_size=self.block_size,
            kv_blocks_total=pool.num_blocks,
            kv_blocks_used=pool.num_used_blocks,
            kv_blocks_cached_free=cached_free,
            kv_blocks_free=pool.num_free_blocks - cached_free,
            block_map=tuple(block_map),
            prefix_cache_hit_rate=self.prefix_hit_rate,
            kv_tiers=self.tiers.states() if self.tiers is not None else (),
        )
