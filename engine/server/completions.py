"""POST /v1/completions: one prompt or a batch, n choices each (choice index prompt * n + j)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable

from fastapi.responses import Response
from starlette.requests import Request

from engine.outputs import RequestOutput, TokenLogprob
from engine.server.context import ServerContext
from engine.server.errors import bad_request, check_encodable
from engine.server.params import resolve_max_tokens, sampling_params, structured_spec
from engine.server.prompts import floor_logprob
from engine.server.protocol import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    Usage,
)
from engine.server.streams import StreamProgress, SubRequest, cached_prompt_tokens

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for completions
MAX_CHOICES = 1024  # engine requests one API request may start (prompts times n)


async def create_completion(
    ctx: ServerContext, req: CompletionRequest, raw: Request
) -> CompletionResponse | Response:
    check_encodable(req, "")
    ctx.check_model(req.model)
    if req.echo:
        raise bad_request("echo is not supported", param="echo")
    if req.suffix:
        raise bad_request("suffix is not supported", param="suffix")
    prompts = await ctx.prompts.off_loop(ctx.prompts.completion, req)
    if len(prompts) * req.n > MAX_CHOICES:
        raise bad_request(
            f"{len(prompts)} prompts times n={req.n} make {len(prompts) * req.n} choices; at "
            f"most {MAX_CHOICES} are allowed",
            param="n" if req.n > 1 else "prompt",
        )
    spec = structured_spec(req)
    request_id = f"cmpl-{req.request_id or uuid.uuid4().hex}"
    subs: list[SubRequest] = []
    for p, ids in enumerate(prompts):
        max_tokens = resolve_max_tokens(
            req.max_tokens, DEFAULT_MAX_TOKENS, len(ids), ctx.max_model_len, "max_tokens"
        )
        params = sampling_params(req, max_tokens=max_tokens, logprobs=req.logprobs, structured=spec)
        for j, choice_params in enumerate(params):
            index = p * req.n + j
            subs.append(SubRequest(index, ids, choice_params, f"{request_id}-{index}"))
    await ctx.compile(spec)
    created = int(time.time())
    model = ctx.settings.model_name
    prompt_tokens = sum(len(ids) for ids in prompts)

    if req.stream:
        progress = StreamProgress()
        text_offsets: dict[int, int] = {}

        def chunks(index: int, out: RequestOutput) -> Iterable[CompletionResponse]:
            new = progress.advance(index, out)
            if new is None:
                return ()
            logprobs = None
            if out.logprobs is not None:
                logprobs, text_offsets[index] = _logprobs(ctx, new, text_offsets.get(index, 0))
            choice = CompletionChoice(
                index=index,
                text=out.delta_text,
                logprobs=logprobs,
                finish_reason=out.finish_reason if out.finished else None,
                stop_reason=out.stop_reason if out.finished else None,
            )
            return (
                CompletionResponse(id=request_id, created=created, model=model, choices=[choice]),
            )

        def last() -> Iterable[CompletionResponse]:
            if req.stream_options is None or not req.stream_options.include_usage:
                return ()
            usage = Usage.of(
                prompt_tokens, progress.num_completion_tokens, progress.num_cached_tokens
            )
            return (
                CompletionResponse(
                    id=request_id, created=created, model=model, choices=[], usage=usage
                ),
            )

        return ctx.stream(raw, subs, req.priority, chunks, last=last)

    finals = await ctx.collect(raw, subs, req.priority)
    choices = []
    for index in sorted(finals):
        out = finals[index]
        logprobs = _logprobs(ctx, out.logprobs, 0)[0] if out.logprobs is not None else None
        choices.append(
            CompletionChoice(
                index=index,
                text=out.text,
                logprobs=logprobs,
                finish_reason=out.finish_reason,
                stop_reason=out.stop_reason,
            )
        )
    completion_tokens_total = sum(len(out.token_ids) for out in finals.values())
    return CompletionResponse(
        id=request_id,
        created=created,
        model=model,
        choices=choices,
        usage=Usage.of(prompt_tokens, completion_tokens_total, cached_prompt_tokens(finals)),
    )


def _logprobs(
    ctx: ServerContext, entries: list[TokenLogprob], offset: int
) -> tuple[CompletionLogprobs, int]:
    """OpenAI's legacy logprobs for `entries`; text offsets continue from `offset`."""
    result = CompletionLogprobs()
    for entry in entries:
        text = ctx.prompts.token_text(entry.token_id)
        result.tokens.append(text)
        result.token_logprobs.append(floor_logprob(entry.logprob))
        top = None
        if entry.top is not None:
            top = {ctx.prompts.token_text(t): floor_logprob(lp) for t, lp in entry.top}
        result.top_logprobs.append(top)
        result.text_offset.append(offset)
        offset += len(text)
    return result, offset
