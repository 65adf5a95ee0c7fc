"""`RequestStream`: the output side of one request, everything the engine keeps about it besides
the `Request` the scheduler sees: its detokenizer, what was already reported, the text detokenized
but not yet reported (or, for a request that reports only its final output, the tokens it will
decode at the finish), its grammar matcher and whether it must run one step at a time.

`EngineCore.add_request` creates one, and the engine forgets it in one place: the output that
reports the request finished (`EngineCore._output`).
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.detokenizer import IncrementalDetokenizer
from engine.outputs import RequestMetrics, RequestOutput
from engine.prompt_logprobs import prompt_logprobs_of
from engine.request import Request, RequestStatus
from engine.stop import Stop, check_stop
from engine.structured import RequestGrammar


@dataclass(eq=False)
class RequestStream:
    request: Request
    detokenizer: IncrementalDetokenizer | None  # None: the model has no tokenizer
    grammar: RequestGrammar | None  # the matcher of a constrained request
    # Must the host know each token before the next step is queued? (no overlap while True)
    needs_each_token: bool
    num_sent_tokens: int = 0  # output tokens already reported
    pending_text: str = ""  # detokenized text not yet reported
    # Output tokens kept for the detokenizer to decode at the finish, in one go: a request that
    # reports only its final output (output_kind "final") and has no stop string to look for.
    undecoded: list[int] | None = None

    def __post_init__(self) -> None:
        params = self.request.params
        if params.output_kind == "final" and not params.stop and self.detokenizer is not None:
            self.undecoded = []

    @property
    def reports_each_step(self) -> bool:
        """Does the request report an output every step it runs (else only when it finishes)?"""
        return self.request.params.output_kind == "stream"

    def accept(self, token_id: int, n: int, max_model_len: int) -> Stop | None:
        """The request's n-th output token: advance the grammar and the detokenizer, and say
        whether the request stops here (the order of the rules is `engine.stop`'s)."""
        if self.grammar is not None and self.grammar.accept(token_id):
            # The grammar took a stop token (it is complete) or is stuck: nothing may follow.
            error = self.grammar.error
            status = RequestStatus.FINISHED_ERROR if error else RequestStatus.FINISHED_STOPPED
            return Stop(status, None, error)
        stop = check_stop(self.request, token_id, n, max_model_len)
        if stop is not None and stop.by_stop_token:
            return stop
        if self.undecoded is not None:
            self.undecoded.append(token_id)
        elif self.detokenizer is not None:
            update = self.detokenizer.push([token_id])
            self.pending_text += update.delta
            if update.stop_string is not None:
                return Stop(RequestStatus.FINISHED_STOPPED, update.stop_string)
        return stop

    def finished(self) -> None:
        """The request finished: nothing of it constrains the next steps any more."""
        self.grammar = None
        self.needs_each_token = False

    def output(self) -> RequestOutput:
        """The request's new tokens and text since the last output."""
        request, detok = self.request, self.detokenizer
        delta_text, self.pending_text = self.pending_text, ""
        finished = request.is_finished
        if finished and detok is not None:
            delta_text += detok.flush(self.undecoded or ())
            self.undecoded = None
            if detok.stop_string is not None and request.stop_reason is None:
                # The held-back tail completed a stop string only at the end.
                request.status = RequestStatus.FINISHED_STOPPED
                request.stop_reason = detok.stop_string
        token_ids = request.resolved_output_ids()
        sent, self.num_sent_tokens = self.num_sent_tokens, len(token_ids)
        return RequestOutput(
            request_id=request.request_id,
            prompt=request.prompt,
            prompt_token_ids=request.prompt_token_ids,
            token_ids=token_ids,
            text=detok.output_text if detok is not None else "",
            delta_token_ids=token_ids[sent:],
            delta_text=delta_text,
            logprobs=list(request.output_logprobs) if request.params.logprobs is not None else None,
            prompt_logprobs=prompt_logprobs_of(request),
            finished=finished,
            finish_reason=request.status.value if finished else None,
            stop_reason=request.stop_reason,
            error=request.error,
            metrics=RequestMetrics(
                arrival_time=request.arrival_time,
                first_scheduled_time=request.scheduled_time,
                first_token_time=request.first_token_time,
                last_token_time=request.last_token_time,
                finish_time=request.finish_time,
                num_cached_tokens=request.num_cached_tokens or 0,
                num_preemptions=request.num_preemptions,
            ),
        )
