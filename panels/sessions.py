"""The Sessions panel: every saved chat; full-text search; open and resume, rename, delete,
export to Markdown and JSON; a preview that browses a session's branches. Store reads and exports
run in worker threads."""

from __future__ import annotations

import json
import re
from datetime import datetime
from pathlib import Path
from typing import ClassVar

from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.markup import escape
from textual.message import Message
from textual.widgets import DataTable, Input, Static
from textual.worker import get_current_worker

from panels.widgets.dialogs import Confirm, TextPrompt
from panels.widgets.session_preview import PreviewMessage, SessionPreview, load_preview
from panels.widgets.table_cursor import cursor_row_key
from store import SearchHit, SessionSummary, Store, StoreError
from store.sessions import BranchShape

HELP = """\
## Sessions

Every chat is saved as it streams, with its model, engine configuration, sampling parameters and
each reply's stats. A reply that was streaming when the app stopped shows as *interrupted*.

- Type in the search box and press **Enter** to search every message (full text; `"exact
  phrase"` works); **Esc** in the box goes back to the list.
- **Enter** or **o** on a session opens it in the Chat panel, where you can continue it.
- The preview shows the session's latest branch, or the one a search hit is on, scrolled to the
  hit. A message with alternatives (edited or regenerated) shows `‹ 2/3 ›`: focus it (**Tab** or
  a click) and press **[** / **]** (or **←** / **→**) to see another branch. The list counts the
  messages of one branch, and says how many branches there are.
- **r** renames, **d** deletes (after asking), **m** / **j** export the session to Markdown
  (its current branch) or JSON (every branch) under the data directory's `exports/`.
"""

LIST_LIMIT = 500
MARK_OPEN, MARK_CLOSE = "\x01", "\x02"  # around the matched words of a search snippet


def _when(iso: str) -> str:
    try:
        return datetime.fromisoformat(iso).astimezone().strftime("%Y-%m-%d %H:%M")
    except ValueError:
        return iso


