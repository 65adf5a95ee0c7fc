"""The Chat panel: several chats (each may be replying at once), the active one's settings."""

from __future__ import annotations

import sqlite3
from typing import ClassVar

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal
from textual.widgets import ContentSwitcher, OptionList
from textual.widgets.option_list import Option

from panels.client import ChatParams, EngineHandle
from panels.conversation import Conversation
from panels.widgets import shown
from panels.widgets.chat_settings import ChatSettings
from panels.widgets.chat_view import ChatView
from panels.widgets.message import MessageView
from store import NotFoundError, OpenChat, Store, StoreError

HELP = """\
## Chat

Talk to the loaded model through its chat template. Replies stream in as Markdown and are saved
to the session store as they arrive (a reply cut short by a crash shows as *interrupted*).

- **Enter** sends; **Ctrl+J** (or Shift+Enter, where the terminal tells them apart) starts a
  new line, and a paste keeps all its lines. While the model is still loading you can type and
  send: the reply starts when the model is ready.
- **Esc** cancels the streaming reply; the engine frees its KV blocks at once.
- **Several chats** can reply at the same time (Ctrl+N opens one; Alt+←/→ or the list on the
  left switch): the Monitor panel shows them batched together.
- **At the next launch** the chats open when you quit come back, in the same order, on the
  branch they showed, the same one on screen (a chat with nothing sent yet does not).
- **Regenerate** (Ctrl+R, or `r` on a focused reply) and **edit & resend** (↑ in an empty input,
  or `e` on a focused prompt) keep the old branch in the session.
- Focus a message with Tab / Shift+Tab: `c` copies it, `k` copies a code block.
- **Settings** (Ctrl+O): system prompt, temperature, top-p, top-k, max tokens and seed, per chat,
  applied from the next reply and saved with the session; also **Tools** (OpenAI `tools` JSON)
  and the tool choice (auto, none, required).
- **Tool calls** show as blocks in the reply (the function and its arguments, as they stream);
  `t` on a focused reply gives a call's result, and once every call has one the model answers.
- **Context**: the line under the prompt counts the chat's prompt tokens against the model's
  context. With *Drop oldest turns* on (the default) a long chat leaves its oldest turns out of
  the prompt (the system prompt stays) so that it goes on; off, a message that cannot fit is
  not sent, and says so.
"""


