"""EAGLE-3 speculation (engine/spec/eagle.py, eagle_proposer.py): the head loads the layout vLLM
loads, the target exposes the right hidden states, and speculation stays lossless (greedy output
unchanged with batching, chunked prefill, preemption and prefix-cache hits; seeded sampling
reproducible). The rejection sampling itself is tested in test_speculative.py."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import assert_pool_whole, random_prompts
from safetensors.torch import load_file, save_file
from tiny_checkpoints import cached_tiny_checkpoint, make_tiny_eagle_head
from transformers import AutoModelForCausalLM

from engine import LLM, SamplingParams
from engine.model.loader import BUNDLED_DIR, iter_safetensors
from engine.spec import SpeculativeConfig
from engine.spec.eagle import Eagle3Head, aux_layer_ids, load_head_config

GREEDY = SamplingParams(max_tokens=16, ignore_eos=True)


@pytest.fixture(scope="module")
def head_dirs(llama_checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("eagle")
    return {
        "full-vocab": make_tiny_eagle_head(llama_checkpoint, root / "full", seed=3),
        "draft-vocab": make_tiny_eagle_head(
            llama_checkpoint, root / "small", seed=4, draft_vocab_size=96
        ),
    }


def spec_prompts():
    repetitive = [7, 8, 9, 10, 11, 7, 8, 9, 10, 11, 7, 8, 9]
    return random_prompts([5, 17, 2, 9], seed=31) + [repetitive]


def eagle(model, num_tokens: int = 3) -> dict:
    return {"method": "eagle", "model": str(model), "num_tokens": num_tokens}


def assert_head_pool_whole(llm) -> None:
    proposer = llm.engine.speculator.draft
    assert proposer.seqs == {}
    assert proposer.kv.pool.num_free_blocks == proposer.kv.pool.num_blocks


@pytest.mark.parametrize("head", ["full-vocab", "draft-vocab"])
@pytest.mark.parametrize(
    "engine_kwargs",
    [
        pytest.param({"block_size": 4}, id="plain"),
        pytest.param({"block_size": 2, "max_num_tokens": 6}, id="chunked"),
        pytest.param({"block_size": 4, "num_kv_blocks": 14}, id="preemption"),
    ],
)
def test_greedy_output_is_unchanged(llama_checkpoint, head_dirs, head, engine_kwargs):
    prompts = spec_prompts()
    plain = LLM(str(llama_checkpoint), **engine_kwargs).generate(prompts, GREEDY)
    llm = LLM(str(llama_checkpoint), speculative=eagle(head_dirs[head]), **engine_kwargs)
    outs = llm.generate(prompts, GREEDY)
    assert [o.token_ids for o in outs] == [o.token_ids for o in plain]
    state = llm.state()
    assert state.spec_acceptance_rate is not None and state.spec_mean_accepted >= 1.0
    if "num_kv_blocks" in engine_kwargs:
        assert llm.engine.recent_steps and any(s.num_preempted for s in llm.engine.recent_steps)
    assert_pool_whole(llm)
    assert_head_pool_whole(llm)


def test_prefix_cache_hits_and_stop_strings(llama_checkpoint, head_dirs):
    prompts = spec_prompts()
    plain = LLM(str(llama_checkpoint), block_size=2)
    stop = plain.generate(prompts, GREEDY)[1].text[4:7]
    params = SamplingParams(max_tokens=16, ignore_eos=True, stop=[stop])
    want = plain.generate(prompts, params)
    llm = LLM(str(llama_checkpoint), block_size=2, speculative=eagle(head_dirs["draft-vocab"]))
    llm.generate(prompts, GREEDY)  # fill the prefix cache
    outs = llm.generate(prompts, params)
    assert llm.engine.kv.prefix_hits > 0
    assert [(o.token_ids, o.text, o.finish_reason) for o in outs] == [
        (o.token_ids, o.text, o.finish_reason) for o in want
    ]
    assert_pool_whole(llm)
    assert_head_pool_whole(llm)


def test_seeded_sampling_is_reproducible(llama_checkpoint, head_dirs):
    llm = LLM(str(llama_checkpoint), block_size=4, speculative=eagle(head_dirs["draft-vocab"]))
    prompt = random_prompts([6], seed=32)[0]
    seeded = SamplingParams(max_tokens=12, temperature=1.0, seed=7, ignore_eos=True)
    noise = SamplingParams(max_tokens=9, temperature=0.8, ignore_eos=True)
    alone = llm.generate(prompt, seeded)[0].token_ids
    mixed = llm.generate(random_prompts([3, 8], seed=33) + [prompt], [noise, noise, seeded])
    assert mixed[2].token_ids == alone


def test_target_keeps_the_inputs_of_the_aux_layers(llama_checkpoint, head_dirs):
    """The rows `capture` reads are transformers' hidden_states[id] (the input of layer id)."""
    llm = LLM(str(llama_checkpoint), block_size=4, speculative=eagle(head_dirs["full-vocab"]))
    target = llm.engine.model
    target.aux_hidden_layers = (1, 0, 1)
    seen = []
    llm.engine.speculator.draft.capture = lambda requests, chunks: seen.append(
        target.aux_hidden_states.clone()
    )
    prompt = random_prompts([9], seed=5)[0]
    llm.generate(prompt, SamplingParams(max_tokens=1))
    hf = AutoModelForCausalLM.from_pretrained(str(llama_checkpoint), dtype=torch.float32)
    with torch.no_grad():
        states = hf(torch.tensor([prompt]), output_hidden_states=True).hidden_states
    want = torch.cat([states[1][0], states[0][0], states[1][0]], dim=-1)  # [9, 3 * hidden]
    torch.testing.assert_close(seen[0], want, rtol=1e-5, atol=1e-5)


