"""Snapshots of each panel at fixed sizes (pytest-textual-snapshot's snap_compare).

Deterministic by construction: a real engine that stays idle, chats and sessions loaded from a
store with frozen timestamps, and a monitor that does not poll but is fed fixed samples.
Update after an intended change with `pytest tests/test_tui_snapshots.py --snapshot-update`.
"""
# ruff: noqa: F811  (pytest fixtures imported from test_tui_support are arguments here)

from __future__ import annotations

from pathlib import Path

import pytest
from build_support import seed_builds
from test_tui_support import (  # noqa: F401  (fixtures)
    _isolated_home,
    app_for,
    fixed_hardware,
    fixed_states,
    seed_bench_runs,
    set_times,
    snapshot_client,
)
from textual.pilot import Pilot
from textual.widgets import Input, TextArea

from panels.build import BuildPanel
from panels.chat import ChatPanel
from panels.hardware import FixedHardware
from panels.monitor import MonitorPanel
from store import open_store
from workbench.app import WorkbenchApp

WIDE, NARROW = (120, 40), (80, 24)

REPLY = """\
Boil it in plenty of salted water for **9–11 minutes**, then taste. For a quick sauce:

```python
def sauce(garlic: int = 2) -> str:
    return f"olive oil, {garlic} cloves of garlic, chili"
```

Drain it a minute early and finish it in the pan.\
"""


@pytest.fixture
def store():
    """In memory: the help screen shows where the store is, and that must not vary."""
    with open_store(":memory:") as s:
        yield s


def seed_sessions(store) -> int:
    """Three saved chats; returns the id of the one with a reply and stats."""
    sampling = {"temperature": 0.7, "top_p": 0.95, "top_k": 0, "max_tokens": 256, "seed": 7}
    engine = {"block_size": 4, "num_kv_blocks": 128, "device": "cpu", "dtype": "float32"}
    a = store.create_session("Weekend plans", "tiny", engine, sampling)
    store.add_message(a, "user", "Ideas for a rainy Saturday?")
    sid = store.create_session("Cooking spaghetti", "tiny", engine, sampling, "Be concise.")
    user = store.add_message(sid, "user", "How long do I boil spaghetti?")
    stats = {
        "tokens": 58,
        "prompt_tokens": 31,
        "cached_tokens": 0,
        "ttft_s": 0.042,
        "tokens_per_s": 87.3,
        "finish_reason": "stop",
    }
    store.add_message(sid, "assistant", REPLY, user, stats=stats)
    b = store.create_session("Haiku about the sea", "tiny", engine, sampling)
    prompt = store.add_message(b, "user", "Write a haiku about the sea")
    store.add_message(b, "assistant", "Grey waves fold and", prompt, status="streaming")
    set_times(store)
    return sid


def make_app(tmp_path: Path, store, client, gpus: bool = False) -> WorkbenchApp:
    """The app, with a monitor that shows only what the test feeds it."""
    app = app_for(
        tmp_path,
        store,
        client,
        hardware=FixedHardware(fixed_hardware(0, gpus)),
        monitor_interval=0,
        chat={"temperature": 0.7, "top_p": 0.95, "max_tokens": 256},
    )
    app.settings.config_file = Path("~/.config/workbench/config.toml")
    return app


async def steady(pilot: Pilot) -> None:
    """No blinking cursors; let pending work settle."""
    await pilot.app.workers.wait_for_complete()
    for widget in pilot.app.query(Input):
        widget.cursor_blink = False
    for widget in pilot.app.query(TextArea):
        widget.cursor_blink = False
    await pilot.pause()


async def open_chat(pilot: Pilot, sid: int) -> None:
    await pilot.app.query_one(ChatPanel).open_session(sid)
    await steady(pilot)


def feed_monitor(pilot: Pilot, gpus: bool) -> None:
    monitor = pilot.app.query_one(MonitorPanel)
    for i, state in enumerate(fixed_states()):
        monitor.record(fixed_hardware(i, gpus), state)


def test_chat_panel(snap_compare, tmp_path: Path, store, snapshot_client) -> None:
    sid = seed_sessions(store)
    app = make_app(tmp_path, store, snapshot_client)
    assert snap_compare(app, terminal_size=WIDE, run_before=lambda p: open_chat(p, sid))


