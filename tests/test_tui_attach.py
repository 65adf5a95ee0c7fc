"""`workbench launch --attach URL`: the TUI chats with and monitors a real server (the bundled
model behind uvicorn on 127.0.0.1) through `RemoteEngineClient`; a server that is not there, a
wrong key, or one that goes away shows as a status, never a traceback."""
# ruff: noqa: F811  (pytest fixtures imported from test_tui_support are arguments here)

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from test_tui_support import (  # noqa: F401  (fixtures)
    _isolated_home,
    fixed_states,
    make_settings,
    run,
    store,
    wait_for,
)
from textual.widgets import Static

from engine import AsyncLLM
from engine.server import BackgroundServer, ServerSettings, create_app
from engine.state import EngineState
from panels.chat import ChatPanel
from panels.client import ChatParams
from panels.monitor import MonitorPanel
from panels.remote_client import RemoteEngineClient, ServerUnavailable, base_url
from panels.widgets.batch_view import BatchView
from panels.widgets.hardware_view import HardwareView
from workbench.app import WorkbenchApp
from workbench.cli import main

KEY = "attach-key"
ENGINE = {"block_size": 4, "num_kv_blocks": 256, "max_model_len": 512}


def start_server(api_key: str | None = KEY) -> tuple[BackgroundServer, AsyncLLM]:
    llm = AsyncLLM("tiny", **ENGINE)
    app = create_app(llm, ServerSettings(model_name="tiny", api_key=api_key))
    return BackgroundServer(app).start(), llm


@pytest.fixture(scope="module")
def server() -> Iterator[BackgroundServer]:
    running, llm = start_server()
    yield running
    running.stop()
    llm.shutdown()


def attached_app(
    tmp_path: Path, store, url: str, api_key: str | None = KEY, **chat
) -> WorkbenchApp:
    settings = make_settings(tmp_path, **chat)
    settings.attach, settings.api_key = url, api_key
    return WorkbenchApp(settings, store, monitor_interval=0.1)


def status_bar(app: WorkbenchApp) -> str:
    return str(app.query_one("#status-bar", Static).render())


def close_client(app: WorkbenchApp) -> None:
    if app.handle.client is not None:
        app.handle.client.close()


def server_state(server: BackgroundServer) -> dict:
    headers = {"Authorization": f"Bearer {KEY}"}
    return httpx.get(server.url + "/v1/engine/state", headers=headers).json()


# --- the state over JSON ----------------------------------------------------------------------


def test_engine_state_round_trips_through_json() -> None:
    for state in fixed_states(4):
        data = json.loads(json.dumps(state.to_dict()))
        assert EngineState.from_dict(data) == state
    data = json.loads(json.dumps(fixed_states(2)[-1].to_dict()))
    data["from_a_newer_server"] = 1  # ignored
    del data["spec_draft_time_s"]  # has a default: an older server may not send it
    assert EngineState.from_dict(data).spec_draft_time_s is None
    del data["kv_blocks_total"]
    with pytest.raises(ValueError, match="kv_blocks_total"):
        EngineState.from_dict(data)


def test_connect_reads_the_server(server) -> None:
    client = RemoteEngineClient.connect(server.url + "/v1/", KEY, poll_interval=0.05)
    try:
        assert client.model_name == "tiny" and client.error is None
        config = client.engine_config
        assert config["attached"] == server.url and config["device"] == "cpu"
        assert (config["block_size"], config["num_kv_blocks"], config["max_model_len"]) == (
            4,
            256,
            512,
        )
        state = client.state()
        assert isinstance(state, EngineState) and state.kv_blocks_total == 256
        assert (
            dataclasses.asdict(state).keys()
            == dataclasses.asdict(EngineState.from_dict(server_state(server))).keys()
        )
    finally:
        client.close()
    with pytest.raises(ServerUnavailable, match="refused the API key"):
        RemoteEngineClient.connect(server.url, "wrong")
    with pytest.raises(ServerUnavailable, match="cannot reach the server at http://127.0.0.1:9"):
        RemoteEngineClient.connect("127.0.0.1:9")
    assert base_url("localhost:8000/v1") == "http://localhost:8000"


def test_a_repeated_prompt_reports_its_cached_tokens(server) -> None:
    """The server's usage carries prompt_tokens_details.cached_tokens, so an attached chat shows
    the prefix-cache hit as a local one does."""
    client = RemoteEngineClient.connect(server.url, KEY, poll_interval=0.05)
    messages = [{"role": "user", "content": "Tell me a story about a cat and a red ball."}]
    params = ChatParams(temperature=0.0, max_tokens=4)

    async def reply(request_id: str):
        return [chunk async for chunk in client.chat(messages, params, request_id)][-1]

    try:
        first = asyncio.run(reply("first"))
        second = asyncio.run(reply("second"))
    finally:
        client.close()
    assert first.finished and second.finished and second.text == first.text
    block = ENGINE["block_size"]
    assert second.num_prompt_tokens == first.num_prompt_tokens > block
    assert second.num_cached_tokens == (second.num_prompt_tokens - 1) // block * block


