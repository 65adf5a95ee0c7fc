"""Pilot tests of tool calling in the chat: the real app, the real engine with the bundled model
(no mocks). Tools are set in the chat settings; a reply's calls show as blocks; the user gives a
call's result and the model replies; all of it is saved and comes back with the session."""
# ruff: noqa: F811  (pytest fixtures imported from test_tui_support are arguments here)

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_tui_attach import attached_app, close_client, start_server
from test_tui_support import (  # noqa: F401  (fixtures)
    _isolated_home,
    app_for,
    engine_client,
    run,
    store,
    tui_model,
    wait_for,
)
from textual.widgets import Checkbox, Select, Static, TextArea

from panels.chat import ChatPanel
from panels.client import parse_tools
from panels.widgets import chat_view
from panels.widgets.dialogs import TextPrompt
from panels.widgets.message import MessageView, tool_call_block

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "enum": ["Paris", "Oslo"]},
                "celsius": {"type": "boolean"},
            },
            "required": ["city", "celsius"],
            "additionalProperties": False,
        },
    },
}
CHAT = {"max_tokens": 160}


def _calls_match_the_schema(calls: list[dict]) -> None:
    assert calls
    for call in calls:
        assert call["name"] == "get_weather" and call["id"]
        arguments = json.loads(call["arguments"])
        assert set(arguments) == {"city", "celsius"}
        assert arguments["city"] in ("Paris", "Oslo") and isinstance(arguments["celsius"], bool)


def _blocks(view: MessageView) -> list[str]:
    return [str(block.render()) for block in view.query(".msg-tool-call").results(Static)]


async def _set_tools(app, pilot, tools: str, choice: str, parallel: bool = True) -> None:
    app.query_one("#param-tools", TextArea).text = tools
    app.query_one("#param-tool-choice", Select).value = choice
    app.query_one("#param-parallel-tools", Checkbox).value = parallel
    await pilot.pause()


async def _call_and_answer(app, pilot, then: str) -> dict[str, object]:
    """Set the tools (required, one call), send, check the call's block, give its result (with
    tool choice `then`) and wait for the reply; what the chat holds then."""
    view = app.query_one(ChatPanel).active
    await _set_tools(app, pilot, json.dumps([WEATHER], indent=2), "required", parallel=False)
    assert view.conv.params.tool_choice == "required"
    assert not view.conv.params.parallel_tool_calls  # else the tiny model calls on and on
    assert str(app.query_one("#settings-error", Static).render()) == ""
    view.send("What is the weather in Paris?")
    await wait_for(pilot, lambda: not view.streaming, what="the tool call")
    reply = view.conv.turns[1]
    assert reply.stats["finish_reason"] == "tool_calls", reply.stats
    assert reply.status == "complete" and len(reply.tool_calls) == 1
    _calls_match_the_schema(reply.tool_calls)
    reply_view = list(view.query(MessageView))[1]
    blocks = _blocks(reply_view)
    assert blocks == [tool_call_block(c) for c in reply.tool_calls]
    assert blocks[0].startswith("⚙ get_weather") and '"city": ' in blocks[0]
    assert "tool_calls" in str(reply_view.query_one(".msg-stats", Static).render())
    # The result: t on the focused reply opens a dialog; Enter sends it, and the model replies.
    app.query_one("#param-tool-choice", Select).value = then
    await pilot.pause()
    reply_view.focus()
    await pilot.press("t")
    await pilot.pause()
    assert isinstance(app.screen, TextPrompt)
    await pilot.press(*"sunny", "enter")
    await wait_for(pilot, lambda: len(view.conv.turns) == 4, what="the tool result")
    await wait_for(pilot, lambda: not view.streaming, what="the reply to the result")
    assert [t.role for t in view.conv.turns] == ["user", "assistant", "tool", "assistant"]
    result = view.conv.turns[2]
    assert (result.content, result.stats["tool_call_id"]) == ("sunny", reply.tool_calls[0]["id"])
    answer = view.conv.turns[3]
    assert answer.status == "complete" and answer.stats["tokens"] >= 1, answer.stats
    reply_view.focus()
    await pilot.press("t")  # answered: nothing waits
    assert not isinstance(app.screen, TextPrompt)
    return {
        "id": view.conv.session_id,
        "turns": [(t.role, t.content, t.tool_calls) for t in view.conv.turns],
        "blocks": blocks,
    }


