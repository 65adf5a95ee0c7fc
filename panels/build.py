"""The Build panel: start a build (model, recipe, KV cache dtype, calibration size, output dir),
follow it stage by stage with its log, cancel it, and compare past builds side by side.

Builds run as `workbench build ... --events-jsonl -` child processes (panels/build_process.py),
which record themselves in the store; the panel reads the store for the list, in a worker.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, VerticalScroll
from textual.suggester import SuggestFromList
from textual.widgets import Button, Checkbox, DataTable, Input, Label, RichLog, Select, Static

from panels.build_format import BUILD_COLUMNS, build_row, compare_rows
from panels.build_process import BuildOptions, BuildProcess
from panels.format import short_model_name
from panels.widgets.stage_progress import StageProgress
from panels.widgets.table_cursor import cursor_row_key
from store import Build, Store, StoreError

# The recipes and KV cache dtypes of `workbench build` (engine_build/recipes.py), listed here so
# that the panel does not import the engine.
RECIPES = ("none", "fp8", "fp8_per_channel", "int8_sq", "int4_awq", "w4a8_awq")
KV_CACHE_DTYPES = ("auto", "fp8", "int8")
BUNDLED = ("tiny", "tiny-draft")
LIST_LIMIT = 200
RUNNING_REFRESH_S = 2.0  # how often the list is read again while it shows a running build

HELP = """\
## Build

Quantize a model with NVIDIA ModelOpt into an **engine directory** that `workbench launch --model
DIR` (or `LLM(DIR)`) serves, and measure it. The same as `workbench build` on the command line.

- **Model**: a bundled name (`tiny`), a checkpoint directory or a Hub id.
- **Recipe**: `none`, `fp8`, `fp8_per_channel`, `int8_sq` (SmoothQuant), `int4_awq`, `w4a8_awq`.
- **KV**: the KV cache dtype the engine serves it with (`fp8` is calibrated, `int8` uses dynamic
  scales).
- **Samples**: calibration samples of 256 tokens from the built-in calibration text.
- **Output**: the engine directory; **replace** allows overwriting an existing engine.

Stages: load, calibrate, quantize, export, evaluate (perplexity of the source and of the build
on held-out text, through our engine). A cancelled or failed build leaves no directory behind.

