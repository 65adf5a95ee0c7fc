"""Pilot tests of the Monitor panel against the real engine: batching shows, blocks come back, a
selected request is aborted, the map and the table fit 80x24; and the help screen's footer."""
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
from textual.widgets._footer import FooterKey

from panels.chat import ChatPanel
from panels.client import BLOCK_CACHED, BLOCK_FREE
from panels.hardware import FixedHardware
from panels.monitor import MonitorPanel
from panels.widgets.batch_view import BatchView
from panels.widgets.block_map import GLYPH_OWNED, GLYPH_SHARED, BlockMap
from panels.widgets.dialogs import Confirm
from panels.widgets.hardware_view import HardwareView
from panels.widgets.help_screen import HelpScreen
from panels.widgets.table_cursor import cursor_row_key


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


def screen_lines(app) -> list[str]:
    """What the terminal shows now, a line per row."""
    return [strip.text for strip in app.screen._compositor.render_strips()]


def row_ids(table: DataTable) -> list[str]:
    """The request ids the batch table shows, top to bottom (each cell is "█ <id>")."""
    rows = [table.get_row_at(i) for i in range(table.row_count)]
    return [str(row[0])[2:] for row in rows if row[1]]  # the idle row has no state


def test_x_aborts_the_selected_request_after_a_confirmation(
    tmp_path: Path, store, engine_client
) -> None:
    app = app_for(
        tmp_path,
        store,
        engine_client,
        chat={"max_tokens": 480, "ignore_eos": True},
        hardware=FixedHardware(fixed_hardware(0, gpus=False)),
        monitor_interval=0.1,
    )

    async def main() -> None:
        async with app.run_test(size=(120, 40)) as pilot:
            chat = app.query_one(ChatPanel)
            await pilot.press("f3")
            monitor = app.query_one(MonitorPanel)
            batch = monitor.query_one(BatchView)
            table = batch.query_one(DataTable)
            await pilot.press("x")  # nothing selected: a notice, no dialog
            assert not isinstance(app.screen, Confirm)
            first = chat.active
            first.send("The first chat asks something")
            second = await chat.add_chat()
            second.send("And the second chat asks too")

            def both_rows() -> bool:  # a chat's request_id is set once its reply starts
                return set(row_ids(table)) == {first.request_id, second.request_id}

            await wait_for(pilot, both_rows, what="both requests in the table")
            assert not table.show_cursor  # no selection yet
            await pilot.press("down", "down")  # the first ↓ selects the first row
            assert table.show_cursor
            chosen = cursor_row_key(table)
            assert chosen == row_ids(table)[1] == batch.selected
            view = first if chosen == first.request_id else second
            other = second if view is first else first

            # The table refreshes as the replies grow; the selection stays on its request, and
            # on it still when the row above goes (the table is rebuilt then).
            step = monitor.last_state.step
            await wait_for(pilot, lambda: monitor.last_state.step >= step + 5, what="steps")
            assert batch.selected == cursor_row_key(table) == chosen
            other.cancel()
            await wait_for(pilot, lambda: row_ids(table) == [chosen], what="the other one to go")
            assert batch.selected == cursor_row_key(table) == chosen
            assert table.cursor_row == 0

            await pilot.press("x")  # asks first; Esc keeps the request running
            assert isinstance(app.screen, Confirm)
            await pilot.press("escape")
            assert not isinstance(app.screen, Confirm) and view.streaming
            await pilot.press("x")
            await pilot.press("y")
            await wait_for(pilot, lambda: not view.streaming, what="the aborted reply to end")
            reply = view.conv.turns[-1]
            assert reply.status == "cancelled" and reply.stats["finish_reason"] == "abort"
            assert reply.stats["tokens"] < 480
            await wait_for(
                pilot,
                lambda: not monitor.last_state.running and monitor.last_state.kv_blocks_used == 0,
                what="the aborted request's blocks to be freed",
            )
            assert batch.selected is None and not table.show_cursor  # it left the batch
            assert "idle" in str(table.get_row_at(0)[0])
            await wait_for(pilot, lambda: not other.streaming, what="the other reply to end")

    run(main())


