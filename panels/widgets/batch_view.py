"""The batch: running, waiting and preempted requests, the last steps' composition, and the
prompt and generation throughput over time."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import DataTable, Static

from panels.format import seconds
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

    def compose(self) -> ComposeResult:
        yield Static("waiting for the engine…", classes="batch-summary")
        table: DataTable[str | Text] = DataTable(
            classes="batch-requests", cursor_type="none", zebra_stripes=True
        )
        table.add_columns(*COLUMNS)
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
        summary.append(f"· step {state.step} · preemptions {state.num_preemptions}")
        self.query_one(".batch-summary", Static).update(summary)
        self._table([*state.running, *state.waiting, *state.preempted])
        self.query_one(".batch-last-step", Static).update(self._last_step(state))
        self.query_one(StepBars).show(
            [StepColumn(s.prefill_tokens, s.decode_tokens) for s in state.recent_steps]
        )
        self.query_one(HistoryPlot).show(
            {"prompt": self.prompt_tp.values, "generation": self.gen_tp.values}, interval
        )

    def _table(self, requests: list[RequestState]) -> None:
        table: DataTable[str | Text] = self.query_one(DataTable)
        table.clear()
        for r in requests:
            color = self.owner_colors.color(r.request_id) if r.state == "running" else "dim"
            table.add_row(
                Text.assemble((f"{GLYPH_OWNED} ", color), r.request_id),
                r.state,
                str(r.prompt_len),
                str(r.generated),
                str(r.blocks_held),
                f"{r.tokens_per_s:.1f}" if r.tokens_per_s else "–",
            )
        if not requests:
            table.add_row(Text("idle: no requests", style="dim"), "", "", "", "", "")

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
        text.append(f" decode tokens · batch {step.batch_size} · {seconds(step.duration_s)}")
        text.append(
            f"\nthroughput: prompt {state.prompt_throughput:.1f} tok/s · "
            f"generation {state.generation_throughput:.1f} tok/s"
        )
        return text
