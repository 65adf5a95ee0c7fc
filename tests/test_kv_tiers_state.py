"""What the KV tiers report: EngineState per tier (and its JSON round trip), /metrics lines, the
monitor's KV view, and the cached tokens of the OpenAI usage."""

from __future__ import annotations

import asyncio
import json

import pytest
from conftest import random_prompts
from textual.app import App, ComposeResult
from textual.widgets import Static

from engine import LLM, SamplingParams
from engine.server.metrics import ServerMetrics
from engine.server.protocol import Usage
from engine.state import EngineState
from panels.widgets.block_map import OwnerColors
from panels.widgets.kv_view import KvView

BLOCK = 16
BYTES_PER_BLOCK = 2 * 8 * BLOCK * 4 * 32 * 4  # tiny: 8 layers, 4 KV heads of 32, float32


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """An engine with 4 host slots and a disk tier that served a, b, a: -> (llm, outputs)."""
    disk = tmp_path_factory.mktemp("kv-disk")
    llm = LLM(
        "tiny",
        block_size=BLOCK,
        num_kv_blocks=16,
        kv_host_bytes=4 * BYTES_PER_BLOCK,
        kv_disk_dir=str(disk),
        kv_disk_bytes="64MiB",
    )
    a, b = random_prompts([200, 200], seed=0)
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    outs = [llm.generate([p], params)[0] for p in (a, b, a)]
    return llm, outs


def test_the_state_shows_each_tier(run):
    llm, outs = run
    host, disk = llm.state().kv_tiers
    # b evicted 9 of a's full blocks: 4 stayed in host, 5 spilled to disk; a found all of them.
    assert outs[2].metrics.num_cached_tokens == 192
    assert (host.name, host.blocks_capacity, host.capacity_bytes) == (
        "host",
        4,
        4 * BYTES_PER_BLOCK,
    )
    assert (host.hits, disk.hits) == (4, 5)
    assert disk.name == "disk" and disk.blocks_used >= 5
    assert disk.bytes_out == 5 * BYTES_PER_BLOCK
    assert host.bytes_out == 4 * BYTES_PER_BLOCK
    assert host.bytes_in >= 9 * BYTES_PER_BLOCK
    assert host.bytes_per_s >= 0.0
    state = llm.state()
    assert EngineState.from_dict(json.loads(json.dumps(state.to_dict()))) == state


def test_usage_counts_restored_tokens_as_cached(run):
    _, outs = run
    usage = Usage.of(200, 8, outs[2].metrics.num_cached_tokens)
    assert usage.prompt_tokens_details.cached_tokens == 192


def test_metrics_have_a_series_per_tier(run):
    llm, _ = run
    text = ServerMetrics(llm.state, "tiny").render().decode()
    assert 'workbench_kv_tier_blocks{model_name="tiny",state="capacity",tier="host"} 4.0' in text
    assert 'workbench_kv_tier_hits_total{model_name="tiny",tier="disk"} 5.0' in text
    disk_out = 'workbench_kv_tier_bytes_total{model_name="tiny",tier="disk",way="out"}'
    assert f"{disk_out} {5 * BYTES_PER_BLOCK:.1f}" in text
    assert 'workbench_kv_tier_bytes_per_second{model_name="tiny",tier="host"}' in text


def test_an_engine_without_tiers_has_no_tier_series():
    llm = LLM("tiny", num_kv_blocks=8)
    assert llm.state().kv_tiers == ()
    assert "kv_tier" not in ServerMetrics(llm.state, "tiny").render().decode()


class _KvApp(App):
    def compose(self) -> ComposeResult:
        yield KvView(OwnerColors())


def test_the_monitor_shows_a_line_per_tier(run):
    llm, _ = run
    state = llm.state()

    async def main() -> str:
        app = _KvApp()
        async with app.run_test(size=(120, 30)) as pilot:
            view = app.query_one(KvView)
            view.add(state)
            view.show(state, 0.5)
            await pilot.pause()
            return str(view.query_one(".kv-summary", Static).render())

    summary = asyncio.run(main())
    host, disk = state.kv_tiers
    assert f"host {host.blocks_used}/4 blocks (512.0 KiB)  hits 4" in summary
    assert f"disk {disk.blocks_used}/{disk.blocks_capacity} blocks" in summary
    assert "hits 5" in summary
