"""The active chat's system prompt and sampling parameters, edited in place.

A value takes effect from the next reply as soon as it is valid; an invalid one is marked and
says why, and the chat keeps its last valid parameters. Tools (OpenAI's `tools` JSON list) are
kept as typed: bad ones are marked and say why, and the chat sends nothing until they are fixed
or cleared.
"""

from __future__ import annotations

import dataclasses

from textual.app import ComposeResult
from textual.containers import Horizontal, VerticalScroll
from textual.message import Message
from textual.widgets import Checkbox, Input, Label, Select, Static, TextArea

from panels.client import TOOL_CHOICES, ChatParams, parse_tools

# field name, label, Input type, placeholder
_FIELDS: tuple[tuple[str, str, str, str], ...] = (
    ("temperature", "Temperature", "number", "0 = greedy"),
    ("top_p", "Top-p", "number", "0..1"),
    ("top_k", "Top-k", "integer", "0 = off"),
    ("max_tokens", "Max tokens", "integer", ">= 1"),
    ("seed", "Seed", "integer", "random"),
)


class ChatSettings(VerticalScroll):
    """Sidebar of the chat panel (Ctrl+O shows or hides it)."""

    DEFAULT_CSS = """
    ChatSettings #param-tools { height: 8; }
    ChatSettings #param-tools.-invalid { border: tall $error; }
    """

    class Changed(Message):
        """Valid new settings for the active chat."""

        def __init__(self, params: ChatParams, system_prompt: str) -> None:
            super().__init__()
            self.params = params
            self.system_prompt = system_prompt

    def __init__(self, params: ChatParams, system_prompt: str = "", **kwargs: str) -> None:
        super().__init__(**kwargs)
        self.border_title = "Chat settings"
        self._params = params
        self._system_prompt = system_prompt

    def compose(self) -> ComposeResult:
        yield Label("System prompt", classes="setting-label")
        yield TextArea(self._system_prompt, id="system-prompt", soft_wrap=True)
        for name, label, kind, placeholder in _FIELDS:
            with Horizontal(classes="setting-row"):
                yield Label(label, classes="setting-name")
                yield Input(
                    _text(getattr(self._params, name)),
                    placeholder=placeholder,
                    type=kind,  # type: ignore[arg-type]
                    id=f"param-{name.replace('_', '-')}",
                    classes="setting-input",
                    compact=True,
                )
        yield Checkbox(
            "Drop oldest turns",
            self._params.drop_oldest,
            id="param-drop-oldest",
            tooltip="Past the model's context, leave the oldest turns out of the prompt (the "
            "system prompt stays) so that the chat goes on",
            compact=True,
        )
        yield Label("Tools (OpenAI JSON list)", classes="setting-label")
        yield TextArea(self._params.tools, id="param-tools", soft_wrap=True, language="json")
        with Horizontal(classes="setting-row"):
            yield Label("Tool choice", classes="setting-name")
            yield Select(
                [(c, c) for c in TOOL_CHOICES],
                value=self._params.tool_choice,
                allow_blank=False,
                id="param-tool-choice",
                classes="setting-input",
                compact=True,
            )
        yield Checkbox(
            "Parallel tool calls",
            self._params.parallel_tool_calls,
            id="param-parallel-tools",
            tooltip="A reply may call several tools at once (off: one call at most)",
            compact=True,
        )
        yield Static("", id="settings-error")
        yield Static(
            "[$text-muted]Applies from the next reply. Saved with the session.[/]",
            id="settings-hint",
        )

    def load(self, params: ChatParams, system_prompt: str) -> None:
        """Show another chat's settings (posts no Changed)."""
        self._params, self._system_prompt = params, system_prompt
        with self.prevent(Input.Changed, TextArea.Changed, Select.Changed):
            self.query_one("#system-prompt", TextArea).text = system_prompt
            self.query_one("#param-tools", TextArea).text = params.tools
            self.query_one("#param-tool-choice", Select).value = params.tool_choice
            for name, *_ in _FIELDS:
                self._input(name).value = _text(getattr(params, name))
                self._input(name).remove_class("-invalid")
        with self.prevent(Checkbox.Changed):
            self.query_one("#param-drop-oldest", Checkbox).value = params.drop_oldest
            self.query_one("#param-parallel-tools", Checkbox).value = params.parallel_tool_calls
        self.query_one("#settings-error", Static).update(self._tools_error())

    def _tools_error(self) -> str:
        """The inline error for bad tools ("" when they are good or empty), marking the field."""
        tools = self.query_one("#param-tools", TextArea)
        try:
            parse_tools(tools.text)
        except ValueError as e:
            tools.add_class("-invalid")
            return f"[$error]{e}. Nothing is sent until the tools are fixed or cleared.[/]"
        tools.remove_class("-invalid")
        return ""

    def _input(self, name: str) -> Input:
        return self.query_one(f"#param-{name.replace('_', '-')}", Input)

    def read(self) -> ChatParams:
        """The parameters the inputs hold; raises ValueError naming the bad one."""
        values: dict[str, float | int | bool | str | None] = {
            "drop_oldest": self.query_one("#param-drop-oldest", Checkbox).value,
            "tools": self.query_one("#param-tools", TextArea).text,
            "tool_choice": str(self.query_one("#param-tool-choice", Select).value),
            "parallel_tool_calls": self.query_one("#param-parallel-tools", Checkbox).value,
        }
        for name, label, kind, _ in _FIELDS:
            raw = self._input(name).value.strip()
            try:
                if not raw:
                    if name != "seed":
                        raise ValueError("is empty")
                    values[name] = None
                else:
                    values[name] = int(raw) if kind == "integer" else float(raw)
            except ValueError as e:
                self._input(name).add_class("-invalid")
                raise ValueError(f"{label}: {e}") from e
        try:
            return dataclasses.replace(self._params, **values)  # keeps what is not shown here
        except ValueError as e:
            bad = next((n for n, label, *_ in _FIELDS if label.lower() in str(e)), None)
            if bad:
                self._input(bad).add_class("-invalid")
            raise

    def _changed(self) -> None:
        for name, *_ in _FIELDS:
            self._input(name).remove_class("-invalid")
        error = self.query_one("#settings-error", Static)
        try:
            params = self.read()
        except ValueError as e:
            error.update(f"[$error]{e}[/]")
            return
        error.update(self._tools_error())
        self._params = params
        self._system_prompt = self.query_one("#system-prompt", TextArea).text
        self.post_message(self.Changed(params, self._system_prompt))

    def on_input_changed(self, event: Input.Changed) -> None:
        event.stop()
        self._changed()

    def on_text_area_changed(self, event: TextArea.Changed) -> None:
        event.stop()
        self._changed()

    def on_checkbox_changed(self, event: Checkbox.Changed) -> None:
        event.stop()
        self._changed()

    def on_select_changed(self, event: Select.Changed) -> None:
        event.stop()
        self._changed()


def _text(value: object) -> str:
    return "" if value is None else f"{value:g}" if isinstance(value, float) else str(value)
