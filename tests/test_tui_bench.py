"""The Bench panel (F6): saved benchmark runs, offline and online, and the selected one in full."""
# ruff: noqa: F811  (pytest fixtures imported from test_tui_support are arguments here)

from __future__ import annotations

from pathlib import Path

from test_tui_support import (  # noqa: F401  (fixtures)
    _isolated_home,
    app_for,
    engine_client,
    run,
    seed_bench_runs,
    store,
    tui_model,
)
from textual.widgets import DataTable, Static

from panels.bench import BenchPanel, run_details, run_row
from store import BenchRun


def text(app, selector: str) -> str:
    return str(app.query_one(selector, Static).render())


def test_bench_panel_lists_runs_and_shows_the_selected_one(
    tmp_path: Path, store, engine_client
) -> None:
    app = app_for(tmp_path, store, engine_client)

    async def main() -> None:
        async with app.run_test(size=(120, 40)) as pilot:
            await pilot.press("f6")
            panel = app.query_one(BenchPanel)
            await app.workers.wait_for_complete()
            await pilot.pause()
            table = panel.query_one(DataTable)
            assert table.row_count == 0 and app.focused is table
            assert "No benchmark runs yet" in text(app, "#bench-info")
            assert not panel.query_one("#bench-detail").display

            seed_bench_runs(store)  # saved from another terminal: r rereads them
            await pilot.press("r")
            await app.workers.wait_for_complete()
            await pilot.pause()
            assert table.row_count == 2
            assert "2 runs (1 offline, 1 online)" in text(app, "#bench-info")
            newest = [str(cell) for cell in table.get_row_at(0)]
            assert newest[2:] == [
                "online", "tiny", "128→128 4/s c16", "2.40", "307.2", "85.50", "22.50",
                "1.60", "2",
            ]  # fmt: skip
            head = text(app, "#bench-detail-head")
            assert "Run #2 · online · tiny" in head and "--request-rate 4" in head
            assert "Poisson 4/s, max concurrency 16 (peak 16)" in head
            totals = text(app, "#bench-detail-totals")
            assert "failed          2" in totals and "20/30 within TTFT ≤ 200 ms" in totals
            latencies = text(app, "#bench-detail-latencies")
            assert "ITL" in latencies and "2 × HTTP 400: the prompt is too long" in latencies

            await pilot.press("down")
            await pilot.pause()
            assert "Run #1 · offline · tiny" in text(app, "#bench-detail-head")
            totals = text(app, "#bench-detail-totals")
            assert "ours / HF       2.18x" in totals and "engine steps    530" in totals
            assert "ITL" not in text(app, "#bench-detail-latencies")

    run(main())


def test_rows_and_details_of_sparse_runs_do_not_fail() -> None:
    """Runs saved by older versions (or by hand) may lack any field."""
    for kind in ("offline", "online"):
        bare = BenchRun(1, kind, "org/model", {"batch": 8}, {"tok_s": 1.0}, "2025-05-01")
        row = run_row(bare)
        assert row[3] == "model" and row[5] == "-"
        details = run_details(bare)
        assert "Run #1" in details.head
