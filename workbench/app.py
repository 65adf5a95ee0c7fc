"""The Workbench TUI: the panels in tabs, a status line, key hints, help, the command palette.

`run_app(args)` is what `workbench launch` calls. The engine loads in a worker thread, so the UI is
usable at once ("loading model…" until it is ready); the panels reach it through an
`EngineHandle`, never through the engine's internals. With `--attach URL` the engine is a running
server's (`RemoteEngineClient`), and the monitor shows the server's device instead of this
machine's.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterable
from contextlib import suppress
from pathlib import Path
from typing import Any

from textual.app import App, ComposeResult, SystemCommand
from textual.binding import Binding
from textual.css.query import NoMatches
from textual.markup import escape
from textual.screen import Screen
from textual.theme import Theme
from textual.widgets import Footer, Static, TabbedContent, TabPane

from panels import PANEL_CSS
from panels.bench import BenchPanel
from panels.build import BuildPanel
from panels.chat import ChatPanel
from panels.client import EngineClient, EngineHandle, LocalEngineClient
from panels.format import short_model_name
from panels.hardware import HardwareSource, RemoteHardware
from panels.monitor import MonitorPanel
from panels.remote_client import ServerUnavailable
from panels.sessions import SessionsPanel
from panels.widgets.chat_view import ChatView
from panels.widgets.help_screen import HelpScreen, KeyHelp, key_help
from panels.widgets.message import MessageView
from store import Store, StoreError, open_store
from workbench.settings import (
    Settings,
    SettingsError,
    config_path,
    save_theme,
    settings_from_args,
)

PANELS = ("chat", "monitor", "sessions", "build", "bench")
STATUS_INTERVAL_S = 0.5
GIL_SWITCH_INTERVAL_S = 0.001


class WorkbenchApp(App[int]):
    TITLE = "Workbench"
    CSS_PATH = [Path(__file__).with_name("app.tcss"), *PANEL_CSS]
    HORIZONTAL_BREAKPOINTS = [(0, "-narrow"), (100, "-wide")]
    BINDINGS = [
        Binding("f1", "help", "Help", id="app.help"),
        Binding("f2", "show_panel('chat')", "Chat", id="app.chat", show=False),
        Binding("f3", "show_panel('monitor')", "Monitor", id="app.monitor", show=False),
        Binding("f4", "show_panel('sessions')", "Sessions", id="app.sessions", show=False),
        Binding("f5", "show_panel('build')", "Build", id="app.build", show=False),
        Binding("f6", "show_panel('bench')", "Bench", id="app.bench", show=False),
        Binding("ctrl+q", "quit", "Quit", id="app.quit", priority=True),
    ]

    def __init__(
        self,
        settings: Settings,
        store: Store,
        client: EngineClient | None = None,
        hardware: HardwareSource | None = None,
        monitor_interval: float | None = None,
    ) -> None:
        """`client`: an engine already running (tests share one); by default the app loads
        `settings.model` itself. `hardware` / `monitor_interval=0`: tests freeze the monitor."""
        super().__init__()
        self.settings = settings
        self.store = store
        self.handle = EngineHandle(settings.model, settings.engine, remote=settings.attach)
        self._injected = client
        if hardware is None and settings.attach:  # the server's device, not this machine's
            hardware = RemoteHardware(self.handle, settings.attach)
        self._hardware = hardware
        self._monitor_interval = (
            settings.monitor_interval if monitor_interval is None else monitor_interval or None
        )
        self._sessions_dirty = False

    def compose(self) -> ComposeResult:
        yield Static("", id="status-bar")
        with TabbedContent(initial="chat", id="panels"):
            with TabPane("Chat (F2)", id="chat"):
                yield ChatPanel(
                    self.store, self.handle, self.settings.chat, self.settings.system_prompt
                )
            with TabPane("Monitor (F3)", id="monitor"):
                yield MonitorPanel(self.handle, self._hardware, self._monitor_interval)
            with TabPane("Sessions (F4)", id="sessions"):
                yield SessionsPanel(self.store, self.settings.exports_dir)
            with TabPane("Build (F5)", id="build"):
                yield BuildPanel(self.store, self.settings.data_dir / "engines")
            with TabPane("Bench (F6)", id="bench"):
                yield BenchPanel(self.store)
        yield Footer(compact=True)

    def on_mount(self) -> None:
        # The engine thread gives up the GIL for every torch op and must win it back each time;
        # while the UI renders, the default 5 ms switch interval makes each of those waits up to
        # 5 ms, and engine steps run several times slower on a small CPU. 1 ms keeps it fed.
        self._switch_interval = sys.getswitchinterval()
        sys.setswitchinterval(min(self._switch_interval, GIL_SWITCH_INTERVAL_S))
        if self.settings.theme in self.available_themes:
            self.theme = self.settings.theme
        else:
            self.notify(f"Unknown theme {self.settings.theme!r}: using {self.theme}.", timeout=8)
        self.theme_changed_signal.subscribe(self, self._save_theme)
        if self.settings.keymap:
            self.set_keymap(self.settings.keymap)
        if self._injected is not None:
            self.handle.set_ready(self._injected)
        else:
            self._start_loading()
        self.set_interval(STATUS_INTERVAL_S, self.refresh_status)
        self.refresh_status()
        self.query_one(ChatPanel).focus_prompt()

    def _save_theme(self, theme: Theme) -> None:
        """A theme picked in the palette (or by a key) is the one the next launch starts with."""
        if theme.name == self.settings.theme:
            return
        path = self.settings.config_file or config_path()
        try:
            save_theme(path, theme.name)
        except OSError as e:
            self.notify(f"The theme could not be saved to {path} ({e.strerror or e}).", timeout=8)
            return
        self.settings.theme = theme.name

    def deliver_screenshot(
        self, filename: str | None = None, path: str | None = None, time_format: str | None = None
    ) -> str | None:
        """The palette's Screenshot: an SVG under the data directory's screenshots/ (not the
        directory the app was started in), and a notice that says where, or why it failed."""
        directory = Path(path) if path else self.settings.data_dir / "screenshots"
        try:
            directory.mkdir(parents=True, exist_ok=True)
            saved = self.save_screenshot(filename, str(directory), time_format)
        except OSError as e:
            self.notify(
                f"Not saved in {directory}: {e.strerror or e}.",
                title="Screenshot",
                severity="error",
                timeout=8,
            )
            return None
        self.notify(f"Saved to {saved}", title="Screenshot", timeout=8)
        return saved

    def on_unmount(self) -> None:
        sys.setswitchinterval(self._switch_interval)

    # -- the engine ----------------------------------------------------------------------------

    def _start_loading(self) -> None:
        # A daemon thread rather than a @work thread worker: those run in the event loop's
        # executor, which is joined at exit, so quitting while a model loads would wait for it.
        threading.Thread(target=self._load_engine, name="engine-load", daemon=True).start()

    def _load_engine(self) -> None:
        try:
            client = self._connect()
        except Exception as e:  # any failure to load is shown, never a crash
            if isinstance(e, ServerUnavailable):  # its message says it all
                message = str(e)
            else:
                message = f"{type(e).__name__}: {e}".splitlines()[0]
            try:
                self.call_from_thread(self._engine_failed, message)
            except RuntimeError:
                pass
            return
        try:
            self.call_from_thread(self._engine_ready, client)
        except RuntimeError:  # the app closed while the model loaded
            client.close()

    def _connect(self) -> EngineClient:
        """The engine: attached to a server (`--attach`), else loaded in this process."""
        if self.settings.attach:
            from panels.remote_client import RemoteEngineClient

            return RemoteEngineClient.connect(self.settings.attach, self.settings.api_key)
        return LocalEngineClient.load(self.settings.model, **self.settings.engine)

    def _engine_ready(self, client: EngineClient) -> None:
        self.handle.set_ready(client)
        self.refresh_status()
        with suppress(NoMatches):
            self.query_one(ChatPanel).refresh_contexts()  # the model's context is known now
        name = short_model_name(client.model_name)
        if self.settings.attach:
            self.notify(f"Attached to {self.settings.attach}: model {name}.", timeout=3)
        else:
            self.notify(f"Model {name} is ready.", timeout=3)

    def _engine_failed(self, message: str) -> None:
        self.handle.set_failed(message)
        self.refresh_status()
        title = (
            "Cannot attach to the server" if self.settings.attach else "The model failed to load"
        )
        self.notify(message, title=title, severity="error", timeout=10)  # the status bar keeps it

    def refresh_status(self) -> None:
        handle = self.handle
        try:
            bar = self.query_one("#status-bar", Static)
        except NoMatches:  # shutting down
            return
        name = escape(short_model_name(handle.client.model_name if handle.client else handle.model))
        remote = escape(handle.remote.split("://", 1)[-1]) if handle.remote else ""
        lost = getattr(handle.client, "error", None)
        if handle.status == "loading" and remote:
            text = f"[$warning]◌ attaching to {remote}…[/] you can type already"
        elif handle.status == "loading":
            text = f"[$warning]◌ loading model {name}…[/] you can type already"
        elif handle.status == "failed" and remote:
            text = f"[$error]✗ cannot attach:[/] {escape(handle.error or '')}"
        elif handle.status == "failed":
            text = f"[$error]✗ model {name} failed to load:[/] {escape(handle.error or '')}"
        elif lost:
            text = f"[$error]✗ {name} @ {remote}:[/] {escape(lost)}"
        else:
            state = handle.state()
            config = handle.client.engine_config if handle.client else {}
            text = f"[$success]●[/] [b]{name}[/b]" + (f" @ {remote}" if remote else "")
            text += f" [$text-muted]{config.get('device', '?')} {config.get('dtype', '?')}[/]"
            if state is not None:
                text += (
                    f" · {len(state.running)} running · {len(state.waiting)} waiting"
                    f" · KV {state.kv_blocks_used}/{state.kv_blocks_total}"
                )
        brand = "[b]Workbench[/b] │ " if self.size.width >= 100 else ""
        bar.update(brand + text, layout=False)

    # -- panels --------------------------------------------------------------------------------

    @property
    def active_panel(self) -> str:
        return self.query_one(TabbedContent).active or "chat"

    def panel(self, name: str) -> Any:
        return self.query_one(f"#{name}", TabPane).children[0]

    def action_show_panel(self, name: str) -> None:
        self.query_one(TabbedContent).active = name
        self._focus_panel(name)

    def _focus_panel(self, name: str) -> None:
        panel = self.panel(name)
        if name == "chat":
            panel.focus_prompt()
        elif name == "monitor":
            panel.show()
            panel.focus()
        else:
            panel.focus_default()
        if name == "sessions" and self._sessions_dirty:
            self._sessions_dirty = False
            panel.reload()
        if name in ("build", "bench"):
            panel.reload()

    def on_tabbed_content_tab_activated(self, event: TabbedContent.TabActivated) -> None:
        if event.pane.id:
            self._focus_panel(event.pane.id)

    def on_chat_view_session_saved(self, event: ChatView.SessionSaved) -> None:
        with suppress(NoMatches):  # a reply saved while the app shuts down
            if self.active_panel == "sessions":
                self.panel("sessions").reload()
            else:
                self._sessions_dirty = True

    def on_chat_view_updated(self, event: ChatView.Updated) -> None:
        with suppress(NoMatches):
            sessions: SessionsPanel = self.panel("sessions")
            sessions.busy_sessions = self.panel("chat").streaming_session_ids()

    async def on_sessions_panel_open_requested(self, event: SessionsPanel.OpenRequested) -> None:
        chat: ChatPanel = self.panel("chat")
        self.query_one(TabbedContent).active = "chat"
        await chat.open_session(event.session_id)

    async def on_sessions_panel_changed(self, event: SessionsPanel.Changed) -> None:
        chat: ChatPanel = self.panel("chat")
        if event.title is None:
            await chat.session_deleted(event.session_id)
            return
        for view in chat.views:
            if view.conv.session_id == event.session_id:
                view.conv.title = event.title
                view.refresh_header()
        chat._refresh_list()

    # -- help and the command palette ----------------------------------------------------------

    def action_help(self) -> None:
        name = self.active_panel
        panel = self.panel(name)
        keymap = self.settings.keymap
        keys: list[KeyHelp] = key_help(panel.BINDINGS, "this panel", keymap)
        if name == "chat":
            keys += key_help(MessageView.BINDINGS, "a focused message", keymap)
        keys += key_help([b for b in self.BINDINGS if isinstance(b, Binding)], "everywhere", keymap)
        keys.append(KeyHelp("ctrl+p", "Command palette (every action by name)", "", "everywhere"))
        source = self.settings.config_file or config_path()
        footer = (
            f"Keys are remapped by id in the `[keymap]` table of `{source}`; "
            f"sessions are stored in `{self.store.path or ':memory:'}`."
        )
        self.push_screen(HelpScreen(panel.HELP, keys, footer))

    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        yield from super().get_system_commands(screen)
        for name in PANELS:
            yield SystemCommand(
                f"Go to {name.capitalize()}",
                f"Show the {name} panel",
                lambda n=name: self.action_show_panel(n),
            )
        chat: ChatPanel = self.panel("chat")
        sessions: SessionsPanel = self.panel("sessions")
        commands: list[tuple[str, str, Any]] = [
            ("Help", "Help and keys of the current panel (F1)", self.action_help),
            ("Chat: new chat", "Open another chat (Ctrl+N)", chat.action_new_chat),
            ("Chat: close chat", "Close the current chat", chat.action_close_chat),
            ("Chat: cancel reply", "Stop the streaming reply (Esc)", chat.action_cancel),
            ("Chat: regenerate", "Regenerate the last reply (Ctrl+R)", chat.action_regenerate),
            (
                "Chat: edit last prompt",
                "Edit and resend the last prompt (↑)",
                chat.action_edit_last_prompt,
            ),
            ("Chat: copy reply", "Copy the last reply (Ctrl+Y)", chat.action_copy_reply),
            ("Chat: copy code block", "Copy a code block of the last reply", chat.action_copy_code),
            (
                "Chat: settings",
                "Show or hide the chat settings (Ctrl+O)",
                chat.action_toggle_settings,
            ),
            ("Chat: next chat", "Switch to the next chat (Alt+→)", chat.action_next_chat),
            (
                "Monitor: pause",
                "Pause or resume the monitor (p)",
                self.panel("monitor").action_toggle_pause,
            ),
            ("Sessions: search", "Full-text search of all sessions", self._palette_search),
            ("Bench: reload", "Reread the saved benchmark runs", self.panel("bench").reload),
            ("Sessions: open", "Open the selected session in Chat", sessions.action_open),
            ("Sessions: rename", "Rename the selected session", sessions.action_rename),
            ("Sessions: delete", "Delete the selected session", sessions.action_delete),
            (
                "Sessions: export Markdown",
                "Export the selected session",
                lambda: sessions.action_export("md"),
            ),
            (
                "Sessions: export JSON",
                "Export the selected session",
                lambda: sessions.action_export("json"),
            ),
        ]
        for title, help_text, callback in commands:
            yield SystemCommand(title, help_text, callback)

    def _palette_search(self) -> None:
        self.action_show_panel("sessions")
        self.panel("sessions").action_focus_search()


def run_app(args: Any) -> int:
    """`workbench launch`: settings from the config file and `args`, the store, then the TUI."""
    try:
        settings = settings_from_args(args)
    except SettingsError as e:
        print(f"workbench: {e}", file=sys.stderr)
        return 2
    try:
        store = open_store(settings.db_path)
    except StoreError as e:
        print(f"workbench: {e}", file=sys.stderr)
        return 1
    app = WorkbenchApp(settings, store)
    try:
        app.run()
    finally:
        if app.handle.client is not None:
            app.handle.client.close()
        store.close()
    return app.return_code or 0
