"""The monitor's batch view reports speculative decoding from the real engine's state."""

from __future__ import annotations

from conftest import random_prompts

from engine import LLM, SamplingParams
from panels.widgets.batch_view import BatchView


def test_batch_view_shows_acceptance_only_with_speculation(llama_checkpoint):
    prompts = random_prompts([6, 9], seed=51)
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    plain = LLM(str(llama_checkpoint), block_size=4)
    plain.generate(prompts, params)
    assert "speculation" not in BatchView._last_step(plain.state()).plain

    spec = LLM(
        str(llama_checkpoint),
        block_size=4,
        speculative={"method": "draft", "model": str(llama_checkpoint), "num_tokens": 3},
    )
    spec.generate(prompts, params)
    state = spec.state()
    text = BatchView._last_step(state).plain
    assert "speculation: acceptance 100.0%" in text
    assert f"{state.spec_mean_accepted:.2f} tokens per verify step" in text
    assert state.spec_draft_time_s > 0 and state.spec_verify_time_s > 0
    assert plain.state().spec_draft_time_s is None
