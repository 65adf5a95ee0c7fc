"""The schema, as an ordered list of migrations.

Invariant: ``PRAGMA user_version`` == the number of migrations applied. Migration ``i`` (0-based)
takes a database at version ``i`` to ``i + 1``; ``store.db`` runs each in its own transaction and
bumps the version in that same transaction, so a crash mid-migration leaves the previous version.
Never edit a released migration: append a new one.
"""

from __future__ import annotations

from collections.abc import Callable

from sqlite_utils import Database
from sqlite_utils.db import ForeignKey

Migration = Callable[[Database], None]

# Stamped into the file header (PRAGMA application_id) so another program's SQLite file that
# happens to use user_version is not mistaken for ours. ASCII "WkBn".
APPLICATION_ID = 0x576B426E

_SESSION_SUMMARIES_SQL = """
SELECT s.id, s.title, s.model, s.created_at,
       max(s.updated_at, coalesce(max(m.updated_at), '')) AS last_activity,
       count(m.id) AS message_count
FROM sessions AS s LEFT JOIN messages AS m ON m.session_id = s.id
GROUP BY s.id
""".strip()


def _v1_initial(db: Database) -> None:
    """Sessions, the message tree with FTS, builds and benchmark runs."""
    db.execute(f"PRAGMA application_id = {APPLICATION_ID}")
    db.table("sessions").create(
        {
            "id": int,
            "title": str,
            "model": str,
            "engine_config": str,  # JSON
            "sampling": str,  # JSON
            "system_prompt": str,
            "created_at": str,
            "updated_at": str,
        },
        pk="id",
        not_null=["title", "model", "engine_config", "sampling", "created_at", "updated_at"],
    )
    messages = db.table("messages").create(
        {
            "id": int,
            "session_id": int,
            "parent_id": int,  # NULL for a first turn; siblings share a parent (= edits)
            "role": str,
            "content": str,
            "status": str,
            "stats": str,  # JSON
            "created_at": str,
            "updated_at": str,
        },
        pk="id",
        not_null=["session_id", "role", "content", "status", "stats", "created_at", "updated_at"],
        foreign_keys=[
            ForeignKey("messages", "session_id", "sessions", "id", on_delete="CASCADE"),
            # Deleting a message removes the branch below it, never leaves orphans.
            ForeignKey("messages", "parent_id", "messages", "id", on_delete="CASCADE"),
        ],
    )
    messages.create_index(["session_id", "id"])
    messages.create_index(["parent_id"])
    # External-content FTS5 table kept in sync by triggers, so inserts, streaming updates and
    # cascading deletes all reach the index with no code on our side.
    messages.enable_fts(["content"], create_triggers=True)
    db.create_view("session_summaries", _SESSION_SUMMARIES_SQL)
    db.table("builds").create(
        {
            "id": int,
            "model": str,
            "recipe": str,
            "kv_dtype": str,
            "out_dir": str,
            "status": str,
            "report": str,  # JSON
            "timings": str,  # JSON
            "created_at": str,
            "updated_at": str,
        },
        pk="id",
        not_null=["model", "recipe", "kv_dtype", "out_dir", "status", "report", "timings"]
        + ["created_at", "updated_at"],
    )
    db.table("bench_runs").create(
        {
            "id": int,
            "kind": str,  # offline | online
            "model": str,
            "config": str,  # JSON
            "results": str,  # JSON
            "created_at": str,
        },
        pk="id",
        not_null=["kind", "model", "config", "results", "created_at"],
    )
    db.table("bench_runs").create_index(["kind", "id"])


def _v2_build_progress(db: Database) -> None:
    """Builds: the stage a running build is in, why one failed, the options it was started with
    (to show and to rerun it) and the process that runs it (to tell a dead build from a live one).
    """
    builds = db.table("builds")
    builds.add_column("stage", str)
    builds.add_column("error", str)
    builds.add_column("options", str)  # JSON
    builds.add_column("pid", int)


def _v3_open_chats(db: Database) -> None:
    """The chats the TUI has open, to reopen them at the next launch: in tab order (`position`),
    each at the message its shown branch ends with, one of them `active` (1). Plain ids, no
    foreign keys: a session deleted meanwhile stays listed, so the launch can say it is gone."""
    db.table("open_chats").create(
        {"position": int, "session_id": int, "leaf_id": int, "active": int},
        pk="position",
        not_null=["session_id", "active"],
    )


MIGRATIONS: list[Migration] = [_v1_initial, _v2_build_progress, _v3_open_chats]
