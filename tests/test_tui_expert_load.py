"""The expert-load heat map: its grouping arithmetic, the widget on a real MoE engine's state
(Pilot), and the Monitor panel showing it for a MoE model only."""
# ruff: noqa: F811  (pytest fixtures imported from test_tui_support are arguments here)

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from conftest import random_prompts
from test_tui_support import (  # noqa: F401  (fixtures)
    _isolated_home,
    app_for,
    fixed_hardware,
    run,
    store,
    wait_for,
)
from textual.app import App, ComposeResult
from tiny_checkpoints import cached_tiny_checkpoint

from engine import LLM, SamplingParams
from panels.widgets.expert_load import (
    GLYPH_HEAT,
    GLYPH_NONE,
    LABEL_WIDTH,
    ExpertHeatMap,
    ExpertLoadView,
    heat_grid,
    heat_style,
    hottest,
)


@pytest.fixture(scope="module")
def moe_state(checkpoint_root):
    """The state of a real Qwen2-MoE tiny engine (sparse layers 1 and 3) after some requests."""
    llm = LLM(str(cached_tiny_checkpoint(checkpoint_root, "qwen2_moe")), block_size=4)
    llm.generate(random_prompts([30, 9, 17]), SamplingParams(max_tokens=6, ignore_eos=True))
    return llm.state()


def test_heat_grid_shares_and_grouping():
    counts = ((6, 2, 0, 0), (1, 1, 1, 1))
    grid = heat_grid((1, 3), counts, width=10, max_rows=8)
    assert grid.ratios == ((3.0, 1.0, None, None), (1.0, 1.0, 1.0, 1.0))
    assert (grid.experts_per_cell, grid.layers_per_row, grid.labels) == (1, 1, (1, 3))
    # Two cells of two experts, both layers in one row: 10 of the 12 pairs went to experts 0-1.
    grid = heat_grid((1, 3), counts, width=2, max_rows=1)
    assert grid.ratios == ((pytest.approx(10 / 6), pytest.approx(2 / 6)),)
    assert (grid.experts_per_cell, grid.layers_per_row, grid.labels) == (2, 2, (1,))
    assert heat_style(3.0) != heat_style(1.0) != heat_style(0.2)
    assert hottest((1, 3), counts) == (1, 0, 3.0)
    assert hottest((1,), ((0, 0),)) is None


class ExpertApp(App):
    def compose(self) -> ComposeResult:
        yield ExpertLoadView()


def test_view_shows_the_engine_expert_load(moe_state):
    load = moe_state.expert_load
    assert load.layers == (1, 3) and len(load.total[0]) == 8

    async def main() -> None:
        app = ExpertApp()
        async with app.run_test(size=(80, 20)) as pilot:
            view = app.query_one(ExpertLoadView)
            assert not view.display  # nothing shown before a state comes
            view.show(moe_state)
            await pilot.pause()
            assert view.display
            rendered = str(app.query_one(ExpertHeatMap).render()).splitlines()
            assert [line[:LABEL_WIDTH].strip() for line in rendered] == ["L1", "L3"]
            cells = [line[LABEL_WIDTH:] for line in rendered]
            for line, row in zip(cells, load.recent, strict=True):
                assert line == "".join(GLYPH_HEAT if n else GLYPH_NONE for n in row)
            title = str(view.query_one(".experts-title").render())
            assert f"last {load.recent_steps} steps" in title
            layer, expert, _ = hottest(load.layers, load.recent)
            legend = str(view.query_one(".experts-legend").render())
            assert f"hottest: layer {layer} expert {expert}," in legend
            view.show(dataclasses.replace(moe_state, expert_load=None))  # a dense model
            await pilot.pause()
            assert not view.display

    run(main())


def test_monitor_shows_experts_for_a_moe_model(tmp_path: Path, store, checkpoint_root) -> None:
    from panels.client import LocalEngineClient
    from panels.hardware import FixedHardware
    from panels.monitor import MonitorPanel

    model = str(cached_tiny_checkpoint(checkpoint_root, "qwen3_moe"))
    client = LocalEngineClient.load(model, block_size=4, max_num_seqs=4)
    hardware = FixedHardware(fixed_hardware(0, gpus=False))
    app = app_for(tmp_path, store, client, model=model, hardware=hardware, monitor_interval=0.1)

    async def main() -> None:
        async with app.run_test(size=(120, 50)) as pilot:
            await pilot.press("f3")
            monitor = app.query_one(MonitorPanel)
            view = monitor.query_one("#monitor-experts", ExpertLoadView)
            await wait_for(pilot, lambda: view.display, what="the experts box")
            assert monitor.last_state.expert_load.layers == (1, 2)  # mlp_only_layers [0]
            rendered = str(view.query_one(ExpertHeatMap).render()).splitlines()
            assert [line[:LABEL_WIDTH].strip() for line in rendered] == ["L1", "L2"]

    try:
        run(main())
    finally:
        client.close()
