"""The chat's prompt: several lines, Enter sends, Shift+Enter or Ctrl+J starts a new line.

A paste arrives whole, line breaks and all (TextArea inserts the pasted text as it is). Many
terminals send Shift+Enter as a plain Enter; Ctrl+J (a line feed) reaches the app in all of them.
"""

from __future__ import annotations

from textual import events
from textual.message import Message
from textual.widgets import TextArea

NEWLINE_KEYS = ("shift+enter", "ctrl+j")
# TextArea actions whose keys the app and the chat use for more (F6 shows Bench, Ctrl+Y copies
# the reply): left to them, their key passes on to those bindings.
YIELDED_ACTIONS = frozenset({"select_line", "redo"})


class PromptArea(TextArea):
    """A multi-line message box that posts `PromptArea.Submitted` on Enter."""

    class Submitted(Message):
        """Enter was pressed: `text` is the message as typed."""

        def __init__(self, prompt: PromptArea, text: str) -> None:
            super().__init__()
            self.prompt = prompt
            self.text = text

        @property
        def control(self) -> PromptArea:
            return self.prompt

    def __init__(self, placeholder: str = "", **kwargs: str) -> None:
        super().__init__(soft_wrap=True, show_line_numbers=False, placeholder=placeholder, **kwargs)

    def set_text(self, text: str) -> None:
        """Replace the whole text and put the cursor at its end."""
        self.text = text
        self.move_cursor(self.document.end)

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        # Up in an empty prompt belongs to the chat (edit the last prompt), not to the cursor.
        if action in YIELDED_ACTIONS or (action == "cursor_up" and not self.text):
            return False
        return super().check_action(action, parameters)

    async def _on_key(self, event: events.Key) -> None:
        if event.key == "enter":
            event.stop()
            event.prevent_default()
            self.post_message(self.Submitted(self, self.text))
            return
        if event.key in NEWLINE_KEYS:
            event.stop()
            event.prevent_default()
            start, end = self.selection
            self._replace_via_keyboard("\n", start, end)
            return
        await super()._on_key(event)
