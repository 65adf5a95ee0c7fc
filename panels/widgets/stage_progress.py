"""A progress bar per build stage (load, calibrate, quantize, export, evaluate), each with its
state: waiting, the latest progress message, or the time it took and its summary."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.markup import escape
from textual.widgets import ProgressBar, Static

STAGES = ("load", "calibrate", "quantize", "export", "evaluate")


class StageRow(Horizontal):
    def __init__(self, stage: str) -> None:
        super().__init__(classes="stage-row")
        self.stage = stage

    def compose(self) -> ComposeResult:
        yield Static(self.stage, classes="stage-name")
        yield ProgressBar(total=1.0, show_eta=False, show_percentage=True, classes="stage-bar")
        yield Static("[$text-muted]waiting[/]", classes="stage-note")

    def show(self, fraction: float, note: str) -> None:
        self.query_one(ProgressBar).update(progress=fraction)
        self.query_one(".stage-note", Static).update(note)


class StageProgress(Vertical):
    """`reset()` before a build, `apply(event)` for each of its JSON events."""

    current: str | None = None  # the stage that started and has not ended

    def compose(self) -> ComposeResult:
        for stage in STAGES:
            yield StageRow(stage)

    def row(self, stage: str) -> StageRow:
        return next(r for r in self.query(StageRow) if r.stage == stage)

    def reset(self) -> None:
        self.current = None
        for row in self.query(StageRow):
            row.show(0.0, "[$text-muted]waiting[/]")

    def apply(self, event: dict) -> None:
        stage = event.get("stage")
        if stage not in STAGES:
            return
        kind = event.get("event")
        message = escape(str(event.get("message", "")))
        if kind == "start":
            self.current = stage
            self.row(stage).show(0.0, message)
        elif kind == "progress":
            self.row(stage).show(float(event.get("fraction", 0.0)), message)
        elif kind == "end":
            self.current = None
            elapsed = float(event.get("elapsed_s", 0.0))
            self.row(stage).show(1.0, f"[$success]{elapsed:.1f} s [/]{message}")

    def stop(self, why: str) -> None:
        """The build ended before the current stage did (it failed or was cancelled)."""
        if self.current is not None:
            row = self.row(self.current)
            row.show(row.query_one(ProgressBar).progress or 0.0, f"[$error]{escape(why)}[/]")
            self.current = None
