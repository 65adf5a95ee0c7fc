"""Pilot tests of the Sessions panel: list, search, open and resume, rename, delete, export."""
# ruff: noqa: F811  (pytest fixtures imported from test_tui_support are arguments here)

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_tui_support import (  # noqa: F401  (fixtures)
    _isolated_home,
    app_for,
    engine_client,
    run,
    store,
    tui_model,
    wait_for,
)
from textual.widgets import DataTable, Input

from panels.chat import ChatPanel
from panels.sessions import SessionsPanel
from panels.widgets.dialogs import Confirm, TextPrompt
from panels.widgets.message import MessageView
from store import StoreError, open_store


def _crashed_session(store) -> int:
    """A session whose last reply was still 'streaming' when the app died."""
    other = store.create_session("Weather", "tiny", {}, {})
    store.add_message(other, "user", "Will it rain tomorrow?")
    sid = store.create_session("Pasta", "tiny", {}, {"temperature": 0.0, "max_tokens": 8})
    user = store.add_message(sid, "user", "How long do I boil spaghetti?")
    store.add_message(sid, "assistant", "About ten min", user, status="streaming")
    return sid


def test_open_resume_and_continue_a_crashed_session(tmp_path: Path, store, engine_client) -> None:
    sid = _crashed_session(store)
    app = app_for(tmp_path, store, engine_client)

    async def main() -> None:
        async with app.run_test(size=(120, 40)) as pilot:
            await pilot.press("f4")
            panel = app.query_one(SessionsPanel)
            table = panel.query_one(DataTable)
            await wait_for(pilot, lambda: table.row_count == 2, what="the list")
            assert app.focused is table
            assert panel.selected_session() == sid  # most recent activity first
            await pilot.press("enter")
            chat = app.query_one(ChatPanel)
            await wait_for(pilot, lambda: chat.active.conv.session_id == sid, what="the open")
            assert app.query_one("TabbedContent").active == "chat"
            view = chat.active
            assert len(chat.views) == 1  # the untouched first chat was replaced
            user, reply = view.query(MessageView)
            assert reply.turn.status == "interrupted" and "interrupted" in str(
                reply.query_one(".msg-header").render()
            )
            assert view.conv.params.max_tokens == 8  # the session's own sampling
            view.send("And linguine?")
            await wait_for(pilot, lambda: not view.streaming, what="the resumed reply")

    run(main())
    branch = store.messages(sid)
    assert [m.role for m in branch] == ["user", "assistant", "user", "assistant"]
    assert branch[2].parent_id == branch[1].id and branch[3].status == "complete"
    assert store.get_session(sid).engine_config["num_kv_blocks"] == 128  # it went on here


def test_search_rename_export_and_delete(tmp_path: Path, store, engine_client) -> None:
    sid = _crashed_session(store)
    app = app_for(tmp_path, store, engine_client)

    async def main() -> None:
        async with app.run_test(size=(120, 40)) as pilot:
            await pilot.press("f4")
            panel = app.query_one(SessionsPanel)
            table = panel.query_one(DataTable)
            await wait_for(pilot, lambda: table.row_count == 2, what="the list")
            await pilot.press("slash")
            assert isinstance(app.focused, Input)
            await pilot.press(*"spaghetti", "enter")
            await wait_for(pilot, lambda: panel.query_text == "spaghetti" and table.row_count == 1)
            assert "spaghetti" in str(table.get_row_at(0)[3])
            assert panel.selected_session() == sid
            await pilot.press("r")
            assert isinstance(app.screen, TextPrompt)
            app.screen.query_one(Input).value = "Cooking times"
            await pilot.press("enter")
            assert store.get_session(sid).title == "Cooking times"
            await pilot.press("m", "j")
            await app.workers.wait_for_complete()
            md = tmp_path / "exports" / f"session-{sid}-cooking-times.md"
            data = json.loads(md.with_suffix(".json").read_text())
            assert "How long do I boil spaghetti?" in md.read_text()
            assert data["session"]["title"] == "Cooking times" and len(data["messages"]) == 2
            await pilot.press("slash", "escape")  # back to the whole list
            await wait_for(pilot, lambda: not panel.query_text and table.row_count == 2)
            await pilot.press("d")
            assert isinstance(app.screen, Confirm)
            await pilot.press("escape")  # no
            assert store.count_sessions() == 2
            await pilot.press("d", "y")
            await wait_for(pilot, lambda: table.row_count == 1, what="the delete")
            assert store.count_sessions() == 1

    run(main())


def _damage(path: Path) -> None:
    """Overwrite the pages past the schema: the file opens, its tables' pages are garbage."""
    size = path.stat().st_size
    with path.open("r+b") as f:
        f.seek(4096 * 3)
        f.write(b"\xff" * (size - 4096 * 6))


def test_a_damaged_database_says_so_in_sessions(tmp_path: Path, engine_client) -> None:
    path = tmp_path / "damaged.db"
    with open_store(path) as before:
        for i in range(40):
            sid = before.create_session(f"chat {i}", "tiny", {}, {}, None)
            before.add_message(sid, "user", "x" * 3000, None)
    _damage(path)
    with open_store(path) as damaged:
        with pytest.raises(StoreError, match="damaged.db is damaged .*malformed"):
            damaged.list_sessions()
        app = app_for(tmp_path, damaged, engine_client)

        async def main() -> None:
            async with app.run_test(size=(120, 40)) as pilot:
                await pilot.press("f4")
                info = app.query_one("#session-info")
                await wait_for(pilot, lambda: "damaged" in str(info.render()), what="the error")
                assert "Cannot list sessions" in str(info.render())

        run(main())


def test_chats_opened_from_sessions_are_numbered_in_order(
    tmp_path: Path, store, engine_client
) -> None:
    _crashed_session(store)
    app = app_for(tmp_path, store, engine_client)

    async def main() -> None:
        async with app.run_test(size=(120, 40)) as pilot:
            await pilot.press("f4")
            table = app.query_one(SessionsPanel).query_one(DataTable)
            await wait_for(pilot, lambda: table.row_count == 2, what="the list")
            table.focus()
            await pilot.press("enter")  # opens it in Chat, in place of the untouched chat 1
            chat = app.query_one(ChatPanel)
            await wait_for(pilot, lambda: chat.active.conv.session_id is not None)
            await pilot.press("ctrl+n", "ctrl+n")
            await pilot.pause()
            assert [v.number for v in chat.views] == [1, 2, 3]
            header = str(chat.active.query_one(".chat-header").render())
            assert header.startswith("Chat 3 (of 3")

    run(main())


def test_one_session_is_one_session(tmp_path: Path, store, engine_client) -> None:
    store.create_session("only one", "tiny", {}, {}, None)
    app = app_for(tmp_path, store, engine_client)

    async def main() -> None:
        async with app.run_test(size=(120, 40)) as pilot:
            await pilot.press("f4")
            info = app.query_one("#session-info")
            await wait_for(pilot, lambda: "session" in str(info.render()), what="the list")
            assert str(info.render()).startswith("1 session · Enter opens")

    run(main())
