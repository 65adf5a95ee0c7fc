"""POST /v1/completions: one prompt or a batch, n choices each (choice index prompt * n + j)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable

from fastapi.responses import Response
from starlette.requests import Request

from engine.outputs import RequestOutput, TokenLogprob
from engine.server.context import ServerContext
from engine.server.echo import append_logprobs, engine_prompt_logprobs, vllm_prompt_logprobs
from engine.server.errors import bad_request, check_encodable
from engine.server.params import resolve_max_tokens, sampling_params, structured_spec
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
    if req.suffix:
        raise bad_request("suffix is not supported", param="suffix")
    prompts = await ctx.prompts.off_loop(ctx.prompts.completion, req)
    if len(prompts) * req.n > MAX_CHOICES:
        raise bad_request(
            f"{len(prompts)} prompts times n={req.n} make {len(prompts) * req.n} choices; at "
            f"most {MAX_CHOICES} are allowed",
            param="n" if req.n > 1 else "prompt",
        )
    # max_tokens 0 with echo scores the prompt only (engine/server/echo.py).
    score_only = req.echo and req.max_tokens == 0
    echoed = await ctx.prompts.off_loop(ctx.prompts.texts, req, prompts) if req.echo else None
    spec = structured_spec(req)
    request_id = f"cmpl-{req.request_id or uuid.uuid4().hex}"
    subs: list[SubRequest] = []
    for p, ids in enumerate(prompts):
        max_tokens = resolve_max_tokens(
            1 if score_only else req.max_tokens,
            DEFAULT_MAX_TOKENS,
            len(ids),
            ctx.max_model_len,
            "max_tokens",
        )
        params = sampling_params(
            req,
            max_tokens=max_tokens,
            logprobs=req.logprobs,
            structured=spec,
            prompt_logprobs=engine_prompt_logprobs(req),
        )
        for j, choice_params in enumerate(params):
            index = p * req.n + j
            subs.append(SubRequest(index, ids, choice_params, f"{request_id}-{index}"))
    await ctx.compile(spec)
    created = int(time.time())
    model = ctx.settings.model_name
    prompt_tokens = sum(len(ids) for ids in prompts)
    prompt_of = {sub.index: sub.prompt_token_ids for sub in subs}

    def choice(index: int, out: RequestOutput, new: list[TokenLogprob], first: bool, offset: int):
        """The choice for `out` (its delta when streaming, else all of it); `first`: the
        choice's first chunk, which carries the echo. -> (choice, the text offset after it)."""
        text = "" if score_only else (out.delta_text if req.stream else out.text)
        logprobs = None if req.logprobs is None else CompletionLogprobs()
        prompt_logprobs = None
        if first and out.prompt_logprobs is not None:
            if echoed is not None:
                text = echoed[index // req.n] + text
                if logprobs is not None:
                    offset = append_logprobs(
                        ctx.prompts,
                        logprobs,
                        out.prompt_logprobs,
                        prompt_of[index],
                        req.logprobs,
                        offset,
                    )
            if req.prompt_logprobs is not None:
                prompt_logprobs = vllm_prompt_logprobs(
                    ctx.prompts, out.prompt_logprobs, req.prompt_logprobs
                )
        if logprobs is not None and not score_only:
            ids = [e.token_id for e in new]
            offset = append_logprobs(ctx.prompts, logprobs, new, ids, req.logprobs, offset)
        finish_reason = out.finish_reason if out.finished else None
        if score_only and out.finished:  # the sampled token (EOS, a stop) is not reported
            finish_reason = "length"
        result = CompletionChoice(
            index=index,
            text=text,
            logprobs=logprobs,
            finish_reason=finish_reason,
            stop_reason=out.stop_reason if out.finished and not score_only else None,
            prompt_logprobs=prompt_logprobs,
        )
        return result, offset

    if req.stream:
        progress = StreamProgress()
        text_offsets: dict[int, int] = {}

        def chunks(index: int, out: RequestOutput) -> Iterable[CompletionResponse]:
            new = progress.advance(index, out)
            if new is None:
                return ()
            first = index not in text_offsets
            one, text_offsets[index] = choice(index, out, new, first, text_offsets.get(index, 0))
            return (CompletionResponse(id=request_id, created=created, model=model, choices=[one]),)

        def last() -> Iterable[CompletionResponse]:
            if req.stream_options is None or not req.stream_options.include_usage:
                return ()
            completion_tokens = 0 if score_only else progress.num_completion_tokens
            usage = Usage.of(prompt_tokens, completion_tokens, progress.num_cached_tokens)
            return (
                CompletionResponse(
                    id=request_id, created=created, model=model, choices=[], usage=usage
                ),
            )

        return ctx.stream(raw, subs, req.priority, chunks, last=last)

    finals = await ctx.collect(raw, subs, req.priority)
    choices = [choice(i, finals[i], finals[i].logprobs or [], True, 0)[0] for i in sorted(finals)]
    completion_tokens = 0 if score_only else sum(len(o.token_ids) for o in finals.values())
    return CompletionResponse(
        id=request_id,
        created=created,
        model=model,
        choices=choices,
        usage=Usage.of(prompt_tokens, completion_tokens, cached_prompt_tokens(finals)),
    )
