"""Widgets the panels are built from."""

from textual.widget import Widget


def shown(widget: Widget) -> bool:
    """Whether `widget` is on screen, not inside a hidden tab or chat (what is not shown need not
    be laid out, and focusing it would switch tabs)."""
    return all(node.display for node in widget.ancestors_with_self if isinstance(node, Widget))
