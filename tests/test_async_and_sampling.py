"""AsyncLLM streams and aborts; seeded sampling and stop strings through the whole engine."""

from __future__ import annotations

import asyncio

from conftest import assert_pool_whole, hf_greedy, random_prompts

from engine import LLM, AsyncLLM, SamplingParams


def test_seeded_sampling_is_reproducible_across_batch_compositions(llama_checkpoint):
    llm = LLM(str(llama_checkpoint), block_size=4)
    prompt = random_prompts([8], seed=21)[0]
    seeded = SamplingParams(max_tokens=16, temperature=0.9, top_p=0.95, seed=1234, ignore_eos=True)
    alone = llm.generate(prompt, seeded)[0].token_ids
    others = random_prompts([3, 12, 5], seed=22)
    noise = SamplingParams(max_tokens=10, temperature=1.0, ignore_eos=True)
    mixed = llm.generate([others[0], prompt, others[1], others[2]], [noise, seeded, noise, noise])[
        1
    ].token_ids
    first = llm.generate([prompt, others[0]], [seeded, noise])[0].token_ids
    assert alone == mixed == first
    other_seed = SamplingParams(max_tokens=16, temperature=0.9, seed=99, ignore_eos=True)
    assert llm.generate(prompt, other_seed)[0].token_ids != alone


def test_stop_strings_cut_the_text_exactly(llama_checkpoint):
    llm = LLM(str(llama_checkpoint), block_size=4)
    prompt = random_prompts([6], seed=23)[0]
    free = llm.generate(prompt, SamplingParams(max_tokens=24, ignore_eos=True))[0]
    text = free.text
    assert len(text) > 6
    stop = text[3:6]
    cut = llm.generate(prompt, SamplingParams(max_tokens=24, ignore_eos=True, stop=[stop]))[0]
    assert cut.finish_reason == "stop" and cut.stop_reason == stop
    assert cut.text == text[: text.index(stop)]
    kept = llm.generate(
        prompt,
        SamplingParams(
            max_tokens=24, ignore_eos=True, stop=[stop], include_stop_str_in_output=True
        ),
    )[0]
    assert kept.text == text[: text.index(stop) + len(stop)]
    token = free.token_ids[4]
    by_id = llm.generate(
        prompt, SamplingParams(max_tokens=24, ignore_eos=True, stop_token_ids=[token])
    )[0]
    assert by_id.finish_reason == "stop" and by_id.stop_reason == token
    assert by_id.token_ids == free.token_ids[: free.token_ids.index(token) + 1]
    assert_pool_whole(llm)


def test_logprobs_are_reported_per_token(llama_checkpoint):
    llm = LLM(str(llama_checkpoint), block_size=4)
    out = llm.generate(
        random_prompts([5], seed=24)[0], SamplingParams(max_tokens=5, ignore_eos=True, logprobs=3)
    )[0]
    assert len(out.logprobs) == 5
    for token_id, entry in zip(out.token_ids, out.logprobs, strict=True):
        assert entry.token_id == token_id and entry.logprob <= 0.0
        assert len(entry.top) == 3 and entry.top[0][0] == token_id  # greedy picks the best


def test_async_streams_deltas_and_abort_frees_blocks(llama_checkpoint):
    prompts = random_prompts([7, 11], seed=25)

    async def main():
        llm = AsyncLLM(str(llama_checkpoint), block_size=4)
        try:

            async def collect(prompt, n):
                chunks = []
                async for out in llm.generate(
                    prompt, SamplingParams(max_tokens=n, ignore_eos=True)
                ):
                    chunks.append(out)
                return chunks

            async def abandon(prompt):
                async for out in llm.generate(
                    prompt, SamplingParams(max_tokens=500, ignore_eos=True)
                ):
                    if len(out.token_ids) >= 3:
                        break  # the client goes away: the request must be aborted

            a, _ = await asyncio.gather(collect(prompts[0], 9), abandon(prompts[1]))
            for _ in range(100):
                if llm.state().kv_blocks_used == 0 and not llm.state().running:
                    break
                await asyncio.sleep(0.02)
            return a, llm.state()
        finally:
            llm.shutdown()

    chunks, state = asyncio.run(main())
    assert chunks[-1].finished and chunks[-1].finish_reason == "length"
    tokens = [t for c in chunks for t in c.delta_token_ids]
    assert tokens == chunks[-1].token_ids == hf_greedy(llama_checkpoint, prompts[0], 9)
    assert "".join(c.delta_text for c in chunks) == chunks[-1].text
    assert state.kv_blocks_used == 0 and not state.running and not state.waiting
