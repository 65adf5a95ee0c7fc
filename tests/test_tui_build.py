"""The Build panel on the real app: start a build and follow it to the end, cancel one, compare
recorded builds. Builds are real `workbench build` child processes on the bundled model."""

# ruff: noqa: F811  (pytest fixtures imported from the support modules are arguments here)

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from build_support import eval_text, seed_builds  # noqa: F401  (fixtures)
from test_tui_support import (  # noqa: F401  (fixtures)
    _isolated_home,
    app_for,
    engine_client,
    run,
    store,
    tui_model,
    wait_for,
)
from textual.widgets import DataTable, Input, ProgressBar, Select

from engine.model import engine_dir
from panels.build import BuildPanel
from panels.build_format import compare_rows
from panels.widgets.stage_progress import STAGES, StageProgress

FAST = ("--calib-seq-len", "128", "--calib-batch-size", "4", "--eval-window", "256")
FAST += ("--threads", "1")
SLOW = ("--calib-seq-len", "64", "--calib-batch-size", "1", "--no-eval", "--threads", "1")


def log_text(panel: BuildPanel) -> str:
    return "\n".join(panel.log_lines)


def bars(panel: BuildPanel) -> dict[str, float]:
    progress = panel.query_one(StageProgress)
    return {s: progress.row(s).query_one(ProgressBar).progress for s in STAGES}


async def fill_form(pilot, panel: BuildPanel, recipe: str, samples: str, out: Path) -> None:
    panel.query_one("#build-recipe", Select).value = recipe
    calib = panel.query_one("#build-calib", Input)
    calib.value = samples
    await pilot.pause()
    panel.query_one("#build-out", Input).value = str(out)
    await pilot.pause()
    panel.query_one("#build-model", Input).value = "tiny"  # no longer changes the typed output
    await pilot.pause()
    assert panel.query_one("#build-out", Input).value == str(out)


def test_start_a_build_and_follow_it_to_the_list(
    tmp_path: Path, store, engine_client, eval_text
) -> None:
    app = app_for(tmp_path, store, engine_client)
    out = tmp_path / "engines" / "tiny-fp8-panel"

    async def main() -> None:
        async with app.run_test(size=(120, 40)) as pilot:
            await pilot.press("f5")
            panel = app.query_one(BuildPanel)
            panel.extra_args = (*FAST, "--eval-text", str(eval_text))
            output = panel.query_one("#build-out", Input)
            assert output.value == str(tmp_path / "engines" / "tiny-fp8")
            panel.query_one("#build-kv", Select).value = "int8"
            await pilot.pause()
            assert output.value == str(tmp_path / "engines" / "tiny-fp8-kvint8")  # it follows
            panel.query_one("#build-kv", Select).value = "auto"
            await fill_form(pilot, panel, "fp8", "4", out)
            await pilot.press("ctrl+s")
            assert panel.process is not None and panel.process.running
            await wait_for(pilot, lambda: not panel.process.running, 300, "the build to end")
            await wait_for(pilot, lambda: panel.process.build_id in panel.builds, 30, "the list")
            await app.workers.wait_for_complete()
            await pilot.pause()
            assert panel.process.proc.returncode == 0, log_text(panel)
            assert bars(panel) == dict.fromkeys(STAGES, 1.0)
            text = log_text(panel)
            for i, stage in enumerate(STAGES):
                assert f"[{i + 1}/5] {stage}" in text  # the child's own progress lines
            assert "Inserted" in text  # and ModelOpt's, which it logs with --verbose
            assert f"serve it with: workbench launch --model {out}" in text
            build = store.get_build(panel.process.build_id)
            assert (build.status, build.recipe, build.out_dir) == ("complete", "fp8", str(out))
            assert engine_dir.is_engine_dir(out)
            table = panel.query_one("#build-table", DataTable)
            assert table.row_count == 1 and table.get_row_at(0)[6].plain == "complete"
            compare = panel.query_one("#build-compare", DataTable)
            assert compare.display and compare.border_title == f"Build #{build.id}"

    run(main())


def test_cancel_stops_the_build_and_leaves_no_engine(tmp_path: Path, store, engine_client) -> None:
    app = app_for(tmp_path, store, engine_client)
    out = tmp_path / "engines" / "cancelled"

    async def main() -> None:
        async with app.run_test(size=(120, 40)) as pilot:
            await pilot.press("f5")
            panel = app.query_one(BuildPanel)
            panel.extra_args = SLOW
            await fill_form(pilot, panel, "int4_awq", "64", out)
            await pilot.press("ctrl+s")
            progress = panel.query_one(StageProgress)
            await wait_for(pilot, lambda: progress.current == "calibrate", 120, "calibration")
            await wait_for(pilot, lambda: bars(panel)["calibrate"] > 0, 60, "a batch")
            await pilot.press("escape")
            await wait_for(pilot, lambda: not panel.process.running, 60, "the build to stop")
            await app.workers.wait_for_complete()
            await pilot.pause()
            assert panel.process.proc.returncode == 130
            assert "cancelled: no engine written" in log_text(panel)
            assert not out.exists() and not list(out.parent.glob(".cancelled.*"))
            build = store.get_build(panel.process.build_id)
            assert (build.status, build.stage) == ("cancelled", "calibrate")
            assert not panel.query_one("#build-start").disabled

    run(main())