class DenseCausal:
    """One sequence's causal attention, no cache: the reference for the paged head."""

    def __init__(self) -> None:
        self.backend = self

    def forward(self, q, k, v, kv_cache, meta, scale):  # [T, heads, d] / [T, kv_heads, d]
        groups = q.shape[1] // k.shape[1]
        k, v = (x.repeat_interleave(groups, dim=1).transpose(0, 1) for x in (k, v))
        out = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(0, 1), k, v, is_causal=True, scale=scale
        )
        return out.transpose(0, 1)


def reference_drafts(hf, head, layers, tokens: list[int], k: int) -> list[int]:
    """Greedy chain drafting recomputed densely: with one layer, the K/V at a position depend on
    that position's inputs only, so this is what the paged head must propose."""
    with torch.no_grad():
        states = hf(torch.tensor([tokens]), output_hidden_states=True).hidden_states
        aux = torch.cat([states[i][0] for i in layers], dim=-1)[: len(tokens) - 1]
        hidden = head.combine(aux)  # [n - 1, hidden]
        inputs, drafts = list(tokens[1:]), []
        embed = hf.get_input_embeddings()
        for _ in range(k):
            embeds = embed(torch.tensor(inputs))
            positions = torch.arange(len(inputs))
            normed, prenorm = head(embeds, hidden, positions, None, DenseCausal())
            drafts.append(int(head.logits(normed[-1:]).argmax()))
            hidden = torch.cat([hidden, prenorm[-1:]])
            inputs.append(drafts[-1])
    return drafts


def test_paged_head_proposes_what_the_dense_head_does(llama_checkpoint, head_dirs):
    llm = LLM(
        str(llama_checkpoint),
        block_size=2,
        max_num_tokens=5,  # prompts in chunks
        speculative=eagle(head_dirs["draft-vocab"], num_tokens=3),
    )
    proposer = llm.engine.speculator.draft
    seen = []
    propose = proposer.propose

    def recording(requests, ks):  # copies: the scheduler trims drafts that do not fit
        results = propose(requests, ks)
        seen.extend(
            (list(r.all_token_ids), k, list(d))
            for r, k, (d, _) in zip(requests, ks, results, strict=True)
        )
        return results

    proposer.propose = recording
    llm.generate(random_prompts([7, 3, 12], seed=8), SamplingParams(max_tokens=8, ignore_eos=True))
    hf = AutoModelForCausalLM.from_pretrained(str(llama_checkpoint), dtype=torch.float32)
    layers = llm.engine.model.aux_hidden_layers
    assert len(seen) > 6
    for tokens, k, drafts in seen:
        assert drafts == reference_drafts(hf, proposer.head, layers, tokens, k)


def test_plain_engine_keeps_no_hidden_states(llama_checkpoint):
    llm = LLM(str(llama_checkpoint), block_size=4)
    llm.generate(random_prompts([5], seed=1), GREEDY)
    assert llm.engine.model.aux_hidden_layers == ()
    assert llm.engine.model.aux_hidden_states is None


