"""/metrics of a MoE model: a counter per (sparse layer, expert) and a per-layer imbalance gauge,
read from the real engine's state; a dense model has neither."""

from __future__ import annotations

import re

from conftest import random_prompts
from tiny_checkpoints import cached_tiny_checkpoint

from engine import LLM, SamplingParams
from engine.server.metrics import ServerMetrics


def test_expert_load_on_metrics(checkpoint_root, llama_checkpoint):
    llm = LLM(str(cached_tiny_checkpoint(checkpoint_root, "mixtral")), block_size=4)
    llm.generate(random_prompts([12, 5]), SamplingParams(max_tokens=4, ignore_eos=True))
    state = llm.state()
    text = ServerMetrics(lambda: state, "tiny-moe").render().decode()
    series = re.findall(
        r'workbench_moe_expert_tokens_total\{expert="(\d+)",layer="(\d+)",model_name="tiny-moe"\} '
        r"(\S+)",
        text,
    )
    got = {(int(layer), int(expert)): float(n) for expert, layer, n in series}
    load = state.expert_load
    assert got == {
        (layer, expert): float(n)
        for layer, row in zip(load.layers, load.total, strict=True)
        for expert, n in enumerate(row)
    }
    assert sum(got.values()) == 2 * 2 * (12 + 5 + 2 * 3)  # 2 layers, top-2, tokens run
    imbalance = re.findall(r'workbench_moe_expert_load_imbalance\{layer="(\d+)".*\} (\S+)', text)
    assert [int(layer) for layer, _ in imbalance] == [0, 1]
    assert all(1.0 <= float(v) <= 4.0 for _, v in imbalance)  # 4 experts: at most 4x even

    dense = LLM(str(llama_checkpoint), block_size=4)
    text = ServerMetrics(dense.state, "tiny-llama").render().decode()
    assert "workbench_kv_cache_usage_ratio" in text and "moe_expert" not in text
