"""The scheduler and KV manager without a model, in vLLM's manner (tests/v1/core): fake requests,
fake sampled tokens, exact block ids. `step` does what EngineCore.step does around the model:
schedule, append one token to each request whose chunk reached its end, update."""

from __future__ import annotations

from engine.config import SamplingParams
from engine.kv.manager import KVCacheManager
from engine.request import Request, RequestStatus
from engine.scheduler import Scheduler, SchedulerOutput
from engine.state import BLOCK_CACHED, BLOCK_FREE

FAKE_TOKEN = 7


def make_scheduler(
    num_blocks: int = 16,
    block_size: int = 4,
    max_num_tokens: int = 64,
    max_num_seqs: int = 8,
    enable_prefix_caching: bool = True,
    enable_chunked_prefill: bool = True,
    max_model_len: int | None = None,
) -> Scheduler:
    kv = KVCacheManager(num_blocks, block_size, enable_prefix_caching)
    return Scheduler(kv, max_num_tokens, max_num_seqs, enable_chunked_prefill, max_model_len)


def make_requests(
    *prompt_lens: int,
    max_tokens: int = 16,
    priorities: tuple[int, ...] | None = None,
    start: int = 0,
    prompts: list[list[int]] | None = None,
) -> list[Request]:
    """Requests r{start}, r{start+1}, ... with prompts of the given lengths (distinct tokens, so
    no two share a cached prefix unless `prompts` says so), in arrival order."""
    prompts = prompts or [
        [1000 * (start + i + 1) + t for t in range(n)] for i, n in enumerate(prompt_lens)
    ]
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    return [
        Request(
            request_id=f"r{start + i}",
            prompt_token_ids=prompt,
            params=params,
            priority=priorities[i] if priorities else 0,
            arrival_index=start + i,
        )
        for i, prompt in enumerate(prompts)
    ]


def step(scheduler: Scheduler) -> SchedulerOutput:
    batch = scheduler.schedule()
    for request, num_new in batch.scheduled:
        if request.num_computed_tokens + num_new == request.num_tokens:  # the chunk reached its end
            request.append_tokens([FAKE_TOKEN], now=0.0)
    scheduler.update(batch)
    return batch


def scheduled(batch: SchedulerOutput) -> dict[str, list[tuple[str, int]]]:
    def rows(items):
        return [(r.request_id, n) for r, n in items]

    return {"decodes": rows(batch.decodes), "prefills": rows(batch.prefills)}


def test_decodes_go_first_then_prefill_chunks_fill_the_budget():
    s = make_scheduler(max_num_tokens=10)
    a, b = make_requests(6, 30)
    s.add(a)
    assert scheduled(step(s)) == {"decodes": [], "prefills": [("r0", 6)]}
    assert s.kv.block_ids("r0") == [0, 1]
    s.add(b)
    batch = step(s)
    assert scheduled(batch) == {"decodes": [("r0", 1)], "prefills": [("r1", 9)]}
    assert s.kv.block_ids("r0") == [0, 1]  # 7 tokens still fit two blocks
    assert s.kv.block_ids("r1") == [2, 3, 4]
    assert b.num_computed_tokens == 9 and b.num_output_tokens == 0  # mid-prompt: no token
    assert scheduled(step(s)) == {"decodes": [("r0", 1)], "prefills": [("r1", 9)]}
    assert s.kv.block_ids("r0") == [0, 1]  # 8 tokens: block 1 is now full
    assert s.kv.block_ids("r1") == [2, 3, 4, 5, 6]


def test_without_chunked_prefill_a_prompt_over_the_budget_waits():
    s = make_scheduler(max_num_tokens=8, enable_chunked_prefill=False)
    a, b = make_requests(4, 6)
    s.add(a)
    s.add(b)
    assert scheduled(step(s)) == {"decodes": [], "prefills": [("r0", 4)]}  # 4 + 6 > 8
    assert [r.request_id for r in s.waiting] == ["r1"]
    assert scheduled(step(s)) == {"decodes": [("r0", 1)], "prefills": [("r1", 6)]}


def test_max_num_seqs_caps_the_running_set_and_priority_then_arrival_orders_admission():
    s = make_scheduler(max_num_seqs=2)
    for request in make_requests(3, 3, 3, priorities=(5, 0, 0)):
        s.add(request)
    step(s)
    assert [r.request_id for r in s.running] == ["r1", "r2"]
    assert [r.request_id for r in s.waiting] == ["r0"]
    stats = s.make_stats(now=0.0)
    assert [r.request_id for r in stats.running] == ["r1", "r2"]
    assert [r.blocks for r in stats.running] == [(0,), (1,)]
    assert [r.request_id for r in stats.waiting] == ["r0"] and stats.preempted == ()


def test_a_cached_prefix_is_shared_at_admission_with_exact_block_ids():
    s = make_scheduler(block_size=4)
    shared = list(range(100, 108))  # two full blocks
    a, b = make_requests(prompts=[shared + [1, 2], shared + [3, 4, 5]])
    s.add(a)
    step(s)
    assert s.kv.block_ids("r0") == [0, 1, 2]
    s.add(b)
    batch = step(s)
    assert scheduled(batch) == {"decodes": [("r0", 1)], "prefills": [("r1", 3)]}  # 8 cached
    assert s.kv.block_ids("r1") == [0, 1, 3]
    assert b.num_cached_tokens == 8
    assert [s.kv.pool.blocks[i].ref_cnt for i in range(4)] == [2, 2, 1, 1]


