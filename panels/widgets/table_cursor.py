"""The key of a DataTable's highlighted row: the panels' lists (sessions, builds, bench runs) find
the item the user is on this way."""

from __future__ import annotations

from textual.widgets import DataTable


def cursor_row_key(table: DataTable) -> str | None:
    """The highlighted row's key, or None when the table is empty or its cursor is on no row."""
    if not table.row_count:
        return None
    try:
        key = table.coordinate_to_cell_key((table.cursor_row, 0)).row_key.value
    except Exception:  # the cursor is past the rows while the table is being refilled
        return None
    return str(key) if key else None
