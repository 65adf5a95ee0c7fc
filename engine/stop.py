"""The stop rules of one output token, as a pure function (vLLM's `check_stop` in sched/utils.py).

Order matters and is the engine's contract: a stop token id, then EOS (both only once
`min_tokens` are out), then length (`max_tokens`, or the prompt plus output reaching
`max_model_len`). Stop strings and grammars need the text or the matcher, so the request's
`RequestStream` applies them around this check (see `RequestStream.accept`).
"""

from __future__ import annotations

from typing import NamedTuple

from engine.request import Request, RequestStatus


class Stop(NamedTuple):
    """Why a request finishes: its final status, the stop token or string that matched, and the
    error for FINISHED_ERROR."""

    status: RequestStatus
    reason: str | int | None = None
    error: str | None = None

    @property
    def by_stop_token(self) -> bool:
        """A stop token or EOS (not length): its text is never shown."""
        return self.status is RequestStatus.FINISHED_STOPPED


def check_stop(request: Request, token_id: int, n: int, max_model_len: int) -> Stop | None:
    """Does the request finish at its n-th output token, `token_id`? Reads, never changes, it."""
    params = request.params
    if n >= params.min_tokens:
        if token_id in params.stop_token_ids:
            return Stop(RequestStatus.FINISHED_STOPPED, token_id)
        if not params.ignore_eos and token_id in request.eos_token_ids:
            return Stop(RequestStatus.FINISHED_STOPPED)
    if n >= params.max_tokens or request.num_prompt_tokens + n >= max_model_len:
        return Stop(RequestStatus.FINISHED_LENGTH)
    return None
