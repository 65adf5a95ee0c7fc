"""Greedy output equals transformers token for token, whatever the batching does."""

from __future__ import annotations

import pytest
from conftest import assert_pool_whole, hf_greedy, random_prompts

from engine import LLM, SamplingParams

GREEDY = SamplingParams(max_tokens=12, ignore_eos=True)
LENGTHS = [5, 17, 33, 2, 9]


def expected(path, prompts, n=12):
    return [hf_greedy(path, p, n) for p in prompts]


@pytest.mark.parametrize(
    "engine_kwargs",
    [
        pytest.param({"block_size": 16}, id="block16"),
        pytest.param({"block_size": 1}, id="block1"),
        pytest.param({"block_size": 4, "max_num_tokens": 7}, id="chunked-prefill-7"),
        pytest.param({"block_size": 3, "max_num_tokens": 3, "max_num_seqs": 2}, id="chunks-of-3"),
    ],
)
def test_mixed_batch_matches_transformers(family_checkpoint, engine_kwargs):
    prompts = random_prompts(LENGTHS)
    llm = LLM(str(family_checkpoint), **engine_kwargs)
    outs = llm.generate(prompts, GREEDY)
    assert [o.token_ids for o in outs] == expected(family_checkpoint, prompts)
    assert all(o.finish_reason == "length" for o in outs)
    assert_pool_whole(llm)


def test_forced_preemption_keeps_output_exact(family_checkpoint):
    # 16 blocks of 4 tokens hold 64 tokens; five requests want up to 45 each at once.
    prompts = random_prompts(LENGTHS)
    llm = LLM(str(family_checkpoint), block_size=4, num_kv_blocks=16)
    outs = llm.generate(prompts, GREEDY)
    assert llm.engine.scheduler.num_preemptions > 0
    assert [o.token_ids for o in outs] == expected(family_checkpoint, prompts)
    assert_pool_whole(llm)


def test_prefix_cache_hits_keep_output_exact(llama_checkpoint):
    base = random_prompts([40], seed=3)[0]
    prompts = [base + tail for tail in random_prompts([3, 7, 1], seed=4)] + [base]
    llm = LLM(str(llama_checkpoint), block_size=4)
    # Requests admitted in the same step all compute the prefix; later ones find it cached.
    first = llm.generate(prompts[:1], GREEDY)
    assert llm.engine.kv.prefix_hits == 0
    second = llm.generate(prompts, GREEDY)
    want = expected(llama_checkpoint, prompts)
    assert [o.token_ids for o in first + second] == want[:1] + want
    assert [o.metrics.num_cached_tokens for o in second] == [40, 40, 40, 36]
    assert llm.engine.kv.prefix_hits == 156
    third = llm.generate(prompts, GREEDY)  # now from the cache, generated tokens included
    assert [o.token_ids for o in third] == want
    assert all(o.metrics.num_cached_tokens >= 40 for o in third[:3])
    assert_pool_whole(llm)


def test_prefix_cache_with_preemption_and_chunks(llama_checkpoint):
    base = random_prompts([21], seed=5)[0]
    prompts = [base + tail for tail in random_prompts([4, 11, 2, 6], seed=6)]
    llm = LLM(str(llama_checkpoint), block_size=2, num_kv_blocks=40, max_num_tokens=5)
    outs = llm.generate(prompts, GREEDY)
    assert [o.token_ids for o in outs] == expected(llama_checkpoint, prompts)
    assert_pool_whole(llm)


def test_requests_joining_mid_flight(llama_checkpoint):
    """In-flight batching: a request added while others decode joins the next step."""
    prompts = random_prompts([6, 13, 8], seed=7)
    llm = LLM(str(llama_checkpoint), block_size=4)
    engine = llm.engine
    ids = [engine.add_request(prompts[0], GREEDY).request_id]
    finished = {}
    steps = 0
    while engine.has_unfinished() or len(ids) < 3:
        if steps in (3, 5):
            ids.append(engine.add_request(prompts[len(ids)], GREEDY).request_id)
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out.token_ids
        steps += 1
    assert [finished[i] for i in ids] == expected(llama_checkpoint, prompts)
