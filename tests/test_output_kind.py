"""`SamplingParams.output_kind`: a request that reports only its final output ("final") ends with
the same tokens, text, stop and logprobs as one that streams every step ("stream"), on the
bundled model, with both kinds in one batch."""

from __future__ import annotations

import dataclasses

import pytest

from engine.config import SamplingParams
from engine.llm import LLM

PROMPTS = [
    "Once upon a time",
    "The little dog ran to the park and",
    "Lily found a shiny stone. She",
    "Tom said: \u201cI want to go home\u201d \U0001f642 and",
]
# Greedy and hot sampling, special tokens kept, a stop token id, logprobs, and a stop string.
PARAMS = [
    SamplingParams(max_tokens=40),
    SamplingParams(max_tokens=48, temperature=1.6, seed=3, skip_special_tokens=False),
    SamplingParams(max_tokens=32, temperature=1.2, seed=5, stop_token_ids=[17], logprobs=2),
    SamplingParams(max_tokens=40, stop=[" the"], min_tokens=2),
    SamplingParams(max_tokens=64, temperature=2.0, seed=11, top_k=0),
]


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM("tiny", block_size=16)


def _run_both(llm: LLM, cases: list[tuple[str, SamplingParams]]):
    """Run every case twice in one batch, streaming and final-only -> (streams, finals): the
    outputs each request reported, by case index."""
    core = llm.engine
    ids: dict[str, tuple[str, int]] = {}
    for i, (prompt, params) in enumerate(cases):
        for kind in ("stream", "final"):
            request = core.add_request(prompt, dataclasses.replace(params, output_kind=kind))
            ids[request.request_id] = (kind, i)
    reported: dict[str, dict[int, list]] = {"stream": {}, "final": {}}
    while core.has_unfinished():
        for out in core.step():
            kind, i = ids[out.request_id]
            reported[kind].setdefault(i, []).append(out)
    return reported["stream"], reported["final"]


def _final_fields(out) -> tuple:
    return (
        out.token_ids,
        out.text,
        out.finish_reason,
        out.stop_reason,
        None if out.logprobs is None else [(e.token_id, e.logprob) for e in out.logprobs],
    )


def test_final_only_reports_once_and_ends_like_the_stream(llm: LLM) -> None:
    cases = [(p, params) for p in PROMPTS for params in PARAMS]
    streams, finals = _run_both(llm, cases)
    assert set(finals) == set(streams) == set(range(len(cases)))
    for i, (prompt, params) in enumerate(cases):
        stream, (final,) = streams[i], finals[i]  # exactly one output when final-only
        assert final.finished and stream[-1].finished
        assert _final_fields(final) == _final_fields(stream[-1]), (prompt, params)
        assert final.delta_text == final.text == "".join(o.delta_text for o in stream)
        assert final.delta_token_ids == final.token_ids
    # The cases do reach what they are there for: a stop string and a stop token. (Characters
    # split over tokens: tests/test_detokenizer.py, on tokenizers made to split them.)
    reasons = {out[0].stop_reason for out in finals.values()}
    assert " the" in reasons and 17 in reasons


def test_final_only_text_is_the_decode_of_its_tokens(llm: LLM) -> None:
    tokenizer = llm.tokenizer
    params = SamplingParams(max_tokens=60, temperature=1.8, seed=7, output_kind="final")
    for prompt in PROMPTS:
        (out,) = llm.generate([prompt], params)
        prompt_ids = tokenizer.encode(prompt)
        full = tokenizer.decode(prompt_ids + out.token_ids, skip_special_tokens=True)
        head = tokenizer.decode(prompt_ids, skip_special_tokens=True)
        assert out.text == full[len(head) :]


def test_an_aborted_final_only_request_reports_its_tokens_and_text(llm: LLM) -> None:
    core = llm.engine
    streamed = core.add_request(PROMPTS[0], SamplingParams(max_tokens=50))
    final = core.add_request(PROMPTS[0], SamplingParams(max_tokens=50, output_kind="final"))
    seen: dict[str, list] = {streamed.request_id: [], final.request_id: []}
    for _ in range(6):
        for out in core.step():
            seen[out.request_id].append(out)
    assert seen[final.request_id] == []  # nothing reported while it runs
    assert core.abort(streamed.request_id) and core.abort(final.request_id)
    while core.has_unfinished():
        for out in core.step():
            seen[out.request_id].append(out)
    (last,) = seen[final.request_id]
    assert last.finish_reason == "abort"
    # Both ran the same greedy steps; the aborted final-only one holds all of its text.
    assert last.token_ids == seen[streamed.request_id][-1].token_ids
    assert last.text == "".join(o.delta_text for o in seen[streamed.request_id])
    assert last.token_ids and last.text


def test_generate_leaves_the_callers_params_alone(llm: LLM) -> None:
    params = SamplingParams(max_tokens=12)
    outs = llm.generate(PROMPTS[:2], params)
    assert params.output_kind == "stream"
    assert all(o.finished and len(o.token_ids) <= 12 and o.text for o in outs)


def test_an_unknown_output_kind_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="output_kind must be one of stream, final"):
        SamplingParams(output_kind="cumulative")
