"""Overlap scheduling on the GPU (`-m gpu`): pinned copies, events, double-buffered graph inputs
and the on-device input patch must give exactly the tokens of one step at a time."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_pool_whole, hf_greedy, random_prompts
from tiny_checkpoints import cached_tiny_checkpoint

from engine import LLM, SamplingParams

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.fixture(scope="module")
def gpu_checkpoint(checkpoint_root):
    return cached_tiny_checkpoint(checkpoint_root, "llama3")


@pytest.mark.parametrize("enforce_eager", [False, True], ids=["graphs", "eager"])
@pytest.mark.parametrize("num_kv_blocks", [None, 12], ids=["roomy", "preempting"])
def test_overlap_on_gpu_equals_transformers(gpu_checkpoint, enforce_eager, num_kv_blocks):
    prompts = random_prompts([5, 17, 33, 2, 9, 21, 40, 3], seed=31)
    params = [SamplingParams(max_tokens=8 + 5 * i, ignore_eos=True) for i in range(len(prompts))]
    llm = LLM(
        str(gpu_checkpoint),
        dtype="float32",
        block_size=16,
        max_num_seqs=8,
        enforce_eager=enforce_eager,
        num_kv_blocks=num_kv_blocks,
        async_scheduling=True,
    )
    outs = llm.generate(prompts, params)
    want = [
        hf_greedy(gpu_checkpoint, p, sp.max_tokens) for p, sp in zip(prompts, params, strict=True)
    ]
    assert [o.token_ids for o in outs] == want
    assert_pool_whole(llm)


def test_overlap_on_gpu_with_stops_and_sampling_equals_one_step_at_a_time(gpu_checkpoint):
    prompts = random_prompts([6, 11, 19, 4], seed=37)
    probe = LLM(str(gpu_checkpoint), dtype="float32", block_size=16).generate(
        prompts, SamplingParams(max_tokens=10, ignore_eos=True)
    )
    params = [
        SamplingParams(max_tokens=10, stop_token_ids=[probe[0].token_ids[2]], logprobs=3),
        SamplingParams(max_tokens=10, temperature=0.8, seed=5),
        SamplingParams(max_tokens=10, temperature=0.8, top_p=0.8, seed=6, logprobs=1),
        SamplingParams(max_tokens=10, ignore_eos=True),
    ]
    runs = []
    for overlap in (False, True):
        llm = LLM(str(gpu_checkpoint), dtype="float32", block_size=16, async_scheduling=overlap)
        runs.append([(o.token_ids, o.finish_reason, o.text) for o in llm.generate(prompts, params)])
        assert_pool_whole(llm)
    assert runs[1] == runs[0]
