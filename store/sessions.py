"""Chat sessions and their message trees: save as it streams, branch on edit, search, export.

Invariant: a message's parent is in the same session and was created before it, so a child's id
is always greater than its parent's. Hence a session's newest message is always a leaf, and "the
latest leaf below X" is simply the largest id among X's descendants.
"""

from __future__ import annotations

import json
import sqlite3
from typing import Any, NamedTuple

from .base import StoreBase, dumps, locked, utc_now
from .errors import NotFoundError
from .export import session_to_json, session_to_markdown
from .models import (
    MESSAGE_STATUSES,
    ROLES,
    Message,
    MessageStatus,
    OpenChat,
    Role,
    SearchHit,
    Session,
    SessionSummary,
    check_choice,
)

# Root -> leaf path, walking parent ids up from the leaf; depth orders it back down.
_BRANCH_SQL = """
WITH RECURSIVE branch(id, depth) AS (
    SELECT id, 0 FROM messages WHERE id = :leaf AND session_id = :session
    UNION ALL
    SELECT m.parent_id, b.depth + 1 FROM messages AS m JOIN branch AS b ON m.id = b.id
    WHERE m.parent_id IS NOT NULL
)
SELECT messages.* FROM branch JOIN messages ON messages.id = branch.id ORDER BY branch.depth DESC
"""

_LATEST_LEAF_UNDER_SQL = """
WITH RECURSIVE below(id) AS (
    SELECT id FROM messages WHERE id = :root AND session_id = :session
    UNION ALL
    SELECT m.id FROM messages AS m JOIN below AS b ON m.parent_id = b.id
)
SELECT max(id) FROM below
"""

# Per session: the length of the current branch (root -> latest leaf) and how many leaves it has.
_BRANCH_SHAPES_SQL = """
WITH RECURSIVE path(session_id, id) AS (
    SELECT session_id, max(id) FROM messages
    WHERE session_id IN (SELECT value FROM json_each(:sessions)) GROUP BY session_id
    UNION ALL
    SELECT p.session_id, m.parent_id FROM messages AS m JOIN path AS p ON m.id = p.id
    WHERE m.parent_id IS NOT NULL
),
leaves(session_id, n) AS (
    SELECT session_id, count(*) FROM messages AS m
    WHERE session_id IN (SELECT value FROM json_each(:sessions))
      AND NOT EXISTS (SELECT 1 FROM messages AS c WHERE c.parent_id = m.id)
    GROUP BY session_id
)
SELECT path.session_id, count(*) AS messages, leaves.n AS branches
FROM path JOIN leaves ON leaves.session_id = path.session_id
GROUP BY path.session_id
"""

# sqlite-utils' Table.search() cannot return FTS5 snippet(), so the query is ours; the escaping
# of user text is sqlite-utils' Database.quote_fts().
_SEARCH_SQL = """
SELECT m.id AS message_id, m.session_id, s.title AS session_title, m.role,
       snippet(messages_fts, 0, :mark_open, :mark_close, '…', :tokens) AS snippet, m.created_at
FROM messages_fts
JOIN messages AS m ON m.rowid = messages_fts.rowid
JOIN sessions AS s ON s.id = m.session_id
WHERE messages_fts MATCH :query {session_filter}
ORDER BY messages_fts.rank, m.id DESC
LIMIT :limit
"""


def _strict_fts_query(text: str) -> str:
    """Every whitespace-separated term as an FTS5 string, quotes doubled: always valid syntax."""
    return " ".join('"' + term.replace('"', '""') + '"' for term in text.split())


class BranchShape(NamedTuple):
    """A session's message tree in two numbers: messages on its current branch, and branches
    (leaves). Edits and regenerations add branches, not length."""

    messages: int
    branches: int


