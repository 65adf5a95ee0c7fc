"""Pilot tests of the Chat panel against the real app and the real engine (no mocks)."""
# ruff: noqa: F811  (pytest fixtures imported from test_tui_support are arguments here)

from __future__ import annotations

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
from textual import events
from textual.widgets import DataTable, Input, Markdown
from textual.widgets._markdown import MarkdownParagraph  # not re-exported by textual

from panels.chat import ChatPanel
from panels.conversation import Turn
from panels.sessions import SessionsPanel
from panels.widgets.message import MessageView
from workbench.app import WorkbenchApp


def _chat(app) -> ChatPanel:
    return app.query_one(ChatPanel)


def test_send_streams_a_reply_and_saves_both_messages(
    tmp_path: Path, store, tui_model, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The app loads the model itself (in a worker); a prompt sent at once waits for it."""
    appends: list[tuple[Markdown, str]] = []  # every piece any Markdown widget grew by
    append = Markdown.append
    monkeypatch.setattr(
        Markdown, "append", lambda md, text: appends.append((md, text)) or append(md, text)
    )
    app = app_for(tmp_path, store, model=tui_model, chat={"max_tokens": 96, "ignore_eos": True})

    async def main() -> None:
        async with app.run_test(size=(120, 40)) as pilot:
            chat = _chat(app)
            assert app.focused is chat.active.prompt
            await pilot.press(*"Hello", "space", *"there", "enter")
            view = chat.active
            await wait_for(pilot, lambda: not view.streaming, what="the reply")
            assert app.handle.status == "ready"
            messages = list(view.query(MessageView))
            assert [m.turn.role for m in messages] == ["user", "assistant"]
            reply = messages[1].turn
            assert reply.status == "complete" and reply.content
            assert messages[1].body.source == reply.content  # what streamed is what is saved
            pieces = [text for widget, text in appends if widget is messages[1].body]
            assert len(pieces) >= 2 and "".join(pieces) == reply.content  # it streamed
            await pilot.press("f4")  # the new session is listed
            table = app.query_one(SessionsPanel).query_one(DataTable)
            await wait_for(pilot, lambda: table.row_count == 1, what="the sessions list")
            assert [str(c) for c in table.get_row_at(0)[1:4:2]] == ["Hello there", "2"]

    run(main())
    [summary] = store.list_sessions()
    assert summary.title == "Hello there" and summary.message_count == 2
    session = store.get_session(summary.id)
    assert session.sampling["temperature"] == 0.0 and session.engine_config["block_size"] == 4
    user, assistant = store.messages(summary.id)
    assert (user.role, user.content, user.status) == ("user", "Hello there", "complete")
    assert assistant.role == "assistant" and assistant.parent_id == user.id
    assert assistant.status == "complete" and assistant.content
    stats = assistant.stats
    assert (
        stats["tokens"] >= 1
        and stats["ttft_s"] > 0
        and stats["finish_reason"]
        in (
            "stop",
            "length",
        )
    )
    assert stats["sampling"]["max_tokens"] == 96


def test_escape_cancels_a_reply_and_frees_its_blocks(tmp_path: Path, store, engine_client) -> None:
    app = app_for(tmp_path, store, engine_client, chat={"max_tokens": 400})

    async def main() -> None:
        async with app.run_test(size=(120, 40)) as pilot:
            view = _chat(app).active
            view.send("Tell me a long story")
            await wait_for(pilot, lambda: len(view.conv.turns[-1].content) >= 4, what="tokens")
            assert any(r.request_id == view.request_id for r in engine_client.state().running)
            saved = store.get_message(view.conv.turns[-1].message_id)  # saved as it streams
            assert saved.status == "streaming" and saved.content
            await pilot.press("escape")
            await wait_for(pilot, lambda: not view.streaming, what="the cancel")
            reply = view.conv.turns[-1]
            assert reply.status == "cancelled" and reply.stats["finish_reason"] == "abort"
            assert reply.stats["tokens"] < 400
            await wait_for(
                pilot,
                lambda: (
                    not engine_client.state().running and engine_client.state().kv_blocks_used == 0
                ),
                what="the blocks to be freed",
            )
            partial = saved.content
            saved = store.get_message(reply.message_id)
            assert saved.status == "cancelled" and saved.content == reply.content
            assert reply.content.startswith(partial)

    run(main())


def test_regenerate_edit_and_copy(tmp_path: Path, store, engine_client) -> None:
    app = app_for(tmp_path, store, engine_client, chat={"temperature": 1.0, "max_tokens": 8})

    async def main() -> None:
        async with app.run_test(size=(120, 40)) as pilot:
            view = _chat(app).active
            await pilot.press(*"first", "enter")
            await wait_for(pilot, lambda: not view.streaming, what="reply 1")
            first_reply = view.conv.turns[1].message_id
            await pilot.press("ctrl+r")
            await wait_for(pilot, lambda: not view.streaming, what="the regenerated reply")
            assert len(view.conv.turns) == 2 and view.conv.turns[1].message_id != first_reply
            assert len(store.siblings(first_reply)) == 2
            first_prompt = view.conv.turns[0].message_id
            await pilot.press("up")  # in the empty input: edit the last prompt
            assert view.editing == 0 and view.prompt.text == "first"
            await pilot.press("end", "space", *"again", "enter")
            await wait_for(pilot, lambda: not view.streaming, what="the edited reply")
            assert view.conv.turns[0].content == "first again"
            assert len(view.query(MessageView)) == 2
            assert [m.content for m in store.siblings(first_prompt)] == ["first", "first again"]
            # copy the reply, then a code block of a (doctored) reply
            await pilot.press("ctrl+y")
            assert app.clipboard == view.conv.turns[-1].content
            reply_view = view.query(MessageView).last()
            reply_view.turn.content = "Here:\n```python\nprint(1)\n```\nand\n```\nls\n```\n"
            reply_view.focus()
            await pilot.press("k")  # two blocks: a picker
            await pilot.press("down", "enter")
            assert app.clipboard == "ls"
            await pilot.press("c")
            assert app.clipboard == reply_view.turn.content

    run(main())


def test_settings_sidebar_changes_the_next_reply(tmp_path: Path, store, engine_client) -> None:
    app = app_for(tmp_path, store, engine_client)

    async def main() -> None:
        async with app.run_test(size=(120, 40)) as pilot:
            view = _chat(app).active
            max_tokens = app.query_one("#param-max-tokens", Input)
            max_tokens.value = "3"
            await pilot.pause()
            assert view.conv.params.max_tokens == 3
            max_tokens.value = "0"  # invalid: marked, and the chat keeps 3
            await pilot.pause()
            assert max_tokens.has_class("-invalid") and view.conv.params.max_tokens == 3
            max_tokens.value = "3"
            app.query_one("#system-prompt").text = "Be brief."
            await pilot.pause()
            view.send("hi")
            await wait_for(pilot, lambda: not view.streaming, what="the reply")
            assert view.conv.turns[-1].stats["tokens"] <= 3
            session = store.get_session(view.conv.session_id)
            assert session.sampling["max_tokens"] == 3 and session.system_prompt == "Be brief."

    run(main())


def test_a_model_that_fails_to_load_says_why(tmp_path: Path, store) -> None:
    app = app_for(tmp_path, store, model=str(tmp_path / "no-such-model"))

    async def main() -> None:
        async with app.run_test(size=(120, 40)) as pilot:
            view = _chat(app).active
            view.send("hello?")
            await wait_for(pilot, lambda: not view.streaming, what="the failure")
            assert "failed to load" in str(app.query_one("#status-bar").render())
            # nothing reached an engine: no session holding only an error, the message is back
            assert store.list_sessions() == [] and view.conv.session_id is None
            assert not view.conv.turns and not view.query(MessageView)
            assert view.prompt.text == "hello?"
            await pilot.pause()
            assert "Not sent:" in _notices(app) and "no-such-model" in _notices(app)

    run(main())


def _notices(app) -> str:
    return "\n".join(str(n.message) for n in app._notifications)


def test_a_prompt_past_the_context_ends_in_an_error_and_the_chat_goes_on(
    tmp_path: Path, store, engine_client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Sent while the model loads (nothing can count its tokens yet), a prompt longer than the
    context reaches the engine, which refuses it (ValueError on the stream's first step): the
    reply ends at once with that error, marked failed in the store, and Esc, Ctrl+R and a new
    message all work afterwards."""
    monkeypatch.setattr(WorkbenchApp, "_start_loading", lambda app: None)  # "loads" on cue
    app = app_for(tmp_path, store, chat={"max_tokens": 4, "drop_oldest": False})

    async def main() -> None:
        async with app.run_test(size=(120, 40)) as pilot:
            chat = _chat(app)
            view = chat.active
            assert app.handle.status == "loading"
            assert view.send("x" * 4500)  # one line, far past the 512-token test context
            await pilot.pause()
            app.handle.set_ready(engine_client)  # the model is up: the reply starts
            await wait_for(pilot, lambda: not view.streaming, what="the refusal")
            reply = view.conv.turns[-1]
            assert reply.status == "error" and "max_model_len" in reply.stats["error"]
            saved = store.get_message(reply.message_id)
            assert saved.status == "error" and "max_model_len" in saved.stats["error"]
            stats = view.query(MessageView).last().query_one(".msg-stats")
            assert "max_model_len" in str(stats.render())
            assert chat.streaming_session_ids() == set()  # the session may be deleted
            await pilot.press("escape")  # nothing to cancel: no error, nothing stuck
            await pilot.press("ctrl+r")  # the model is up now: refused before it is sent
            await pilot.pause()
            assert not view.streaming and view.conv.turns[-1] is reply
            assert "Not sent: the prompt would be" in _notices(app)
            await pilot.press("up")  # edit the too-long prompt into a short one: it replies
            assert view.editing == 0
            view.prompt.set_text("hello")
            await pilot.press("enter")
            await wait_for(pilot, lambda: not view.streaming, timeout=20, what="the reply")
            assert view.conv.turns[-1].status == "complete" and view.conv.turns[-1].content
            assert store.get_message(view.conv.turns[-1].message_id).status == "complete"

    run(main())


def test_a_message_that_cannot_fit_the_context_is_not_sent(
    tmp_path: Path, store, engine_client
) -> None:
    app = app_for(tmp_path, store, engine_client, chat={"max_tokens": 4})

    async def main() -> None:
        async with app.run_test(size=(120, 40)) as pilot:
            view = _chat(app).active
            meter = view.query_one(".chat-context")
            await wait_for(pilot, lambda: "Context" in str(meter.render()), what="the meter")
            view.prompt.set_text("x" * 4500)
            await pilot.press("enter")
            assert view.prompt.text == "x" * 4500  # kept, to shorten
            assert not view.conv.turns and store.list_sessions() == []  # nothing saved
            assert "too long even on its own" in _notices(app)
            assert "512" in _notices(app)

    run(main())


STORY = "Tell me a story about a cat and a dog. " * 8  # about 115 tokens


def test_a_long_chat_drops_its_oldest_turns_and_goes_on(
    tmp_path: Path, store, engine_client
) -> None:
    """Five long turns pass the 512-token test context: each prompt leaves out the oldest turns
    (never the system prompt) and leaves room for the reply; the meter says so."""
    app = app_for(tmp_path, store, engine_client, chat={"max_tokens": 16, "ignore_eos": True})

    async def main() -> None:
        async with app.run_test(size=(120, 40)) as pilot:
            view = _chat(app).active
            view.conv.system_prompt = "Be brief."
            for i in range(5):
                assert view.send(f"{i}. {STORY}")
                await wait_for(pilot, lambda: not view.streaming, what=f"reply {i}")
            replies = [t for t in view.conv.turns if t.role == "assistant"]
            assert [r.status for r in replies] == ["complete"] * 5
            assert all(r.stats["tokens"] == 16 for r in replies)  # never cut by the context
            assert not replies[0].stats.get("dropped_messages")
            last = replies[-1].stats
            assert last["dropped_messages"] >= 2 and last["prompt_tokens"] + 16 <= 512
            meter = str(view.query_one(".chat-context").render())
            assert (
                "/ 512 tokens" in meter and "the next prompt leaves the oldest turns out" in meter
            )
            assert "oldest messages left out" in str(
                view.query(MessageView).last().query_one(".msg-stats").render()
            )
            # what was sent started with the system prompt: the engine's record says so
            request = replies[-1].stats["prompt_tokens"]
            sent = view._fit(view.conv.engine_messages(upto=len(view.conv.turns) - 1))
            assert sent.messages[0]["role"] == "system" and sent.prompt_tokens == request

    run(main())


def test_without_dropping_a_full_chat_says_why_it_stops(
    tmp_path: Path, store, engine_client
) -> None:
    app = app_for(
        tmp_path,
        store,
        engine_client,
        chat={"max_tokens": 200, "ignore_eos": True, "drop_oldest": False},
    )

    async def main() -> None:
        async with app.run_test(size=(120, 40)) as pilot:
            view = _chat(app).active
            sent = 0
            while view.send(f"{sent}. {STORY}"):
                sent += 1
                await wait_for(pilot, lambda: not view.streaming, what=f"reply {sent}")
                assert sent < 5
            await pilot.pause()
            assert "Turn on 'Drop oldest turns'" in _notices(app)
            cut = view.conv.turns[-1]
            assert cut.stats["finish_reason"] == "length" and cut.stats["tokens"] < 200
            shown = str(view.query(MessageView).last().query_one(".msg-stats").render())
            assert "the context (512 tokens) is full" in shown
            # turning dropping on lets the same message go
            app.query_one("#param-drop-oldest").value = True
            await pilot.pause()
            assert view.conv.params.drop_oldest
            assert view.send(f"{sent}. {STORY}")
            await wait_for(pilot, lambda: not view.streaming, what="the reply after dropping")
            stats = view.conv.turns[-1].stats
            assert stats["dropped_messages"] >= 2
            assert stats["tokens"] >= 128  # the prompt left a quarter of the context to it

    run(main())


def test_the_prompt_takes_several_lines_and_pastes_whole(
    tmp_path: Path, store, engine_client
) -> None:
    app = app_for(tmp_path, store, engine_client, chat={"max_tokens": 4})
    pasted = "\n".join(f"line {i}" for i in range(40))  # within the 512-token test context

    async def main() -> None:
        async with app.run_test(size=(120, 40)) as pilot:
            view = _chat(app).active
            await pilot.press(*"one", "ctrl+j", *"two", "shift+enter", *"three")
            assert view.prompt.text == "one\ntwo\nthree" and not view.conv.turns
            await pilot.press("enter")
            await wait_for(pilot, lambda: not view.streaming, what="reply 1")
            assert view.conv.turns[0].content == "one\ntwo\nthree" and view.prompt.text == ""
            assert _paragraphs(view.query(MessageView).first()) == ["one\ntwo\nthree"]
            app.post_message(events.Paste(pasted))  # as a terminal's bracketed paste arrives
            await pilot.pause()
            assert view.prompt.text == pasted  # all 40 lines
            await pilot.press("enter")
            await wait_for(pilot, lambda: not view.streaming, what="reply 2")
            assert store.get_message(view.conv.turns[2].message_id).content == pasted

    run(main())


def _paragraphs(view: MessageView) -> list[str]:
    return [p._content.plain for p in view.body.query(MarkdownParagraph)]


def test_the_models_line_breaks_show(tmp_path: Path, store, engine_client) -> None:
    """A reply's single line breaks stay line breaks (Markdown would join the lines)."""
    app = app_for(tmp_path, store, engine_client)

    async def main() -> None:
        async with app.run_test(size=(120, 40)) as pilot:
            view = _chat(app).active
            shown = view._append_view(Turn("assistant", "Roses are red,\nviolets blue.\n\nEnd."))
            await pilot.pause()
            assert _paragraphs(shown) == ["Roses are red,\nviolets blue.", "End."]

    run(main())