# --- the app ----------------------------------------------------------------------------------


def test_attached_app_chats_monitors_and_cancels(tmp_path: Path, store, server) -> None:
    app = attached_app(tmp_path, store, server.url, max_tokens=12)
    # What the server answers this chat greedily, asked directly.
    messages = [{"role": "user", "content": "Tell me a story about a dog."}]
    expected = httpx.post(
        server.url + "/v1/chat/completions",
        headers={"Authorization": f"Bearer {KEY}"},
        json={"model": "tiny", "messages": messages, "max_tokens": 12, "temperature": 0},
        timeout=60,
    ).json()["choices"][0]["message"]["content"]

    async def main() -> None:
        async with app.run_test(size=(120, 40)) as pilot:
            await wait_for(pilot, lambda: app.handle.status == "ready", what="attached")
            host = server.url.removeprefix("http://")
            assert f"tiny @ {host} cpu float32" in status_bar(app)
            chat = app.query_one(ChatPanel)
            view = chat.active
            view.send(messages[0]["content"])
            await wait_for(pilot, lambda: view._reply is None and len(view.conv.turns) == 2)
            reply = view.conv.turns[1]
            assert reply.status == "complete" and reply.content == expected
            assert reply.stats["tokens"] == 12 and reply.stats["prompt_tokens"] > 0
            assert reply.stats["ttft_s"] > 0 and reply.stats["finish_reason"] == "length"
            session = store.get_session(view.conv.session_id)
            assert session.engine_config["attached"] == server.url

            # A long reply, watched from the monitor: the server's state, its device.
            view.conv.params = dataclasses.replace(view.conv.params, max_tokens=400)
            view.conv.params = dataclasses.replace(view.conv.params, ignore_eos=True)
            await pilot.press("f3")
            monitor = app.query_one(MonitorPanel)
            view.send("And now a very long one.")

            def running() -> bool:
                state = monitor.last_state
                return state is not None and len(state.running) == 1

            await wait_for(pilot, running, what="the reply running in the monitor")
            (request,) = monitor.last_state.running
            assert request.request_id.startswith(f"chatcmpl-{view.request_id}-")
            assert monitor.last_state.kv_blocks_used > 0
            hardware = app.query_one(HardwareView)
            await wait_for(pilot, lambda: hardware.sample is not None, what="a hardware sample")
            assert hardware.sample.remote.device == "cpu" and hardware.sample.host is None
            assert hardware.sample.remote.memory_used > 0
            assert hardware.border_title == "Server"
            rendered = hardware.render().plain
            assert f"Server {server.url} · cpu" in rendered and "RSS" in rendered

            # Esc cancels: the connection closes, the server aborts and frees the blocks.
            await pilot.press("f2")
            await pilot.press("escape")
            await wait_for(pilot, lambda: view._reply is None, what="the cancelled reply")
            assert view.conv.turns[-1].status == "cancelled"
            assert view.conv.turns[-1].stats["finish_reason"] == "abort"

            def freed() -> bool:
                state = server_state(server)
                return not state["running"] and state["kv_blocks_used"] == 0

            await wait_for(pilot, freed, what="the server to free the reply's blocks")
        close_client(app)

    run(main())


def test_the_monitor_aborts_a_chat_of_this_app_on_the_server(tmp_path: Path, store, server) -> None:
    app = attached_app(tmp_path, store, server.url, max_tokens=400, ignore_eos=True)

    async def main() -> None:
        async with app.run_test(size=(120, 40)) as pilot:
            await wait_for(pilot, lambda: app.handle.status == "ready", what="attached")
            view = app.query_one(ChatPanel).active
            view.send("A long reply, to abort from the monitor")
            await pilot.press("f3")
            monitor = app.query_one(MonitorPanel)

            def running() -> bool:
                state = monitor.last_state
                return state is not None and len(state.running) == 1

            await wait_for(pilot, running, what="the reply running in the monitor")
            await pilot.pause(0.3)  # the table shows it
            await pilot.press("down")  # select it: the id the server's engine runs it under
            selected = monitor.query_one(BatchView).selected
            assert selected == monitor.last_state.running[0].request_id
            assert selected.startswith(f"chatcmpl-{view.request_id}-")
            assert not app.handle.client.abort("chatcmpl-another-client-0")  # not this app's
            await pilot.press("x", "y")
            await wait_for(pilot, lambda: view._reply is None, what="the aborted reply")
            assert view.conv.turns[-1].status == "cancelled"
            assert view.conv.turns[-1].stats["finish_reason"] == "abort"

            def freed() -> bool:
                state = server_state(server)
                return not state["running"] and state["kv_blocks_used"] == 0

            await wait_for(pilot, freed, what="the server to free the reply's blocks")
        close_client(app)

    run(main())


