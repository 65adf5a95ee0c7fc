"""Block pool and per-request manager: exact block ids, ref counts and eviction order."""

from __future__ import annotations

import pytest

from engine.config import SamplingParams
from engine.kv.block_pool import BlockPool, NoFreeBlocksError, hash_block_tokens
from engine.kv.manager import KVCacheManager
from engine.request import Request


def ids(blocks):
    return [b.block_id for b in blocks]


def test_allocate_takes_from_the_head_in_order():
    pool = BlockPool(6)
    assert ids(pool.allocate(2)) == [0, 1]
    assert ids(pool.allocate(3)) == [2, 3, 4]
    assert pool.num_free_blocks == 1
    with pytest.raises(NoFreeBlocksError):
        pool.allocate(2)
    assert pool.num_free_blocks == 1  # a failed allocation takes nothing


def test_free_order_is_eviction_order_and_cached_blocks_are_evicted_lru():
    pool = BlockPool(4)
    a = pool.allocate(2)  # 0, 1
    b = pool.allocate(2)  # 2, 3
    for i, block in enumerate(a + b):
        pool.register(block, 100 + i)
    pool.free(reversed(b))  # queue: 3, 2
    pool.free(reversed(a))  # queue: 3, 2, 1, 0
    assert list(pool.free_queue) == [3, 2, 1, 0]
    assert pool.num_cached_free_blocks == 4
    taken = pool.allocate(1)
    assert ids(taken) == [3]
    assert taken[0].block_hash is None and pool.lookup(103) is None  # evicted
    assert pool.lookup(100).block_id == 0  # the others still cached
    assert pool.num_evictions == 1


def test_touch_pulls_a_cached_block_out_of_the_free_queue_and_counts_refs():
    pool = BlockPool(3)
    (block,) = pool.allocate(1)
    pool.register(block, 7)
    pool.free([block])
    assert block.ref_cnt == 0 and 0 in pool.free_queue
    pool.touch([block])
    pool.touch([block])
    assert block.ref_cnt == 2 and 0 not in pool.free_queue
    assert ids(pool.allocate(2)) == [1, 2]  # the shared block can't be handed out
    pool.free([block])
    assert block.ref_cnt == 1 and 0 not in pool.free_queue
    pool.free([block])
    assert list(pool.free_queue) == [0]
    with pytest.raises(RuntimeError):
        pool.free([block])


def test_duplicate_content_keeps_the_first_registration():
    pool = BlockPool(2)
    first, second = pool.allocate(2)
    pool.register(first, 5)
    pool.register(second, 5)
    assert pool.lookup(5) is first and second.block_hash is None


def test_chained_hash_depends_on_parent_tokens_and_extra_keys():
    h = hash_block_tokens(None, [1, 2, 3])
    assert h == hash_block_tokens(None, [1, 2, 3])
    assert h != hash_block_tokens(None, [1, 2, 4])
    assert hash_block_tokens(h, [4]) != hash_block_tokens(None, [4])
    assert hash_block_tokens(None, [1], "lora-a") != hash_block_tokens(None, [1], "lora-b")


def request(rid, tokens):
    return Request(request_id=rid, prompt_token_ids=list(tokens), params=SamplingParams())


def run_step(kv, req, num_new, cached=None):
    assert kv.allocate_slots(req, num_new, cached)
    if cached:
        req.num_computed_tokens = cached.num_tokens
    req.num_computed_tokens += num_new
    kv.register_full_blocks(req)


def test_manager_shares_a_common_prefix_without_copies():
    kv = KVCacheManager(num_blocks=10, block_size=4, enable_prefix_caching=True)
    a = request("a", range(10))  # blocks: [0..3] [4..7] [8, 9]
    run_step(kv, a, 10)
    assert kv.block_ids("a") == [0, 1, 2]
    b = request("b", list(range(8)) + [50, 51, 52])
    hit = kv.find_cached_prefix(b)
    assert ids(hit.blocks) == [0, 1] and hit.num_tokens == 8
    run_step(kv, b, 3, hit)
    assert kv.block_ids("b") == [0, 1, 3]
    assert [kv.pool.blocks[i].ref_cnt for i in range(4)] == [2, 2, 1, 1]
    kv.free(a)  # tail first: block 2 (a's own) is freed; 0 and 1 are still b's
    assert list(kv.pool.free_queue)[-1:] == [2]
    assert kv.pool.blocks[0].ref_cnt == 1
    kv.free(b)
    # b freed tail first: 3, then 1, then 0 join the queue's tail in that order.
    assert list(kv.pool.free_queue)[-4:] == [2, 3, 1, 0]


def test_a_hit_never_covers_the_whole_prompt():
    kv = KVCacheManager(num_blocks=8, block_size=4, enable_prefix_caching=True)
    a = request("a", range(8))
    run_step(kv, a, 8)
    kv.free(a)
    again = request("again", range(8))
    hit = kv.find_cached_prefix(again)
    # The last token must be computed for its logits, so only the first block is reused.
    assert ids(hit.blocks) == [0] and hit.num_tokens == 4


def test_partial_blocks_are_not_cached_and_failed_allocation_changes_nothing():
    kv = KVCacheManager(num_blocks=3, block_size=4, enable_prefix_caching=True)
    a = request("a", range(6))
    run_step(kv, a, 6)
    assert kv.pool.blocks[0].block_hash is not None
    assert kv.pool.blocks[1].block_hash is None  # half full
    b = request("b", range(100, 112))
    assert not kv.allocate_slots(b, 12)
    assert kv.block_ids("b") == [] and kv.pool.num_free_blocks == 1


def test_reclaimable_cached_blocks_are_not_double_counted():
    kv = KVCacheManager(num_blocks=3, block_size=2, enable_prefix_caching=True)
    a = request("a", range(4))
    run_step(kv, a, 4)
    kv.free(a)  # blocks 0 and 1 free but cached; block 2 free
    b = request("b", [0, 1, 2, 3, 9, 9, 9])  # hits blocks 0 and 1, needs 2 more for 3 tokens
    hit = kv.find_cached_prefix(b)
    assert ids(hit.blocks) == [0, 1]
    assert not kv.allocate_slots(b, 3, hit)  # only block 2 is truly available
    assert kv.pool.num_free_blocks == 3
