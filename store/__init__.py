"""The Workbench's SQLite store (sessions, messages, builds, benchmark runs) on sqlite-utils.

Open it with ``open_store()`` (the user data dir) or ``open_store(args.db)`` for ``--db PATH``;
one Store is shared by the whole app, threads included.
"""

from .db import MIGRATIONS, Store, default_data_dir, default_db_path, open_store
from .errors import NotFoundError, StoreError
from .models import BenchRun, Build, Message, OpenChat, SearchHit, Session, SessionSummary

__all__ = [
    "MIGRATIONS",
    "BenchRun",
    "Build",
    "Message",
    "NotFoundError",
    "OpenChat",
    "SearchHit",
    "Session",
    "SessionSummary",
    "Store",
    "StoreError",
    "default_data_dir",
    "default_db_path",
    "open_store",
]