class ChatPanel(Horizontal):
    """Chats in a ContentSwitcher, a list to pick one, and the settings sidebar."""

    HELP: ClassVar[str] = HELP
    BINDINGS = [
        Binding("escape", "cancel", "Cancel", id="chat.cancel", priority=True),
        Binding("ctrl+n", "new_chat", "New chat", id="chat.new"),
        Binding("ctrl+r", "regenerate", "Regenerate", id="chat.regenerate"),
        Binding("ctrl+y", "copy_reply", "Copy reply", id="chat.copy", show=False),
        Binding("ctrl+o", "toggle_settings", "Settings", id="chat.settings"),
        Binding("up", "edit_last", "Edit last prompt", id="chat.edit_last", show=False),
        Binding("alt+right", "next_chat", "Next chat", id="chat.next", show=False),
        Binding("alt+left", "previous_chat", "Previous chat", id="chat.previous", show=False),
    ]

    def __init__(
        self,
        store: Store,
        handle: EngineHandle,
        params: ChatParams,
        system_prompt: str = "",
        **kwargs: str,
    ) -> None:
        super().__init__(**kwargs)
        self.store = store
        self.handle = handle
        self.default_params = params
        self.default_system_prompt = system_prompt
        self._numbers = 0  # the last chat number shown ("Chat 3")
        self._ids = 0  # widget ids: never reused, while a number is (see open_session)
        self._remembered: list[OpenChat] = []  # the open chats as the store has them
        self._not_reopened: list[str] = []  # saved chats that could not be reopened, and why
        self._remember_failed = False

    def compose(self) -> ComposeResult:
        yield OptionList(id="chat-list")
        views, active = self._reopen()
        with ContentSwitcher(id="chats", initial=active.id):
            yield from views
        yield ChatSettings(active.conv.params, active.conv.system_prompt, id="chat-settings")

    def on_mount(self) -> None:
        self.query_one("#chat-list", OptionList).border_title = "Chats"
        self._refresh_list()
        if self._not_reopened:
            self.notify(
                "\n".join(self._not_reopened),
                title="Chats not reopened",
                severity="warning",
                timeout=10,
            )

    def _new_view(self, conv: Conversation | None = None, number: int | None = None) -> ChatView:
        if number is None:
            self._numbers += 1
            number = self._numbers
        self._ids += 1
        conv = conv or Conversation(self.store, self.default_params, self.default_system_prompt)
        return ChatView(number, conv, self.handle, view_id=f"chat-{self._ids}")

    # -- across launches -----------------------------------------------------------------------

    def _reopen(self) -> tuple[list[ChatView], ChatView]:
        """The chats open when the app last quit, in order and each on the branch it showed, and
        the one on screen then (else the last); a new chat if there are none. One that cannot be
        reopened (its session deleted meanwhile, a damaged database) is left out, and the reason
        kept in `_not_reopened`."""
        try:
            self._remembered = self.store.open_chats()
        except (StoreError, sqlite3.Error) as e:
            self._not_reopened.append(f"The list of open chats could not be read ({e}).")
        views: list[ChatView] = []
        active: ChatView | None = None
        for chat in self._remembered:
            try:
                conv = Conversation.resume(
                    self.store, chat.session_id, self.default_params, chat.leaf_id
                )
            except NotFoundError:
                self._not_reopened.append(f"Session #{chat.session_id} was deleted.")
                continue
            except (StoreError, sqlite3.Error) as e:
                self._not_reopened.append(f"Session #{chat.session_id}: {e}")
                continue
            views.append(self._new_view(conv))
            if chat.active:
                active = views[-1]
        if not views:
            views.append(self._new_view())
        return views, active or views[-1]

    def _remember_open_chats(self) -> None:
        """Save the chats that have a session, in order, each with the branch it shows, and which
        one is on screen: what the next launch reopens (`_reopen`). Only what changed is written."""
        if not self.app.is_running:  # quitting: the chats are being taken down, not closed
            return
        current = self.query_one(ContentSwitcher).current
        chats = [
            OpenChat(view.conv.session_id, view.conv.leaf_id, view.id == current)
            for view in self.views
            if view.conv.session_id is not None
        ]
        if chats == self._remembered:
            return
        self._remembered = chats
        try:
            self.store.save_open_chats(chats)
        except (StoreError, sqlite3.Error) as e:
            if not self._remember_failed:  # said once: it is retried at the next change
                self._remember_failed = True
                self.notify(f"The open chats could not be saved ({e}).", severity="warning")

    # -- which chat ----------------------------------------------------------------------------

    @property
    def views(self) -> list[ChatView]:
        return list(self.query(ChatView))

    @property
    def active(self) -> ChatView:
        switcher = self.query_one(ContentSwitcher)
        return switcher.query_one(f"#{switcher.current}", ChatView)

    def focus_prompt(self) -> None:
        self.active.prompt.focus()

    def switch_to(self, view: ChatView) -> None:
        self.query_one(ContentSwitcher).current = view.id
        self.query_one(ChatSettings).load(view.conv.params, view.conv.system_prompt)
        self._refresh_list()
        if shown(self):  # focusing inside a hidden tab would switch to it
            view.prompt.focus()

    async def add_chat(
        self, conv: Conversation | None = None, number: int | None = None
    ) -> ChatView:
        view = self._new_view(conv, number)
        await self.query_one(ContentSwitcher).add_content(view)
        self.switch_to(view)
        return view

    async def open_session(self, session_id: int) -> ChatView:
        """Show a saved session (switching to it if a chat already has it open) to resume it."""
        for view in self.views:
            if view.conv.session_id == session_id:
                self.switch_to(view)
                return view
        conv = Conversation.resume(self.store, session_id, self.default_params)
        old = self.active
        untouched = not old.conv.turns and not old.streaming  # replaced, number and all
        view = await self.add_chat(conv, old.number if untouched else None)
        if untouched:
            await old.remove()
            self._refresh_list()
        return view

    async def close_chat(self, view: ChatView | None = None) -> None:
        view = view or self.active
        view.cancel()
        if len(self.views) == 1:
            await self.add_chat()
        views = self.views
        if view is self.active:
            at = views.index(view)
            self.switch_to(views[at + 1] if at + 1 < len(views) else views[at - 1])
        await view.remove()
        self._refresh_list()

    async def session_deleted(self, session_id: int) -> None:
        for view in self.views:
            if view.conv.session_id == session_id:
                await self.close_chat(view)

    def refresh_contexts(self) -> None:
        for view in self.views:
            if not view.streaming:
                view.refresh_context()

    def streaming_session_ids(self) -> set[int]:
        return {v.conv.session_id for v in self.views if v.streaming and v.conv.session_id}

    def _refresh_list(self) -> None:
        chat_list = self.query_one("#chat-list", OptionList)
        views = self.views
        highlighted = chat_list.highlighted
        chat_list.clear_options()
        chat_list.add_options(Option(Text(v.label), id=v.id) for v in views)
        try:
            current = views.index(self.active)
        except (ValueError, LookupError):
            current = highlighted
        chat_list.highlighted = current
        for view in views:
            view.chats_open = len(views)
            view.refresh_header()
        self._remember_open_chats()  # every change of the chats shown comes through here

    # -- events --------------------------------------------------------------------------------

    def on_chat_view_updated(self, event: ChatView.Updated) -> None:
        self._refresh_list()

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        event.stop()
        view = self.query_one(f"#{event.option.id}", ChatView)
        self.switch_to(view)

    def on_chat_settings_changed(self, event: ChatSettings.Changed) -> None:
        event.stop()
        self.active.apply_settings(event.params, event.system_prompt)

    # -- actions -------------------------------------------------------------------------------

    def action_cancel(self) -> None:
        active = self.active
        if active.cancel() or active.stop_editing():
            return
        if isinstance(self.app.focused, MessageView):
            self.focus_prompt()

    async def action_new_chat(self) -> None:
        await self.add_chat()

    async def action_close_chat(self) -> None:
        await self.close_chat()

    def action_regenerate(self) -> None:
        self.active.regenerate()

    def action_copy_reply(self) -> None:
        self.active.copy()

    def action_copy_code(self) -> None:
        self.active.copy_code()

    def action_edit_last_prompt(self) -> None:
        self.active.edit()

    def action_edit_last(self) -> None:
        focused = self.app.focused
        if focused is self.active.prompt and not self.active.prompt.text:
            self.active.edit()
        elif isinstance(focused, MessageView):
            self.app.action_focus_previous()

    def action_toggle_settings(self) -> None:
        settings = self.query_one(ChatSettings)
        if settings.display:
            settings.add_class("-hidden").remove_class("-shown")
            self.focus_prompt()
        else:
            settings.add_class("-shown").remove_class("-hidden")
            settings.query_one("#system-prompt").focus()

    def _cycle(self, step: int) -> None:
        views = self.views
        self.switch_to(views[(views.index(self.active) + step) % len(views)])

    def action_next_chat(self) -> None:
        self._cycle(1)

    def action_previous_chat(self) -> None:
        self._cycle(-1)