def test_chat_panel_narrow(snap_compare, tmp_path: Path, store, snapshot_client) -> None:
    sid = seed_sessions(store)
    app = make_app(tmp_path, store, snapshot_client)
    assert snap_compare(app, terminal_size=NARROW, run_before=lambda p: open_chat(p, sid))


def test_monitor_panel_gpu(snap_compare, tmp_path: Path, store, snapshot_client) -> None:
    app = make_app(tmp_path, store, snapshot_client, gpus=True)

    async def run_before(pilot: Pilot) -> None:
        await pilot.press("f3")
        feed_monitor(pilot, gpus=True)
        await steady(pilot)

    assert snap_compare(app, terminal_size=WIDE, run_before=run_before)


def test_monitor_panel_no_gpu_narrow(snap_compare, tmp_path: Path, store, snapshot_client) -> None:
    app = make_app(tmp_path, store, snapshot_client, gpus=False)

    async def run_before(pilot: Pilot) -> None:
        await pilot.press("f3")
        feed_monitor(pilot, gpus=False)
        await steady(pilot)

    assert snap_compare(app, terminal_size=NARROW, run_before=run_before)


def test_monitor_panel_gpu_narrow_selected(
    snap_compare, tmp_path: Path, store, snapshot_client
) -> None:
    """80x24 with a GPU: the short layout keeps the block map and the batch table on screen, and
    the selected request shows."""
    app = make_app(tmp_path, store, snapshot_client, gpus=True)

    async def run_before(pilot: Pilot) -> None:
        await pilot.press("f3")
        feed_monitor(pilot, gpus=True)
        await pilot.press("down", "down")
        await steady(pilot)

    assert snap_compare(app, terminal_size=NARROW, run_before=run_before)


def test_sessions_panel(snap_compare, tmp_path: Path, store, snapshot_client) -> None:
    seed_sessions(store)
    app = make_app(tmp_path, store, snapshot_client)

    async def run_before(pilot: Pilot) -> None:
        await pilot.press("f4")
        await steady(pilot)
        await pilot.press("down")  # the spaghetti session, with its preview
        await steady(pilot)

    assert snap_compare(app, terminal_size=WIDE, run_before=run_before)


def test_sessions_panel_narrow(snap_compare, tmp_path: Path, store, snapshot_client) -> None:
    """80x24: the list above the preview, which opens on the conversation."""
    seed_sessions(store)
    app = make_app(tmp_path, store, snapshot_client)

    async def run_before(pilot: Pilot) -> None:
        await pilot.press("f4")
        await steady(pilot)
        await pilot.press("down")
        await steady(pilot)

    assert snap_compare(app, terminal_size=NARROW, run_before=run_before)


def build_app(tmp_path: Path, store, client) -> WorkbenchApp:
    """Four recorded builds (failed, complete, running, complete) and a fixed data dir, so the
    default output directory is the same on every machine."""
    seed_builds(store)
    app = make_app(tmp_path, store, client)
    app.settings.data_dir = Path("/home/user/.local/share/workbench")
    return app


async def show_builds(pilot: Pilot) -> None:
    await pilot.press("f5")
    await steady(pilot)
    panel = pilot.app.query_one(BuildPanel)
    panel.marked = {2, 4}  # int4_awq and w4a8_awq side by side
    panel.reload()
    await steady(pilot)
    panel.query_one("#build-model", Input).focus()
    await steady(pilot)


def test_build_panel(snap_compare, tmp_path: Path, store, snapshot_client) -> None:
    app = build_app(tmp_path, store, snapshot_client)
    assert snap_compare(app, terminal_size=WIDE, run_before=show_builds)


def test_build_panel_narrow(snap_compare, tmp_path: Path, store, snapshot_client) -> None:
    app = build_app(tmp_path, store, snapshot_client)
    assert snap_compare(app, terminal_size=NARROW, run_before=show_builds)


def test_bench_panel(snap_compare, tmp_path: Path, store, snapshot_client) -> None:
    seed_bench_runs(store)
    app = make_app(tmp_path, store, snapshot_client)

    async def run_before(pilot: Pilot) -> None:
        await pilot.press("f6")
        await steady(pilot)

    assert snap_compare(app, terminal_size=WIDE, run_before=run_before)
