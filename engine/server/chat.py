"""POST /v1/chat/completions: messages through the model's chat template, n choices."""

from __future__ import annotations

import dataclasses
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
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatMessageOut,
    ChatStreamChoice,
    ChatTokenLogprob,
    DeltaMessage,
    TopLogprob,
    Usage,
)
from engine.server.streams import StreamProgress, SubRequest, cached_prompt_tokens
from engine.server.tools import ToolStream, plan_tools, tool_calls


async def create_chat_completion(
    ctx: ServerContext, req: ChatCompletionRequest, raw: Request
) -> ChatCompletionResponse | Response:
    check_encodable(req, "")
    ctx.check_model(req.model)
    if req.top_logprobs is not None and not req.logprobs:
        raise bad_request("top_logprobs needs logprobs set to true", param="top_logprobs")
    plan = plan_tools(req, ctx.tool_parser)
    prompt = await ctx.prompts.off_loop(
        ctx.prompts.chat, req.messages, req.chat_template_kwargs, tools=plan.template_tools
    )
    spec = plan.spec or structured_spec(req)
    # OpenAI's newer name wins; the 400 names whichever field the client used.
    newer = req.max_completion_tokens is not None
    max_tokens = resolve_max_tokens(
        req.max_completion_tokens if newer else req.max_tokens,
        None,
        len(prompt),
        ctx.max_model_len,
        "max_completion_tokens" if newer else "max_tokens",
        prompt_param="messages",
    )
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    renamed = {"logprobs": "top_logprobs"}
    if newer:
        renamed["max_tokens"] = "max_completion_tokens"
    params = sampling_params(
        req, max_tokens=max_tokens, logprobs=logprobs, structured=spec, renamed=renamed
    )
    if plan.parser is not None and plan.parser.needs_special_tokens:  # its markers are special
        params = [dataclasses.replace(p, skip_special_tokens=False) for p in params]
    request_id = f"chatcmpl-{req.request_id or uuid.uuid4().hex}"
    subs = [SubRequest(i, prompt, p, f"{request_id}-{i}") for i, p in enumerate(params)]
    await ctx.compile(spec, "tools" if plan.spec is not None else "response_format")
    created = int(time.time())
    model = ctx.settings.model_name

    def chunk(choices: list[ChatStreamChoice], usage: Usage | None = None) -> ChatCompletionChunk:
        return ChatCompletionChunk(
            id=request_id, created=created, model=model, choices=choices, usage=usage
        )

    if req.stream:
        progress = StreamProgress()
        tool_streams = {i: ToolStream(plan) for i in range(req.n)}
        first = [
            chunk([ChatStreamChoice(index=i, delta=DeltaMessage(role="assistant", content=""))])
            for i in range(req.n)
        ]

        def chunks(index: int, out: RequestOutput) -> Iterable[ChatCompletionChunk]:
            new = progress.advance(index, out)
            if new is None:
                return ()
            tools = tool_streams[index]
            content, calls = tools.feed(out.delta_text)
            finish_reason = None
            if out.finished:
                rest, calls_at_end = tools.finish()
                content = (content or "") + (rest or "") or None
                calls += calls_at_end
                finish_reason = "tool_calls" if tools.has_calls else out.finish_reason
            if content is None and not calls and not new and not out.finished:
                return ()  # held back: it may be the start of a tool call
            choice = ChatStreamChoice(
                index=index,
                delta=DeltaMessage(content=content, tool_calls=calls or None),
                logprobs=_logprobs(ctx, new) if out.logprobs is not None else None,
                finish_reason=finish_reason,
                stop_reason=out.stop_reason if out.finished else None,
            )
            return (chunk([choice]),)

        def last() -> Iterable[ChatCompletionChunk]:
            if req.stream_options is None or not req.stream_options.include_usage:
                return ()
            usage = Usage.of(
                len(prompt), progress.num_completion_tokens, progress.num_cached_tokens
            )
            return (chunk([], usage),)

        return ctx.stream(raw, subs, req.priority, chunks, first=first, last=last)

    finals = await ctx.collect(raw, subs, req.priority)
    choices = []
    for i in sorted(finals):
        out = finals[i]
        parsed = plan.parse(out.text)
        choices.append(
            ChatChoice(
                index=i,
                message=ChatMessageOut(
                    content=parsed.content, tool_calls=tool_calls(parsed.calls) or None
                ),
                logprobs=_logprobs(ctx, out.logprobs) if out.logprobs is not None else None,
                finish_reason="tool_calls" if parsed.calls else out.finish_reason,
                stop_reason=out.stop_reason,
            )
        )
    done = sum(len(out.token_ids) for out in finals.values())
    return ChatCompletionResponse(
        id=request_id,
        created=created,
        model=model,
        choices=choices,
        usage=Usage.of(len(prompt), done, cached_prompt_tokens(finals)),
    )


def _token(ctx: ServerContext, token_id: int, logprob: float) -> TopLogprob:
    text = ctx.prompts.token_text(token_id)
    return TopLogprob(token=text, logprob=floor_logprob(logprob), bytes=list(text.encode()))


def _logprobs(ctx: ServerContext, entries: list[TokenLogprob]) -> ChatLogprobs:
    content = []
    for entry in entries:
        chosen = _token(ctx, entry.token_id, entry.logprob)
        top = [_token(ctx, t, lp) for t, lp in entry.top or ()]
        content.append(ChatTokenLogprob(**chosen.model_dump(), top_logprobs=top))
    return ChatLogprobs(content=content)