def test_bad_form_input_starts_nothing(tmp_path: Path, store, engine_client) -> None:
    app = app_for(tmp_path, store, engine_client)

    async def main() -> None:
        async with app.run_test(size=(120, 40)) as pilot:
            await pilot.press("f5")
            panel = app.query_one(BuildPanel)
            panel.query_one("#build-calib", Input).value = "0"
            await pilot.press("ctrl+s")
            await pilot.pause()
            assert panel.process is None
            assert any("Samples must be" in n.message for n in app._notifications)
            panel.query_one("#build-calib", Input).value = "8"
            panel.query_one("#build-model", Input).value = " "
            await pilot.press("ctrl+s")
            assert panel.process is None

    run(main())


def test_mark_builds_to_compare_them(tmp_path: Path, store, engine_client) -> None:
    ids = seed_builds(store)
    app = app_for(tmp_path, store, engine_client)

    async def main() -> None:
        async with app.run_test(size=(120, 40)) as pilot:
            await pilot.press("f5")
            panel = app.query_one(BuildPanel)
            await app.workers.wait_for_complete()
            await pilot.pause()
            table = panel.query_one("#build-table", DataTable)
            compare = panel.query_one("#build-compare", DataTable)
            assert table.row_count == len(ids)
            table.focus()
            assert compare.border_title == f"Build #{max(ids)}"  # the highlighted one
            await pilot.press("space", "down", "down", "space")
            assert panel.marked == {ids[-1], ids[-3]}
            assert [c.label.plain for c in compare.ordered_columns][1:] == [
                f"#{ids[-3]} int4_awq",
                f"#{ids[-1]} w4a8_awq",
            ]
            assert compare.border_title == "Compare"
            assert table.get_row_at(0)[0].plain == "●"
            await pilot.press("space")  # unmark the highlighted one
            assert panel.marked == {ids[-1]}

    run(main())


def test_compare_rows_cope_with_partial_reports(store) -> None:
    seed_builds(store)
    builds = store.list_builds()
    columns, rows = compare_rows(builds)
    assert len(columns) == len(builds) + 1
    table = {row[0].plain: [c.plain for c in row[1:]] for row in rows}
    by_recipe = {b.recipe: i for i, b in enumerate(builds)}
    assert table["Δ ppl"][by_recipe["int4_awq"]] == "+1.18% ✓"
    assert table["ppl build"][by_recipe["fp8"]] == "-"  # the failed build has no report
    assert table["status"][by_recipe["fp8"]].startswith("failed (RuntimeError")
    assert table["calibrate (s)"][by_recipe["int4_awq"]] == "39.8"
    assert table["status"][by_recipe["int8_sq"]] == "calibrate…"
    assert os.getpid() == store.get_build(builds[by_recipe["int8_sq"]].id).pid


def test_a_build_killed_elsewhere_turns_failed_without_a_reload(
    tmp_path: Path, store, engine_client
) -> None:
    """A build started from another terminal and killed there (SIGKILL: it records nothing)
    shows as failed within a few seconds, with the panel left open."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    build_id = store.record_build("tiny", "fp8", "auto", str(tmp_path / "e"), pid=child.pid)
    app = app_for(tmp_path, store, engine_client)

    async def main() -> None:
        async with app.run_test(size=(120, 40)) as pilot:
            await pilot.press("f5")
            panel = app.query_one(BuildPanel)
            await wait_for(pilot, lambda: build_id in panel.builds, what="the list")
            assert panel.builds[build_id].status == "running"
            child.kill()
            child.wait()
            dead = lambda: panel.builds[build_id].status == "failed"  # noqa: E731
            await wait_for(pilot, dead, timeout=10, what="the dead build")

    try:
        run(main())
    finally:
        child.kill()


@pytest.mark.parametrize("size", [(120, 40), (80, 24)])
def test_the_log_wraps_long_lines_and_echoes_the_whole_command(
    tmp_path: Path, store, engine_client, size: tuple[int, int]
) -> None:
    app = app_for(tmp_path, store, engine_client)
    line = "calibrated 12 layers; " * 6 + "kept in float16: lm_head"

    async def main() -> None:
        async with app.run_test(size=size) as pilot:
            await pilot.press("f5")
            panel = app.query_one(BuildPanel)
            command = panel.options().command_line()
            assert "--kv-cache-dtype auto" in command and command.startswith("workbench build ")
            panel._log(f"$ {command}")
            panel._log(line)
            await pilot.pause()
            log = panel.log_view
            width = log.scrollable_content_region.width
            assert all(strip.cell_length <= width for strip in log.lines)  # nothing cut off
            shown = " ".join(strip.text.strip() for strip in log.lines)
            assert "kept in float16: lm_head" in shown and "--kv-cache-dtype auto" in shown

    run(main())
