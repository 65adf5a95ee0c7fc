"""Pilot tests of the Monitor panel against the real engine: batching shows, blocks come back."""
# ruff: noqa: F811  (pytest fixtures imported from test_tui_support are arguments here)

from __future__ import annotations

from pathlib import Path

from test_tui_support import (  # noqa: F401  (fixtures)
    _isolated_home,
    app_for,
    engine_client,
    fixed_hardware,
    run,
    store,
    tui_model,
    wait_for,
)
from textual.widgets import DataTable

from panels.chat import ChatPanel
from panels.client import BLOCK_CACHED, BLOCK_FREE
from panels.hardware import FixedHardware
from panels.monitor import MonitorPanel
from panels.widgets.block_map import GLYPH_OWNED, GLYPH_SHARED, BlockMap
from panels.widgets.hardware_view import HardwareView


def test_block_values_match_the_engine() -> None:
    from engine import state

    assert (BLOCK_FREE, BLOCK_CACHED) == (state.BLOCK_FREE, state.BLOCK_CACHED)


def test_two_chats_show_as_two_running_requests(tmp_path: Path, store, engine_client) -> None:
    hardware = FixedHardware(fixed_hardware(0, gpus=False))
    app = app_for(
        tmp_path,
        store,
        engine_client,
        chat={"max_tokens": 480, "ignore_eos": True},
        hardware=hardware,
        monitor_interval=0.1,
    )

    async def main() -> None:
        async with app.run_test(size=(120, 40)) as pilot:
            chat = app.query_one(ChatPanel)
            await pilot.press("f3")  # watch from the monitor while the chats send
            monitor = app.query_one(MonitorPanel)
            assert app.focused is monitor
            first = chat.active
            first.send("The first chat asks something")
            second = await chat.add_chat()
            second.send("And the second chat asks too")

            def batched() -> bool:
                state = monitor.last_state
                return state is not None and len(state.running) == 2

            await wait_for(pilot, batched, what="two running requests in the monitor")
            # No await from here on: what is checked is what the monitor shows now.
            state = monitor.last_state
            assert state.kv_blocks_used > 0
            assert {r.request_id for r in state.running} == {first.request_id, second.request_id}
            table = monitor.query_one(DataTable)
            assert table.row_count == 2
            assert {str(table.get_row_at(i)[0])[2:] for i in range(2)} == {
                first.request_id,
                second.request_id,
            }
            block_map = monitor.query_one(BlockMap)
            assert block_map.data.owners == tuple(r.request_id for r in state.running)
            assert block_map.group_size() == 1  # one cell per block at this width
            rendered = str(block_map.render())
            assert rendered.count(GLYPH_OWNED) + rendered.count(GLYPH_SHARED) == (
                state.kv_blocks_used
            )
            colors = {block_map.owner_colors.color(r.request_id) for r in state.running}
            assert len(colors) == 2  # each request its own colour

            first.cancel()
            second.cancel()

            def drained() -> bool:
                state = monitor.last_state
                return (
                    not first.streaming
                    and not second.streaming
                    and state is not None
                    and not state.running
                    and state.kv_blocks_used == 0
                )

            await wait_for(pilot, drained, what="both replies to stop and free their blocks")
            state = monitor.last_state
            assert state.kv_blocks_free + state.kv_blocks_cached_free == state.kv_blocks_total
            rendered = str(monitor.query_one(BlockMap).render())
            assert GLYPH_OWNED not in rendered and GLYPH_SHARED not in rendered
            assert "idle" in str(table.get_row_at(0)[0])
            hardware_view = monitor.query_one(HardwareView)
            assert "No NVIDIA GPU" in str(hardware_view.render())
            await pilot.press("p")  # pause: no samples while paused
            assert monitor.paused
            seen = len(hardware_view.history["cpu"])
            await pilot.pause(0.4)
            assert len(hardware_view.history["cpu"]) == seen
            await pilot.press("p")
            await wait_for(pilot, lambda: len(hardware_view.history["cpu"]) > seen, what="samples")

    run(main())
