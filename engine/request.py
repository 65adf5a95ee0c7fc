"""One request's life inside the engine: tokens, progress, status and timings."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from engine.config import SamplingParams

PLACEHOLDER = -1  # a token sampled in a step still in flight: its value is on the device


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"
    FINISHED_ERROR = "error"

    @property
    def finished(self) -> bool:
        return self in _FINISHED


_FINISHED = frozenset(s for s in RequestStatus if s.name.startswith("FINISHED_"))


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    prompt: str | None = None
    priority: int = 0  # lower runs first; ties by arrival
    arrival_time: float = field(default_factory=time.monotonic)
    arrival_index: int = 0  # strict FCFS order among equal priorities
    generator: torch.Generator | None = None
    eos_token_ids: tuple[int, ...] = ()

    output_token_ids: list[int] = field(default_factory=list)
    all_token_ids: list[int] = field(default_factory=list)
    output_logprobs: list = field(default_factory=list)
    prompt_logprobs: list = field(default_factory=list)  # scored prompt tokens (prompt_logprobs.py)
    num_computed_tokens: int = 0  # tokens whose K/V are in the cache
    spec_token_ids: list[int] = field(default_factory=list)  # drafts to verify this step
    spec_probs: torch.Tensor | None = None  # [len(spec_token_ids), vocab] draft distributions
    num_cached_tokens: int | None = None  # prefix-cache hit at first admission (None: not yet)
    num_preemptions: int = 0
    # Output tokens sampled on the device but not yet read back (overlap scheduling): always the
    # last ones of output_token_ids/all_token_ids, holding PLACEHOLDER until resolved.
    num_placeholders: int = 0
    status: RequestStatus = RequestStatus.WAITING
    stop_reason: str | int | None = None
    error: str | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finish_time: float | None = None
    scheduled_time: float | None = None

    def __post_init__(self) -> None:
        self.all_token_ids = list(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    def token_slice(self, start: int, end: int) -> list[int]:
        """Tokens [start, end) of the request followed by its draft tokens."""
        known = self.all_token_ids[start:end]
        if end > self.num_tokens:
            known += self.spec_token_ids[max(start - self.num_tokens, 0) : end - self.num_tokens]
        return known

    @property
    def is_finished(self) -> bool:
        return self.status.finished

    @property
    def is_prefilling(self) -> bool:
        """Still computing tokens that are already known (the prompt, or after preemption the
        prompt and the output so far)."""
        return self.num_tokens - self.num_computed_tokens > 1

    @property
    def sort_key(self) -> tuple[int, int]:
        return (self.priority, self.arrival_index)

    @property
    def num_resolved_tokens(self) -> int:
        """Tokens whose values the host knows (all but the placeholders)."""
        return len(self.all_token_ids) - self.num_placeholders

    @property
    def num_resolved_output_tokens(self) -> int:
        return len(self.output_token_ids) - self.num_placeholders

    def resolved_output_ids(self) -> list[int]:
        """A copy of the output tokens whose values are known."""
        return self.output_token_ids[: self.num_resolved_output_tokens]

    def append_tokens(self, token_ids: list[int], now: float) -> None:
        self.output_token_ids.extend(token_ids)
        self.all_token_ids.extend(token_ids)
        self._mark_token_time(now)

    def append_placeholder(self) -> int:
        """Count a token sampled in a step that is still in flight -> its output index."""
        self.output_token_ids.append(PLACEHOLDER)
        self.all_token_ids.append(PLACEHOLDER)
        self.num_placeholders += 1
        return len(self.output_token_ids) - 1

    def resolve_placeholder(self, index: int, token_id: int, now: float) -> None:
        """The value of output token `index` (the oldest placeholder) is known."""
        assert self.output_token_ids[index] == PLACEHOLDER, "placeholders resolve in order"
        self.output_token_ids[index] = token_id
        self.all_token_ids[self.num_prompt_tokens + index] = token_id
        self.num_placeholders -= 1
        self._mark_token_time(now)

    def drop_placeholders(self) -> None:
        """Forget tokens still in flight (the request finished before them)."""
        if self.num_placeholders:
            del self.output_token_ids[-self.num_placeholders :]
            del self.all_token_ids[-self.num_placeholders :]
            self.num_placeholders = 0

    def _mark_token_time(self, now: float) -> None:
        if self.first_token_time is None:
            self.first_token_time = now
        self.last_token_time = now
