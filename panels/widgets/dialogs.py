"""Small modal dialogs: ask for a line of text, confirm, pick one of several items. Each has its
own footer with its own keys: the app's footer, under it, would show the panel's, which do
nothing while the dialog is up."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Footer, Input, Label, OptionList
from textual.widgets.option_list import Option


class _Dialog(ModalScreen[object]):
    BINDINGS = [Binding("escape", "dismiss_none", "Cancel", id="dialog.cancel")]
    DEFAULT_CLASSES = "dialog"

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog-box"):
            yield from self.body()
        yield Footer(compact=True)

    def body(self) -> ComposeResult:
        """The dialog's widgets, inside its box."""
        raise NotImplementedError

    def action_dismiss_none(self) -> None:
        self.dismiss(None)


class TextPrompt(_Dialog):
    """Ask for one line; dismisses with the text (stripped) or None."""

    def __init__(self, title: str, value: str = "") -> None:
        super().__init__()
        self._title, self._value = title, value

    def body(self) -> ComposeResult:
        yield Label(self._title, classes="dialog-title")
        yield Input(self._value, id="dialog-input")
        yield Label("[$text-muted]Enter to save · Esc to cancel[/]", classes="dialog-hint")

    def on_input_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        text = event.value.strip()
        self.dismiss(text or None)


class Confirm(_Dialog):
    """Ask yes or no; dismisses with True or None."""

    BINDINGS = [Binding("y", "yes", "Yes", id="dialog.yes"), *_Dialog.BINDINGS]

    def __init__(self, question: str, yes: str = "Delete") -> None:
        super().__init__()
        self._question, self._yes = question, yes

    def body(self) -> ComposeResult:
        yield Label(self._question, classes="dialog-title")
        with Horizontal(classes="dialog-buttons"):
            yield Button(f"{self._yes} (y)", variant="error", id="dialog-yes")
            yield Button("Cancel (Esc)", id="dialog-no")

    def on_mount(self) -> None:
        self.query_one("#dialog-no", Button).focus()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        event.stop()
        self.dismiss(True if event.button.id == "dialog-yes" else None)

    def action_yes(self) -> None:
        self.dismiss(True)


class Pick(_Dialog):
    """Pick one of several items; dismisses with its index or None."""

    def __init__(self, title: str, items: list[str]) -> None:
        super().__init__()
        self._title, self._items = title, items

    def body(self) -> ComposeResult:
        yield Label(self._title, classes="dialog-title")
        yield OptionList(*(Option(item, id=str(i)) for i, item in enumerate(self._items)))
        yield Label("[$text-muted]Enter to pick · Esc to cancel[/]", classes="dialog-hint")

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        event.stop()
        self.dismiss(event.option_index)