Every build is listed below with its perplexity change, size and time. Mark builds with
**space** to compare them side by side (or see the highlighted one).
"""


class BuildPanel(VerticalScroll):
    HELP: ClassVar[str] = HELP
    BINDINGS = [
        Binding("ctrl+s", "start", "Start build", id="build.start"),
        Binding("escape", "cancel", "Cancel build", id="build.cancel"),
        Binding("space", "mark", "Mark to compare", id="build.mark"),
        Binding("r", "reload", "Reload", id="build.reload"),
    ]

    def __init__(
        self,
        store: Store,
        engines_dir: Path | None = None,
        extra_args: tuple[str, ...] = (),
        **kwargs: Any,
    ) -> None:
        """`engines_dir`: where output dirs go by default; `extra_args`: appended to every build
        command (tests use a smaller calibration)."""
        super().__init__(**kwargs)
        self.store = store
        self.engines_dir = engines_dir or Path("engines")
        self.extra_args = extra_args
        self.process: BuildProcess | None = None
        self.builds: dict[int, Build] = {}
        self.marked: set[int] = set()
        self.log_lines: list[str] = []  # what the log shows, unwrapped
        self._out_edited = False
        self._auto_out = ""  # the output dir the form chose itself

    def compose(self) -> ComposeResult:
        with Horizontal(id="build-form", classes="build-form"):
            yield Label("Model", classes="build-label")
            yield Input(
                "tiny",
                id="build-model",
                suggester=SuggestFromList(BUNDLED, case_sensitive=False),
                compact=True,
            )
            yield Label("Recipe", classes="build-label")
            yield Select(
                [(r, r) for r in RECIPES], value="fp8", id="build-recipe", allow_blank=False,
                compact=True,
            )  # fmt: skip
            yield Label("KV", classes="build-label")
            yield Select(
                [(k, k) for k in KV_CACHE_DTYPES], value="auto", id="build-kv",
                allow_blank=False, compact=True,
            )  # fmt: skip
            yield Label("Samples", classes="build-label")
            yield Input("32", id="build-calib", type="integer", compact=True)
        with Horizontal(id="build-form-2", classes="build-form"):
            yield Label("Output", classes="build-label")
            yield Input("", id="build-out", compact=True)
            yield Checkbox("replace", id="build-force", compact=True)
            yield Button("Start", id="build-start", variant="primary", compact=True)
            yield Button("Cancel", id="build-cancel", variant="error", compact=True, disabled=True)
        with Horizontal(id="build-live"):
            yield StageProgress(id="build-stages")
            # min_width=1: RichLog's default (78) renders wider than a narrow log and cuts lines
            yield RichLog(id="build-log", wrap=True, markup=False, max_lines=2000, min_width=1)
        yield Static("", id="build-list-info")
        yield DataTable(id="build-table", cursor_type="row", zebra_stripes=True)
        yield DataTable(id="build-compare", cursor_type="none", zebra_stripes=True)

    def on_mount(self) -> None:
        self.query_one("#build-stages").border_title = "Stages"
        self.query_one("#build-log").border_title = "Log"
        self.query_one("#build-compare").border_title = "Compare"
        self.table.add_columns(*BUILD_COLUMNS)
        self._default_out()
        self.reload()
        self.set_interval(RUNNING_REFRESH_S, self._refresh_running)

    def _refresh_running(self) -> None:
        """Builds running elsewhere (the CLI, another TUI) move on, finish or die without telling
        this panel: while the list shows one running, read it again."""
        if any(b.status == "running" for b in self.builds.values()):
            self.reload()

    @property
    def table(self) -> DataTable[str]:
        return self.query_one("#build-table", DataTable)

    @property
    def log_view(self) -> RichLog:
        return self.query_one("#build-log", RichLog)

    def focus_default(self) -> None:
        self.query_one("#build-model", Input).focus()

    # -- the form ------------------------------------------------------------------------------

    def _default_out(self) -> None:
        """The output dir follows model and recipe until the user types one."""
        if self._out_edited:
            return
        model = short_model_name(self.query_one("#build-model", Input).value.strip()) or "model"
        name = f"{model}-{self.query_one('#build-recipe', Select).value}"
        kv = self.query_one("#build-kv", Select).value
        if kv != "auto":
            name += f"-kv{kv}"
        self._auto_out = str(self.engines_dir / name)
        self.query_one("#build-out", Input).value = self._auto_out

    @on(Input.Changed, "#build-model")
    @on(Select.Changed)
    def _form_changed(self) -> None:
        self._default_out()

    @on(Input.Changed, "#build-out")
    def _out_changed(self, event: Input.Changed) -> None:
        if event.value != self._auto_out:  # typed by the user: keep it
            self._out_edited = True

    def options(self) -> BuildOptions:
        """The form as build options (ValueError with what to fix)."""
        model = self.query_one("#build-model", Input).value.strip()
        out = self.query_one("#build-out", Input).value.strip()
        calib = self.query_one("#build-calib", Input).value.strip()
        if not model:
            raise ValueError("Give a model: tiny, a checkpoint directory or a Hub id.")
        if not out:
            raise ValueError("Give an output directory.")
        if not calib.isdigit() or int(calib) < 1:
            raise ValueError("Samples must be a whole number of at least 1.")
        return BuildOptions(
            model=model,
            quant=str(self.query_one("#build-recipe", Select).value),
            kv_cache_dtype=str(self.query_one("#build-kv", Select).value),
            calib_size=int(calib),
            out=str(Path(out).expanduser()),
            force=self.query_one("#build-force", Checkbox).value,
            extra=self.extra_args,
        )

    # -- running a build -----------------------------------------------------------------------

    @on(Button.Pressed, "#build-start")
    def action_start(self) -> None:
        if self.process is not None and self.process.running:
            self.notify("A build is already running.", severity="warning")
            return
        try:
            options = self.options()
        except ValueError as e:
            self.notify(str(e), severity="error")
            return
        self.query_one(StageProgress).reset()
        self.log_view.clear()
        self.log_lines = []
        self._log(f"$ {options.command_line()}")
        try:
            self.process = BuildProcess(
                options,
                self.store.path,
                on_event=lambda e: self._from_thread(self._on_event, e),
                on_log=lambda line: self._from_thread(self._log, line),
                on_exit=lambda code: self._from_thread(self._on_exit, code),
            )
        except OSError as e:
            self.notify(f"Cannot start the build: {e}", severity="error")
            return
        self._set_running(True)

    @on(Button.Pressed, "#build-cancel")
    def action_cancel(self) -> None:
        if self.process is None or not self.process.running:
            return
        self._log("cancelling…")
        self.process.cancel()

    def _from_thread(self, fn: Any, *args: Any) -> None:
        try:
            self.app.call_from_thread(fn, *args)
        except RuntimeError:  # the app is gone: nobody to tell
            pass

    def _set_running(self, running: bool) -> None:
        self.query_one("#build-start", Button).disabled = running
        self.query_one("#build-cancel", Button).disabled = not running

    def _on_event(self, event: dict[str, Any]) -> None:
        """Events drive the stage bars and the list; the log shows the child's own lines."""
        kind = event.get("event")
        self.query_one(StageProgress).apply(event)
        if kind in ("build", "start"):
            self.reload()
        elif kind == "done":
            self._log(f"serve it with: workbench launch --model {event['out']}")

    def _log(self, line: str) -> None:
        self.log_lines.append(line)
        self.log_view.write(line)

    def _on_exit(self, code: int) -> None:
        process = self.process
        self._set_running(False)
        if code == 0:
            self.notify("The build is done.", timeout=4)
        else:
            why = "cancelled" if process is not None and process.cancelled else f"exit {code}"
            self.query_one(StageProgress).stop(why)
            if code < 0 and process is not None:  # killed: the child could not clean up
                self._after_kill(process)
            if not (process and process.cancelled):
                self.notify(f"The build failed ({why}); see its log.", severity="error")
        self.reload(select=process.build_id if process else None)

    def _after_kill(self, process: BuildProcess) -> None:
        from engine.model.engine_dir import remove_stale_partials

        remove_stale_partials(Path(process.options.out))
        if process.build_id is not None:
            try:
                self.store.update_build(process.build_id, status="cancelled", error="killed")
            except StoreError as e:
                self.notify(str(e), severity="error")

    def on_unmount(self) -> None:
        if self.process is not None and self.process.running:
            self.process.cancel()  # the child stops cleanly on SIGTERM

    # -- the list and the comparison -----------------------------------------------------------

    def action_reload(self) -> None:
        self.reload()

    @work(thread=True, exclusive=True, group="builds-load", exit_on_error=False)
    def reload(self, select: int | None = None) -> None:
        try:
            self.store.fail_dead_builds()
            builds = self.store.list_builds(limit=LIST_LIMIT)
        except StoreError as e:
            self._from_thread(self.notify, str(e), severity="error")
            return
        self._from_thread(self._show, builds, select)

    def _show(self, builds: list[Build], select: int | None = None) -> None:
        table = self.table
        keep = select if select is not None else self.selected_build()
        self.builds = {b.id: b for b in builds}
        self.marked &= set(self.builds)
        table.clear()
        for b in builds:
            table.add_row(*build_row(b, b.id in self.marked), key=str(b.id))
        info = self.query_one("#build-list-info", Static)
        if builds:
            info.update(f"{len(builds)} builds · space marks builds to compare · r reloads")
        else:
            info.update("No builds yet: start one above, or run `workbench build`.")
        table.display = bool(builds)
        if keep is not None and keep in self.builds:
            table.move_cursor(row=table.get_row_index(str(keep)))
        self._compare()

    def selected_build(self) -> int | None:
        key = cursor_row_key(self.table)
        return int(key) if key else None

    def action_mark(self) -> None:
        build_id = self.selected_build()
        if build_id is None:
            return
        self.marked ^= {build_id}
        self.table.update_cell(
            str(build_id), self.table.ordered_columns[0].key, self._mark(build_id)
        )
        self._compare()

    def _mark(self, build_id: int) -> Text:
        return Text("●" if build_id in self.marked else " ")

    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        event.stop()
        if not self.marked:
            self._compare()

    def _compare(self) -> None:
        chosen = sorted(self.marked) if self.marked else [self.selected_build()]
        builds = [self.builds[i] for i in chosen if i in self.builds]
        compare = self.query_one("#build-compare", DataTable)
        compare.clear(columns=True)
        compare.display = bool(builds)
        if not builds:
            return
        columns, rows = compare_rows(builds)
        compare.add_columns(*columns)
        compare.add_rows(rows)
        title = "Compare" if len(builds) > 1 else f"Build #{builds[0].id}"
        compare.border_title = title
