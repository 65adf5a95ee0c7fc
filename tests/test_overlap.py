"""Overlap scheduling (`async_scheduling`): the next step is queued before the last one's tokens
are read back. Whatever the timing, the outputs must be exactly those of one step at a time."""

from __future__ import annotations

import asyncio

import pytest
from conftest import assert_pool_whole, hf_greedy, random_prompts

from engine import LLM, AsyncLLM, SamplingParams
from engine.request import PLACEHOLDER

LENGTHS = [5, 17, 33, 2, 9, 21]


def run_both(path, prompts, params, **engine_kwargs):
    """(one at a time, overlapped) outputs of the same requests on two fresh engines."""
    results = []
    for overlap in (False, True):
        llm = LLM(str(path), async_scheduling=overlap, **engine_kwargs)
        results.append(llm.generate(prompts, params))
        assert_pool_whole(llm)
    return results


def summary(outs):
    return [(o.token_ids, o.text, o.finish_reason, o.stop_reason, o.error) for o in outs]


def assert_same_logprobs(got, want):
    """Same tokens and top ids; values within float32 noise. A request that stopped still
    computes one row in the step queued behind it, so the batches (and the GEMMs' reduction
    order) of the two runs differ in size, which moves logprobs by ~1e-6."""
    for a, b in zip(got, want, strict=True):
        assert (a.logprobs is None) == (b.logprobs is None)
        for x, y in zip(a.logprobs or [], b.logprobs or [], strict=True):
            assert x.token_id == y.token_id
            assert x.logprob == pytest.approx(y.logprob, abs=1e-4)
            assert [t for t, _ in x.top or []] == [t for t, _ in y.top or []]
            assert [v for _, v in x.top or []] == pytest.approx(
                [v for _, v in y.top or []], abs=1e-4
            )


@pytest.mark.parametrize(
    "engine_kwargs",
    [
        pytest.param({"block_size": 4}, id="plain"),
        pytest.param({"block_size": 4, "max_num_tokens": 7}, id="chunked-prefill-7"),
        pytest.param({"block_size": 4, "num_kv_blocks": 16}, id="preemption"),
        pytest.param({"block_size": 2, "max_num_seqs": 2}, id="two-seqs"),
    ],
)
def test_greedy_output_equals_transformers(llama_checkpoint, engine_kwargs):
    prompts = random_prompts(LENGTHS, seed=5)
    params = [SamplingParams(max_tokens=6 + 3 * i, ignore_eos=True) for i in range(len(prompts))]
    llm = LLM(str(llama_checkpoint), async_scheduling=True, **engine_kwargs)
    outs = llm.generate(prompts, params)
    want = [
        hf_greedy(llama_checkpoint, p, sp.max_tokens) for p, sp in zip(prompts, params, strict=True)
    ]
    assert [o.token_ids for o in outs] == want
    assert all(o.finish_reason == "length" for o in outs)
    if "num_kv_blocks" in engine_kwargs:
        assert llm.engine.scheduler.num_preemptions > 0
    assert_pool_whole(llm)


def test_stops_logprobs_and_seeded_sampling_match_one_step_at_a_time(llama_checkpoint):
    """EOS, stop tokens and stop strings end a request while its next step is already queued;
    that extra token must vanish. Seeded and unseeded sampling draw the same numbers."""
    llm = LLM(str(llama_checkpoint), block_size=4)
    prompts = random_prompts(LENGTHS, seed=7)
    probe = llm.generate(prompts, SamplingParams(max_tokens=12, ignore_eos=True))
    # Stop on tokens and text that these prompts really produce, a few tokens in.
    stop_token = probe[0].token_ids[3]
    stop_text = probe[1].text[2:5]
    params = [
        SamplingParams(max_tokens=12, stop_token_ids=[stop_token], logprobs=2),
        SamplingParams(max_tokens=12, stop=[stop_text], ignore_eos=True),
        SamplingParams(max_tokens=12, temperature=0.9, seed=11, logprobs=0),
        SamplingParams(max_tokens=12, temperature=0.7, top_p=0.9, top_k=20),
        SamplingParams(max_tokens=1),
        SamplingParams(max_tokens=12),
    ]
    sync, overlapped = run_both(llama_checkpoint, prompts, params, block_size=4)
    assert summary(overlapped) == summary(sync)
    assert_same_logprobs(overlapped, sync)
    assert overlapped[0].finish_reason == "stop" and overlapped[0].token_ids[-1] == stop_token
    assert overlapped[1].stop_reason == stop_text
    assert len(overlapped[4].token_ids) == 1