def test_preemption_takes_the_newest_frees_its_blocks_and_it_recomputes_from_the_cache():
    # 6 blocks of 2 tokens: three 3-token prompts take 2 blocks each, and the first decode that
    # needs a third block finds none free.
    s = make_scheduler(num_blocks=6, block_size=2, max_num_tokens=64)
    a, b, c = make_requests(3, 3, 3)
    for request in (a, b, c):
        s.add(request)
    step(s)
    assert [s.kv.block_ids(r.request_id) for r in (a, b, c)] == [[0, 1], [2, 3], [4, 5]]
    batch = step(s)  # each now has 4 tokens, 3 computed + 1 new: still two blocks
    assert scheduled(batch)["decodes"] == [("r0", 1), ("r1", 1), ("r2", 1)]
    batch = step(s)  # the 5th tokens need a third block each: r2, the newest, is preempted
    assert [r.request_id for r in batch.preempted] == ["r2"]
    assert c.status is RequestStatus.PREEMPTED and c.num_computed_tokens == 0
    assert c.num_preemptions == 1 and s.num_preemptions == 1
    assert s.kv.block_ids("r2") == []
    assert s.kv.block_ids("r0") == [0, 1, 5] and s.kv.block_ids("r1") == [2, 3, 4]
    assert scheduled(batch)["decodes"] == [("r0", 1), ("r1", 1)]
    assert [r.request_id for r in s.make_stats(now=0.0).preempted] == ["r2"]
    # The pool stays full: r2 waits while the others decode. Once they finish it comes back
    # and recomputes everything it knew (3 prompt + 2 output tokens) as one prefill, in blocks
    # taken from the head of the free queue (the finished requests' pages, tail first).
    assert scheduled(step(s)) == {"decodes": [("r0", 1), ("r1", 1)], "prefills": []}
    s.finish(a, RequestStatus.FINISHED_LENGTH)
    s.finish(b, RequestStatus.FINISHED_LENGTH)
    assert list(s.kv.pool.free_queue) == [5, 1, 0, 4, 3, 2]
    assert scheduled(step(s)) == {"decodes": [], "prefills": [("r2", 5)]}
    assert c.status is RequestStatus.RUNNING and s.kv.block_ids("r2") == [5, 1, 0]
    assert c.num_cached_tokens == 0  # counted at its first admission only


def test_rejected_drafts_give_their_slots_back():
    s = make_scheduler(block_size=4)
    (a,) = make_requests(7)
    s.add(a)
    step(s)  # 7 prompt tokens + 1 sampled: 8 tokens, 7 computed, blocks [0, 1]
    a.spec_token_ids = [1, 2, 3, 4, 5]
    batch = s.schedule()
    assert [(r.request_id, n) for r, n in batch.verifies] == [("r0", 6)]  # last token + 5 drafts
    assert s.kv.block_ids("r0") == [0, 1, 2, 3]  # room for 13 tokens
    a.append_tokens([1, 2, FAKE_TOKEN], now=0.0)  # two drafts accepted, one corrected token
    s.update(batch, {"r0": 3})
    assert a.num_computed_tokens == 7 + 6 - 3 and a.spec_token_ids == []
    assert s.kv.block_ids("r0") == [0, 1, 2]  # 10 computed tokens: the fourth block went back


def test_drafts_beyond_the_budget_are_dropped_never_the_requests_own_tokens():
    s = make_scheduler(max_num_tokens=3)
    (a,) = make_requests(3)
    s.add(a)
    step(s)
    a.spec_token_ids = [1, 2, 3, 4]
    batch = s.schedule()
    assert [(r.request_id, n) for r, n in batch.verifies] == [("r0", 3)]
    assert a.spec_token_ids == [1, 2]


def test_finish_frees_at_once_and_the_kv_stats_show_cached_free_blocks():
    s = make_scheduler(num_blocks=8, block_size=4)
    a, b = make_requests(9, 4)
    s.add(a)
    s.add(b)
    step(s)
    assert s.kv.block_ids("r0") == [0, 1, 2] and s.kv.block_ids("r1") == [3]
    s.finish(a, RequestStatus.FINISHED_ABORTED)
    assert a.status is RequestStatus.FINISHED_ABORTED and s.kv.block_ids("r0") == []
    stats = s.kv.make_stats(s.running)
    # r0's two full blocks stay cached; its partial block 2 and never-used 4..7 are empty.
    assert stats.block_map == (
        BLOCK_CACHED,
        BLOCK_CACHED,
        BLOCK_FREE,
        0,
        BLOCK_FREE,
        BLOCK_FREE,
        BLOCK_FREE,
        BLOCK_FREE,
    )
    assert (stats.kv_blocks_used, stats.kv_blocks_cached_free, stats.kv_blocks_free) == (1, 2, 5)
    assert s.has_unfinished() and [r.request_id for r in s.running] == ["r1"]
