"""What the engine hands back: one RequestOutput per request per step that touched it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple


class TokenLogprob(NamedTuple):
    token_id: int
    logprob: float
    top: list[tuple[int, float]] | None  # the top-n (token id, logprob), best first
    rank: int | None = None  # 1 + the tokens more likely than it (prompt logprobs only)


@dataclass
class RequestMetrics:
    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finish_time: float | None = None
    num_cached_tokens: int = 0
    num_preemptions: int = 0

    @property
    def ttft(self) -> float | None:
        """Time to first token, seconds."""
        if self.first_token_time is None:
            return None
        return self.first_token_time - self.arrival_time


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)  # all generated so far
    text: str = ""  # all generated text so far (stop strings already cut)
    delta_token_ids: list[int] = field(default_factory=list)  # new since the last output
    delta_text: str = ""
    logprobs: list[TokenLogprob] | None = None
    # params.prompt_logprobs set: one per prompt token, None for the first (nothing precedes it)
    prompt_logprobs: list[TokenLogprob | None] | None = None
    finished: bool = False
    finish_reason: str | None = None  # stop | length | abort | error
    stop_reason: str | int | None = None  # the stop string or stop token id that matched
    error: str | None = None
    metrics: RequestMetrics | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)