def test_requests_that_need_each_token_run_one_step_at_a_time(llama_checkpoint):
    """Penalties, min_tokens and grammars read each token before the next step: while such a
    request is in the engine nothing is queued ahead; the others still match exactly."""
    prompts = random_prompts(LENGTHS[:4], seed=9)
    params = [
        SamplingParams(max_tokens=10, ignore_eos=True),
        SamplingParams(max_tokens=4, repetition_penalty=1.3, ignore_eos=True),
        SamplingParams(max_tokens=14, ignore_eos=True),
        SamplingParams(max_tokens=6, min_tokens=5, frequency_penalty=0.5),
    ]
    sync, overlapped = run_both(llama_checkpoint, prompts, params, block_size=4)
    assert summary(overlapped) == summary(sync)

    llm = LLM(str(llama_checkpoint), block_size=4, async_scheduling=True)
    engine = llm.engine
    engine.add_request(prompts[0], params[0])
    engine.add_request(prompts[1], params[1])
    engine.step()
    assert not engine.step_in_flight  # a penalty request is running
    while any(not r.is_finished for r in engine.requests.values() if r.params is params[1]):
        engine.step()
    engine.step()
    assert engine.step_in_flight  # only plain requests left: overlapped again
    while engine.has_unfinished():
        engine.step()
    assert_pool_whole(llm)


def test_a_request_at_max_model_len_is_not_scheduled_past_it(llama_checkpoint):
    prompts = random_prompts([10, 3], seed=13)
    params = SamplingParams(max_tokens=50, ignore_eos=True)
    sync, overlapped = run_both(llama_checkpoint, prompts, params, block_size=4, max_model_len=16)
    assert summary(overlapped) == summary(sync)
    assert [len(o.token_ids) for o in overlapped] == [6, 13]
    assert all(o.finish_reason == "length" for o in overlapped)


def test_placeholders_never_leave_the_engine(llama_checkpoint):
    """Streamed deltas, cumulative tokens and the step-by-step state carry only real tokens,
    and an abort while a step is in flight frees the request's pages."""
    llm = LLM(str(llama_checkpoint), block_size=4, async_scheduling=True)
    engine = llm.engine
    prompts = random_prompts([6, 9, 4], seed=17)
    ids = [
        engine.add_request(p, SamplingParams(max_tokens=20, ignore_eos=True)).request_id
        for p in prompts
    ]
    streamed: dict[str, list[int]] = {rid: [] for rid in ids}
    finals = {}
    steps = 0
    while engine.has_unfinished():
        for out in engine.step():
            assert PLACEHOLDER not in out.token_ids
            assert (
                out.token_ids[: len(out.token_ids) - len(out.delta_token_ids)]
                == streamed[out.request_id]
            )
            streamed[out.request_id].extend(out.delta_token_ids)
            if out.finished:
                finals[out.request_id] = out
        steps += 1
        if steps == 5:
            assert engine.step_in_flight
            assert engine.abort(ids[1])
    assert finals[ids[1]].finish_reason == "abort"
    assert PLACEHOLDER not in finals[ids[1]].token_ids
    for rid, prompt in zip((ids[0], ids[2]), (prompts[0], prompts[2]), strict=True):
        assert streamed[rid] == finals[rid].token_ids == hf_greedy(llama_checkpoint, prompt, 20)
    assert_pool_whole(llm)


def test_prefix_cache_registers_blocks_once_their_tokens_are_known(llama_checkpoint):
    """Generated tokens fill blocks while their values are still on the device; those blocks
    are hashed when the values land, so a later request finds the whole conversation."""
    prompt = random_prompts([9], seed=19)[0]
    llm = LLM(str(llama_checkpoint), block_size=4, async_scheduling=True)
    first = llm.generate([prompt], SamplingParams(max_tokens=15, ignore_eos=True))[0]
    follow = prompt + first.token_ids + random_prompts([2], seed=20)[0]
    second = llm.generate([follow], SamplingParams(max_tokens=5, ignore_eos=True))[0]
    # 9 + 15 = 24 tokens: the last one's K/V was never computed, so 5 full blocks of 4 are hit.
    assert second.metrics.num_cached_tokens == 20
    assert second.token_ids == hf_greedy(llama_checkpoint, follow, 5)
    assert_pool_whole(llm)


def test_async_llm_streams_with_overlap(llama_checkpoint):
    prompts = random_prompts([7, 12], seed=23)

    async def main():
        llm = AsyncLLM(str(llama_checkpoint), block_size=4, async_scheduling=True)
        try:

            async def collect(prompt, n):
                return [
                    out
                    async for out in llm.generate(
                        prompt, SamplingParams(max_tokens=n, ignore_eos=True)
                    )
                ]

            return await asyncio.gather(collect(prompts[0], 9), collect(prompts[1], 13))
        finally:
            llm.shutdown()

    for chunks, prompt, n in zip(asyncio.run(main()), prompts, (9, 13), strict=True):
        tokens = [t for c in chunks for t in c.delta_token_ids]
        assert tokens == chunks[-1].token_ids == hf_greedy(llama_checkpoint, prompt, n)
        assert "".join(c.delta_text for c in chunks) == chunks[-1].text
