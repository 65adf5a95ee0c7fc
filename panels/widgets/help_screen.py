"""F1: help for the focused panel, with every key it answers to (as remapped by the keymap) and
the binding ids a config file's [keymap] table uses. Its own footer shows its own keys: the app's
footer, under it, would show the panel's, which do nothing while the help is up."""

from __future__ import annotations

from dataclasses import dataclass

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Footer, Markdown, Static


@dataclass(frozen=True)
class KeyHelp:
    keys: str  # as the user types them, e.g. "ctrl+n"
    description: str
    binding_id: str
    scope: str  # where the key works: "this panel", "a focused message", "everywhere"


def pretty_keys(keys: str) -> str:
    """'ctrl+n,escape' -> 'Ctrl+N, Esc'."""
    names = {"escape": "Esc", "slash": "/", "delete": "Del", "up": "↑", "down": "↓"}
    out = []
    for key in keys.split(","):
        parts = [names.get(p, p if len(p) > 1 else p.upper()) for p in key.strip().split("+")]
        out.append("+".join(p[:1].upper() + p[1:] if len(p) > 1 else p for p in parts))
    return ", ".join(out)


def keys_markdown(keys: list[KeyHelp]) -> str:
    rows = ["| Key | Does | Where | Keymap id |", "|---|---|---|---|"]
    rows += [
        f"| `{pretty_keys(k.keys)}` | {k.description} | {k.scope} | `{k.binding_id}` |"
        for k in keys
    ]
    return "\n".join(rows)


def key_help(bindings: list[Binding], scope: str, keymap: dict[str, str]) -> list[KeyHelp]:
    return [
        KeyHelp(keymap.get(b.id, b.key) if b.id else b.key, b.description, b.id or "", scope)
        for b in bindings
        if b.description
    ]


class HelpScreen(ModalScreen[None]):
    BINDINGS = [Binding("escape,f1,q", "dismiss", "Close help", id="help.close")]

    def __init__(self, panel_help: str, keys: list[KeyHelp], footer: str) -> None:
        super().__init__(classes="dialog")
        self._text = f"{panel_help}\n### Keys\n\n{keys_markdown(keys)}\n\n{footer}\n"

    def compose(self) -> ComposeResult:
        with VerticalScroll(id="help-box"):
            yield Markdown(self._text, id="help-text")
        yield Static("[$text-muted]Esc, F1 or q closes this help[/]", id="help-hint")
        yield Footer(compact=True)

    def on_mount(self) -> None:
        self.query_one("#help-box").border_title = "Help"
        self.query_one("#help-box").focus()
