"""Regenerate screenshots/*.svg: each panel of the real app, driven headless on a live engine.

    python scripts/screenshots.py [--model tiny] [--out screenshots] [--size 120x40]

Two chats generate at once (so the monitor shows batching, KV blocks and throughput), then the
chat, monitor, sessions and build panels (after two real builds: fp8 and int4_awq) and the F1
help are saved as SVG. Uses the bundled model when it is there, else a tiny random-weight
checkpoint (whose replies are noise). Everything it writes besides the SVGs goes to a temporary
WORKBENCH_HOME.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MAX_TOKENS = 240  # ignore_eos: both replies run this long, so the monitor catches them batched
PROMPTS = (
    "Explain in two sentences why a paged KV cache helps batching.",
    "Write a haiku about a GPU.",
)


def default_model() -> str:
    bundled = ROOT / "engine" / "bundled" / "tiny"
    if (bundled / "config.json").is_file():
        return "tiny"
    sys.path.insert(0, str(ROOT / "tests"))
    from tiny_checkpoints import cached_tiny_checkpoint

    path = cached_tiny_checkpoint(Path(tempfile.gettempdir()) / "workbench-screenshots", "llama3")
    print(f"no bundled model yet: using a random-weight checkpoint ({path})")
    return str(path)


async def until(pilot, condition: Callable[[], bool], timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("the app did not get there in time")
        await pilot.pause(0.1)


async def build_engines(pilot, app, model: str) -> None:
    """Two real builds from the Build panel (fp8, then int4_awq), then both side by side."""
    from textual.widgets import Input, Select

    from panels.build import BuildPanel

    panel = app.query_one(BuildPanel)
    panel.query_one("#build-model", Input).value = model
    ids = []
    for recipe in ("fp8", "int4_awq"):
        panel.query_one("#build-recipe", Select).value = recipe
        panel.query_one("#build-calib", Input).value = "16"
        await pilot.pause()
        panel.action_start()
        await until(pilot, lambda: panel.process is not None and not panel.process.running, 900)
        ids.append(panel.process.build_id)
    await pilot.pause(1.0)
    panel.marked = set(ids)
    panel.reload()
    await pilot.pause(1.0)


async def shoot(model: str, out: Path, size: tuple[int, int], home: Path) -> list[Path]:
    from textual.widgets import Input, TextArea

    from panels.chat import ChatPanel
    from panels.client import ChatParams
    from panels.monitor import MonitorPanel
    from store import open_store
    from workbench.app import WorkbenchApp
    from workbench.settings import Settings

    settings = Settings(
        model=model,
        chat=ChatParams(
            temperature=0.7, top_p=0.95, max_tokens=MAX_TOKENS, seed=1, ignore_eos=True
        ),
        engine={"block_size": 8, "num_kv_blocks": 192},
        monitor_interval=0.25,
        db_path=home / "workbench.db",
        data_dir=home,
    )
    written: list[Path] = []
    with open_store(settings.db_path) as store:
        app = WorkbenchApp(settings, store)
        async with app.run_test(size=size) as pilot:

            async def save(name: str) -> None:
                for widget in app.query(Input):
                    widget.cursor_blink = False
                for widget in app.query(TextArea):
                    widget.cursor_blink = False
                await pilot.pause(0.3)
                path = out / f"{name}.svg"
                path.write_text(app.export_screenshot(title=f"Workbench: {name}"), "utf-8")
                written.append(path)

            await until(pilot, lambda: app.handle.status != "loading")
            if app.handle.status == "failed":
                raise SystemExit(f"the model failed to load: {app.handle.error}")
            chat = app.query_one(ChatPanel)
            first = chat.active
            first.send(PROMPTS[0])
            second = await chat.add_chat()
            second.send(PROMPTS[1])
            await pilot.press("f3")
            monitor = app.query_one(MonitorPanel)

            def halfway() -> bool:  # both still running, with some history in the plots
                state = monitor.last_state
                running = state.running if state else ()
                return len(running) == 2 and min(r.generated for r in running) >= MAX_TOKENS // 2

            await until(pilot, halfway)
            monitor.action_toggle_pause()  # hold that moment (on a GPU the replies end fast)
            await save("monitor")
            monitor.action_toggle_pause()
            await until(pilot, lambda: not first.streaming and not second.streaming)
            await pilot.press("f2")
            chat.switch_to(first)
            await save("chat")
            await pilot.press("f4")
            await pilot.pause(0.5)
            await save("sessions")
            await pilot.press("f5")
            await build_engines(pilot, app, model)
            await save("build")
            await pilot.press("f2", "f1")
            await save("help")
    return written


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="default: the bundled model, else a random tiny one")
    parser.add_argument("--out", type=Path, default=ROOT / "screenshots")
    parser.add_argument("--size", default="120x40", help="COLUMNSxROWS (default: 120x40)")
    args = parser.parse_args()
    columns, rows = (int(n) for n in args.size.lower().split("x"))
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="workbench-screenshots-") as home:
        os.environ["WORKBENCH_HOME"] = home  # no trace in the user's config or data dirs
        model = args.model or default_model()
        written = asyncio.run(shoot(model, args.out, (columns, rows), Path(home)))
    for path in written:
        print(f"wrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