class SessionsMixin(StoreBase):
    """Session and message methods of Store."""

    # -- sessions ----------------------------------------------------------------------------

    @locked
    def create_session(
        self,
        title: str,
        model: str,
        engine_config: dict[str, Any] | None = None,
        sampling: dict[str, Any] | None = None,
        system_prompt: str | None = None,
    ) -> int:
        """Start a chat; model, engine config and sampling are kept so it can be resumed as run."""
        now = utc_now()
        table = self.table("sessions").insert(
            {
                "title": title,
                "model": model,
                "engine_config": dumps(engine_config),
                "sampling": dumps(sampling),
                "system_prompt": system_prompt,
                "created_at": now,
                "updated_at": now,
            }
        )
        return int(table.last_pk)

    @locked
    def get_session(self, session_id: int) -> Session:
        """The session's settings (raises NotFoundError)."""
        return Session.from_row(self._get("sessions", session_id))

    @locked
    def list_sessions(self, limit: int = 50, offset: int = 0) -> list[SessionSummary]:
        """Sessions, most recently active first, with message counts (one page)."""
        rows = self.db.view("session_summaries").rows_where(
            order_by="last_activity DESC, id DESC", limit=limit, offset=offset
        )
        return [SessionSummary.from_row(row) for row in rows]

    @locked
    def count_sessions(self) -> int:
        """How many sessions there are (for paging the list)."""
        return self.table("sessions").count

    @locked
    def rename_session(self, session_id: int, title: str) -> None:
        """Change a session's title."""
        self._update("sessions", session_id, {"title": title})

    @locked
    def update_session_sampling(self, session_id: int, sampling: dict[str, Any]) -> None:
        """Replace the sampling parameters after the user edits them mid-chat.

        Replies already saved keep whatever the caller put in their stats; the session row holds
        what the next reply (and a resume) will use.
        """
        self._update("sessions", session_id, {"sampling": dumps(sampling)})

    @locked
    def update_session_engine(
        self, session_id: int, model: str, engine_config: dict[str, Any]
    ) -> None:
        """Record that the chat continued on another model or engine configuration."""
        self._update(
            "sessions", session_id, {"model": model, "engine_config": dumps(engine_config)}
        )

    @locked
    def delete_session(self, session_id: int) -> None:
        """Delete a session; its messages and their FTS rows go with it (FK cascade + triggers)."""
        self._get("sessions", session_id)
        self.table("sessions").delete(session_id)

    # -- messages ----------------------------------------------------------------------------

    @locked
    def add_message(
        self,
        session_id: int,
        role: Role,
        content: str,
        parent_id: int | None = None,
        stats: dict[str, Any] | None = None,
        status: MessageStatus = "complete",
    ) -> int:
        """Append a message under ``parent_id`` (None: a first turn) and return its id.

        A second child of the same parent is a branch: that is how an edited user message or a
        regenerated reply is stored, leaving the original in place. Start a streamed reply with
        ``content="", status="streaming"`` and grow it with update_message().
        """
        check_choice("role", role, ROLES)
        check_choice("status", status, MESSAGE_STATUSES)
        if parent_id is not None:
            parent = self._get("messages", parent_id, what="message")
            if parent["session_id"] != session_id:
                raise ValueError(
                    f"message {parent_id} belongs to session {parent['session_id']}, "
                    f"not {session_id}"
                )
        else:
            self._get("sessions", session_id)
        now = utc_now()
        table = self.table("messages").insert(
            {
                "session_id": session_id,
                "parent_id": parent_id,
                "role": role,
                "content": content,
                "status": status,
                "stats": dumps(stats),
                "created_at": now,
                "updated_at": now,
            }
        )
        return int(table.last_pk)

    @locked
    def update_message(
        self,
        message_id: int,
        content: str | None = None,
        stats: dict[str, Any] | None = None,
        status: MessageStatus | None = None,
    ) -> None:
        """Overwrite the given fields of a message; called repeatedly while a reply streams.

        Hot path, so one UPDATE statement committed at once (Table.update() would add a SELECT and
        a PRAGMA per call): after it returns, a crash keeps the text so far. Pass the whole text,
        not a delta; ~10 updates a second is plenty (each one re-indexes the message for FTS).
        """
        sets = ["updated_at = ?"]
        args: list[Any] = [utc_now()]
        if content is not None:
            sets.append("content = ?")
            args.append(content)
        if stats is not None:
            sets.append("stats = ?")
            args.append(dumps(stats))
        if status is not None:
            check_choice("status", status, MESSAGE_STATUSES)
            sets.append("status = ?")
            args.append(status)
        args.append(message_id)
        cursor = self.db.execute(f"UPDATE messages SET {', '.join(sets)} WHERE id = ?", args)
        if cursor.rowcount != 1:
            raise NotFoundError(f"no message {message_id}")

    @locked
    def get_message(self, message_id: int) -> Message:
        """One message (raises NotFoundError)."""
        return Message.from_row(self._get("messages", message_id, what="message"))

    @locked
    def messages(self, session_id: int, leaf_id: int | None = None) -> list[Message]:
        """The branch from its root down to ``leaf_id`` (default: the latest leaf), in order.

        ``leaf_id`` may be any message of the session; the path ends exactly there. To show the
        branch through a sibling, pass ``latest_leaf(session_id, under=sibling_id)``.
        """
        if leaf_id is None:
            leaf_id = self.latest_leaf(session_id)
            if leaf_id is None:
                self._get("sessions", session_id)  # an empty session, or no session at all?
                return []
        rows = list(self.db.query(_BRANCH_SQL, {"leaf": leaf_id, "session": session_id}))
        if not rows:
            raise NotFoundError(f"no message {leaf_id} in session {session_id}")
        return [Message.from_row(row) for row in rows]

    @locked
    def all_messages(self, session_id: int) -> list[Message]:
        """Every message of the session, all branches, in creation order."""
        rows = self.table("messages").rows_where("session_id = ?", [session_id], order_by="id")
        return [Message.from_row(row) for row in rows]

    @locked
    def latest_leaf(self, session_id: int, under: int | None = None) -> int | None:
        """The newest leaf of the session, or of the subtree rooted at ``under``; None if empty."""
        if under is None:
            row = self.db.execute(
                "SELECT max(id) FROM messages WHERE session_id = ?", [session_id]
            ).fetchone()
        else:
            row = self.db.execute(
                _LATEST_LEAF_UNDER_SQL, {"root": under, "session": session_id}
            ).fetchone()
            if row[0] is None:
                raise NotFoundError(f"no message {under} in session {session_id}")
        return row[0]

    @locked
    def siblings(self, message_id: int) -> list[Message]:
        """The message and its alternatives (same parent), oldest first: a ``< 2/3 >`` switcher."""
        me = self._get("messages", message_id, what="message")
        rows = self.table("messages").rows_where(
            "session_id = ? AND parent_id IS ?", [me["session_id"], me["parent_id"]], order_by="id"
        )
        return [Message.from_row(row) for row in rows]

    @locked
    def branch_shapes(self, session_ids: list[int]) -> dict[int, BranchShape]:
        """Each session's BranchShape (sessions with no messages are left out), in one query."""
        rows = self.db.execute(_BRANCH_SHAPES_SQL, {"sessions": json.dumps(session_ids)})
        return {sid: BranchShape(messages, branches) for sid, messages, branches in rows}

    # -- the chats open in the TUI -----------------------------------------------------------

    @locked
    def open_chats(self) -> list[OpenChat]:
        """The chats the TUI last had open, in tab order (as save_open_chats() left them)."""
        rows = self.table("open_chats").rows_where(order_by="position")
        return [OpenChat(r["session_id"], r["leaf_id"], bool(r["active"])) for r in rows]

    @locked
    def save_open_chats(self, chats: list[OpenChat]) -> None:
        """Replace the list of open chats with ``chats`` (in tab order), in one transaction."""
        rows = [
            {"position": i, "session_id": c.session_id, "leaf_id": c.leaf_id, "active": c.active}
            for i, c in enumerate(chats)
        ]
        with self.db.atomic():
            self.db.execute("DELETE FROM open_chats")
            self.table("open_chats").insert_all(rows)

    # -- search and export -------------------------------------------------------------------

    @locked
    def search(
        self,
        query: str,
        limit: int = 50,
        session_id: int | None = None,
        highlight: tuple[str, str] = ("[", "]"),
        snippet_tokens: int = 12,
    ) -> list[SearchHit]:
        """Full-text search over message text, best match first, with a highlighted snippet.

        Any user text is safe: terms are quoted (``AND``, ``(``, ``*``, ``:`` lose their FTS
        meaning) while ``"an exact phrase"`` still works; an unbalanced quote is closed.
        """
        fts_query = self.db.quote_fts(query)
        if not fts_query.strip():
            return []
        params: dict[str, Any] = {
            "query": fts_query,
            "mark_open": highlight[0],
            "mark_close": highlight[1],
            "tokens": snippet_tokens,
            "limit": limit,
        }
        session_filter = ""
        if session_id is not None:
            session_filter = "AND m.session_id = :session"
            params["session"] = session_id
        sql = _SEARCH_SQL.format(session_filter=session_filter)
        try:
            rows = list(self.db.query(sql, params))
        except sqlite3.OperationalError:
            # quote_fts() keeps the user's own "quoted phrases", but its regex stops at a newline,
            # so a pasted multi-line query can come out unbalanced; then quote every term.
            params["query"] = _strict_fts_query(query)
            rows = list(self.db.query(sql, params))
        return [SearchHit(**row) for row in rows]

    @locked
    def export_markdown(self, session_id: int, leaf_id: int | None = None) -> str:
        """The session's current branch (or the one ending at ``leaf_id``) as Markdown."""
        return session_to_markdown(self.get_session(session_id), self.messages(session_id, leaf_id))

    @locked
    def export_json(self, session_id: int) -> dict[str, Any]:
        """The whole session, all branches, as JSON-serializable data (``json.dumps`` it)."""
        return session_to_json(
            self.get_session(session_id),
            self.all_messages(session_id),
            self.latest_leaf(session_id),
        )