def test_at_80x24_the_block_map_and_the_batch_table_are_on_screen_together(
    tmp_path: Path, store, engine_client
) -> None:
    app = app_for(
        tmp_path,
        store,
        engine_client,
        chat={"max_tokens": 480, "ignore_eos": True},
        hardware=FixedHardware(fixed_hardware(0, gpus=True)),
        monitor_interval=0.1,
    )

    async def main() -> None:
        async with app.run_test(size=(80, 24)) as pilot:
            view = app.query_one(ChatPanel).active
            view.send("Fill the batch table")
            await pilot.press("f3")
            monitor = app.query_one(MonitorPanel)
            table = monitor.query_one(DataTable)
            await wait_for(pilot, lambda: row_ids(table) == [view.request_id], what="its row")
            await pilot.pause(0.3)  # a few refreshes
            lines = screen_lines(app)
            map_rows = str(monitor.query_one(BlockMap).render()).splitlines()
            assert map_rows and all(row.rstrip() in "\n".join(lines) for row in map_rows)
            assert any(GLYPH_OWNED in row for row in map_rows)  # the request's blocks show
            assert any("request" in line and "tok/s" in line for line in lines)  # its header
            assert any(view.request_id in line and "running" in line for line in lines)
            assert monitor.has_class("-short")  # the layout for short terminals
            view.cancel()
            await wait_for(pilot, lambda: not view.streaming, what="the cancel")

    run(main())


def test_a_dialog_footer_shows_its_own_keys(tmp_path: Path, store, engine_client) -> None:
    """The abort confirmation (as every dialog) shows its keys, not the Monitor's under it."""
    app = app_for(tmp_path, store, engine_client)

    async def main() -> None:
        async with app.run_test(size=(80, 24)) as pilot:
            await pilot.press("f3")
            app.push_screen(Confirm("Abort request r?", yes="Abort"))
            await pilot.pause()
            shown = [key.description for key in app.screen.query(FooterKey)]
            assert sorted(shown) == ["Cancel", "Yes"]
            bottom = screen_lines(app)[-1]
            assert "Cancel" in bottom and "Abort request" not in bottom and "Pause" not in bottom

    run(main())


def test_the_help_screen_footer_shows_its_own_keys(tmp_path: Path, store, engine_client) -> None:
    app = app_for(tmp_path, store, engine_client)

    async def main() -> None:
        async with app.run_test(size=(80, 24)) as pilot:
            for panel in ("f2", "f3"):
                await pilot.press(panel)
                under = {key.description for key in app.screen.query(FooterKey)}
                await pilot.press("f1")
                assert isinstance(app.screen, HelpScreen)
                shown = [key.description for key in app.screen.query(FooterKey)]
                assert shown == ["Close help"]
                bottom = screen_lines(app)[-1]
                assert "Close help" in bottom
                assert not any(d in bottom for d in under - {"Help"})  # not the panel's keys
                await pilot.press("escape")
                assert not isinstance(app.screen, HelpScreen)

    run(main())


def test_the_kv_view_lists_every_tensor_parallel_rank() -> None:
    """A real two-rank engine (gloo, CPU): the KV box names each rank's device, pid, shard of
    the weights, share of the KV pages and memory."""
    from textual.app import App
    from textual.widgets import Static

    from engine import LLM
    from panels.widgets.block_map import OwnerColors
    from panels.widgets.kv_view import KvView

    with LLM("tiny", dtype="float32", tensor_parallel_size=2, num_kv_blocks=16) as llm:
        state = llm.state()
    assert [r.rank for r in state.ranks] == [0, 1]

    class KvApp(App):
        def compose(self):
            yield KvView(OwnerColors())

    async def main() -> None:
        app = KvApp()
        async with app.run_test(size=(120, 40)) as pilot:
            app.query_one(KvView).show(state, 0.1)
            await pilot.pause()
            text = str(app.query_one(".kv-summary", Static).render())
            assert "tensor parallel ×2" in text
            for r in state.ranks:
                assert f"rank {r.rank} {r.device} pid {r.pid}" in text

    run(main())
