"""One chat's current branch and settings, kept in SQLite as it changes. No widgets here.

Invariant: every turn that has been shown has a row in the store (once the session exists), and a
turn's parent is the turn before it; editing or regenerating starts a sibling branch in the store
while the in-memory list holds only the branch on screen.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Literal

from panels.client import ChatChunk, ChatMessage, ChatParams, ToolCall
from store import NotFoundError, Store

TurnStatus = Literal["complete", "streaming", "cancelled", "error", "interrupted"]
TITLE_CHARS = 48
SAVE_INTERVAL_S = 0.1  # a streaming reply is saved at most ~10 times a second


@dataclass
class Turn:
    """A message. An assistant turn's tool calls are in `stats["tool_calls"]`; a tool turn (the
    result the user gave for a call) names its call in `stats["tool_call_id"]` and `["name"]`."""

    role: Literal["user", "assistant", "tool"]
    content: str
    message_id: int | None = None
    status: TurnStatus = "complete"
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def tool_calls(self) -> list[ToolCall]:
        return list(self.stats.get("tool_calls") or [])

    def message(self) -> ChatMessage:
        """The turn as the engine takes it (OpenAI's message format)."""
        if self.role == "tool":
            call_id = str(self.stats.get("tool_call_id", ""))
            return {"role": "tool", "content": self.content, "tool_call_id": call_id}
        message: ChatMessage = {"role": self.role, "content": self.content}
        if self.tool_calls:
            message["tool_calls"] = [
                {
                    "id": c["id"],
                    "type": "function",
                    "function": {"name": c["name"], "arguments": c["arguments"]},
                }
                for c in self.tool_calls
            ]
        return message


def title_from(prompt: str) -> str:
    line = next((ln.strip() for ln in prompt.splitlines() if ln.strip()), "New chat")
    return line if len(line) <= TITLE_CHARS else line[: TITLE_CHARS - 1] + "…"


def reply_stats(chunk: ChatChunk | None, params: ChatParams, elapsed_s: float) -> dict[str, Any]:
    """What is saved (and shown) under a reply."""
    stats: dict[str, Any] = {"sampling": params.to_dict(), "elapsed_s": round(elapsed_s, 4)}
    if chunk is not None:
        stats.update(
            tokens=chunk.num_tokens,
            prompt_tokens=chunk.num_prompt_tokens,
            cached_tokens=chunk.num_cached_tokens,
            finish_reason=chunk.finish_reason,
            request_id=chunk.request_id,
        )
        if chunk.tool_calls:
            stats["tool_calls"] = [dict(c) for c in chunk.tool_calls]
        if chunk.ttft_s is not None:
            stats["ttft_s"] = round(chunk.ttft_s, 4)
        if chunk.tokens_per_s is not None:
            stats["tokens_per_s"] = round(chunk.tokens_per_s, 2)
        if chunk.error:
            stats["error"] = chunk.error
    return stats


class Conversation:
    """The branch a chat shows, its sampling parameters and system prompt, and its session row."""

    def __init__(self, store: Store, params: ChatParams, system_prompt: str = "") -> None:
        self.store = store
        self.params = params
        self.system_prompt = system_prompt
        self.session_id: int | None = None
        self.title = "New chat"
        self.turns: list[Turn] = []
        self._session_system_prompt: str | None = None
        self._engine: tuple[str, dict[str, Any]] | None = None  # as the session row has it
        self._last_save: dict[int, float] = {}

    @classmethod
    def resume(
        cls, store: Store, session_id: int, default: ChatParams, leaf_id: int | None = None
    ) -> Conversation:
        """A saved session's branch ending at `leaf_id` (default, or if that message is gone: its
        latest); a reply left 'streaming' by a crash is interrupted. NotFoundError: no session."""
        session = store.get_session(session_id)
        try:
            params = ChatParams.from_dict(session.sampling, default)
        except (TypeError, ValueError):
            params = default
        conv = cls(store, params, session.system_prompt or "")
        conv.session_id = session.id
        conv.title = session.title
        conv._session_system_prompt = session.system_prompt or ""
        conv._engine = (session.model, session.engine_config)
        try:
            messages = store.messages(session_id, leaf_id)
        except NotFoundError:
            messages = store.messages(session_id)
        for m in messages:
            if m.role not in ("user", "assistant", "tool"):
                continue
            status: TurnStatus = "interrupted" if m.status == "streaming" else m.status
            conv.turns.append(Turn(m.role, m.content, m.id, status, dict(m.stats)))
        return conv

    @property
    def leaf_id(self) -> int | None:
        """The message the branch on screen ends with: resume() takes it to show that branch."""
        return self.turns[-1].message_id if self.turns else None

    # -- what the engine sees ------------------------------------------------------------------

    def engine_messages(self, upto: int | None = None) -> list[ChatMessage]:
        """System prompt + turns[:upto], for the chat template. Failed replies are left out."""
        out: list[ChatMessage] = []
        if self.system_prompt.strip():
            out.append({"role": "system", "content": self.system_prompt})
        for turn in self.turns[:upto]:
            if turn.role == "assistant" and turn.status == "error" and not turn.content:
                continue
            out.append(turn.message())
        return out

    # -- changes (each one saved at once) ------------------------------------------------------

    def set_params(self, params: ChatParams) -> None:
        self.params = params
        if self.session_id is not None:
            self.store.update_session_sampling(self.session_id, params.to_dict())

    def start_turn(
        self, prompt: str, model: str, engine_config: dict[str, Any], replace: int | None = None
    ) -> Turn:
        """Append a user turn (replacing turns[replace:], the edit-and-resend case) and an empty
        streaming reply under it; returns the reply."""
        if replace is not None:
            del self.turns[replace:]
        if self.session_id is None:
            self.title = title_from(prompt)
            self.session_id = self.store.create_session(
                self.title, model, engine_config, self.params.to_dict(), self.system_prompt or None
            )
            self._session_system_prompt = self.system_prompt
            self._engine = (model, engine_config)
        else:
            self.note_engine(model, engine_config)
        parent = self.turns[-1].message_id if self.turns else None
        user = Turn("user", prompt)
        user.message_id = self.store.add_message(self.session_id, "user", prompt, parent)
        self.turns.append(user)
        return self._start_reply()

    def unanswered_calls(self) -> list[ToolCall]:
        """The last reply's tool calls that no tool turn after it answers yet."""
        index = next(
            (i for i in range(len(self.turns) - 1, -1, -1) if self.turns[i].role != "tool"), None
        )
        if index is None or self.turns[index].role != "assistant":
            return []
        answered = {t.stats.get("tool_call_id") for t in self.turns[index + 1 :]}
        return [c for c in self.turns[index].tool_calls if c["id"] not in answered]

    def add_tool_result(self, call: ToolCall, result: str) -> Turn:
        """Append the result the user gave for one of the last reply's tool calls."""
        if call not in self.unanswered_calls():
            raise ValueError("that tool call is not the last reply's, or it is answered")
        assert self.session_id is not None
        turn = Turn("tool", result, stats={"tool_call_id": call["id"], "name": call["name"]})
        turn.message_id = self.store.add_message(
            self.session_id, "tool", result, self.turns[-1].message_id, stats=turn.stats
        )
        self.turns.append(turn)
        return turn

    def start_reply(self, model: str, engine_config: dict[str, Any]) -> Turn:
        """A reply to the turns as they are (after the tool results of the last reply)."""
        self.note_engine(model, engine_config)
        return self._start_reply()

    def start_regenerate(self, index: int, model: str, engine_config: dict[str, Any]) -> Turn:
        """Drop turns[index:] (a reply and what followed) and start a sibling reply."""
        if not (0 < index < len(self.turns)) or self.turns[index].role != "assistant":
            raise ValueError("only a reply can be regenerated")
        self.note_engine(model, engine_config)
        del self.turns[index:]
        return self._start_reply()

    def note_engine(self, model: str, engine_config: dict[str, Any]) -> None:
        """A resumed chat that goes on with another model or engine config records it."""
        if self.session_id is not None and self._engine != (model, engine_config):
            self.store.update_session_engine(self.session_id, model, engine_config)
            self._engine = (model, engine_config)

    def _start_reply(self) -> Turn:
        assert self.session_id is not None
        parent = self.turns[-1].message_id
        reply = Turn("assistant", "", status="streaming")
        reply.message_id = self.store.add_message(
            self.session_id, "assistant", "", parent, status="streaming"
        )
        self.turns.append(reply)
        return reply

    def save_partial(self, reply: Turn, text: str, force: bool = False) -> bool:
        """Save a streaming reply's text so far, at most every SAVE_INTERVAL_S."""
        assert reply.message_id is not None
        reply.content = text
        now = time.monotonic()
        if not force and now - self._last_save.get(reply.message_id, 0.0) < SAVE_INTERVAL_S:
            return False
        self._last_save[reply.message_id] = now
        self.store.update_message(reply.message_id, content=text)
        return True

    def finish_reply(
        self, reply: Turn, text: str, status: TurnStatus, stats: dict[str, Any]
    ) -> None:
        assert reply.message_id is not None
        if self.system_prompt != (self._session_system_prompt or ""):
            stats = {**stats, "system_prompt": self.system_prompt}
        reply.content, reply.status, reply.stats = text, status, stats
        db_status = "cancelled" if status == "interrupted" else status
        self.store.update_message(reply.message_id, content=text, stats=stats, status=db_status)
        self._last_save.pop(reply.message_id, None)

    def holds_only_first_exchange(self) -> bool:
        """The session has just the first prompt and its reply (no other branch)."""
        if self.session_id is None or len(self.turns) != 2:
            return False
        return len(self.store.all_messages(self.session_id)) == 2

    def discard(self) -> None:
        """Delete the session and start over as a new chat (same settings)."""
        if self.session_id is not None:
            self.store.delete_session(self.session_id)
        self.session_id, self.title, self.turns = None, "New chat", []
        self._session_system_prompt, self._engine = None, None

    def rename(self, title: str) -> None:
        self.title = title
        if self.session_id is not None:
            self.store.rename_session(self.session_id, title)