def _slug(title: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")[:40] or "session"


class SessionsPanel(Vertical):
    HELP: ClassVar[str] = HELP
    BINDINGS = [
        Binding("slash", "focus_search", "Search", id="sessions.search", show=False),
        Binding("o", "open", "Open", id="sessions.open", show=False),
        Binding("r", "rename", "Rename", id="sessions.rename"),
        Binding("d,delete", "delete", "Delete", id="sessions.delete"),
        Binding("m", "export('md')", "Export .md", id="sessions.export_markdown"),
        Binding("j", "export('json')", "Export .json", id="sessions.export_json"),
    ]

    class OpenRequested(Message):
        def __init__(self, session_id: int) -> None:
            super().__init__()
            self.session_id = session_id

    class Changed(Message):
        """A session was renamed (title) or deleted (title None)."""

        def __init__(self, session_id: int, title: str | None) -> None:
            super().__init__()
            self.session_id = session_id
            self.title = title

    def __init__(self, store: Store, exports_dir: Path, **kwargs: str) -> None:
        super().__init__(**kwargs)
        self.store = store
        self.exports_dir = exports_dir
        self.query_text = ""
        self.busy_sessions: set[int] = set()  # streaming now: not deletable (the app sets it)
        self._titles: dict[int, str] = {}
        self._matches: dict[str, tuple[str, ...]] = {}  # search row key -> the words it matched

    def compose(self) -> ComposeResult:
        yield Input(placeholder="Search all messages (Enter) · / focuses here", id="session-search")
        yield Static("", id="session-info")
        with Horizontal(id="sessions-body"):
            yield DataTable(id="session-table", cursor_type="row", zebra_stripes=True)
            yield SessionPreview(id="session-preview")

    def on_mount(self) -> None:
        self.preview.border_title = "Preview"
        self.reload()

    @property
    def table(self) -> DataTable[str | Text]:
        return self.query_one("#session-table", DataTable)

    @property
    def preview(self) -> SessionPreview:
        return self.query_one(SessionPreview)

    def focus_default(self) -> None:
        self.table.focus()

    # -- loading -------------------------------------------------------------------------------

    @work(thread=True, exclusive=True, group="sessions-load", exit_on_error=False)
    def reload(self) -> None:
        """Reread the list (or the search results) from the store."""
        query = self.query_text
        shapes: dict[int, BranchShape] = {}
        try:
            if query:
                rows: list[SessionSummary] | list[SearchHit] = self.store.search(
                    query, limit=LIST_LIMIT, highlight=(MARK_OPEN, MARK_CLOSE)
                )
            else:
                rows = self.store.list_sessions(limit=LIST_LIMIT)
                shapes = self.store.branch_shapes([s.id for s in rows])
            total = self.store.count_sessions()
        except StoreError as e:
            self.app.call_from_thread(self._show_failure, str(e))
            return
        self.app.call_from_thread(self._show_rows, query, rows, total, shapes)

    def _show_failure(self, error: str) -> None:
        """The list could not be read: say why where the list would be, not only in a toast."""
        self.table.clear(columns=True)
        self.query_one("#session-info", Static).update(
            f"[$error]Cannot list sessions: {escape(error)}[/]"
        )
        self.preview.show(None)
        self.notify(error, title="Cannot list sessions", severity="error")

    def _show_rows(
        self,
        query: str,
        rows: list[SessionSummary] | list[SearchHit],
        total: int,
        shapes: dict[int, BranchShape],
    ) -> None:
        table = self.table
        keep = self.selected_session()
        table.clear(columns=True)
        info = self.query_one("#session-info", Static)
        self._matches.clear()
        if query:
            table.add_columns("#", "session", "role", "match")
            for hit in rows:
                assert isinstance(hit, SearchHit)
                self._titles[hit.session_id] = hit.session_title
                key = f"{hit.session_id}:{hit.message_id}"
                self._matches[key] = _matched_words(hit.snippet)
                table.add_row(
                    str(hit.session_id),
                    hit.session_title,
                    hit.role,
                    _snippet(hit.snippet),
                    key=key,
                )
            info.update(
                f"{_count(len(rows), 'matching message')} for “{query}” · Esc in the box: "
                "all sessions"
            )
        else:
            table.add_columns("#", "title", "model", "msgs", "last active")
            for s in rows:
                assert isinstance(s, SessionSummary)
                self._titles[s.id] = s.title
                table.add_row(
                    str(s.id),
                    s.title,
                    s.model.rstrip("/").rsplit("/", 1)[-1],
                    _message_count(shapes.get(s.id, BranchShape(0, 0))),
                    _when(s.last_activity),
                    key=str(s.id),
                )
            shown = f"{len(rows)} of {_count(total, 'session')}"
            if total <= len(rows):
                shown = _count(total, "session")
            info.update(
                f"{shown} · Enter opens one in Chat · / searches every message"
                if total
                else "No sessions yet: every chat is saved here as it streams."
            )
        if not rows:
            self.preview.show(None)
            return
        if keep is not None:
            for i, row_key in enumerate(table.rows):
                if str(row_key.value).split(":")[0] == str(keep):
                    table.move_cursor(row=i)
                    break
        self._preview_selected()  # the cursor may not have moved: no RowHighlighted then

    def selected_session(self) -> int | None:
        key = cursor_row_key(self.table)
        return int(key.split(":")[0]) if key else None

    def _selected_hit(self) -> tuple[int | None, tuple[str, ...]]:
        """The message the highlighted search result matched and the words it matched (None and
        nothing when listing sessions)."""
        key = cursor_row_key(self.table)
        if not key or ":" not in key:
            return None, ()
        return int(key.split(":")[1]), self._matches.get(key, ())

    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        self._preview_selected()

    def _preview_selected(self) -> None:
        """The selected session's latest branch, or the branch of the selected search hit."""
        session_id = self.selected_session()
        if session_id is not None:
            hit, marks = self._selected_hit()
            self._preview(session_id, hit, hit, marks)

    def on_preview_message_switch_requested(self, event: PreviewMessage.SwitchRequested) -> None:
        event.stop()
        session_id = self.selected_session()
        if session_id is not None:
            hit, marks = self._selected_hit()
            self._preview(session_id, event.message_id, hit, marks, take_focus=True)

    @work(thread=True, exclusive=True, group="sessions-preview", exit_on_error=False)
    def _preview(
        self,
        session_id: int,
        through: int | None,
        hit: int | None,
        marks: tuple[str, ...],
        take_focus: bool = False,
    ) -> None:
        """Show the session's branch through message `through` (None: its latest branch), with
        the search `hit` (if it is on that branch) marked."""
        try:
            data = load_preview(self.store, session_id, through, hit, marks)
        except StoreError:
            return
        if not get_current_worker().is_cancelled:
            self.app.call_from_thread(self.preview.show, data, take_focus)

    # -- search --------------------------------------------------------------------------------

    def on_input_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        self.query_text = event.value.strip()
        self.reload()
        self.table.focus()

    def on_key(self, event: object) -> None:
        key = getattr(event, "key", None)
        search = self.query_one("#session-search", Input)
        if key == "escape" and self.app.focused is search:
            search.value = ""
            if self.query_text:
                self.query_text = ""
                self.reload()
            self.table.focus()

    def action_focus_search(self) -> None:
        self.query_one("#session-search", Input).focus()

    # -- actions on the selected session -------------------------------------------------------

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        event.stop()
        self.action_open()

    def _need_selection(self) -> int | None:
        session_id = self.selected_session()
        if session_id is None:
            self.notify("No session selected.", severity="warning")
        return session_id

    def action_open(self) -> None:
        session_id = self._need_selection()
        if session_id is not None:
            self.post_message(self.OpenRequested(session_id))

    def action_rename(self) -> None:
        session_id = self._need_selection()
        if session_id is None:
            return

        def done(title: object) -> None:
            if isinstance(title, str):
                self.store.rename_session(session_id, title)
                self.post_message(self.Changed(session_id, title))
                self.reload()

        title = self._titles.get(session_id, "")
        self.app.push_screen(TextPrompt(f"Rename session #{session_id}", title), done)

    def action_delete(self) -> None:
        session_id = self._need_selection()
        if session_id is None:
            return
        if session_id in self.busy_sessions:
            self.notify("That session is replying in a chat: cancel the reply first.")
            return

        def done(yes: object) -> None:
            if yes:
                self.store.delete_session(session_id)
                self.post_message(self.Changed(session_id, None))
                self.notify(f"Deleted session #{session_id}.")
                self.reload()

        title = self._titles.get(session_id, "")
        self.app.push_screen(Confirm(f"Delete session #{session_id} “{title}” for good?"), done)

    def action_export(self, kind: str) -> None:
        session_id = self._need_selection()
        if session_id is not None:
            self._export(session_id, kind)

    @work(thread=True, group="sessions-export", exit_on_error=False)
    def _export(self, session_id: int, kind: str) -> None:
        title = self._titles.get(session_id, "session")
        path = self.exports_dir / f"session-{session_id}-{_slug(title)}.{kind}"
        try:
            if kind == "md":
                text = self.store.export_markdown(session_id)
            else:
                data = self.store.export_json(session_id)
                text = json.dumps(data, ensure_ascii=False, indent=2) + "\n"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
        except (StoreError, OSError) as e:
            self.app.call_from_thread(self.notify, f"Export failed: {e}", severity="error")
            return
        self.app.call_from_thread(self.notify, f"Exported to {path}", timeout=8)


def _count(n: int, noun: str) -> str:
    """'1 session', '3 sessions'."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _message_count(shape: BranchShape) -> str:
    """The messages of one branch, and how many branches there are if more than one."""
    if shape.branches <= 1:
        return str(shape.messages)
    return f"{shape.messages} ({shape.branches} branches)"


def _matched_words(snippet: str) -> tuple[str, ...]:
    """The words an FTS snippet marks as matched, as they are written in the message."""
    return tuple(re.findall(f"{MARK_OPEN}(.*?){MARK_CLOSE}", snippet, flags=re.DOTALL))


def _snippet(snippet: str) -> Text:
    """FTS snippet with \\x01 ... \\x02 around matches -> highlighted Text, one line."""
    text = Text()
    for i, part in enumerate(re.split(f"[{MARK_OPEN}{MARK_CLOSE}]", snippet.replace("\n", " "))):
        text.append(part, style="bold reverse" if i % 2 else "")
    return text
