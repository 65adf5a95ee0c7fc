"""Grammar-constrained decoding through the whole engine (xgrammar bitmasks on the batch logits),
on a random-weight model: whatever the weights want, the output must match the grammar."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator

import jsonschema
import pytest
import torch
from conftest import assert_pool_whole

from engine import LLM, SamplingParams
from engine.structured import GrammarBackend, StructuredSpec, _pack

# Bounded, so a random model finishes well inside max_tokens.
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "color": {"enum": ["red", "green", "blue"]},
        "ok": {"type": "boolean"},
    },
    "required": ["name", "age", "color", "ok"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def llm(llama_checkpoint) -> Iterator[LLM]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: threads only add hand-off cost
    yield LLM(str(llama_checkpoint), block_size=4, max_model_len=256)
    torch.set_num_threads(threads)


def params(spec: StructuredSpec, **kw) -> SamplingParams:
    return SamplingParams(**{"max_tokens": 120, **kw}, structured=spec)


def test_constrained_and_free_requests_share_a_batch(llm):
    prompts = ["name:", "x", "The answer is", "[", "{"]
    specs = [
        StructuredSpec.json_schema(SCHEMA),
        None,
        StructuredSpec.regex(r"[0-9]{3}-[a-z]{2}"),
        StructuredSpec.grammar('root ::= "yes" | "no" | "maybe " root'),
        StructuredSpec.choice(['say "hi"', "tab\there"]),
    ]
    free_alone = llm.generate("x", SamplingParams(max_tokens=20, ignore_eos=True))[0]
    outs = llm.generate(
        prompts,
        [
            params(specs[0], temperature=0.8, seed=1),
            SamplingParams(max_tokens=20, ignore_eos=True),
            params(specs[2]),
            params(specs[3], temperature=1.0, seed=3),
            params(specs[4]),
        ],
    )
    value = json.loads(outs[0].text)
    jsonschema.validate(value, SCHEMA)
    assert outs[0].finish_reason == "stop"
    assert outs[1].token_ids == free_alone.token_ids  # the mask left the free row alone
    assert re.fullmatch(r"[0-9]{3}-[a-z]{2}", outs[2].text)
    assert re.fullmatch(r"(maybe )*(yes|no)", outs[3].text)
    assert outs[4].text in ('say "hi"', "tab\there")
    assert all(o.finish_reason == "stop" for i, o in enumerate(outs) if i != 1)
    assert_pool_whole(llm)


def test_json_object_and_many_seeds_always_validate(llm):
    outs = llm.generate(
        ["{"] * 6,
        [params(StructuredSpec.json_schema(SCHEMA), temperature=1.0, seed=s) for s in range(6)],
    )
    for out in outs:
        jsonschema.validate(json.loads(out.text), SCHEMA)
    obj = llm.generate("a", params(StructuredSpec.json_object(), max_tokens=200, seed=0))[0]
    if obj.finish_reason == "stop":  # a random model may ramble past max_tokens in a string
        assert isinstance(json.loads(obj.text), dict)
    else:
        assert obj.text.startswith("{")


def test_ignore_eos_still_ends_when_the_grammar_is_complete(llm):
    out = llm.generate("q", params(StructuredSpec.regex("(ab|cd)"), ignore_eos=True))[0]
    assert out.text in ("ab", "cd") and out.finish_reason == "stop"


def test_bad_specs_are_value_errors_and_change_nothing(llm):
    for spec in (
        StructuredSpec.regex("(unclosed"),
        StructuredSpec.grammar("root ::= undefined_rule"),
        StructuredSpec.json_schema({"type": "string", "minLength": 5, "maxLength": 2}),
    ):
        with pytest.raises(ValueError, match="invalid"):
            llm.engine.add_request("x", params(spec))
    assert not llm.engine.requests
    with pytest.raises(ValueError, match="min_tokens"):
        SamplingParams(min_tokens=2, structured=StructuredSpec.json_object())
    with pytest.raises(ValueError, match="kind"):
        StructuredSpec("yaml", "x")
    with pytest.raises(ValueError, match="not valid JSON"):
        StructuredSpec("json_schema", "{nope")


def test_a_grammar_with_no_way_forward_ends_the_request_with_an_error(llm):
    # An empty character class: after "a" no token can follow, not even the end.
    spec = StructuredSpec.grammar('root ::= "a" [^\\x00-\\U0010FFFF]')
    out = llm.generate("q", params(spec))[0]
    assert out.finish_reason == "error" and "admits no further token" in out.error
    assert out.text == "a"
    assert_pool_whole(llm)


def test_pack_matches_xgrammar_bit_layout():
    bits = torch.zeros(70, dtype=torch.bool)
    bits[[0, 31, 32, 69]] = True
    packed = _pack(bits)
    assert packed.dtype == torch.int32 and packed.tolist() == [1 - 2**31, 1, 32]
    backend = GrammarBackend(None, 70, [1])
    with pytest.raises(ValueError, match="tokenizer"):
        backend.compile(StructuredSpec.json_object())


def test_surrogates_and_control_bytes_are_masked(llm):
    # xgrammar admits 0xED 0xA0.. (a UTF-16 surrogate, invalid UTF-8, detokenized as three
    # U+FFFD) and, in bounded strings, raw control bytes; the backend masks both.
    backend = llm.engine.grammars
    string = backend.matcher(StructuredSpec.json_schema({"type": "string", "maxLength": 4}))
    regex = backend.matcher(StructuredSpec.regex(r"[^a]+"))
    assert not string.accept(ord('"'))  # accept() says whether the request must stop
    assert not string.accept(0xED) and not regex.accept(0xED)
    logits = torch.zeros(3, 256)
    backend.apply(logits, [string, None, regex])
    allowed = [set((row > float("-inf")).nonzero().flatten().tolist()) for row in logits]
    for row in (allowed[0], allowed[2]):
        assert set(range(0x80, 0xA0)) <= row and not row & set(range(0xA0, 0xC0))
    assert allowed[1] == set(range(256))
    fresh = backend.matcher(StructuredSpec.json_schema({"type": "string", "maxLength": 4}))
    fresh.accept(ord('"'))
    logits = torch.zeros(1, 256)
    backend.apply(logits, [fresh])
    allowed = set((logits[0] > float("-inf")).nonzero().flatten().tolist())
    assert ord("a") in allowed and not allowed & set(range(0x20))
