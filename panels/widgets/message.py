"""One chat message: who, the text as Markdown (streamed into while a reply arrives), its stats.

Focus a message (Tab / Shift+Tab, or click) to copy it or one of its code blocks, to edit and
resend a prompt, to regenerate a reply, or to give the result of one of its tool calls (t): each
call shows as its own block, its name and its arguments (pretty-printed once they are whole).
"""

from __future__ import annotations

import json
import time

from markdown_it import MarkdownIt
from markdown_it.rules_core import StateCore
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.content import Content
from textual.markup import escape
from textual.message import Message
from textual.widgets import Markdown, Static

from panels.client import ChatChunk, ToolCall
from panels.conversation import Turn
from panels.format import clean_text, seconds, stats_line
from panels.widgets import shown

LIVE_INTERVAL_S = 0.25
_STATUS_NOTE = {
    "cancelled": "[$warning]cancelled[/]",
    "interrupted": "[$warning]interrupted (the app stopped while it streamed)[/]",
    "error": "[$error]error[/]",
}


def _parser() -> MarkdownIt:
    """Markdown as the chat shows it: a line break is a line break. A model (or a person) writes
    one where it means one; CommonMark would join the lines, and Textual draws only hard breaks
    (markdown-it's `breaks` option changes the HTML renderer, not the tokens)."""
    parser = MarkdownIt("gfm-like")
    parser.core.ruler.push("hard_breaks", _hard_breaks)
    return parser


def _hard_breaks(state: StateCore) -> None:
    for token in state.tokens:
        for child in token.children or ():
            if child.type == "softbreak":
                child.type = "hardbreak"


class MessageView(Vertical, can_focus=True):
    """A turn of the conversation. Posts `MessageView.Requested` for the chat to act on."""

    DEFAULT_CSS = """
    MessageView .msg-tool-call {
        height: auto;
        border: round $accent 60%;
        padding: 0 1;
    }
    """

    BINDINGS = [
        Binding("c", "request('copy')", "Copy", id="message.copy"),
        Binding("k", "request('copy_code')", "Copy code", id="message.copy_code"),
        Binding("e", "request('edit')", "Edit & resend", id="message.edit"),
        Binding("r", "request('regenerate')", "Regenerate", id="message.regenerate"),
        Binding("t", "request('answer_tool')", "Tool result", id="message.answer_tool"),
    ]

    class Requested(Message):
        """The user asked for `action` (copy, copy_code, edit, regenerate, answer_tool) on a
        message."""

        def __init__(self, view: MessageView, action: str) -> None:
            super().__init__()
            self.view = view
            self.action = action

    def __init__(self, turn: Turn, index: int) -> None:
        super().__init__(classes=f"message -{turn.role}")
        self.turn = turn
        self.index = index
        self.note = ""  # a transient status: waiting for the model, streaming...
        self._live_at = 0.0
        self._stats_long = False  # the stats line was wider than the message (it wraps)

    def compose(self) -> ComposeResult:
        yield Static(self._header(), classes="msg-header", markup=True)
        yield Markdown(clean_text(self.turn.content), classes="msg-body", parser_factory=_parser)
        for call in self.turn.tool_calls:
            yield Static(tool_call_block(call), classes="msg-tool-call", markup=False)
        yield Static(self._stats(), classes="msg-stats", markup=True)

    def show_tool_calls(self, calls: tuple[ToolCall, ...] | list[ToolCall]) -> None:
        """The reply's tool calls so far, one block each (the last one may still grow)."""
        blocks = list(self.query(".msg-tool-call").results(Static))
        for call, block in zip(calls, blocks, strict=False):
            block.update(tool_call_block(call))
        new = [
            Static(tool_call_block(c), classes="msg-tool-call", markup=False)
            for c in calls[len(blocks) :]
        ]
        if new:
            self.mount_all(new, before=self.query_one(".msg-stats"))

    @property
    def body(self) -> Markdown:
        return self.query_one(".msg-body", Markdown)

    def _header(self) -> str:
        who = {"user": "You", "assistant": "Assistant", "tool": "Tool result"}[self.turn.role]
        parts = [f"[b]{who}[/b]"]
        if self.turn.role == "tool":
            parts.append(f"[$text-muted]for {escape(str(self.turn.stats.get('name', '')))}[/]")
        if self.turn.status in _STATUS_NOTE:
            parts.append(_STATUS_NOTE[self.turn.status])
        return "  ".join(parts)

    def _stats(self) -> str:
        if self.note:
            return f"[$text-muted]{self.note}[/]"
        stats = self.turn.stats
        line = stats_line(stats) if self.turn.role == "assistant" else ""
        if stats.get("error"):
            line = (line + " · " if line else "") + f"[$error]{escape(str(stats['error']))}[/]"
        return f"[$text-muted]{line}[/]" if line else ""

    def show_live(self, chunk: ChatChunk) -> bool:
        """Running stats while the reply streams (a few times a second: cheap for the UI).
        False when it skipped the work (too soon, or not on screen)."""
        now = time.monotonic()
        if now - self._live_at < LIVE_INTERVAL_S or not shown(self):  # unseen: skip the work
            return False
        self._live_at = now
        parts = [f"{chunk.num_tokens} tok"]
        if chunk.ttft_s is not None:
            parts.append(f"TTFT {seconds(chunk.ttft_s)}")
        if chunk.tokens_per_s is not None:
            parts.append(f"{chunk.tokens_per_s:.1f} tok/s")
        self.refresh_meta("streaming · " + " · ".join(parts) + " · Esc cancels")
        return True

    def refresh_meta(self, note: str = "") -> None:
        self.note = note
        self.query_one(".msg-header", Static).update(self._header(), layout=False)  # 1 line
        stats = self.query_one(".msg-stats", Static)
        text = self._stats()
        # A new layout (costly while replies stream) only when the stats line may change height.
        long = len(Content.from_markup(text).plain) > self.size.width - 2  # it wraps
        relayout = not stats.display or long or self._stats_long
        self._stats_long = long
        stats.update(text, layout=relayout)
        stats.display = bool(text)
        if not note and self.has_focus:  # the status changed: regenerate may be allowed now
            self.refresh_bindings()

    def on_mount(self) -> None:
        self.query_one(".msg-stats", Static).display = bool(self._stats())

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action != "request" or not parameters:
            return True
        what = parameters[0]
        if what == "edit":
            return self.turn.role == "user"
        if what == "regenerate":
            return self.turn.role == "assistant" and self.turn.status != "streaming"
        if what == "answer_tool":
            return bool(self.turn.tool_calls) and self.turn.status != "streaming"
        return True

    def action_request(self, action: str) -> None:
        self.post_message(self.Requested(self, action))


def tool_call_block(call: ToolCall) -> str:
    """A tool call as its block shows it: the function's name, then its arguments, indented
    JSON once they parse (as they stream: the text so far)."""
    try:
        arguments = json.dumps(json.loads(call["arguments"]), indent=2, ensure_ascii=False)
    except json.JSONDecodeError:
        arguments = call["arguments"]
    return f"⚙ {call['name']}(…)\n{arguments}" if arguments else f"⚙ {call['name']}(…)"
