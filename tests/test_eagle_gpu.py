"""EAGLE-3 speculation on the GPU (`python3 -m pytest -m gpu tests/test_eagle_gpu.py`): exact in
float32 (equal to plain decoding and to transformers), a stated tolerance in bfloat16."""

from __future__ import annotations

import pytest
import torch
from conftest import hf_greedy, random_prompts
from tiny_checkpoints import cached_tiny_checkpoint, make_tiny_eagle_head

from engine import LLM, SamplingParams

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

STORIES = [
    "Once upon a time, there was a little girl named Lily. She loved to",
    "One day, a small dog named Max found a big red ball in the park.",
    "Tom and his mom went to the store to buy some food. Tom saw",
    "<|endoftext|><|im_start|>user\nTell me a story about a cat.<|im_end|>\n"
    "<|im_start|>assistant\n",
]


@pytest.fixture(scope="module")
def gpu_checkpoint(checkpoint_root):
    return cached_tiny_checkpoint(checkpoint_root, "llama3")


@pytest.fixture(scope="module")
def gpu_head(gpu_checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("eagle-gpu")
    return make_tiny_eagle_head(gpu_checkpoint, root / "head", seed=5, draft_vocab_size=128)


def test_float32_eagle_on_gpu_matches_transformers(gpu_checkpoint, gpu_head):
    prompts = random_prompts([5, 17, 9, 30], seed=44)
    params = SamplingParams(max_tokens=16, ignore_eos=True)
    spec = {"method": "eagle", "model": str(gpu_head), "num_tokens": 3}
    llm = LLM(str(gpu_checkpoint), dtype="float32", block_size=16, speculative=spec)
    assert llm.engine.runner.graphs is None  # EAGLE reads every forward's hidden states
    outs = llm.generate(prompts, params)
    assert [o.token_ids for o in outs] == [hf_greedy(gpu_checkpoint, p, 16) for p in prompts]


def test_float32_bundled_head_is_exact_and_accepts():
    params = SamplingParams(max_tokens=64, ignore_eos=True)
    plain = LLM("tiny", dtype="float32", block_size=16)
    want = [o.token_ids for o in plain.generate(STORIES, params)]
    llm = LLM("tiny", dtype="float32", block_size=16, speculative={"method": "eagle"})
    assert [o.token_ids for o in llm.generate(STORIES, params)] == want
    assert llm.state().spec_mean_accepted > 1.5


def test_bfloat16_bundled_head_agrees_with_plain_decoding():
    """In bfloat16 a (k + 1)-token verify rounds differently from one-token steps, so near-ties
    can flip and the texts part from there on. Tolerance: every request's first token equal
    (the same prefill), the texts equal for their first 8 tokens in at least 3 of 4 requests,
    and 50% of all tokens equal position by position."""
    params = SamplingParams(max_tokens=64, ignore_eos=True)
    plain = LLM("tiny", dtype="bfloat16", block_size=16)
    want = [o.token_ids for o in plain.generate(STORIES, params)]
    llm = LLM("tiny", dtype="bfloat16", block_size=16, speculative={"method": "eagle"})
    got = [o.token_ids for o in llm.generate(STORIES, params)]
    assert [g[0] for g in got] == [w[0] for w in want]
    assert sum(g[:8] == w[:8] for g, w in zip(got, want, strict=True)) >= 3
    same = sum(a == b for g, w in zip(got, want, strict=True) for a, b in zip(g, w, strict=True))
    assert same >= 0.5 * sum(len(w) for w in want)
    assert llm.state().spec_mean_accepted > 1.5
