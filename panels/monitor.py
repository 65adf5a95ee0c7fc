"""The Monitor panel: GPU (or CPU and RAM), the KV cache and the batch, live at 2 Hz or faster.

It reads only the engine's published `EngineState` snapshots and the hardware source; sampling
the hardware runs in a worker thread, so a slow driver call never stalls the UI.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.markup import escape
from textual.widgets import Static

from panels.client import EngineHandle
from panels.hardware import HardwareSample, HardwareSource, SystemHardware
from panels.widgets import shown
from panels.widgets.batch_view import BatchView
from panels.widgets.block_map import BlockMap, OwnerColors
from panels.widgets.dialogs import Confirm
from panels.widgets.expert_load import ExpertLoadView
from panels.widgets.hardware_view import HardwareView
from panels.widgets.kv_view import KvView

if TYPE_CHECKING:
    from engine.state import EngineState

HELP = """\
## Monitor

What the engine and the machine are doing, sampled every half second or faster.

- **GPU** (through NVML): per GPU utilization, memory used / total, power, temperature, SM clock
  and the processes on it, with history. Without an NVIDIA GPU it says so and shows CPU and RAM.
- **KV cache**: blocks total / used / cached / free, usage and prefix-hit-rate history, and the
  block map: one cell per block (or per group of blocks when there are many) coloured by the
  request that owns it. `▓` marks blocks shared by several requests (a prefix-cache hit), `▒` free
  blocks that still hold a cached prefix, `·` free blocks. Send from two chats at once to watch
  pages being allocated, shared and freed. With KV tiers (`--kv-host-bytes`, `--kv-disk-dir`) a
  line per tier: blocks used / capacity, blocks restored from it, bytes moved per second. With
  tensor parallelism a line per rank: its device and pid, its shard of the weights, its share of
  the KV pages and its device memory.
- **Batch**: running, waiting and preempted requests (prompt length, generated tokens, blocks
  held, tokens/s), the composition of the last steps (prefill-chunk tokens vs decode tokens) and
  the prompt and generation throughput.
- **Experts** (MoE models only): a heat map of the tokens routed to each expert (columns) of
  each sparse layer (rows) since the last sample, from cold (a small share) to hot.
