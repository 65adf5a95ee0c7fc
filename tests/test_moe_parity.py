"""Greedy output of the MoE families equals transformers token for token, whatever the batching
does: test_parity's mixed-batch and preemption tests run here on the MoE tiny checkpoints (this
module's `family_checkpoint`), plus prefix-cache hits."""

from __future__ import annotations

import json

import pytest
from conftest import assert_pool_whole, random_prompts
from test_parity import (  # noqa: F401  (collected here, on the MoE checkpoints)
    GREEDY,
    expected,
    test_forced_preemption_keeps_output_exact,
    test_mixed_batch_matches_transformers,
)
from tiny_checkpoints import MOE_FAMILIES, cached_tiny_checkpoint

from engine import LLM
from engine.state import EngineState


@pytest.fixture(scope="module", params=MOE_FAMILIES)
def family_checkpoint(request, checkpoint_root):
    return cached_tiny_checkpoint(checkpoint_root, request.param)


def test_moe_prefix_cache_hits_keep_output_exact(family_checkpoint):
    base = random_prompts([24], seed=3)[0]
    prompts = [base + tail for tail in random_prompts([3, 7], seed=4)] + [base]
    llm = LLM(str(family_checkpoint), block_size=4, max_num_tokens=11)
    first = llm.generate(prompts[:1], GREEDY)
    second = llm.generate(prompts, GREEDY)
    want = expected(family_checkpoint, prompts)
    assert [o.token_ids for o in first + second] == want[:1] + want
    assert [o.metrics.num_cached_tokens for o in second] == [24, 24, 20]
    assert_pool_whole(llm)


def test_expert_load_in_engine_state(family_checkpoint):
    """Every token of every step is routed to top_k experts of each sparse layer (every expert
    gets some: the tiny configs route for real), the dense layers of the Qwen configs stay dense,
    and `recent` is what was routed since the previous snapshot."""
    llm = LLM(str(family_checkpoint), block_size=16)
    model = llm.engine.model
    spec = model.moe
    sparse = tuple(i for i in range(model.config.num_hidden_layers) if spec.is_sparse(i))
    assert len(sparse) < model.config.num_hidden_layers or model.config.model_type == "mixtral"
    llm.generate(random_prompts([40, 13]), GREEDY)
    first = llm.state().expert_load
    assert first.layers == sparse
    tokens = 40 + 13 + 2 * (GREEDY.max_tokens - 1)  # prompts, then a decode per later token
    assert all(sum(row) == tokens * spec.top_k for row in first.total)
    assert all(min(row) > 0 for row in first.total)
    assert first.recent == first.total and first.recent_steps == llm.engine.step_index
    llm.generate(random_prompts([7], seed=9), GREEDY)
    state = llm.state()
    second = state.expert_load
    assert all(sum(row) == (7 + GREEDY.max_tokens - 1) * spec.top_k for row in second.recent)
    assert [
        [a + b for a, b in zip(f, r, strict=True)]
        for f, r in zip(first.total, second.recent, strict=True)
    ] == [list(row) for row in second.total]
    assert second.recent_steps == GREEDY.max_tokens  # one prefill step, then the decodes
    assert EngineState.from_dict(json.loads(json.dumps(state.to_dict()))) == state


def test_moe_ngram_speculation_keeps_output_exact(family_checkpoint):
    """Verification runs several tokens of a sequence through the experts in one step."""
    base = random_prompts([6], seed=11)[0]
    prompts = [base * 4, random_prompts([19], seed=12)[0]]  # repeats: the n-gram proposer hits
    llm = LLM(
        str(family_checkpoint),
        block_size=4,
        speculative={"method": "ngram", "num_tokens": 3},
    )
    outs = llm.generate(prompts, GREEDY)
    assert [o.token_ids for o in outs] == expected(family_checkpoint, prompts)
    assert llm.state().spec_acceptance_rate is not None
    assert_pool_whole(llm)
