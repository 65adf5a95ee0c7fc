"""Widgets the panels are built from."""

from rich.text import Text
from textual.widget import Widget
from textual.widgets import Static


def shown(widget: Widget) -> bool:
    """Whether `widget` is on screen, not inside a hidden tab or chat (what is not shown need not
    be laid out, and focusing it would switch tabs)."""
    return all(node.display for node in widget.ancestors_with_self if isinstance(node, Widget))


class QuietStatic:
    """Updates Statics only when their text changed, with a layout (which re-arranges the whole
    screen) only when their number of lines changed; for panels that refresh several times a
    second. The Statics should not wrap (CSS `text-wrap: nowrap`), so lines are newlines."""

    def __init__(self) -> None:
        self._shown: dict[int, Text] = {}

    def update(self, static: Static, text: Text) -> None:
        old = self._shown.get(id(static))
        if old is not None and old == text:
            return
        relayout = old is None or old.plain.count("\n") != text.plain.count("\n")
        static.update(text, layout=relayout)
        self._shown[id(static)] = text
