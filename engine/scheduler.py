"""In-flight batching: which requests run this step, and with how many tokens each.

Every step has a token budget (`max_num_tokens`) shared by decodes (one token each) and prefill
chunks. Running decodes go first, then running prefills continue, then waiting requests are
admitted in priority/FCFS order while budget, sequence slots and KV blocks last. When a running
request cannot get a block, the newest lowest-priority running request is preempted: its blocks are
freed and it goes back to the waiting queue to be recomputed later (its pages often survive in the
prefix cache, which makes the recompute cheap).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import NamedTuple

from engine.kv.manager import KVCacheManager
from engine.prompt_logprobs import usable_prefix
from engine.request import Request, RequestStatus
from engine.state import RequestState, SchedulerStats


class ScheduledRequest(NamedTuple):
    request: Request
    num_new_tokens: int


@dataclass
class SchedulerOutput:
    decodes: list[ScheduledRequest] = field(default_factory=list)  # one token each
    verifies: list[ScheduledRequest] = field(default_factory=list)  # a token + its drafts
    prefills: list[ScheduledRequest] = field(default_factory=list)  # prompt chunks
    preempted: list[Request] = field(default_factory=list)

    @property
    def scheduled(self) -> list[ScheduledRequest]:
        """Single-token decodes first: the attention backend relies on that order."""
        return self.decodes + self.verifies + self.prefills

    @property
    def num_decode_tokens(self) -> int:
        return len(self.decodes) + sum(s.num_new_tokens for s in self.verifies)

    @property
    def num_prefill_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.prefills)

    @property
    def is_empty(self) -> bool:
        return not (self.decodes or self.verifies or self.prefills)


class Scheduler:
    def __init__(
        self,
        kv: KVCacheManager,
        max_num_tokens: int,
        max_num_seqs: int,
        enable_chunked_prefill: bool = True,
        max_model_len: int | None = None,
    ) -> None:
        self.kv = kv
        self.max_model_len = max_model_len
        self.max_num_tokens = max_num_tokens
        self.max_num_seqs = max_num_seqs
        self.enable_chunked_prefill = enable_chunked_prefill
        self.waiting: list[Request] = []  # sorted by (priority, arrival)
        self.running: list[Request] = []  # sorted by (priority, arrival)
        self.num_preemptions = 0

    def add(self, request: Request) -> None:
        request.status = RequestStatus.WAITING
        bisect.insort(self.waiting, request, key=lambda r: r.sort_key)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, request: Request, status: RequestStatus) -> None:
        """Take a request out (finished, aborted or failed) and free its pages at once."""
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        self.kv.free(request)
        request.status = status

    # --- one step -----------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_tokens
        scheduled: dict[str, ScheduledRequest] = {}

        decoding = [r for r in self.running if not r.is_prefilling]
        prefilling = [r for r in self.running if r.is_prefilling]
        for request in decoding + prefilling:
            if budget == 0:
                break
            if request.status is not RequestStatus.RUNNING:
                continue  # preempted earlier in this loop
            if self._reached_length(request):
                continue  # its last token is still in flight (overlap): it finishes on arrival
            num_known = request.num_tokens - request.num_computed_tokens
            num_new = min(num_known + len(request.spec_token_ids), budget)
            if num_new <= 0:
                continue
            # Drafts that don't fit the budget are dropped, never the request's own tokens.
            del request.spec_token_ids[max(num_new - num_known, 0) :]
            while not self.kv.allocate_slots(request, num_new):
                victim = max(self.running, key=lambda r: r.sort_key)
                self._preempt(victim, out)
                if victim.request_id in scheduled:
                    budget += scheduled.pop(victim.request_id).num_new_tokens
                if victim is request:
                    break
            else:
                scheduled[request.request_id] = ScheduledRequest(request, num_new)
                budget -= num_new

        # Admitting new work in a step that had to preempt would only thrash the pool.
        while self.waiting and budget > 0 and not out.preempted:
            if len(self.running) >= self.max_num_seqs:
                break
            request = self.waiting[0]
            cached = self.kv.find_cached_prefix(request)
            cached = usable_prefix(cached, request, self.kv.block_size)  # prompt logprobs
            num_new = request.num_tokens - cached.num_tokens
            if num_new > budget and not self.enable_chunked_prefill:
                break
            num_new = min(num_new, budget)
            if not self.kv.allocate_slots(request, num_new, cached):
                break
            self.waiting.pop(0)
            if request.num_cached_tokens is None:  # first admission: count it for the hit rate
                request.num_cached_tokens = cached.num_tokens
                self.kv.record_prefix_query(request.num_tokens, cached.num_tokens)
            request.num_computed_tokens = cached.num_tokens
            request.status = RequestStatus.RUNNING
            bisect.insort(self.running, request, key=lambda r: r.sort_key)
            scheduled[request.request_id] = ScheduledRequest(request, num_new)
            budget -= num_new

        for item in scheduled.values():
            if item.request.spec_token_ids:
                out.verifies.append(item)
            elif item.num_new_tokens == 1 and not item.request.is_prefilling:
                out.decodes.append(item)
            else:
                out.prefills.append(item)
        return out

    def _reached_length(self, request: Request) -> bool:
        """Has max_tokens or max_model_len tokens, counting placeholders (without overlap
        scheduling such a request has already finished)."""
        if not request.num_placeholders:
            return False
        return request.num_output_tokens >= request.params.max_tokens or (
            self.max_model_len is not None and request.num_tokens >= self.max_model_len
        )

    def _preempt(self, request: Request, out: SchedulerOutput) -> None:
        self.running.remove(request)
        self.kv.free(request)
        request.num_computed_tokens = 0
        request.spec_token_ids = []
        request.num_preemptions += 1
        request.status = RequestStatus.PREEMPTED
        bisect.insort(self.waiting, request, key=lambda r: r.sort_key)
        out.preempted.append(request)
        self.num_preemptions += 1

    def update(self, out: SchedulerOutput, num_rejected: dict[str, int] | None = None) -> None:
        """The step ran and its tokens were appended: the scheduled tokens' K/V are in the
        cache, except those of rejected drafts, whose pages beyond the kept tokens go back."""
        num_rejected = num_rejected or {}
        for request, num_new in out.scheduled:
            rejected = num_rejected.get(request.request_id, 0)
            request.num_computed_tokens += num_new - rejected
            request.spec_token_ids = []
            request.spec_probs = None
            self.kv.register_full_blocks(request)
            if rejected:
                self.kv.trim(request, request.num_computed_tokens)

    @property
    def preempted(self) -> list[Request]:
        return [r for r in self.waiting if r.status is RequestStatus.PREEMPTED]

    def make_stats(self, now: float) -> SchedulerStats:
        """The queues as `EngineState` reports them (`now`: time.monotonic())."""
        return SchedulerStats(
            running=tuple(
                RequestState.of(r, self.kv.block_ids(r.request_id), now) for r in self.running
            ),
            waiting=tuple(
                RequestState.of(r, [], now)
                for r in self.waiting
                if r.status is RequestStatus.WAITING
            ),
            preempted=tuple(
                RequestState.of(r, [], now)
                for r in self.waiting
                if r.status is RequestStatus.PREEMPTED
            ),
            num_preemptions=self.num_preemptions,
        )
