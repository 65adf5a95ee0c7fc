"""The Sessions panel's preview of one saved session: the conversation first, one branch of it.

A message with alternatives (an edited prompt, a regenerated reply) says `‹ 2/3 ›`; focus it and
press `[` / `]` (or ← / →) to show the branch through another one. A search hit is scrolled to and
its matching words are marked. The session's settings come last, folded away.
"""

from __future__ import annotations

import asyncio
import json
import re
from dataclasses import dataclass

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical, VerticalScroll
from textual.markup import escape
from textual.message import Message as TextualMessage
from textual.widget import Widget
from textual.widgets import Collapsible, Markdown, Static

from panels.format import stats_line
from panels.widgets.message import _parser as chat_markdown_parser
from store import Message, Session, Store

PREVIEW_CHARS = 20_000  # of message text shown; open the session in Chat to read it all
MARK_STYLE = "bold reverse"
_WHO = {"user": "You", "assistant": "Assistant", "system": "System"}


@dataclass(frozen=True)
class PreviewTurn:
    """A message of the shown branch, and the ids of its alternatives (itself included)."""

    message: Message
    alternatives: tuple[int, ...]  # same parent, oldest first

    @property
    def position(self) -> int:
        """1-based: this is alternative `position` of `len(alternatives)`."""
        return self.alternatives.index(self.message.id) + 1


@dataclass(frozen=True)
class PreviewData:
    """What the preview shows: a window of one branch, where to scroll, what to mark."""

    session: Session
    turns: tuple[PreviewTurn, ...]
    focus_id: int | None = None  # the message to scroll to (a search hit, a switched branch)
    hit_id: int | None = None  # the message a search matched: its `marks` are highlighted
    marks: tuple[str, ...] = ()
    earlier: int = 0  # messages of the branch before `turns`, left out to keep it short
    later: int = 0  # and after


def load_preview(
    store: Store,
    session_id: int,
    through: int | None = None,
    hit_id: int | None = None,
    marks: tuple[str, ...] = (),
) -> PreviewData:
    """Read what to preview (call it in a worker thread): the session's latest branch, or with
    `through` the latest branch through that message, scrolled to it."""
    session = store.get_session(session_id)
    leaf = store.latest_leaf(session_id, under=through) if through is not None else None
    branch = store.messages(session_id, leaf)
    focus = next((i for i, m in enumerate(branch) if m.id == through), 0)
    start, end = _window([len(m.content) for m in branch], focus, PREVIEW_CHARS)
    turns = tuple(
        PreviewTurn(m, tuple(s.id for s in store.siblings(m.id))) for m in branch[start:end]
    )
    return PreviewData(session, turns, through, hit_id, marks, start, len(branch) - end)


def _window(sizes: list[int], focus: int, budget: int) -> tuple[int, int]:
    """The slice of messages to show: from the first (or, if that does not reach it, from
    `focus`) while their text fits in `budget`; always at least one message."""
    start = 0 if sum(sizes[: focus + 1]) <= budget else focus
    end, used = start, 0
    while end < len(sizes) and (end == start or used + sizes[end] <= budget):
        used += sizes[end]
        end += 1
    return start, end


def marked(text: str, words: tuple[str, ...]) -> Text:
    """`text` with every whole-word, case-insensitive occurrence of `words` highlighted."""
    out = Text(text)
    if words:
        alternatives = "|".join(re.escape(w) for w in sorted(set(words), key=len, reverse=True))
        out.highlight_regex(re.compile(rf"\b(?:{alternatives})\b", re.IGNORECASE), MARK_STYLE)
    return out


def _clipped(text: str, markdown: bool = True) -> str:
    """At most PREVIEW_CHARS of `text`, saying so if it was cut (in Markdown, or plain)."""
    if len(text) <= PREVIEW_CHARS:
        return text
    more = "… (open the session to read it all)"
    return text[:PREVIEW_CHARS] + "\n\n" + (f"*{more}*" if markdown else more)


