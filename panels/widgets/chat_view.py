"""One chat: its messages, the prompt input, and the reply streaming into it.

Invariant: `_views[i]` shows `conv.turns[i]`; at most one reply streams per chat (several chats
stream at once, which is how the engine's batching shows in the monitor).
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import sqlite3
import time
from typing import Any

from textual import work
from textual.app import ComposeResult
from textual.containers import Vertical, VerticalScroll
from textual.markup import escape
from textual.message import Message
from textual.widgets import Markdown, Static
from textual.widgets.markdown import MarkdownStream
from textual.worker import Worker

from panels.client import ChatChunk, ChatMessage, ChatParams, EngineHandle, ToolCall, parse_tools
from panels.context import ContextFit, fit_messages, reply_room
from panels.conversation import Conversation, Turn, TurnStatus, reply_stats
from panels.format import clean_text, code_blocks
from panels.widgets.dialogs import Pick, TextPrompt
from panels.widgets.message import MessageView
from panels.widgets.prompt import PromptArea
from store import StoreError

_request_ids = itertools.count(1)
RENDER_INTERVAL_S = 0.2  # a streaming reply grows 5 times a second: each growth costs a layout


class ChatView(Vertical):
    """A conversation with the engine; the chat panel shows one ChatView at a time."""

    class Updated(Message):
        """The chat's title, session or streaming state changed."""

        def __init__(self, view: ChatView) -> None:
            super().__init__()
            self.view = view

    class SessionSaved(Message):
        """A turn was written to the store (the sessions list may refresh)."""

        def __init__(self, session_id: int) -> None:
            super().__init__()
            self.session_id = session_id

    def __init__(
        self, number: int, conv: Conversation, handle: EngineHandle, view_id: str | None = None
    ) -> None:
        super().__init__(id=view_id or f"chat-{number}", classes="chat-view")
        self.number = number
        self.conv = conv
        self.handle = handle
        self.request_id: str | None = None  # the engine request streaming now
        self.editing: int | None = None  # index of the user turn being edited
        self._views: list[MessageView] = []
        self._reply: Worker[None] | None = None
        self._save_failed = False
        self._context_len: int | None = None  # the model's context, once known
        self.chats_open = 1  # how many chats the panel has (the header says how to switch)

    # -- layout --------------------------------------------------------------------------------

    def compose(self) -> ComposeResult:
        yield Static("", classes="chat-header")
        with VerticalScroll(classes="chat-messages", can_focus=False):
            yield Static(
                "[$text-muted]Type a message below: Enter sends, Ctrl+J starts a new line. "
                "F1 lists every key.[/]",
                classes="chat-empty",
            )
            for index, turn in enumerate(self.conv.turns):
                view = MessageView(turn, index)
                self._views.append(view)
                yield view
        yield Static("", classes="chat-edit-hint")
        yield PromptArea(
            "Message (Enter sends, Ctrl+J or Shift+Enter: new line)", classes="chat-prompt"
        )
        yield Static("", classes="chat-context")

    def on_mount(self) -> None:
        self.messages.anchor()
        self.refresh_header()

    @property
    def messages(self) -> VerticalScroll:
        return self.query_one(".chat-messages", VerticalScroll)

    @property
    def prompt(self) -> PromptArea:
        return self.query_one(".chat-prompt", PromptArea)

    @property
    def streaming(self) -> bool:
        return self._reply is not None

    @property
    def label(self) -> str:
        mark = "● " if self.streaming else ""
        title = self.conv.title if len(self.conv.title) <= 14 else self.conv.title[:13] + "…"
        return f"{mark}{self.number}. {title}"

    def refresh_header(self) -> None:
        parts = [f"[b]Chat {self.number}[/b]", escape(self.conv.title)]
        if self.chats_open > 1:
            parts[0] += f" [$text-muted](of {self.chats_open}: Alt+←/→)[/]"
        if self.conv.session_id is not None:
            parts.append(f"[$text-muted]session #{self.conv.session_id}[/]")
        parts.append(f"[$text-muted]{self.conv.params.describe()}[/]")
        if self.streaming:
            parts.append("[$success]● replying[/]")
        self.query_one(".chat-header", Static).update(" · ".join(parts))
        self.query_one(".chat-empty").display = not self.conv.turns
        if not self.streaming:
            self.refresh_context()
        hint = self.query_one(".chat-edit-hint", Static)
        hint.display = self.editing is not None
        if self.editing is not None:
            hint.update(
                f"[$warning]Editing message {self.editing + 1}[/]: Enter resends it as a new "
                "branch (the old one stays in the session) · Esc stops editing"
            )

    def _changed(self) -> None:
        self.refresh_header()
        self.post_message(self.Updated(self))

    # -- turns ---------------------------------------------------------------------------------

    def _truncate_views(self, n: int) -> None:
        for view in self._views[n:]:
            view.remove()
        del self._views[n:]

    def _append_view(self, turn: Turn) -> MessageView:
        view = MessageView(turn, len(self._views))
        self._views.append(view)
        self.messages.mount(view)
        self.messages.anchor()
        return view

    def apply_settings(self, params: ChatParams, system_prompt: str) -> None:
        self.conv.system_prompt = system_prompt
        if params != self.conv.params:
            self.conv.set_params(params)
        self.refresh_header()

    # -- the context ---------------------------------------------------------------------------

    def _fit(self, messages: list[ChatMessage]) -> ContextFit:
        """`messages` cut to the model's context as this chat's settings say (unchecked while
        the model loads: the engine refuses what does not fit, and the reply shows why)."""
        client = self.handle.client
        if client is None:
            return ContextFit(messages, None, None)
        params = self.conv.params
        return fit_messages(
            messages,
            functools.partial(client.count_prompt_tokens, tools=self._tools()),
            client.max_model_len,
            params.max_tokens,
            params.drop_oldest,
        )

    def _tools(self) -> list[dict[str, Any]] | None:
        """The chat's tools, which the prompt holds too (None while they are bad: not sent)."""
        try:
            return parse_tools(self.conv.params.tools)
        except ValueError:
            return None

    def refresh_context(self, live: ChatChunk | None = None) -> None:
        """The meter under the prompt: tokens of the whole conversation (or of the streaming
        reply's prompt and reply so far) against the model's context."""
        meter = self.query_one(".chat-context", Static)
        params = self.conv.params
        drop = "on" if params.drop_oldest else "off"
        if live is not None:
            used, context = live.num_prompt_tokens + live.num_tokens, self._context_len
        else:
            client = self.handle.client
            messages = self.conv.engine_messages()
            used = client.count_prompt_tokens(messages, self._tools()) if client and messages else 0
            context = client.max_model_len if client else None
            if used is None:  # an attached engine: what the last reply used, as it reported
                last = next((t for t in reversed(self.conv.turns) if t.role == "assistant"), None)
                stats = last.stats if last else {}
                if stats.get("prompt_tokens"):
                    used = int(stats["prompt_tokens"]) + int(stats.get("tokens") or 0)
        self._context_len = context
        if context is None:
            meter.update("[$text-muted]Context: the model's length is not known yet[/]")
            return
        if used is None:
            meter.update(f"[$text-muted]Context {context:,} tokens · drop oldest turns: {drop}[/]")
            return
        share = used / context
        colour = "$error" if share >= 1 else "$warning" if share >= 0.75 else "$text-muted"
        text = f"[{colour}]Context {used:,} / {context:,} tokens ({share:.0%})[/]"
        if live is None and used + reply_room(params.max_tokens, context) > context:
            text += (
                " [$warning]· the next prompt leaves the oldest turns out[/]"
                if params.drop_oldest
                else " [$warning]· full: turn on dropping the oldest turns[/]"
            )
        meter.update(f"{text} [$text-muted]· drop oldest turns: {drop} (Ctrl+O)[/]")

    def on_prompt_area_submitted(self, event: PromptArea.Submitted) -> None:
        event.stop()
        self.send(event.text)

    def send(self, text: str) -> bool:
        """Send a prompt (or resend an edited one). False if it was not sent."""
        if not text.strip():
            return False
        if self.streaming:
            self.notify("This chat is still replying: Esc cancels it, Ctrl+N opens another chat.")
            return False
        try:
            parse_tools(self.conv.params.tools)
        except ValueError as e:
            self.notify(f"Not sent: {e} (chat settings, Ctrl+O).", severity="error", timeout=8)
            return False
        upto = self.editing if self.editing is not None else len(self.conv.turns)
        fit = self._fit([*self.conv.engine_messages(upto), {"role": "user", "content": text}])
        if not fit.fits:
            self.notify(fit.refusal(self.conv.params.drop_oldest), severity="error", timeout=10)
            return False
        try:
            reply = self.conv.start_turn(text, *self._engine_info(), replace=self.editing)
        except (StoreError, sqlite3.Error) as e:
            self.notify(f"Not sent: the session store failed ({e}).", severity="error")
            return False
        self.editing = None
        self._truncate_views(len(self.conv.turns) - 2)
        self._append_view(self.conv.turns[-2])
        self.prompt.set_text("")
        self._start_reply(reply, fit)
        return True

    def regenerate(self, index: int | None = None) -> None:
        """Generate the reply at `index` (default: the last one) again, as a new branch."""
        if self.streaming:
            self.notify("Wait for the reply to finish, or cancel it with Esc.")
            return
        if index is None:
            index = len(self.conv.turns) - 1
        if index < 1 or index >= len(self.conv.turns) or self.conv.turns[index].role != "assistant":
            self.notify("There is no reply to regenerate yet.", severity="warning")
            return
        fit = self._fit(self.conv.engine_messages(upto=index))
        if not fit.fits:
            self.notify(fit.refusal(self.conv.params.drop_oldest), severity="error", timeout=10)
            return
        try:
            reply = self.conv.start_regenerate(index, *self._engine_info())
        except (StoreError, sqlite3.Error) as e:
            self.notify(f"Not regenerated: the session store failed ({e}).", severity="error")
            return
        self._truncate_views(index)
        self._start_reply(reply, fit)

    def edit(self, index: int | None = None) -> None:
        """Put a prompt (default: the last one) back in the input; Enter resends it."""
        if self.streaming:
            self.notify("Wait for the reply to finish, or cancel it with Esc.")
            return
        users = [i for i, t in enumerate(self.conv.turns) if t.role == "user"]
        if index is None:
            if not users:
                self.notify("There is no message to edit yet.", severity="warning")
                return
            index = users[-1]
        self.editing = index
        self.prompt.set_text(self.conv.turns[index].content)
        self.prompt.focus()
        self.refresh_header()

    def stop_editing(self) -> bool:
        if self.editing is None:
            return False
        self.editing = None
        self.prompt.set_text("")
        self.refresh_header()
        return True

    def cancel(self) -> bool:
        """Cancel the streaming reply (its KV blocks are freed). False if none streams."""
        if self._reply is None:
            return False
        client = self.handle.client
        if self.request_id is not None and client is not None:
            client.abort(self.request_id)  # the stream ends with finish_reason "abort"
        else:
            self._reply.cancel()  # still waiting for the model: nothing in the engine yet
        return True

    def copy(self, index: int | None = None) -> None:
        turn = self._turn(index, "assistant")
        if turn is None:
            self.notify("Nothing to copy yet.", severity="warning")
            return
        self.app.copy_to_clipboard(turn.content)
        self.notify(f"Copied the {turn.role} message ({len(turn.content)} characters).")

    def copy_code(self, index: int | None = None) -> None:
        turn = self._turn(index, "assistant")
        blocks = code_blocks(turn.content) if turn else []
        if not blocks:
            self.notify("That message has no code block.", severity="warning")
            return
        if len(blocks) == 1:
            self._copy_block(blocks[0])
            return
        items = [f"{i + 1}. {(b.splitlines() or [''])[0][:60]}" for i, b in enumerate(blocks)]

        def picked(choice: object) -> None:
            if isinstance(choice, int):
                self._copy_block(blocks[choice])

        self.app.push_screen(Pick("Copy which code block?", items), picked)

    def _copy_block(self, code: str) -> None:
        self.app.copy_to_clipboard(code)
        self.notify(f"Copied a code block ({len(code.splitlines())} lines).")

    def _turn(self, index: int | None, role: str) -> Turn | None:
        if index is not None:
            return self.conv.turns[index]
        return next((t for t in reversed(self.conv.turns) if t.role == role), None)

    def on_message_view_requested(self, event: MessageView.Requested) -> None:
        event.stop()
        index = event.view.index
        actions = {
            "copy": self.copy,
            "copy_code": self.copy_code,
            "edit": self.edit,
            "regenerate": self.regenerate,
            "answer_tool": self.answer_tool,
        }
        actions[event.action](index)

    # -- tool results --------------------------------------------------------------------------

    def answer_tool(self, index: int | None = None) -> None:
        """Ask for the result of one of the last reply's tool calls (a pick first when several
        wait); once every call has its result, the model replies."""
        if self.streaming:
            self.notify("Wait for the reply to finish, or cancel it with Esc.")
            return
        calls = self.conv.unanswered_calls()
        last = max(
            (i for i, t in enumerate(self.conv.turns) if t.role == "assistant"), default=None
        )
        if index is not None and index != last:
            self.notify("Only the last reply's tool calls can be answered.", severity="warning")
            return
        if not calls:
            self.notify("No tool call waits for a result.", severity="warning")
            return
        if len(calls) == 1:
            self._ask_tool_result(calls[0])
            return
        items = [f"{c['name']} {c['arguments'][:50]}" for c in calls]

        def picked(choice: object) -> None:
            if isinstance(choice, int):
                self._ask_tool_result(calls[choice])

        self.app.push_screen(Pick("Give the result of which call?", items), picked)

    def _ask_tool_result(self, call: ToolCall) -> None:
        def given(result: object) -> None:
            if isinstance(result, str):
                self.give_tool_result(call, result)

        self.app.push_screen(TextPrompt(f"Result of {call['name']}", ""), given)

    def give_tool_result(self, call: ToolCall, result: str) -> bool:
        """Add `result` as the `tool` message answering `call`; the model replies once no call
        of its last reply waits. False if it was not added."""
        try:
            turn = self.conv.add_tool_result(call, result)
        except ValueError as e:
            self.notify(str(e), severity="warning")
            return False
        except (StoreError, sqlite3.Error) as e:
            self.notify(f"Not sent: the session store failed ({e}).", severity="error")
            return False
        self._append_view(turn)
        if self.conv.unanswered_calls():
            self.notify("Saved. Give the other calls' results (t) for the model to reply.")
            self._changed()
            return True
        fit = self._fit(self.conv.engine_messages())
        if not fit.fits:
            self.notify(fit.refusal(self.conv.params.drop_oldest), severity="error", timeout=10)
            return True
        try:
            reply = self.conv.start_reply(*self._engine_info())
        except (StoreError, sqlite3.Error) as e:
            self.notify(f"Not sent: the session store failed ({e}).", severity="error")
            return True
        self._start_reply(reply, fit)
        return True

    # -- streaming -----------------------------------------------------------------------------

    def _engine_info(self) -> tuple[str, dict[str, Any]]:
        client = self.handle.client
        if client is not None:
            return client.model_name, client.engine_config
        return self.handle.model, dict(self.handle.options)

    def _start_reply(self, reply: Turn, fit: ContextFit) -> None:
        view = self._append_view(reply)
        self._reply = self._stream(reply, view, fit, self.conv.params)
        assert self.conv.session_id is not None
        self.post_message(self.SessionSaved(self.conv.session_id))
        self._changed()

    @work(group="replies", exit_on_error=False)
    async def _stream(
        self,
        reply: Turn,
        view: MessageView,
        fit: ContextFit,
        params: ChatParams,
    ) -> None:
        start = time.monotonic()
        self._save_failed = False
        text, last, error, unsent = "", None, None, False
        status: TurnStatus = "complete"
        stream = None
        try:
            if self.handle.status == "loading":
                view.refresh_meta("waiting for the model to load…")
            client = await self.handle.wait()
            view.refresh_meta("waiting for the engine…")
            self.request_id = f"chat{self.number}-{next(_request_ids)}"
            stream = Markdown.get_stream(view.body)
            shown, flushed_at = 0, 0.0  # characters of `text` in the Markdown widget, and when
            async for chunk in client.chat(fit.messages, params, self.request_id):
                last = chunk
                text = chunk.text
                now = time.monotonic()
                # Markdown re-lays out on every append: a few appends a second read as smooth
                # streaming, and a chat that is not on screen catches up when it is.
                if chunk.finished or (self.display and now - flushed_at >= RENDER_INTERVAL_S):
                    await stream.write(clean_text(text[shown:]))
                    shown, flushed_at = len(text), now
                    if chunk.tool_calls:
                        view.show_tool_calls(chunk.tool_calls)
                if chunk.finished:
                    break
                if view.show_live(chunk):
                    self.refresh_context(chunk)
                self._save_partial(reply, text)
            reason = last.finish_reason if last else None
            status = "cancelled" if reason == "abort" else "error" if reason == "error" else status
            error = last.error if last else None
        except asyncio.CancelledError:
            status = "cancelled"
            raise
        except Exception as e:  # whatever the engine raised ends this reply, not the chat
            status, error = "error", _reason(e)
            # No engine to send to (it failed to load, the server is gone), as opposed to an
            # engine that refused the request (ValueError): nothing was sent.
            unsent = isinstance(e, RuntimeError) and last is None
        finally:
            try:
                if stream is not None:
                    await _end_stream(stream, view, clean_text(text))
            finally:
                stats = reply_stats(last, params, time.monotonic() - start)
                stats.update(context=fit.context, dropped_messages=fit.dropped or None)
                if error:
                    stats["error"] = error
                if unsent and error and self.conv.holds_only_first_exchange():
                    self._unsend(error)
                else:
                    self._finish(reply, view, text, status, stats)

    def _unsend(self, error: str) -> None:
        """A new chat's first message that never reached an engine: no session is kept for it
        (it would hold only an error); the message goes back into the prompt."""
        prompt = self.conv.turns[0].content
        session_id = self.conv.session_id
        try:
            self.conv.discard()
        except (StoreError, sqlite3.Error) as e:
            self.notify(f"The failed session could not be removed ({e}).", severity="warning")
        self.request_id = None
        self._reply = None
        self.notify(f"Not sent: {error}", severity="error", timeout=8)
        if not self.is_attached:
            return
        self._truncate_views(0)
        if not self.prompt.text:
            self.prompt.set_text(prompt)
        self._changed()
        if session_id is not None:
            self.post_message(self.SessionSaved(session_id))  # the sessions list drops it

    def _save_partial(self, reply: Turn, text: str) -> None:
        try:
            self.conv.save_partial(reply, text)
        except (StoreError, sqlite3.Error) as e:
            if not self._save_failed:  # say it once per reply, keep streaming
                self._save_failed = True
                self.notify(f"Saving the reply failed ({e}); it goes on.", severity="warning")

    def _finish(
        self,
        reply: Turn,
        view: MessageView,
        text: str,
        status: TurnStatus,
        stats: dict[str, Any],
    ) -> None:
        stats = {k: v for k, v in stats.items() if v is not None}
        try:
            self.conv.finish_reply(reply, text, status, stats)
        except (StoreError, sqlite3.Error) as e:
            reply.content, reply.status, reply.stats = text, status, stats
            self.notify(f"The reply could not be saved ({e}).", severity="error")
        self.request_id = None
        self._reply = None
        if view.is_attached:
            view.refresh_meta()
        if self.is_attached:
            self._changed()
            assert self.conv.session_id is not None
            self.post_message(self.SessionSaved(self.conv.session_id))


def _reason(error: BaseException) -> str:
    """An engine error in one line: the engine's own words for what it raises on purpose."""
    if isinstance(error, (ValueError, RuntimeError)) and str(error):  # EngineUnavailable too
        return str(error)
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__


async def _end_stream(stream: MarkdownStream, view: MessageView, text: str) -> None:
    """Flush the Markdown stream and show exactly `text` (a stop string may cut what was shown).

    `stop()` cancels the stream's task; a task that never ran (the engine refused the request
    before the first token) hands that cancellation to the awaiter. It is not ours unless this
    task is being cancelled itself, so it must not end the worker before the reply is finished.
    """
    try:
        await stream.stop()
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise
    if view.body.source != text:
        await view.body.update(text)
