"""How much of the model's context a chat takes, and the prompt that fits it. No widgets here.

The engine refuses a prompt longer than its context (`max_model_len`) and stops a reply when
prompt + reply reaches it, so a chat checks before it sends: with `drop_oldest` on, the oldest
turns (never the system prompt, never the new message) are left out of the prompt until it
leaves room for a reply; with it off, or when the new message alone is too long, the send is
refused with a message that says so.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from panels.client import ChatMessage

REPLY_SHARE = 4  # a prompt leaves at least a quarter of the context (or max_tokens) to the reply


@dataclass(frozen=True)
class ContextFit:
    """The messages to send and what they take of the context."""

    messages: list[ChatMessage]
    prompt_tokens: int | None  # None: this engine cannot count tokens here (attached)
    context: int | None  # the model's context in tokens; None: unknown
    dropped: int = 0  # messages left out from the start of the conversation

    @property
    def fits(self) -> bool:
        """The engine can start a reply (at least one token) to this prompt."""
        if self.prompt_tokens is None or self.context is None:
            return True  # the engine will say if it does not
        return self.prompt_tokens < self.context

    def refusal(self, drop_oldest: bool) -> str:
        """Why the prompt cannot be sent (only when not `fits`)."""
        assert self.prompt_tokens is not None and self.context is not None
        head = f"Not sent: the prompt would be {self.prompt_tokens:,} tokens, "
        head += f"and the model's context is {self.context:,}."
        if drop_oldest:
            return head + " This message is too long even on its own: shorten it."
        return (
            head + " Turn on 'Drop oldest turns' in the settings (Ctrl+O) to leave the oldest "
            "turns out, or start a new chat (Ctrl+N)."
        )


def reply_room(max_tokens: int, context: int) -> int:
    """Tokens a prompt should leave free for the reply."""
    return max(1, min(max_tokens, context // REPLY_SHARE))


def fit_messages(
    messages: list[ChatMessage],
    count: Callable[[list[ChatMessage]], int | None],
    context: int | None,
    max_tokens: int,
    drop_oldest: bool,
) -> ContextFit:
    """`messages` (a system prompt first if any, the new user message last) cut to fit.

    Messages are dropped from the front so that what is left starts with a user turn (chat
    templates expect user/assistant turns in order); the last message always stays.
    """
    tokens = count(messages) if messages else 0
    if tokens is None or context is None:
        return ContextFit(list(messages), tokens, context)
    system = [m for m in messages[:1] if m["role"] == "system"]
    turns = messages[len(system) :]
    dropped = 0
    room = reply_room(max_tokens, context)
    while drop_oldest and tokens + room > context and len(turns) > 1:
        cut = 1
        while cut < len(turns) - 1 and turns[cut]["role"] != "user":
            cut += 1
        turns, dropped = turns[cut:], dropped + cut
        tokens = count(system + turns) or 0
    return ContextFit(system + turns, tokens, context, dropped)
