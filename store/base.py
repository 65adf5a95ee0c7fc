"""State shared by the Store mixins: one sqlite-utils Database behind one re-entrant lock.

Thread model: the TUI writes from worker threads, so the single sqlite3 connection is opened with
``check_same_thread=False`` and every public method holds ``StoreBase.lock`` for its whole body
(including consuming query generators). One connection plus a lock keeps transactions simple and
is plenty for a chat app; SQLite serializes writers anyway. Other *processes* (``workbench serve``)
are handled by WAL and the busy timeout.
"""

from __future__ import annotations

import functools
import json
import sqlite3
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Concatenate, ParamSpec, TypeVar

from sqlite_utils import Database
from sqlite_utils.db import NotFoundError as SqliteUtilsNotFound
from sqlite_utils.db import Table

from .errors import NotFoundError, StoreError

P = ParamSpec("P")
R = TypeVar("R")
S = TypeVar("S", bound="StoreBase")


class StoreBase:
    """Holds the connection and the lock; the mixins add the domain methods."""

    def __init__(self, db: Database, path: Path | None) -> None:
        self.db = db
        self.path = path  # None for an in-memory store
        self.lock = threading.RLock()

    def table(self, name: str) -> Table:
        """The named table (``db[name]`` is typed Table | View, which the type checker dislikes)."""
        return self.db.table(name)

    def _get(self, table: str, row_id: int, what: str | None = None) -> dict[str, Any]:
        """The row, or NotFoundError naming it ("no session 7")."""
        try:
            return self.table(table).get(row_id)
        except SqliteUtilsNotFound:
            raise NotFoundError(f"no {what or table.rstrip('s')} {row_id}") from None

    def _update(self, table: str, row_id: int, values: dict[str, Any]) -> None:
        """Table.update() plus updated_at, with NotFoundError for a missing row."""
        try:
            self.table(table).update(row_id, {**values, "updated_at": utc_now()})
        except SqliteUtilsNotFound:
            raise NotFoundError(f"no {table.rstrip('s')} {row_id}") from None


DAMAGED = ("SQLITE_CORRUPT", "SQLITE_NOTADB")  # a file that opened but whose pages are bad


def locked(method: Callable[Concatenate[S, P], R]) -> Callable[Concatenate[S, P], R]:
    """Run ``method`` holding the store's lock, so threads never interleave on the connection.

    A database damaged past its first page opens fine and fails on a later query: that failure
    is the store's own StoreError, naming the file, like one found when opening.
    """

    @functools.wraps(method)
    def wrapper(self: S, *args: P.args, **kwargs: P.kwargs) -> R:
        with self.lock:
            try:
                return method(self, *args, **kwargs)
            except sqlite3.DatabaseError as e:
                if getattr(e, "sqlite_errorname", "") not in DAMAGED:
                    raise
                where = self.path or "the in-memory database"
                raise StoreError(
                    f"{where} is damaged ({e}); move it away to start a new one"
                ) from e

    return wrapper


def utc_now() -> str:
    """ISO-8601 UTC with microseconds: sorts as text, and rows written in one tick still order."""
    return datetime.now(UTC).isoformat(timespec="microseconds")


def dumps(value: dict[str, Any] | None) -> str:
    """JSON text for a JSON column; ``default=str``: a Path in a config must not lose a chat."""
    return json.dumps(value or {}, ensure_ascii=False, default=str)


def loads(text: str | None) -> dict[str, Any]:
    """The dict stored in a JSON column ({} for NULL/empty)."""
    return json.loads(text) if text else {}
