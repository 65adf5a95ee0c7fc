"""Speculative decoding is lossless: greedy output unchanged, sampling distribution unchanged."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_pool_whole, random_prompts
from tiny_checkpoints import cached_tiny_checkpoint

from engine import LLM, SamplingParams
from engine.spec import SpeculativeConfig
from engine.spec.ngram import propose_ngram
from engine.spec.rejection import verify

GREEDY = SamplingParams(max_tokens=16, ignore_eos=True)


@pytest.fixture(scope="module")
def draft_checkpoint(checkpoint_root):
    # A different, smaller model with the target's vocabulary: it disagrees often.
    return cached_tiny_checkpoint(checkpoint_root, "llama3", seed=1, num_hidden_layers=1)


def spec_prompts():
    repetitive = [7, 8, 9, 10, 11, 7, 8, 9, 10, 11, 7, 8, 9]  # n-gram drafts find matches here
    return random_prompts([5, 17, 2, 9], seed=31) + [repetitive]


def methods(draft_checkpoint, llama_checkpoint):
    return {
        "ngram": {"method": "ngram", "num_tokens": 3},
        "draft": {"method": "draft", "num_tokens": 3, "model": str(draft_checkpoint)},
        "self-draft": {"method": "draft", "num_tokens": 4, "model": str(llama_checkpoint)},
    }


@pytest.mark.parametrize("method", ["ngram", "draft", "self-draft"])
@pytest.mark.parametrize(
    "engine_kwargs",
    [
        pytest.param({"block_size": 4}, id="plain"),
        pytest.param({"block_size": 2, "max_num_tokens": 6}, id="chunked"),
        pytest.param({"block_size": 4, "num_kv_blocks": 14}, id="preemption"),
    ],
)
def test_greedy_output_is_unchanged(llama_checkpoint, draft_checkpoint, method, engine_kwargs):
    prompts = spec_prompts()
    plain = LLM(str(llama_checkpoint), **engine_kwargs).generate(prompts, GREEDY)
    spec = methods(draft_checkpoint, llama_checkpoint)[method]
    llm = LLM(str(llama_checkpoint), speculative=spec, **engine_kwargs)
    outs = llm.generate(prompts, GREEDY)
    assert [o.token_ids for o in outs] == [o.token_ids for o in plain]
    state = llm.state()
    assert state.spec_acceptance_rate is not None and state.spec_mean_accepted >= 1.0
    if method == "self-draft":  # the target drafting for itself is always right
        assert state.spec_acceptance_rate == 1.0
    assert_pool_whole(llm)
    if llm.engine.speculator.draft is not None:
        draft_pool = llm.engine.speculator.draft.kv.pool
        assert draft_pool.num_free_blocks == draft_pool.num_blocks


def test_speculation_with_prefix_cache_hits_and_stop_strings(llama_checkpoint, draft_checkpoint):
    prompts = spec_prompts()
    plain = LLM(str(llama_checkpoint), block_size=2)
    free = plain.generate(prompts, GREEDY)
    stop = free[1].text[4:7]
    params = SamplingParams(max_tokens=16, ignore_eos=True, stop=[stop])
    want = plain.generate(prompts, params)
    llm = LLM(
        str(llama_checkpoint),
        block_size=2,
        speculative=methods(draft_checkpoint, llama_checkpoint)["self-draft"],
    )
    llm.generate(prompts, GREEDY)  # fill the prefix cache
    outs = llm.generate(prompts, params)
    assert llm.engine.kv.prefix_hits > 0
    assert [(o.token_ids, o.text, o.finish_reason) for o in outs] == [
        (o.token_ids, o.text, o.finish_reason) for o in want
    ]
    assert outs[1].finish_reason == "stop"
    assert_pool_whole(llm)


def test_seeded_speculative_sampling_is_reproducible(llama_checkpoint, draft_checkpoint):
    spec = methods(draft_checkpoint, llama_checkpoint)["draft"]
    llm = LLM(str(llama_checkpoint), block_size=4, speculative=spec)
    prompt = random_prompts([6], seed=32)[0]
    seeded = SamplingParams(max_tokens=12, temperature=1.0, seed=7, ignore_eos=True)
    noise = SamplingParams(max_tokens=9, temperature=0.8, ignore_eos=True)
    alone = llm.generate(prompt, seeded)[0].token_ids
    mixed = llm.generate(random_prompts([3, 8], seed=33) + [prompt], [noise, noise, seeded])
    assert mixed[2].token_ids == alone


def test_ngram_proposals():
    assert propose_ngram([1, 2, 3, 9, 1, 2, 3], k=3, min_n=1, max_n=3) == [9, 1, 2]
    assert propose_ngram([5, 1, 2, 6, 1, 2], k=2, min_n=2, max_n=2) == [6, 1]
    assert propose_ngram([1, 2, 3, 4], k=2, min_n=1, max_n=3) == []
    # The latest earlier occurrence wins.
    assert propose_ngram([4, 7, 4, 8, 4], k=1, min_n=1, max_n=1) == [8]


def test_bad_speculative_config_is_a_clear_error():
    with pytest.raises(ValueError, match="method"):
        SpeculativeConfig.from_dict({"method": "medusa"})
    with pytest.raises(ValueError, match="num_tokens"):
        SpeculativeConfig.from_dict({"method": "ngram", "num_tokens": 0})
    with pytest.raises(ValueError, match="unknown"):
        SpeculativeConfig.from_dict({"method": "ngram", "k": 3})


def chi_square_ok(counts: torch.Tensor, probs: torch.Tensor, draws: int) -> bool:
    """Pearson chi-square against the expected counts, at p = 0.001 (critical values for the
    degrees of freedom that occur here)."""
    expected = probs * draws
    keep = expected > 0
    assert counts[~keep].sum() == 0  # nothing outside the support
    stat = float(((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum())
    critical = {4: 18.47, 5: 20.52, 6: 22.46, 7: 24.32}[int(keep.sum()) - 1]
    return stat < critical


@pytest.mark.parametrize("draft_kind", ["model", "ngram", "eagle-vocab"])
def test_rejection_sampling_preserves_the_target_distribution(draft_kind):
    """Each emitted position follows the target: first token ~ p_0; given x_1, the second
    ~ p_1 (the test's p_1 does not depend on x_1, so its marginal must be p_1)."""
    vocab, k, draws = 8, 2, 6000
    gen = torch.Generator().manual_seed(0)
    p = torch.rand(k + 1, vocab, generator=gen) ** 3
    p[:, 0] = 0.0  # a token the target never emits
    p = p / p.sum(-1, keepdim=True)
    q = torch.rand(k, vocab, generator=gen)
    if draft_kind == "eagle-vocab":  # an EAGLE draft vocabulary lacks tokens the target emits
        q[:, 5:] = 0.0
    q = q / q.sum(-1, keepdim=True)
    first = torch.zeros(vocab)
    second = torch.zeros(vocab)
    for seed in range(draws):
        g = torch.Generator().manual_seed(seed)
        if draft_kind != "ngram":
            drafts = torch.multinomial(q, 1, generator=g)[:, 0].tolist()
            tokens, _ = verify(p, drafts, q, g)
        else:  # deterministic drafts (one-hot q)
            tokens, _ = verify(p, [3, 5], None, g)
        first[tokens[0]] += 1
        if len(tokens) > 1:
            second[tokens[1]] += 1
    assert chi_square_ok(first, p[0], draws)
    assert chi_square_ok(second, p[1], int(second.sum()))


def test_greedy_verification_accepts_exactly_the_argmax_prefix():
    p = torch.zeros(4, 5)
    p[0, 2] = p[1, 4] = p[2, 1] = p[3, 0] = 1.0
    assert verify(p, [2, 4, 1], None, None) == ([2, 4, 1, 0], 3)
    assert verify(p, [2, 3, 1], None, None) == ([2, 4], 1)
    assert verify(p, [0, 4, 1], None, None) == ([2], 0)
