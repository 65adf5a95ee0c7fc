"""`echo` with `logprobs`, `max_tokens: 0`, and vLLM's `prompt_logprobs` on /v1/completions, with
the real `openai` client; a small loglikelihood evaluation (what evaluation harnesses run) through
the server equals transformers' numbers."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import openai
import pytest
import torch
from conftest import _hf_model
from server_support import wait_idle

from engine import AsyncLLM
from engine.server import BackgroundServer, ServerSettings, create_app

KEY = "echo-key"
MODEL = "tiny-llama"
PAIRS = [  # (context, continuation), as a loglikelihood task has them
    ("The cat sat on", " the mat"),
    ("Once upon a time", ", there was a dragon."),
    ("2 + 2 =", " 4"),
    ("Question: what colour is the sky?\nAnswer:", " blue"),
]


@pytest.fixture(scope="module")
def server(llama_checkpoint) -> Iterator[BackgroundServer]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    llm = AsyncLLM(str(llama_checkpoint), dtype="float32", block_size=4, max_model_len=256)
    app = create_app(llm, ServerSettings(model_name=MODEL, api_key=KEY))
    with BackgroundServer(app) as running:
        yield running
    llm.shutdown()
    torch.set_num_threads(threads)


@pytest.fixture
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture
def http(server) -> Iterator[httpx.Client]:
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.Client(base_url=server.url, headers=headers, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def tokenizer(llama_checkpoint):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(llama_checkpoint))


def hf_loglikelihood(path, context: list[int], continuation: list[int]) -> tuple[float, bool]:
    """transformers' log P(continuation | context), and whether it is the greedy continuation."""
    ids = context + continuation
    with torch.no_grad():
        logits = _hf_model(str(path))(torch.tensor([ids])).logits[0].float()
    logp = torch.log_softmax(logits, dim=-1)[len(context) - 1 : -1]  # rows predicting cont.
    target = torch.tensor(continuation)
    total = logp.gather(1, target[:, None]).sum().item()
    return total, bool((logp.argmax(-1) == target).all())


def test_loglikelihood_evaluation_equals_transformers(client, http, tokenizer, llama_checkpoint):
    for context, continuation in PAIRS:
        ctx_ids = tokenizer.encode(context)
        whole = tokenizer.encode(context + continuation)
        assert whole[: len(ctx_ids)] == ctx_ids  # byte-level: the continuation's tokens follow
        cont_ids = whole[len(ctx_ids) :]
        expected, greedy = hf_loglikelihood(llama_checkpoint, ctx_ids, cont_ids)
        out = client.completions.create(
            model=MODEL, prompt=context + continuation, echo=True, logprobs=1, max_tokens=0
        )
        lp = out.choices[0].logprobs
        assert len(lp.tokens) == len(whole) and out.choices[0].text == context + continuation
        tail = slice(len(ctx_ids), len(whole))
        assert sum(lp.token_logprobs[tail]) == pytest.approx(expected, abs=1e-3)
        is_greedy = all(
            max(top, key=top.get) == token
            for token, top in zip(lp.tokens[tail], lp.top_logprobs[tail], strict=True)
        )
        assert is_greedy == greedy
        assert out.usage.completion_tokens == 0 and out.choices[0].finish_reason == "length"
    # The same through token ids, as a batch.
    batch = [tokenizer.encode(c + k) for c, k in PAIRS]
    out = client.completions.create(
        model=MODEL, prompt=batch, echo=True, logprobs=0, max_tokens=0, temperature=0
    )
    for (context, _), ids, choice in zip(PAIRS, batch, out.choices, strict=True):
        n = len(tokenizer.encode(context))
        expected, _ = hf_loglikelihood(llama_checkpoint, ids[:n], ids[n:])
        assert sum(choice.logprobs.token_logprobs[n:]) == pytest.approx(expected, abs=1e-3)
        assert choice.logprobs.top_logprobs[1] is None  # logprobs 0: no alternatives
    wait_idle(http)


def test_echo_shape_over_prompt_and_output(client, http, tokenizer):
    prompt = "abc def"
    ids = tokenizer.encode(prompt)
    out = client.completions.create(
        model=MODEL, prompt=prompt, echo=True, logprobs=2, max_tokens=5, temperature=0
    )
    plain = client.completions.create(
        model=MODEL, prompt=prompt, logprobs=2, max_tokens=5, temperature=0
    )
    choice = out.choices[0]
    lp = choice.logprobs
    assert choice.text == prompt + plain.choices[0].text
    assert len(lp.tokens) == len(ids) + 5
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(x <= 0 for x in lp.token_logprobs[1:])
    assert all(len(top) <= 2 for top in lp.top_logprobs[1:])
    assert lp.text_offset[0] == 0
    for i in range(len(lp.tokens) - 1):
        assert lp.text_offset[i + 1] == lp.text_offset[i] + len(lp.tokens[i])
    # The output part is what the request without echo reports.
    assert lp.tokens[len(ids) :] == plain.choices[0].logprobs.tokens
    assert lp.token_logprobs[len(ids) :] == pytest.approx(plain.choices[0].logprobs.token_logprobs)

    stream = client.completions.create(
        model=MODEL, prompt=prompt, echo=True, logprobs=2, max_tokens=5, temperature=0, stream=True
    )
    chunks = [c for c in stream if c.choices]
    assert "".join(c.choices[0].text for c in chunks) == choice.text
    assert chunks[0].choices[0].text.startswith(prompt)
    streamed = [t for c in chunks if c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
    assert streamed == lp.tokens
    offsets = [
        o for c in chunks if c.choices[0].logprobs for o in c.choices[0].logprobs.text_offset
    ]
    assert offsets == lp.text_offset
    wait_idle(http)


def test_vllm_prompt_logprobs_field(client, http, tokenizer):
    prompt = "hello world"
    ids = tokenizer.encode(prompt)
    out = client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=2, extra_body={"prompt_logprobs": 3}
    )
    echo = client.completions.create(
        model=MODEL, prompt=prompt, echo=True, logprobs=0, max_tokens=0
    )
    entries = out.choices[0].model_extra["prompt_logprobs"]
    assert len(entries) == len(ids) and entries[0] is None
    assert out.choices[0].logprobs is None
    for token_id, entry, legacy in zip(
        ids[1:], entries[1:], echo.choices[0].logprobs.token_logprobs[1:], strict=True
    ):
        own = entry[str(token_id)]
        assert own["logprob"] == pytest.approx(legacy, abs=1e-6)
        assert own["decoded_token"] == tokenizer.decode([token_id])
        assert {v["rank"] for k, v in entry.items() if k != str(token_id)} <= {1, 2, 3}
        assert len(entry) == (3 if own["rank"] <= 3 else 4)  # the token itself, and the top 3
    stream = client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=2, stream=True, extra_body={"prompt_logprobs": 0}
    )
    firsts = [c.choices[0].model_extra.get("prompt_logprobs") for c in stream if c.choices]
    assert firsts[0] is not None and len(firsts[0]) == len(ids)
    assert all(f is None for f in firsts[1:])  # sent once, with the first chunk
    wait_idle(http)


def test_max_tokens_zero_needs_echo(client, http):
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model=MODEL, prompt="x", max_tokens=0)
    assert caught.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(
            model=MODEL, prompt="x", echo=True, logprobs=1, extra_body={"prompt_logprobs": 21}
        )
    assert caught.value.body["param"] == "prompt_logprobs"
    wait_idle(http)
