"""Bad input gets a clear error for that request alone; the others finish and the pool is whole."""

from __future__ import annotations

import pytest
from conftest import assert_pool_whole, hf_greedy, random_prompts

from engine import LLM, SamplingParams
from engine.model.loader import ModelNotFoundError


def test_unknown_model_is_a_one_line_error():
    with pytest.raises(ModelNotFoundError) as err:
        LLM("no-such-org/no-such-model")
    assert "no-such-org/no-such-model" in str(err.value)
    assert "\n" not in str(err.value)
    with pytest.raises(ModelNotFoundError):
        LLM("/definitely/not/a/dir")


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"temperature": -1.0}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -3}, "top_k"),
        ({"min_p": 2.0}, "min_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"presence_penalty": 3.0}, "presence_penalty"),
        ({"logprobs": 50}, "logprobs"),
        ({"stop": [""]}, "stop"),
    ],
)
def test_invalid_sampling_values_name_the_field(bad, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**bad)


def test_a_bad_prompt_fails_alone(llama_checkpoint):
    llm = LLM(str(llama_checkpoint), block_size=4, max_model_len=64)
    good = random_prompts([5, 9], seed=11)
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    outs = llm.generate([good[0], list(range(100)), [], [0, 99999], good[1]], params)
    assert [o.finish_reason for o in outs] == ["length", "error", "error", "error", "length"]
    assert "max_model_len 64" in outs[1].error and "100 tokens" in outs[1].error
    assert "empty" in outs[2].error
    assert "99999" in outs[3].error
    assert outs[0].token_ids == hf_greedy(llama_checkpoint, good[0], 6)
    assert outs[4].token_ids == hf_greedy(llama_checkpoint, good[1], 6)
    assert_pool_whole(llm)


def test_bad_request_does_not_disturb_running_ones(llama_checkpoint):
    llm = LLM(str(llama_checkpoint), block_size=4, max_model_len=64)
    engine = llm.engine
    prompt = random_prompts([7], seed=12)[0]
    engine.add_request(prompt, SamplingParams(max_tokens=10, ignore_eos=True), request_id="ok")
    engine.step()
    with pytest.raises(ValueError, match="max_model_len"):
        engine.add_request(list(range(65)), request_id="too-long")
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request(prompt, request_id="ok")
    done = {}
    while engine.has_unfinished():
        done.update({o.request_id: o for o in engine.step() if o.finished})
    assert list(done) == ["ok"]
    assert done["ok"].token_ids == hf_greedy(llama_checkpoint, prompt, 10)
    assert_pool_whole(llm)


def test_generation_stops_at_max_model_len(llama_checkpoint):
    llm = LLM(str(llama_checkpoint), block_size=4, max_model_len=20)
    out = llm.generate(
        random_prompts([15], seed=13)[0], SamplingParams(max_tokens=50, ignore_eos=True)
    )[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 5