def test_head_loads_the_checkpoint_layout(head_dirs):
    head_dir = head_dirs["draft-vocab"]
    names = set(load_file(head_dir / "model.safetensors"))
    assert {"fc.weight", "midlayer.self_attn.q_proj.weight", "midlayer.hidden_norm.weight"} <= names
    assert {"midlayer.mlp.gate_proj.weight", "norm.weight", "lm_head.weight", "d2t", "t2d"} <= names
    config = load_head_config(head_dir)
    head = Eagle3Head(config, 64, 256)
    head.load_weights(iter_safetensors(head_dir))
    assert aux_layer_ids(config, num_target_layers=2) == (0, 1, 1)
    logits = head.logits(torch.randn(3, 64))  # [3, vocab]: the draft ids only
    assert torch.isfinite(logits).sum(-1).tolist() == [96, 96, 96]
    assert torch.isfinite(logits[:, head.target_ids]).all()
    assert head.t2d[head.target_ids].all() and int(head.t2d.sum()) == 96


def test_default_aux_layers_follow_vllm(head_dirs):
    config = load_head_config(head_dirs["full-vocab"])
    config.eagle_config = {}
    assert aux_layer_ids(config, num_target_layers=32) == (2, 16, 29)
    with pytest.raises(ValueError, match="aux layer ids"):
        aux_layer_ids(config, num_target_layers=2)  # (2, 1, -1)


def test_bad_heads_are_clear_errors(llama_checkpoint, head_dirs, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(head_dirs["draft-vocab"], bad)
    weights = load_file(bad / "model.safetensors")
    del weights["midlayer.self_attn.k_proj.weight"]
    save_file(weights, str(bad / "model.safetensors"))
    with pytest.raises(ValueError, match="lacks"):
        LLM(str(llama_checkpoint), speculative=eagle(bad))
    config = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps(config | {"architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(ValueError, match="not an EAGLE-3 head"):
        LLM(str(llama_checkpoint), speculative=eagle(bad))
    other = cached_tiny_checkpoint(llama_checkpoint.parent, "llama3", hidden_size=32)
    with pytest.raises(ValueError, match="target hidden states of 64, the target has 32"):
        LLM(str(other), speculative=eagle(head_dirs["full-vocab"]))


def test_config_defaults_to_the_bundled_head():
    assert SpeculativeConfig.from_dict({"method": "eagle"}).model == "tiny-eagle"
    assert SpeculativeConfig.from_dict({"method": "draft"}).model == "tiny-draft"


BUNDLED = (BUNDLED_DIR / "tiny-eagle").is_dir()


@pytest.mark.skipif(not BUNDLED, reason="engine/bundled/tiny-eagle not trained")
def test_bundled_head_is_lossless_and_accepts():
    """tiny-eagle on the bundled model: greedy output equal to plain decoding (and to tiny-draft
    speculation), with real acceptance (a random head gets ~1.0 tokens per verify step)."""
    prompts = [
        "<|endoftext|><|im_start|>user\nTell me a story about a dog.<|im_end|>\n"
        "<|im_start|>assistant\n",
        "<|endoftext|>Once upon a time, there was a little girl named Lily.",
        "<|endoftext|>Tom and his mom went to the park.",
    ]
    params = SamplingParams(max_tokens=40, ignore_eos=True)
    want = [o.token_ids for o in LLM("tiny").generate(prompts, params)]
    llm = LLM("tiny", speculative={"method": "eagle", "num_tokens": 3})
    assert [o.token_ids for o in llm.generate(prompts, params)] == want
    assert llm.state().spec_mean_accepted > 1.8


@pytest.mark.parametrize("command", ["generate", "bench", "serve", "chat"])
def test_speculative_eagle_flag_on_every_command(command):
    from workbench.cli import build_parser, engine_config_from_args

    extra = ["--prompt", "x"] if command == "generate" else []
    parse = build_parser().parse_args
    args = parse([command, *extra, "--speculative", "eagle", "--spec-tokens", "5"])
    spec = engine_config_from_args(args).speculative
    assert spec == {"method": "eagle", "num_tokens": 5}
    assert SpeculativeConfig.from_dict(spec).model == "tiny-eagle"  # the method's default
    args = parse([command, *extra, "--speculative", "eagle", "--draft-model", "/h"])
    assert engine_config_from_args(args).speculative["model"] == "/h"
