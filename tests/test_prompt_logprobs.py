"""Prompt logprobs (engine/prompt_logprobs.py) against transformers in float32: whole prompts,
chunked prefill, prefix-cache hits, preemption mid-prefill, and a batch that mixes requests that
ask with ones that don't (whose greedy output must not change)."""

from __future__ import annotations

import pytest
import torch
from conftest import _hf_model, assert_pool_whole, hf_greedy, random_prompts

from engine import LLM, SamplingParams, prompt_logprobs

TOL = 1e-4


def hf_logprobs(path, prompt: list[int]) -> torch.Tensor:
    """[len(prompt) - 1, vocab]: row p is log P(. | prompt[: p + 1])."""
    model = _hf_model(str(path))
    with torch.no_grad():
        logits = model(torch.tensor([prompt])).logits[0].float()
    return torch.log_softmax(logits, dim=-1)[:-1]


def assert_exact(path, prompt: list[int], got, num_top: int) -> None:
    expected = hf_logprobs(path, prompt)
    assert len(got) == len(prompt) and got[0] is None
    for p, entry in enumerate(got[1:]):
        assert entry.token_id == prompt[p + 1]
        target = expected[p, prompt[p + 1]].item()
        assert entry.logprob == pytest.approx(target, abs=TOL)
        assert entry.rank == 1 + int((expected[p] > target).sum())
        if num_top:
            values, ids = expected[p].topk(num_top)
            assert [v for _, v in entry.top] == pytest.approx(values.tolist(), abs=TOL)
            # ids may swap only where values tie within the tolerance
            for (tid, _), eid, ev in zip(entry.top, ids.tolist(), values.tolist(), strict=True):
                assert tid == eid or abs(expected[p, tid].item() - ev) < TOL
        else:
            assert entry.top is None


@pytest.mark.parametrize(
    ("max_num_tokens", "score_rows"),
    [(256, 256), (7, 256), (256, 5)],  # one chunk, chunked prefill, logits taken 5 rows at a time
)
def test_prompt_logprobs_equal_transformers(
    llama_checkpoint, max_num_tokens, score_rows, monkeypatch
):
    monkeypatch.setattr(prompt_logprobs, "SCORE_ROWS", score_rows)
    llm = LLM(str(llama_checkpoint), dtype="float32", block_size=4, max_num_tokens=max_num_tokens)
    prompts = random_prompts([1, 2, 23, 40], seed=11)
    params = SamplingParams(max_tokens=3, prompt_logprobs=3, ignore_eos=True)
    outs = llm.generate(prompts, params)
    for prompt, out in zip(prompts, outs, strict=True):
        assert_exact(llama_checkpoint, prompt, out.prompt_logprobs, 3)
        assert out.token_ids == hf_greedy(llama_checkpoint, prompt, 3)
    assert_pool_whole(llm)


def test_a_cached_prefix_is_recomputed_for_its_logprobs(llama_checkpoint):
    llm = LLM(str(llama_checkpoint), dtype="float32", block_size=4)
    prompt = random_prompts([30], seed=12)[0]
    plain = SamplingParams(max_tokens=2, ignore_eos=True)
    llm.generate([prompt], plain)  # its pages are now in the prefix cache
    hit = llm.generate([prompt], plain)[0]
    assert hit.metrics.num_cached_tokens == 28
    scored = llm.generate([prompt], SamplingParams(max_tokens=2, prompt_logprobs=0))[0]
    assert scored.metrics.num_cached_tokens == 0  # skipped the cache: cached pages have no logits
    assert_exact(llama_checkpoint, prompt, scored.prompt_logprobs, 0)
    assert scored.token_ids == hit.token_ids
    assert llm.generate([prompt], plain)[0].metrics.num_cached_tokens == 28  # cache still used
    assert_pool_whole(llm)


def test_mixed_batch_and_preemption_mid_prefill(llama_checkpoint):
    llm = LLM(
        str(llama_checkpoint), dtype="float32", block_size=2, num_kv_blocks=20, max_num_tokens=6
    )
    engine = llm.engine
    prompts = random_prompts([13, 14, 15], seed=13)
    requests = [
        engine.add_request(p, SamplingParams(max_tokens=12, ignore_eos=True, prompt_logprobs=n))
        for p, n in zip(prompts, [2, None, 0], strict=True)
    ]
    preempted_mid_prefill = False
    finals = {}
    while engine.has_unfinished():
        before = {r.request_id: r.num_preemptions for r in requests}
        for out in engine.step():
            if out.finished:
                finals[out.request_id] = out
        for r in requests:
            if r.num_preemptions > before[r.request_id] and r.params.prompt_logprobs is not None:
                unscored = r.num_prompt_tokens - 1 - len(r.prompt_logprobs)
                preempted_mid_prefill |= unscored > 0
    assert sum(r.num_preemptions for r in requests) > 0
    assert preempted_mid_prefill  # the case this test exists for
    for request, prompt in zip(requests, prompts, strict=True):
        out = finals[request.request_id]
        assert out.token_ids == hf_greedy(llama_checkpoint, prompt, 12)
        if request.params.prompt_logprobs is None:
            assert out.prompt_logprobs is None
        else:
            assert_exact(
                llama_checkpoint, prompt, out.prompt_logprobs, request.params.prompt_logprobs
            )
    assert_pool_whole(llm)


def test_prompt_logprobs_bounds():
    with pytest.raises(ValueError, match="prompt_logprobs"):
        SamplingParams(prompt_logprobs=21)
    with pytest.raises(ValueError, match="prompt_logprobs"):
        SamplingParams(prompt_logprobs=-1)
