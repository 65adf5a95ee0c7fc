"""The prompt's side of /v1/completions: `echo` (the prompt before the completion, and with
`logprobs` its tokens' logprobs, OpenAI's legacy shape) and vLLM's `prompt_logprobs` field.

Both come from the engine's prompt logprobs (SamplingParams.prompt_logprobs), asked for with the
larger of the two top-n counts. `max_tokens: 0` with echo scores the prompt only: the engine runs
the prefill and samples one token (it always does), which the response leaves out."""

from __future__ import annotations

from engine.outputs import TokenLogprob
from engine.server.prompts import Prompts, floor_logprob
from engine.server.protocol import CompletionLogprobs, CompletionRequest, PromptLogprob


def engine_prompt_logprobs(req: CompletionRequest) -> int | None:
    """The engine's prompt_logprobs for the request (None: it needs none)."""
    wanted = [n for n in (req.logprobs if req.echo else None, req.prompt_logprobs) if n is not None]
    return max(wanted) if wanted else None


def append_logprobs(
    prompts: Prompts,
    result: CompletionLogprobs,
    entries: list[TokenLogprob | None],
    token_ids: list[int],
    num_top: int | None,
    offset: int,
) -> int:
    """Append one entry per token of `token_ids` to OpenAI's legacy logprobs (None entries: no
    logprob, as the first prompt token); -> the text offset after them."""
    for token_id, entry in zip(token_ids, entries, strict=True):
        text = prompts.token_text(token_id)
        result.tokens.append(text)
        result.text_offset.append(offset)
        offset += len(text)
        if entry is None:
            result.token_logprobs.append(None)
            result.top_logprobs.append(None)
            continue
        result.token_logprobs.append(floor_logprob(entry.logprob))
        top = None
        if num_top and entry.top is not None:
            top = {prompts.token_text(t): floor_logprob(lp) for t, lp in entry.top[:num_top]}
        result.top_logprobs.append(top)
    return offset


def vllm_prompt_logprobs(
    prompts: Prompts, entries: list[TokenLogprob | None], num_top: int
) -> list[dict[str, PromptLogprob] | None]:
    """vLLM's shape: per prompt token, None for the first, else {token id: logprob, rank,
    decoded token} for the token itself and the top `num_top`."""
    result: list[dict[str, PromptLogprob] | None] = []
    for entry in entries:
        if entry is None:
            result.append(None)
            continue
        found = {
            str(entry.token_id): PromptLogprob(
                logprob=floor_logprob(entry.logprob),
                rank=entry.rank,
                decoded_token=prompts.token_text(entry.token_id),
            )
        }
        for rank, (token_id, logprob) in enumerate((entry.top or [])[:num_top], start=1):
            found.setdefault(
                str(token_id),
                PromptLogprob(
                    logprob=floor_logprob(logprob),
                    rank=rank,
                    decoded_token=prompts.token_text(token_id),
                ),
            )
        result.append(found)
    return result