class PreviewMessage(Vertical, can_focus=True):
    """One message of the preview; where it has alternatives, `[` / `]` switch between them."""

    BINDINGS = [
        Binding(
            "left_square_bracket,left",
            "switch(-1)",
            "Previous branch",
            id="sessions.previous_branch",
        ),
        Binding(
            "right_square_bracket,right", "switch(1)", "Next branch", id="sessions.next_branch"
        ),
    ]

    class SwitchRequested(TextualMessage):
        """Show the branch through `message_id` (an alternative of the focused message)."""

        def __init__(self, message_id: int) -> None:
            super().__init__()
            self.message_id = message_id

    def __init__(self, turn: PreviewTurn, marks: tuple[str, ...] = ()) -> None:
        super().__init__(classes=f"preview-message -{turn.message.role}")
        self.turn = turn
        self.marks = marks

    @property
    def message_id(self) -> int:
        return self.turn.message.id

    def compose(self) -> ComposeResult:
        yield Static(self._header(), classes="preview-header")
        text = self.turn.message.content
        if self.marks:  # plain text, so the match can be marked where it is
            yield Static(marked(_clipped(text, False), self.marks), classes="preview-body -hit")
        else:
            yield Markdown(
                _clipped(text), classes="preview-body", parser_factory=chat_markdown_parser
            )
        message = self.turn.message
        if message.role == "assistant" and message.stats:
            yield Static(
                f"[$text-muted]{escape(stats_line(message.stats))}[/]", classes="preview-stats"
            )

    def _header(self) -> str:
        message = self.turn.message
        parts = [f"[b]{_WHO.get(message.role, message.role)}[/b]"]
        count = len(self.turn.alternatives)
        if count > 1:
            parts.append(f"[$accent]‹ {self.turn.position}/{count} ›[/]")
            parts.append(f"[$text-muted]{escape('[ ]')} switch[/]")
        if message.status != "complete":
            parts.append(f"[$warning]{message.status}[/]")
        if self.marks:
            parts.append("[$text-muted]search match[/]")
        return "  ".join(parts)

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action == "switch":
            return len(self.turn.alternatives) > 1
        return True

    def action_switch(self, step: int) -> None:
        """To the previous / next alternative, round the end."""
        alternatives = self.turn.alternatives
        index = (self.turn.position - 1 + step) % len(alternatives)
        self.post_message(self.SwitchRequested(alternatives[index]))


def _settings(session: Session) -> Collapsible:
    """The session's model and configuration as one folded line at the end."""
    options = len(session.sampling) + len(session.engine_config)
    title = f"Settings: {session.model.rstrip('/').rsplit('/', 1)[-1]} · {options} options"
    lines = [f"- Model: `{session.model}`", f"- Created: {session.created_at}"]
    for name, values in (("Sampling", session.sampling), ("Engine", session.engine_config)):
        if values:
            shown = json.dumps(values, ensure_ascii=False, indent=2)
            lines += ["", f"**{name}**", "", "```json", shown, "```"]
    return Collapsible(
        Markdown("\n".join(lines)), title=title, collapsed=True, id="preview-settings"
    )


def _widgets(data: PreviewData) -> list[Widget]:
    session = data.session
    widgets: list[Widget] = []
    if session.system_prompt:
        system = f"[b]System[/b]\n{escape(_clipped(session.system_prompt, False))}"
        widgets.append(Static(system, classes="preview-system"))
    if data.earlier:
        widgets.append(Static(f"… {data.earlier} earlier messages", classes="preview-note"))
    for turn in data.turns:
        is_hit = turn.message.id == data.hit_id
        widgets.append(PreviewMessage(turn, data.marks if is_hit else ()))
    if not data.turns:
        widgets.append(Static("No messages yet.", classes="preview-note"))
    if data.later:
        note = f"… {data.later} more messages (open the session to read them all)"
        widgets.append(Static(note, classes="preview-note"))
    widgets.append(_settings(session))
    return widgets


class SessionPreview(VerticalScroll):
    """Shows PreviewData; the panel reads it from the store and calls `show`."""

    def __init__(self, **kwargs: str) -> None:
        super().__init__(**kwargs)
        self.data: PreviewData | None = None
        self._replacing = asyncio.Lock()  # two shows from two workers must not interleave

    def message_view(self, message_id: int) -> PreviewMessage | None:
        for view in self.query(PreviewMessage):
            if view.message_id == message_id:
                return view
        return None

    def show(self, data: PreviewData | None, take_focus: bool = False) -> None:
        """Replace what is shown (None: nothing); scroll to `data.focus_id`, and focus it if
        asked. Returns at once: the widgets are replaced in order, one show after the other."""
        self.run_worker(self._replace(data, take_focus), group="session-preview-replace")

    async def _replace(self, data: PreviewData | None, take_focus: bool) -> None:
        async with self._replacing:
            self.data = data
            self.border_title = f"Preview: {escape(data.session.title)}" if data else "Preview"
            with self.app.batch_update():
                await self.remove_children()
                if data is not None:
                    await self.mount_all(_widgets(data))
            target = self.message_view(data.focus_id) if data and data.focus_id else None
            if target is None:
                self.scroll_home(animate=False)
                return
            if take_focus:
                target.focus(scroll_visible=False)
            self.call_after_refresh(self.scroll_to_widget, target, animate=False, top=True)
