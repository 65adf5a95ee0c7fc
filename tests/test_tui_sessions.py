"""Pilot tests of the Sessions panel: list, search, open and resume, rename, delete, export; the
preview: conversation first, search hits scrolled to and marked, branches switched."""
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
from textual.widgets import Collapsible, DataTable, Input, Static

from panels.chat import ChatPanel
from panels.sessions import SessionsPanel
from panels.widgets.dialogs import Confirm, TextPrompt
from panels.widgets.message import MessageView
from panels.widgets.session_preview import MARK_STYLE, PreviewMessage, SessionPreview, _window
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


# -- the preview -------------------------------------------------------------------------------

ENGINE_CONFIG = {f"option_{i}": i for i in range(25)}  # as long as a real engine configuration


async def _sessions(pilot, app) -> tuple[SessionsPanel, DataTable, SessionPreview]:
    await pilot.press("f4")
    panel = app.query_one(SessionsPanel)
    return panel, panel.query_one(DataTable), panel.query_one(SessionPreview)


def _header(view: PreviewMessage) -> str:
    return str(view.query_one(".preview-header", Static).render())


def test_preview_shows_the_conversation_first_and_folds_the_settings(
    tmp_path: Path, store, engine_client
) -> None:
    sid = store.create_session("Pasta", "tiny", ENGINE_CONFIG, {"temperature": 0.0})
    user = store.add_message(sid, "user", "How long do I boil spaghetti?")
    store.add_message(sid, "assistant", "About ten minutes.", user)
    app = app_for(tmp_path, store, engine_client)

    async def main() -> None:
        async with app.run_test(size=(120, 40)) as pilot:
            panel, table, preview = await _sessions(pilot, app)
            await wait_for(pilot, lambda: preview.message_view(user) is not None, what="preview")
            first = preview.children[0]
            assert isinstance(first, PreviewMessage) and first.message_id == user
            assert first.region.y == preview.content_region.y  # the top line, not the config
            settings = preview.query_one(Collapsible)
            assert preview.children[-1] is settings and settings.collapsed
            settings.collapsed = False
            await pilot.pause()
            assert '"option_24": 24' in settings.query_one("Markdown").source

    run(main())


def _long_chat(store, sid: int, turns: int, parent: int | None = None) -> int:
    """`turns` questions and answers of a dozen lines each, under `parent`; returns the last."""
    for i in range(turns):
        parent = store.add_message(sid, "user", f"Question {i}?", parent)
        answer = "\n".join(f"Line {j} of answer {i}." for j in range(12))
        parent = store.add_message(sid, "assistant", answer, parent)
    assert parent is not None
    return parent


def test_a_search_hit_opens_its_branch_scrolled_to_it_and_marked(
    tmp_path: Path, store, engine_client
) -> None:
    sid = store.create_session("Travel", "tiny", ENGINE_CONFIG, {})
    fork = _long_chat(store, sid, 10)
    question = store.add_message(sid, "user", "Where should I go in June?", fork)
    hit = store.add_message(sid, "assistant", "Try Zanzibar: zanzibar is dry in June.", question)
    store.add_message(sid, "assistant", "Try Lisbon.", question)  # regenerated: the latest branch
    app = app_for(tmp_path, store, engine_client)

    async def main() -> None:
        async with app.run_test(size=(120, 40)) as pilot:
            panel, table, preview = await _sessions(pilot, app)
            await wait_for(pilot, lambda: table.row_count == 1, what="the list")
            await pilot.press("slash", *"zanzibar", "enter")
            await wait_for(pilot, lambda: preview.message_view(hit) is not None, what="the hit")
            view = preview.message_view(hit)
            assert view is not None and "1/2" in _header(view)  # the older reply, not "Lisbon"
            shown = preview.content_region
            await wait_for(pilot, lambda: shown.contains_region(view.region), what="the scroll")
            assert preview.scroll_y > 0
            body = view.query_one(".preview-body", Static).content
            marks = [body.plain[s.start : s.end] for s in body.spans if s.style == MARK_STYLE]
            assert marks == ["Zanzibar", "zanzibar"]
            await pilot.press("slash", "escape")  # back to the list: the latest branch, the top
            await wait_for(pilot, lambda: preview.message_view(hit) is None, what="the list")
            assert preview.scroll_y == 0

    run(main())


def test_branches_count_once_and_switch_in_the_preview(
    tmp_path: Path, store, engine_client
) -> None:
    sid = store.create_session("Sums", "tiny", {}, {})
    u1 = store.add_message(sid, "user", "What is 2+2?")
    a1 = store.add_message(sid, "assistant", "4", u1)
    u2 = store.add_message(sid, "user", "And 3+3?", a1)
    a2 = store.add_message(sid, "assistant", "6", u2)
    a1b = store.add_message(sid, "assistant", "Four.", u1)  # regenerated: now the latest branch
    a1c = store.add_message(sid, "assistant", "2+2=4", u1)
    app = app_for(tmp_path, store, engine_client)

    async def main() -> None:
        async with app.run_test(size=(120, 40)) as pilot:
            panel, table, preview = await _sessions(pilot, app)
            await wait_for(pilot, lambda: preview.message_view(a1c) is not None, what="preview")
            assert table.get_row_at(0)[3] == "2 (3 branches)"  # not 6 messages
            view = preview.message_view(a1c)
            assert view is not None and "‹ 3/3 ›" in _header(view)
            assert "‹" not in _header(preview.message_view(u1))  # no alternatives
            view.focus()
            await pilot.press("left_square_bracket")
            await wait_for(pilot, lambda: preview.message_view(a1b) is not None, what="switch")
            assert app.focused is preview.message_view(a1b)
            assert "‹ 2/3 ›" in _header(app.focused)
            await pilot.press("left")
            await wait_for(pilot, lambda: preview.message_view(a2) is not None, what="branch 1")
            assert [v.message_id for v in preview.query(PreviewMessage)] == [u1, a1, u2, a2]
            assert app.focused is preview.message_view(a1) and "‹ 1/3 ›" in _header(app.focused)
            await pilot.press("left")  # round the end, to the last alternative
            await wait_for(pilot, lambda: preview.message_view(a1c) is not None, what="round")
            await pilot.press("right_square_bracket")
            await wait_for(pilot, lambda: preview.message_view(a1) is not None, what="forward")

    run(main())


def test_a_long_branch_is_previewed_in_a_window_that_holds_the_focus() -> None:
    sizes = [400] * 10  # a budget of 1000 holds two messages and a half
    assert _window(sizes, focus=0, budget=1000) == (0, 2)
    assert _window(sizes, focus=1, budget=1000) == (0, 2)
    assert _window(sizes, focus=7, budget=1000) == (7, 9)  # a search hit far down
    assert _window([5000, 10], focus=0, budget=1000) == (0, 1)  # one too long: still shown
    assert _window([10, 20], focus=0, budget=1000) == (0, 2)
