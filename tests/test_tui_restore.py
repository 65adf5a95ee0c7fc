"""Pilot tests of reopening the chats at the next launch: the real app, the real engine (no
mocks), a store file that outlives the app as the data dir does between launches."""
# ruff: noqa: F811  (pytest fixtures imported from test_tui_support are arguments here)

from __future__ import annotations

from pathlib import Path

from test_tui_sessions import _damage
from test_tui_support import (  # noqa: F401  (fixtures)
    _isolated_home,
    app_for,
    engine_client,
    run,
    store,
    tui_model,
    wait_for,
)

from panels.chat import ChatPanel
from panels.widgets.message import MessageView
from store import OpenChat, Store, open_store


def _chat(app) -> ChatPanel:
    return app.query_one(ChatPanel)


def _notices(app) -> str:
    return "\n".join(f"{n.title}: {n.message}" for n in app._notifications)


def _shown(chat: ChatPanel) -> list[list[str]]:
    """Each chat's messages as on screen, in tab order."""
    return [[m.turn.content for m in view.query(MessageView)] for view in chat.views]


def _launch_and_chat(tmp_path: Path, store: Store, engine_client, prompts: list[str]) -> None:
    """One launch: a chat per prompt, each sent and replied to, the first chat left on screen and
    an untouched new chat after them; then quit."""
    app = app_for(tmp_path, store, engine_client, chat={"max_tokens": 8})

    async def main() -> None:
        async with app.run_test(size=(120, 40)) as pilot:
            chat = _chat(app)
            for i, prompt in enumerate(prompts):
                if i:
                    await pilot.press("ctrl+n")
                await pilot.press(*prompt, "enter")
                view = chat.active
                await wait_for(pilot, lambda v=view: not v.streaming, what=f"reply {i + 1}")
            await pilot.press("ctrl+n")  # empty: not reopened
            await pilot.press("alt+right")  # wraps around to the first chat
            assert chat.active is chat.views[0] and len(chat.views) == len(prompts) + 1
            await pilot.press("ctrl+q")

    run(main())


def test_the_open_chats_come_back_with_their_messages_and_go_on_in_their_sessions(
    tmp_path: Path, store, engine_client
) -> None:
    _launch_and_chat(tmp_path, store, engine_client, ["one", "two"])
    first, second = sorted(s.id for s in store.list_sessions())
    before = {sid: [m.content for m in store.messages(sid)] for sid in (first, second)}
    # Meanwhile the first session got a newer branch elsewhere: the chat shows the one it showed.
    store.add_message(first, "user", "another branch", None)
    store.close()

    with open_store(tmp_path / "workbench.db") as again:  # the next launch
        app = app_for(tmp_path, again, engine_client, chat={"max_tokens": 8})

        async def main() -> None:
            async with app.run_test(size=(120, 40)) as pilot:
                chat = _chat(app)
                assert [v.conv.session_id for v in chat.views] == [first, second]
                assert _shown(chat) == [before[first], before[second]]
                assert chat.active is chat.views[0] and app.focused is chat.active.prompt
                assert "Chats not reopened" not in _notices(app)
                view = chat.active
                reply_id = view.conv.turns[-1].message_id
                await pilot.press(*"three", "enter")
                await wait_for(pilot, lambda: not view.streaming, what="the reply")
                assert view.conv.session_id == first
                prompt, reply = again.messages(first)[-2:]
                assert (prompt.content, prompt.parent_id) == ("three", reply_id)
                assert reply.parent_id == prompt.id and reply.status == "complete"
                assert again.count_sessions() == 2  # no new session
                assert again.open_chats() == [
                    OpenChat(first, reply.id, True),
                    OpenChat(second, chat.views[1].conv.leaf_id, False),
                ]

        run(main())


def test_a_deleted_session_is_skipped_and_said_so(tmp_path: Path, store, engine_client) -> None:
    _launch_and_chat(tmp_path, store, engine_client, ["one", "two"])
    first, second = sorted(s.id for s in store.list_sessions())
    store.delete_session(first)  # the chat that was on screen
    app = app_for(tmp_path, store, engine_client)

    async def main() -> None:
        async with app.run_test(size=(120, 40)) as pilot:
            await pilot.pause()
            chat = _chat(app)
            assert [v.conv.session_id for v in chat.views] == [second]
            assert len(_shown(chat)[0]) == 2 and chat.active is chat.views[0]
            assert f"Chats not reopened: Session #{first} was deleted." in _notices(app)
            assert store.open_chats() == [OpenChat(second, chat.active.conv.leaf_id, True)]

    run(main())


def test_nothing_to_reopen_starts_one_new_chat(tmp_path: Path, store, engine_client) -> None:
    """Quitting with only an untouched chat open leaves nothing to reopen."""
    app = app_for(tmp_path, store, engine_client)

    async def main() -> None:
        async with app.run_test(size=(120, 40)) as pilot:
            await pilot.press("ctrl+n")
            assert len(_chat(app).views) == 2
            await pilot.press("ctrl+q")

    run(main())
    assert store.open_chats() == []
    again = app_for(tmp_path, store, engine_client)

    async def relaunch() -> None:
        async with again.run_test(size=(120, 40)):
            chat = _chat(again)
            assert len(chat.views) == 1 and chat.active.conv.session_id is None

    run(relaunch())


def test_a_damaged_database_still_starts_with_a_new_chat(tmp_path: Path, engine_client) -> None:
    path = tmp_path / "damaged.db"
    with open_store(path) as before:
        chats = []
        for i in range(40):
            sid = before.create_session(f"chat {i}", "tiny", {}, {}, None)
            chats.append(OpenChat(sid, before.add_message(sid, "user", "x" * 3000, None)))
        before.save_open_chats(chats)
    _damage(path)
    with open_store(path) as damaged:
        app = app_for(tmp_path, damaged, engine_client)

        async def main() -> None:
            async with app.run_test(size=(120, 40)) as pilot:
                await pilot.pause()
                chat = _chat(app)
                assert len(chat.views) == 1 and chat.active.conv.session_id is None
                assert "Chats not reopened" in _notices(app) and "damaged" in _notices(app)
                assert app.focused is chat.active.prompt

        run(main())
