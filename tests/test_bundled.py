"""The bundled models: real checkpoints, exact against transformers, usable for chat."""

from __future__ import annotations

import pytest
from conftest import assert_pool_whole, hf_greedy

from engine import LLM, SamplingParams
from engine.model.loader import resolve_model_dir


@pytest.fixture(scope="module")
def tiny():
    return LLM("tiny", block_size=16)


def test_bundled_greedy_matches_transformers(tiny):
    tokenizer = tiny.tokenizer
    texts = ["Once upon a time, there was a little", "The dog ran to the park and", "Lily"]
    prompts = [tokenizer.encode(t) for t in texts]
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    outs = tiny.generate(prompts, params)
    path = resolve_model_dir("tiny")
    assert [o.token_ids for o in outs] == [hf_greedy(path, p, 24) for p in prompts]
    assert_pool_whole(tiny)


def test_bundled_chat_tells_stories_that_end(tiny):
    """Sampled replies (greedy decoding of so small a model loops) are stories that mostly end
    with <|im_end|> on their own: the chat format was learned, not just the text."""
    messages = [{"role": "user", "content": "Tell me a story about a cat."}]
    params = [SamplingParams(max_tokens=400, temperature=0.8, top_p=0.95, seed=s) for s in range(8)]
    outs = tiny.chat([messages] * 8, params)
    assert sum(o.finish_reason == "stop" for o in outs) >= 5
    for out in outs:
        assert len(out.text.split()) >= 20
        assert "<|im_end|>" not in out.text and "<|im_start|>" not in out.text
    assert_pool_whole(tiny)


def test_draft_shares_the_tokenizer_and_speculation_is_lossless():
    target, draft = (LLM(name) for name in ("tiny", "tiny-draft"))
    assert target.tokenizer.get_vocab() == draft.tokenizer.get_vocab()
    assert target.engine.vocab_size == draft.engine.vocab_size
    params = SamplingParams(max_tokens=32, ignore_eos=True)
    prompt = target.tokenizer.encode("Once upon a time")
    spec = LLM("tiny", speculative={"method": "draft", "model": "tiny-draft", "num_tokens": 4})
    assert (
        spec.generate(prompt, params)[0].token_ids == target.generate(prompt, params)[0].token_ids
    )
    assert spec.state().spec_acceptance_rate > 0.3  # the draft learned the same stories


def test_bundled_checkpoints_are_small():
    total = sum(
        f.stat().st_size
        for name in ("tiny", "tiny-draft")
        for f in resolve_model_dir(name).rglob("*")
        if f.is_file()
    )
    assert total <= 25 * 2**20
