"""The Build panel's frame. Building engines (quantization, packaging) is a later issue: until then
the panel says what it will do and that it is not available, and lists builds already recorded
in the store. It has no controls, so nothing here pretends to work."""

from __future__ import annotations

from typing import ClassVar

from textual import work
from textual.app import ComposeResult
from textual.containers import VerticalScroll
from textual.widgets import DataTable, Markdown, Static

from store import Build, Store, StoreError

HELP = """\
## Build (not available yet)

This panel will build engines from a model: quantize its weights (fp8, int8 or int4), choose the
KV cache dtype, check the result against the original, and save an engine directory that
`workbench launch --model DIR` serves.

Building is not implemented in this version; the panel has no controls. Builds recorded in the
store by a later version are listed here.
"""

ABOUT = """\
## Build engines: not available yet

Building engines arrives with a later release. This panel has **no controls yet**: nothing here
starts, queues or pretends to run a build. Meanwhile `workbench launch --model` serves a bundled
model, a Hugging Face checkpoint directory or a Hub id as they are.

When it arrives, a build will:

1. take a model (the bundled one, a Hugging Face directory or Hub id),
2. quantize its linear layers (**fp8**, **int8** or **int4**) and pick the **KV cache dtype**,
3. check the quantized model against the original (perplexity, greedy agreement),
4. write an engine directory that `workbench launch --model DIR` loads,
5. record the build, its report and per-stage timings in the session store, listed below.
"""


class BuildPanel(VerticalScroll):
    HELP: ClassVar[str] = HELP

    def __init__(self, store: Store, **kwargs: str) -> None:
        super().__init__(**kwargs)
        self.store = store

    def compose(self) -> ComposeResult:
        yield Markdown(ABOUT, id="build-about")
        yield Static("[b]Recorded builds[/b]", id="build-history-title")
        yield DataTable(id="build-history", cursor_type="row", zebra_stripes=True)
        yield Static("", id="build-history-empty")

    def on_mount(self) -> None:
        table = self.query_one(DataTable)
        table.add_columns("#", "model", "recipe", "kv dtype", "status", "output")
        self.reload()

    def focus_default(self) -> None:
        self.focus()

    @work(thread=True, exclusive=True, group="builds-load", exit_on_error=False)
    def reload(self) -> None:
        try:
            builds = self.store.list_builds(limit=200)
        except StoreError as e:
            self.app.call_from_thread(self.notify, str(e), severity="error")
            return
        self.app.call_from_thread(self._show, builds)

    def _show(self, builds: list[Build]) -> None:
        table = self.query_one(DataTable)
        table.clear()
        for b in builds:
            table.add_row(str(b.id), b.model, b.recipe, b.kv_dtype, b.status, b.out_dir)
        table.display = bool(builds)
        empty = self.query_one("#build-history-empty", Static)
        empty.update("[$text-muted]None yet.[/]")
        empty.display = not builds