- **↑ / ↓** select a request in the batch table (the selection stays on it as the table
  refreshes, and goes when it leaves the batch); **x** aborts it, after a confirmation, as
  nvitop kills a process: its reply ends there (a chat's shows "cancelled") and its KV blocks
  are freed. Attached to a server (`--attach`), any client's request can be aborted (through
  the server's POST /v1/engine/abort).
- **p** pauses the display to look at a moment closely, and resumes it (no samples are taken
  while paused).
- On a short terminal (below about 34 rows) the boxes lose their bottom borders, the KV box its
  plot, the hardware box all but its first lines, and in one column (a narrow terminal) the expert
  heat map goes, so that the block map and the batch table are on screen together; the rest of
  the batch box is a scroll away (PgUp / PgDn).
"""

SHORT_ROWS = 30  # a panel lower than this gets the short layout (the class "-short")
SHORT_MAP_ROWS = 3  # the block map's rows in the short layout (it groups blocks to fit)


class MonitorPanel(VerticalScroll):
    HELP: ClassVar[str] = HELP
    BINDINGS = [
        Binding("up", "select(-1)", "Previous request", id="monitor.previous", show=False),
        Binding("down", "select(1)", "Next request", id="monitor.next", show=False),
        Binding("x", "abort_request", "Abort request", id="monitor.abort"),
        Binding("p", "toggle_pause", "Pause", id="monitor.pause"),
    ]

    def __init__(
        self,
        handle: EngineHandle,
        hardware: HardwareSource | None = None,
        interval: float | None = 0.5,
        **kwargs: str,
    ) -> None:
        super().__init__(**kwargs)
        self.handle = handle
        self.hardware = hardware  # None: this machine, opened on the first sample
        self.interval = interval  # None: no polling (tests call record())
        self.paused = False
        self.owner_colors = OwnerColors()
        self.last_state: EngineState | None = None

    def compose(self) -> ComposeResult:
        yield Static("", id="monitor-status")
        with Horizontal(id="monitor-columns"):
            with Vertical(id="monitor-left"):
                yield HardwareView(id="monitor-hardware", classes="monitor-box")
                yield KvView(self.owner_colors, id="monitor-kv", classes="monitor-box")
                yield ExpertLoadView(id="monitor-experts", classes="monitor-box")
            yield BatchView(self.owner_colors, id="monitor-batch", classes="monitor-box")

    def on_mount(self) -> None:
        self._block_map_rows = self.query_one(BlockMap).max_rows
        self._show_status()
        if self.interval:
            self.set_interval(self.interval, self.poll)

    @property
    def step_s(self) -> float:
        return self.interval or 0.5

    def poll(self) -> None:
        """One sample: the engine's snapshot now, the hardware from a worker thread."""
        if self.paused:
            return
        state = self.handle.state()
        if state is not None:
            self.record(None, state)
        else:
            self._show_status()
        self._sample_hardware()

    @work(thread=True, exclusive=True, group="monitor-hardware", exit_on_error=False)
    def _sample_hardware(self) -> None:
        if self.hardware is None:
            self.hardware = SystemHardware()
        sample = self.hardware.sample()
        self.app.call_from_thread(self.record, sample, None)

    def record(self, hardware: HardwareSample | None, state: EngineState | None) -> None:
        """Add a sample to the histories, and show it if the panel is on screen."""
        if hardware is not None:
            self.query_one(HardwareView).add(hardware)
        if state is not None:
            self.last_state = state
            self.query_one(KvView).add(state)
            self.query_one(BatchView).add(state)
        if shown(self):
            self.show(hardware is not None, state is not None)

    def show(self, hardware: bool = True, engine: bool = True) -> None:
        """Bring the widgets up to date with the latest samples (the app calls this when the
        panel comes into view)."""
        if hardware:
            self.query_one(HardwareView).show()
        state = self.last_state
        if engine and state is not None:
            self.owner_colors.update([r.request_id for r in state.running])
            self.query_one(KvView).show(state, self.step_s)
            experts = self.query_one(ExpertLoadView)
            if self.has_class("-short") and self.screen.has_class("-narrow"):
                experts.display = False  # it comes between the KV box and the batch table
            else:
                experts.show(state)
            self.query_one(BatchView).show(state, self.step_s)
        self._show_status()

    def _show_status(self) -> None:
        status = self.query_one("#monitor-status", Static)
        handle = self.handle
        lost = getattr(handle.client, "error", None)
        if self.paused:
            status.update("[$warning]paused[/]: p resumes")
        elif handle.status == "loading" and handle.remote:
            status.update(f"[$text-muted]attaching to {escape(handle.remote)}…[/]")
        elif handle.status == "loading":
            status.update(f"[$text-muted]loading model {handle.model}…[/]")
        elif handle.status == "failed" and handle.remote:
            status.update(f"[$error]cannot attach: {escape(handle.error or '')}[/]")
        elif handle.status == "failed":
            status.update(f"[$error]the engine failed to load: {escape(handle.error or '')}[/]")
        elif lost:
            status.update(f"[$error]{escape(lost)}[/] · the last state it sent is shown")
        status.display = self.paused or handle.status != "ready" or bool(lost)

    def on_resize(self) -> None:
        short = self.size.height < SHORT_ROWS
        self.set_class(short, "-short")
        self.query_one(BlockMap).max_rows = SHORT_MAP_ROWS if short else self._block_map_rows
        if shown(self):
            self.show(hardware=False)

    def action_select(self, step: int) -> None:
        self.query_one(BatchView).select(step)

    def action_abort_request(self) -> None:
        """Abort the selected request, once the user confirms it."""
        request_id = self.query_one(BatchView).selected
        client = self.handle.client
        if request_id is None or client is None:
            self.notify("Select a request first (↑ or ↓ in the batch table).", severity="warning")
            return

        def abort(confirmed: object) -> None:
            if not confirmed:
                return
            if client.abort(request_id):
                self.notify(f"Aborted {request_id}: its KV blocks are freed.", timeout=3)
            else:
                self.notify(f"{request_id} was not aborted: it has finished.", severity="warning")

        question = f"Abort request {request_id}? Its reply ends here and its KV blocks are freed."
        self.app.push_screen(Confirm(question, yes="Abort"), abort)

    def action_toggle_pause(self) -> None:
        self.paused = not self.paused
        for view in self.query(".monitor-box"):
            view.set_class(self.paused, "-paused")
        self._show_status()

    def on_unmount(self) -> None:
        if self.hardware is not None:
            self.hardware.close()
