"""MoE presets at real shapes (`load_format="dummy"`): they build on the meta device with the
published parameter counts, and one real-shape layer of Qwen3-30B-A3B runs on the CPU."""

from __future__ import annotations

import json
from contextlib import contextmanager

import pytest
import torch
from tiny_checkpoints import MOE_FAMILIES, cached_tiny_checkpoint, tiny_config
from transformers import AutoModelForCausalLM

from engine import LLM, SamplingParams
from engine.model.builder import parameter_bytes
from engine.model.moe_model import MoeForCausalLM, idle_expert_bytes, model_class
from engine.model.presets import PRESETS, num_active_parameters, num_parameters, preset_config
from engine.quant.checkpoint import dummy_quant_config


@contextmanager
def torch_default_dtype(dtype: torch.dtype):
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


MOE_PRESETS = {"mixtral-8x7b": 46.7e9, "qwen3-30b-a3b": 30.5e9}
ACTIVE = {"mixtral-8x7b": 12.9e9, "qwen3-30b-a3b": 3.3e9}  # per token, published


@pytest.mark.parametrize("name", sorted(MOE_PRESETS))
def test_moe_preset_builds_at_real_shape_on_meta(name):
    config = preset_config(name)
    assert name in PRESETS and model_class(config) is MoeForCausalLM
    with torch.device("meta"):
        ours = MoeForCausalLM(config)
        theirs = AutoModelForCausalLM.from_config(config)
    count = sum(p.numel() for p in ours.parameters())
    assert count == num_parameters(config) == sum(p.numel() for p in theirs.parameters())
    assert abs(count - MOE_PRESETS[name]) / MOE_PRESETS[name] < 0.01, count
    active = num_active_parameters(config)
    assert abs(active - ACTIVE[name]) / ACTIVE[name] < 0.03, active
    assert num_active_parameters(preset_config("llama-3.1-8b")) == num_parameters(
        preset_config("llama-3.1-8b")
    )


def test_mixtral_8x7b_fits_one_h200_in_bf16():
    with torch.device("meta"):
        model = MoeForCausalLM(preset_config("mixtral-8x7b")).to(torch.bfloat16)
    assert 90e9 < parameter_bytes(model) < 100e9  # of the H200's 141 GB, the rest for KV
    # A batch-1 decode step reads the 2 routed experts of 8: the roofline's bytes.
    active = parameter_bytes(model) - idle_expert_bytes(model)
    assert active == 2 * num_active_parameters(model.config)


def test_fp8_experts_halve_the_bytes_a_decode_step_reads():
    config = preset_config("qwen3-30b-a3b")
    with torch.device("meta"), torch_default_dtype(torch.bfloat16):
        bf16 = MoeForCausalLM(config)
        fp8 = MoeForCausalLM(config, dummy_quant_config("fp8"))
    idle_bf16, idle_fp8 = idle_expert_bytes(bf16), idle_expert_bytes(fp8)
    assert 0.5 < idle_fp8 / idle_bf16 < 0.51  # one byte per weight, plus per-row scales
    assert 30e9 < parameter_bytes(fp8) < 33e9


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_num_parameters_of_tiny_moe_families(family):
    config = tiny_config(family)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    assert num_parameters(config) == sum(p.numel() for p in model.parameters())


def test_qwen3_30b_a3b_one_layer_runs_with_dummy_weights(tmp_path, checkpoint_root):
    # One layer at its real shape (128 experts of 768 x 2048); a byte vocabulary keeps the
    # embeddings small.
    values = {**PRESETS["qwen3-30b-a3b"], "num_hidden_layers": 1, "vocab_size": 256}
    (tmp_path / "config.json").write_text(json.dumps(values))
    tokenizer = cached_tiny_checkpoint(checkpoint_root, "qwen3_moe")  # prompts are token ids
    llm = LLM(str(tmp_path), load_format="dummy", dtype="bfloat16", tokenizer=str(tokenizer))
    outs = llm.generate([[1, 2, 3, 4, 5], [7, 8]], SamplingParams(max_tokens=2, ignore_eos=True))
    assert [len(o.token_ids) for o in outs] == [2, 2]
    load = llm.state().expert_load
    layers, counts = load.layers, load.total
    assert layers == (0,) and len(counts[0]) == 128
    assert sum(counts[0]) == (5 + 2 + 2) * 8  # 7 prompt tokens and 2 decodes, 8 experts each