def test_the_monitor_aborts_another_clients_request_through_the_server(
    tmp_path: Path, store, server
) -> None:
    """A request this app did not send (another client's stream) is aborted through POST
    /v1/engine/abort: that client's stream ends with finish_reason abort."""
    app = attached_app(tmp_path, store, server.url)
    events: list[str] = []

    def other_client() -> None:
        body = {"prompt": "another client", "max_tokens": 400, "ignore_eos": True, "stream": True}
        headers = {"Authorization": f"Bearer {KEY}"}
        with httpx.stream(
            "POST", server.url + "/v1/completions", json=body, headers=headers, timeout=60
        ) as response:
            events.extend(line[6:] for line in response.iter_lines() if line.startswith("data: "))

    async def main() -> None:
        async with app.run_test(size=(120, 40)) as pilot:
            await wait_for(pilot, lambda: app.handle.status == "ready", what="attached")
            other = asyncio.create_task(asyncio.to_thread(other_client))
            await pilot.press("f3")
            monitor = app.query_one(MonitorPanel)

            def running() -> bool:
                state = monitor.last_state
                return state is not None and len(state.running) == 1

            await wait_for(pilot, running, what="the other client's request in the monitor")
            await pilot.pause(0.3)
            await pilot.press("down")
            assert monitor.query_one(BatchView).selected.startswith("cmpl-")
            await pilot.press("x", "y")
            await asyncio.wait_for(other, timeout=30)
            assert events[-1] == "[DONE]"
            assert json.loads(events[-2])["choices"][0]["finish_reason"] == "abort"
        close_client(app)

    run(main())


def test_attach_to_nothing_or_with_a_wrong_key_is_a_status(tmp_path: Path, store, server) -> None:
    for url, key, message in (
        ("http://127.0.0.1:9", None, "cannot reach the server at http://127.0.0.1:9"),
        (server.url, "wrong", "refused the API key (HTTP 401)"),
    ):
        app = attached_app(tmp_path, store, url, api_key=key)

        async def main(app: WorkbenchApp = app, message: str = message) -> None:
            async with app.run_test(size=(120, 40)) as pilot:
                await wait_for(pilot, lambda: app.handle.status == "failed", what="failure")
                assert "✗ cannot attach:" in status_bar(app) and message in status_bar(app)
                view = app.query_one(ChatPanel).active
                view.send("hello?")  # not sent, with the reason; the app stays up
                await wait_for(pilot, lambda: not view.streaming and not view.conv.turns)
                assert view.prompt.text == "hello?" and store.list_sessions() == []
                await pilot.pause()
                assert any(message in str(n.message) for n in app._notifications)
                await pilot.press("f3")
                status = str(app.query_one("#monitor-status", Static).render())
                assert "cannot attach" in status and message in status

        run(main())


def test_a_server_that_goes_away_shows_in_the_status_bar(tmp_path: Path, store) -> None:
    gone, llm = start_server(api_key=None)
    app = attached_app(tmp_path, store, gone.url, api_key=None)

    async def main() -> None:
        async with app.run_test(size=(120, 40)) as pilot:
            await wait_for(pilot, lambda: app.handle.status == "ready", what="attached")
            gone.stop()
            await wait_for(pilot, lambda: "cannot reach the server" in status_bar(app))
            view = app.query_one(ChatPanel).active
            view.send("still there?")  # a first message that reached no server keeps no session
            await wait_for(pilot, lambda: not view.streaming and not view.conv.turns)
            assert view.prompt.text == "still there?" and store.list_sessions() == []
            await pilot.pause()
            assert any("cannot reach the server" in str(n.message) for n in app._notifications)
        close_client(app)

    try:
        run(main())
    finally:
        llm.shutdown()


def test_launch_attach_refuses_engine_options(capsys) -> None:
    for argv, named in (
        (["--attach", "http://h:8000", "--block-size", "4"], "--block-size: not with --attach"),
        (["--attach", "http://h:8000", "--model", "tiny"], "--model: not with --attach"),
        (["--attach", "ftp://h"], "http:// or https://"),
        (["--api-key", "k"], "--api-key: only with --attach"),
    ):
        assert main(["launch", *argv]) == 2
        err = capsys.readouterr().err
        assert err.startswith("workbench: error: ") and named in err and err.count("\n") == 1
