"""The batch: running, waiting and preempted requests, the last steps' composition, and the
prompt and generation throughput over time.

The request table has a selection (`selected`, a request id) that the Monitor panel moves with
↑/↓ and aborts: rows are keyed by request id, so it stays on its request while the table refreshes
several times a second, and it is dropped when that request leaves the batch."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import DataTable, Static

from panels.format import seconds
from panels.widgets import QuietStatic
from panels.widgets.block_map import GLYPH_OWNED, OwnerColors
from panels.widgets.history import History
from panels.widgets.plots import HistoryPlot
from panels.widgets.step_bars import DECODE_STYLE, PREFILL_STYLE, StepBars, StepColumn

if TYPE_CHECKING:
    from engine.state import EngineState, RequestState

COLUMNS = ("request", "state", "prompt", "gen", "blocks", "tok/s")


class BatchView(Vertical):
    def __init__(self, colors: OwnerColors, **kwargs: str) -> None:
        super().__init__(**kwargs)
        self.border_title = "Batch"
        self.owner_colors = colors
        self.prompt_tp = History()
        self.gen_tp = History()
        self._statics = QuietStatic()
        self._rows: list[tuple[Text | str, ...]] | None = None  # the rows shown; None: none yet
        self._ids: list[str] = []  # the request id of each row, in order; [] when idle
        self.selected: str | None = None  # the request the cursor is on; None: no cursor

    def compose(self) -> ComposeResult:
        yield Static("waiting for the engine…", classes="batch-summary")
        table: DataTable[str | Text] = DataTable(
            classes="batch-requests", cursor_type="row", show_cursor=False, zebra_stripes=True
        )
        table.can_focus = False  # the panel keeps the focus and moves the selection
        self._columns = table.add_columns(*COLUMNS)
        yield table
        yield Static("", classes="batch-last-step")
        yield StepBars(classes="batch-steps")
        legend = Text()
        legend.append("      █ ", style=PREFILL_STYLE)
        legend.append("prefill-chunk tokens  ")
        legend.append("█ ", style=DECODE_STYLE)
        legend.append("decode tokens  (one column per step, newest right)")
        yield Static(legend, classes="batch-legend")
        yield HistoryPlot("throughput", "tok/s", classes="batch-plot")

    def add(self, state: EngineState) -> None:
        """Record a sample in the histories (always, shown or not)."""
        self.prompt_tp.add(state.prompt_throughput)
        self.gen_tp.add(state.generation_throughput)

    def show(self, state: EngineState, interval: float) -> None:
        """Show a sample (only while the panel is on screen: layout is not free)."""
        summary = Text()
        for name, group in (
            ("running", state.running),
            ("waiting", state.waiting),
            ("preempted", state.preempted),
        ):
            summary.append(f"{name} ", style="dim")
            summary.append(f"{len(group)}  ", style="bold")
        summary.append(f"\nstep {state.step} · {state.num_preemptions} preemptions so far")
        self._statics.update(self.query_one(".batch-summary", Static), summary)
        self._table([*state.running, *state.waiting, *state.preempted])
        self._statics.update(self.query_one(".batch-last-step", Static), self._last_step(state))
        self.query_one(StepBars).show(
            [StepColumn(s.prefill_tokens, s.decode_tokens) for s in state.recent_steps]
        )
        self.query_one(HistoryPlot).show(
            {"prompt": self.prompt_tp.values, "generation": self.gen_tp.values}, interval
        )

    def select(self, step: int) -> None:
        """Move the selection `step` rows down (up if negative); with none yet, ↓ selects the
        first request and ↑ the last."""
        if not self._ids:
            return
        if self.selected in self._ids:
            row = self._ids.index(self.selected) + step
        else:
            row = 0 if step > 0 else len(self._ids) - 1
        self.selected = self._ids[max(0, min(row, len(self._ids) - 1))]
        self._show_selection()

    def _table(self, requests: list[RequestState]) -> None:
        ids = [r.request_id for r in requests]
        rows = [
            (
                Text.assemble((f"{GLYPH_OWNED} ", self._color(r)), r.request_id),
                r.state,
                str(r.prompt_len),
                str(r.generated),
                str(r.blocks_held),
                f"{r.tokens_per_s:.1f}" if r.tokens_per_s else "–",
            )
            for r in requests
        ]
        if ids == self._ids and rows == self._rows:
            return  # an idle engine, or nothing new: nothing to redo
        table: DataTable[str | Text] = self.query_one(DataTable)
        if ids and ids == self._ids and self._rows:  # the same requests: only their numbers changed
            for rid, old, new in zip(ids, self._rows, rows, strict=True):
                for column, was, now in zip(self._columns, old, new, strict=True):
                    if was != now:
                        table.update_cell(rid, column, now, update_width=True)
        else:
            table.clear()
            for rid, row in zip(ids, rows, strict=True):
                table.add_row(*row, key=rid)
            if not rows:
                table.add_row(Text("idle: no requests", style="dim"), "", "", "", "", "")
        self._ids, self._rows = ids, rows
        if self.selected not in ids:
            self.selected = None
        self._show_selection()

    def _show_selection(self) -> None:
        table: DataTable[str | Text] = self.query_one(DataTable)
        table.show_cursor = self.selected is not None
        if self.selected is not None:
            table.move_cursor(row=self._ids.index(self.selected))

    def _color(self, r: RequestState) -> str:
        return self.owner_colors.color(r.request_id) if r.state == "running" else "dim"

    @staticmethod
    def _last_step(state: EngineState) -> Text:
        step = state.last_step
        text = Text()
        if step is None:
            return Text("no step yet", style="dim")
        text.append("last step ", style="dim")
        text.append(f"#{step.index}: ")
        text.append(f"{step.prefill_tokens}", style=f"bold {PREFILL_STYLE}")
        text.append(" prefill + ")
        text.append(f"{step.decode_tokens}", style=f"bold {DECODE_STYLE}")
        text.append(" decode tokens")
        text.append(f"\nbatch {step.batch_size} · {seconds(step.duration_s)}")
        text.append(
            f"\nthroughput: prompt {state.prompt_throughput:.1f} · "
            f"generation {state.generation_throughput:.1f} tok/s"
        )
        if state.spec_acceptance_rate is not None:
            text.append(  # two lines: the Static does not wrap (it redraws without a layout)
                f"\nspeculation: acceptance {100 * state.spec_acceptance_rate:.1f}%\n"
                f"{state.spec_mean_accepted:.2f} tokens per verify step"
            )
        return text