def test_required_tools_call_answer_reply_and_reopen(
    tmp_path: Path, store, engine_client, monkeypatch: pytest.MonkeyPatch
) -> None:
    shown: list[str] = []  # the first call's arguments each time the blocks were drawn
    show = MessageView.show_tool_calls
    monkeypatch.setattr(
        MessageView,
        "show_tool_calls",
        lambda view, calls: shown.append(calls[0]["arguments"]) or show(view, calls),
    )
    monkeypatch.setattr(chat_view, "RENDER_INTERVAL_S", 0.0)  # draw every delta
    app = app_for(tmp_path, store, engine_client, chat=CHAT)
    session: dict[str, object] = {}

    async def main() -> None:
        async with app.run_test(size=(120, 40)) as pilot:
            session.update(await _call_and_answer(app, pilot, then="auto"))

    run(main())
    final = session["turns"][1][2][0]["arguments"]
    assert len(shown) >= 2 and shown[-1] == final  # the block streamed as the call came
    assert any(len(a) < len(final) and final.startswith(a) for a in shown)
    saved = store.messages(session["id"])
    assert [m.role for m in saved] == [role for role, *_ in session["turns"]]
    assert store.get_session(session["id"]).sampling["tools"] == json.dumps([WEATHER], indent=2)

    reopened = app_for(tmp_path, store, engine_client, chat=CHAT)

    async def reopen() -> None:
        async with reopened.run_test(size=(120, 40)) as pilot:
            view = await reopened.query_one(ChatPanel).open_session(session["id"])
            await pilot.pause()
            assert [(t.role, t.content, t.tool_calls) for t in view.conv.turns] == session["turns"]
            views = list(view.query(MessageView))
            assert _blocks(views[1]) == session["blocks"]
            assert "Tool result" in str(views[2].query_one(".msg-header", Static).render())
            assert view.conv.params.tools == json.dumps([WEATHER], indent=2)
            assert view.conv.unanswered_calls() == []

    run(reopen())


def test_bad_tools_show_an_inline_error_and_send_nothing(
    tmp_path: Path, store, engine_client
) -> None:
    app = app_for(tmp_path, store, engine_client, chat=CHAT)

    async def main() -> None:
        async with app.run_test(size=(120, 40)) as pilot:
            view = app.query_one(ChatPanel).active
            error = app.query_one("#settings-error", Static)
            tools = app.query_one("#param-tools", TextArea)
            await _set_tools(app, pilot, '[{"type": "function", ', "required")
            assert "tools: not JSON" in str(error.render()) and tools.has_class("-invalid")
            assert not view.send("hi") and not view.conv.turns and view.conv.session_id is None
            tools.text = '[{"type": "function", "function": {"name": "f"}}]'
            await pilot.pause()
            assert '"parameters" must be a JSON schema object' in str(error.render())
            tools.text = '{"type": "function"}'
            await pilot.pause()
            assert "must be a non-empty JSON list" in str(error.render())
            assert not view.send("hi") and store.list_sessions() == []
            tools.text = ""  # cleared: the chat goes on without tools
            await pilot.pause()
            assert str(error.render()) == "" and not tools.has_class("-invalid")
            assert view.send("hi")
            await wait_for(pilot, lambda: not view.streaming, what="the reply")
            assert view.conv.turns[-1].status == "complete"

    run(main())


def test_parse_tools_takes_openai_function_tools() -> None:
    assert parse_tools("") is None and parse_tools(json.dumps([WEATHER])) == [WEATHER]
    for bad, says in [
        ("[1]", 'tools[0]: must be {"type": "function"'),
        ('[{"type": "function", "function": {"parameters": {}}}]', 'needs a "name"'),
        (json.dumps([WEATHER, WEATHER]), "used twice"),
        ("[]", "non-empty JSON list"),
    ]:
        try:
            parse_tools(bad)
        except ValueError as e:
            assert says in str(e)
        else:
            raise AssertionError(f"{bad} was taken")


def test_an_attached_chat_sends_tools_and_reads_streamed_calls(tmp_path: Path, store) -> None:
    """Over HTTP to `workbench serve` (started without a tool-call parser: no `auto` there)."""
    server, llm = start_server()
    app = attached_app(tmp_path, store, server.url, **CHAT)

    async def main() -> None:
        async with app.run_test(size=(120, 40)) as pilot:
            await wait_for(pilot, lambda: app.handle.status == "ready", what="the server")
            await _call_and_answer(app, pilot, then="none")
            close_client(app)

    try:
        run(main())
    finally:
        server.stop()
        llm.shutdown()
