"""Opening the Workbench database: where it lives, refusing files that aren't ours, migrating.

Invariant: a file is only ever written after it has been read and judged to be a Workbench
database at a schema version this code knows (or an empty file). Anything else raises StoreError
and the file is left byte-identical: no WAL switch, no migration, no "recreate".
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

from sqlite_utils import Database

from .errors import NotFoundError, StoreError
from .runs import RunsMixin
from .schema import APPLICATION_ID, MIGRATIONS, Migration
from .sessions import SessionsMixin

__all__ = [
    "MIGRATIONS",
    "NotFoundError",
    "Store",
    "StoreError",
    "default_data_dir",
    "default_db_path",
    "open_store",
]

DB_FILENAME = "workbench.db"
BUSY_TIMEOUT_S = 10.0  # another process (workbench serve) may hold the write lock briefly


class Store(SessionsMixin, RunsMixin):
    """The Workbench database. Safe to share between threads (one connection + a lock).

    Build one with :func:`open_store`; close it (or use it as a context manager) when done.
    """

    def close(self) -> None:
        """Close the connection; WAL is checkpointed by SQLite when the last connection closes."""
        with self.lock:
            self.db.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def schema_version(self) -> int:
        """The ``PRAGMA user_version`` of the open file."""
        with self.lock:
            return int(self.db.execute("PRAGMA user_version").fetchone()[0])


def default_data_dir() -> Path:
    """``$WORKBENCH_HOME``, else ``$XDG_DATA_HOME/workbench``, else ``~/.local/share/workbench``.

    Hand-rolled rather than platformdirs, which is not a dependency; a relative XDG_DATA_HOME is
    ignored as the XDG spec requires.
    """
    if home := os.environ.get("WORKBENCH_HOME"):
        return Path(home).expanduser()
    xdg = os.environ.get("XDG_DATA_HOME")
    base = Path(xdg) if xdg and Path(xdg).is_absolute() else Path.home() / ".local" / "share"
    return base / "workbench"


def default_db_path() -> Path:
    """Where the database lives unless ``--db PATH`` says otherwise."""
    return default_data_dir() / DB_FILENAME


def open_store(path: Path | str | None = None) -> Store:
    """Open (creating if needed) the Workbench database at ``path`` (default: default_db_path()).

    ``":memory:"`` gives a private in-memory store (tests, demos). Raises StoreError, with a
    one-line message, if the file is not a Workbench database, is corrupt, is locked, or was
    written by a newer Workbench; such a file is never modified.
    """
    if path is None:
        path = default_db_path()
    memory = str(path) == ":memory:"
    file_path = None if memory else Path(path).expanduser()
    if file_path is not None:
        try:
            file_path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StoreError(f"cannot create {file_path.parent} ({e.strerror})") from e
    where = ":memory:" if file_path is None else str(file_path)
    try:
        conn = sqlite3.connect(where, check_same_thread=False, timeout=BUSY_TIMEOUT_S)
    except sqlite3.Error as e:
        raise StoreError(f"cannot open {where} ({e})") from e
    # No plugins: third-party sqlite-utils plugins have no business on our connection.
    db = Database(conn, execute_plugins=False)
    try:
        _check_is_ours(db, where, len(MIGRATIONS))
        if not memory:
            db.enable_wal()
            # WAL + NORMAL: each commit survives a process crash (a streamed reply's partial
            # text included) without an fsync per streamed update.
            db.execute("PRAGMA synchronous = NORMAL")
        db.execute("PRAGMA foreign_keys = ON")  # cascades: session -> messages -> FTS rows
        migrate(db, where, MIGRATIONS)
    except sqlite3.Error as e:
        db.close()
        raise _as_store_error(where, e) from e
    except BaseException:
        db.close()
        raise
    return Store(db, file_path)


def _check_is_ours(db: Database, where: str, known_version: int) -> None:
    """Raise StoreError unless ``db`` is empty or a Workbench database at <= known_version.

    Only reads: the header pragmas and a count of schema objects.
    """
    app_id = int(db.execute("PRAGMA application_id").fetchone()[0])
    version = int(db.execute("PRAGMA user_version").fetchone()[0])
    n_objects = int(db.execute("SELECT count(*) FROM sqlite_master").fetchone()[0])
    if app_id != APPLICATION_ID and (app_id != 0 or version != 0):
        raise StoreError(
            f"{where} is not a Workbench database (application_id {app_id:#x}, "
            f"schema version {version})"
        )
    if version == 0 and n_objects > 0:
        raise StoreError(
            f"{where} is not a Workbench database (it has tables but no Workbench schema version)"
        )
    if version > known_version:
        raise StoreError(
            f"{where} was written by a newer Workbench (schema version {version}, "
            f"this one knows {known_version}): upgrade Workbench"
        )


def migrate(db: Database, where: str, migrations: list[Migration]) -> None:
    """Apply the migrations the file lacks, one transaction each, bumping user_version in it.

    ``BEGIN IMMEDIATE`` takes the write lock before re-reading the version, so two processes
    opening a fresh file at once can't both run migration 1: the second waits, then skips it.
    """
    for target, step in enumerate(migrations, start=1):
        if int(db.execute("PRAGMA user_version").fetchone()[0]) >= target:
            continue
        db.execute("BEGIN IMMEDIATE")
        try:
            if int(db.execute("PRAGMA user_version").fetchone()[0]) < target:
                step(db)
                db.execute(f"PRAGMA user_version = {target}")
            db.commit()
        except BaseException as e:
            db.rollback()
            if isinstance(e, Exception):
                raise StoreError(
                    f"{where}: migration to schema version {target} failed ({e}); "
                    "the database was left at the previous version"
                ) from e
            raise


def _as_store_error(where: str, e: sqlite3.Error) -> StoreError:
    """One line for the user from a sqlite3 error raised while opening."""
    name = getattr(e, "sqlite_errorname", "")
    if name in ("SQLITE_NOTADB", "SQLITE_CORRUPT") or not isinstance(e, sqlite3.OperationalError):
        return StoreError(f"{where} is not a Workbench database ({e})")
    if name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")):
        return StoreError(f"{where} is locked by another process ({e})")
    return StoreError(f"cannot open {where} ({e})")
