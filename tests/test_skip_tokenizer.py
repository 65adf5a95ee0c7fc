"""skip_tokenizer_init: no tokenizer is loaded; token-id prompts are served exactly as with one,
and a text prompt is a clear error (a 400 on the server) that leaves the engine whole."""

from __future__ import annotations

import openai
import pytest

from engine import LLM, AsyncLLM, SamplingParams
from engine.server import BackgroundServer, ServerSettings, create_app

PROMPT = [1, 300, 17, 42, 9, 1000]
PARAMS = SamplingParams(max_tokens=8, ignore_eos=True)


def test_token_prompts_without_a_tokenizer_equal_the_engine_with_one():
    plain = LLM("tiny").generate([PROMPT], PARAMS)[0]
    llm = LLM("tiny", skip_tokenizer_init=True)
    assert llm.engine.tokenizer is None
    out = llm.generate([PROMPT], PARAMS)[0]
    assert out.token_ids == plain.token_ids
    assert out.text == ""
    text, ids = llm.generate(["Once upon a time", PROMPT], PARAMS)
    assert text.finish_reason == "error" and "no tokenizer" in text.error
    assert ids.token_ids == plain.token_ids  # the neighbour runs as usual
    assert llm.state().kv_blocks_used == 0


def test_server_without_a_tokenizer_takes_token_ids_and_refuses_text():
    llm = AsyncLLM("tiny", skip_tokenizer_init=True)
    app = create_app(llm, ServerSettings(model_name="tiny"))
    try:
        with BackgroundServer(app) as server:
            client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
            done = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=4)
            assert done.usage.completion_tokens == 4
            with pytest.raises(openai.BadRequestError) as err:
                client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=4)
            assert "tokenizer" in str(err.value)
    finally:
        llm.shutdown()
