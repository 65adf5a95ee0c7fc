"""Prompt logprobs (`SamplingParams.prompt_logprobs=N`): the log-probability of every prompt token
after the first under the model, given the tokens before it, and the top-N alternatives.

They come from the prefill: the logits at position p score prompt token p + 1, so a prefill chunk
covering positions [start, end) asks the runner for logits at its positions below P - 1 (P: the
prompt's length; the logits at P - 1 are the first output token's, sampled as usual). Chunked
prefill gathers them chunk by chunk, in order, into `Request.prompt_logprobs`.

The invariant: `len(request.prompt_logprobs)` prompt tokens are scored, i.e. the logits at
positions [0, len) were seen. A cached prefix has no logits, so a request that still needs
positions scored may only reuse cached pages that end within what is scored: a new request
skips the prefix cache (as vLLM does), a preempted one recomputes from the end of what it
scored (positions it scored before are not scored twice). Its own pages still go into the
cache for other requests.

Values are the raw model's log_softmax in float32 (no temperature or penalties), like the
sampled tokens' logprobs. Logits are taken SCORE_ROWS positions at a time: a whole 2k-token
chunk's would be [2048, vocab] float32, 1 GiB at a 128k vocabulary.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch

from engine.kv.manager import CachedPrefix
from engine.outputs import TokenLogprob
from engine.request import Request

if TYPE_CHECKING:  # the scheduler imports this module
    from engine.runner import ModelRunner, SeqChunk
    from engine.scheduler import ScheduledRequest

SCORE_ROWS = 256


def num_unscored(request: Request) -> int:
    """Prompt tokens after the first not scored yet (0 for requests that don't ask)."""
    if request.params.prompt_logprobs is None:
        return 0
    return max(request.num_prompt_tokens - 1 - len(request.prompt_logprobs), 0)


def offsets_to_score(request: Request, start: int, end: int) -> range:
    """Offsets into the chunk of positions [start, end) whose logits score a prompt token not
    yet scored."""
    if not num_unscored(request):
        return range(0)
    first = max(len(request.prompt_logprobs), start)
    last = min(end, request.num_prompt_tokens - 1)
    return range(first - start, max(last - start, first - start))


def usable_prefix(cached: CachedPrefix, request: Request, block_size: int) -> CachedPrefix:
    """The part of a prefix-cache hit that leaves every unscored position to compute."""
    if not num_unscored(request):
        return cached
    num_blocks = min(len(cached.blocks), len(request.prompt_logprobs) // block_size)
    return CachedPrefix(cached.blocks[:num_blocks], num_blocks * block_size)


@torch.inference_mode()
def run_scoring_prompts(
    runner: ModelRunner,
    scheduled: list[ScheduledRequest],
    chunks: list[SeqChunk],
    num_decodes: int,
) -> torch.Tensor:
    """`runner.run`, recording the prompt logprobs the chunks score on their requests."""
    if not any(chunk.score_offsets for chunk in chunks):
        return runner.run(chunks, num_decodes)
    logits, hidden = runner.run_with_prompt_hidden(chunks, num_decodes)  # hidden: [scored, h]
    for index, lo, rows in score_slices(chunks):
        request, chunk = scheduled[index][0], chunks[index]
        first = chunk.start + chunk.score_offsets[0] + 1 + lo  # the first target's position
        targets = request.all_token_ids[first : first + len(rows)]
        row_logits = runner.model.logits(hidden[rows.start : rows.stop])  # [len(rows), vocab]
        request.prompt_logprobs.extend(
            score(row_logits, targets, request.params.prompt_logprobs or 0)
        )
    return logits


def score_slices(chunks: list[SeqChunk]) -> Iterator[tuple[int, int, range]]:
    """The slices the scored hidden states are turned into logits by, in order: (chunk index,
    offset into its score_offsets, rows of `run_with_prompt_hidden`'s hidden states). A
    tensor-parallel worker replays them to join each slice's logits gather."""
    row = 0
    for index, chunk in enumerate(chunks):
        count = len(chunk.score_offsets)
        for lo in range(0, count, SCORE_ROWS):
            yield index, lo, range(row + lo, row + min(lo + SCORE_ROWS, count))
        row += count


def score(logits: torch.Tensor, targets: list[int], num_top: int) -> list[TokenLogprob]:
    """logits: [n, vocab], the rows that predict `targets` (n of them) -> each target's logprob,
    the top `num_top` (token, logprob), best first, and its rank."""
    logp = torch.log_softmax(logits.float(), dim=-1)  # [n, vocab]
    index = torch.tensor(targets, dtype=torch.int64, device=logp.device)
    chosen_t = logp.gather(1, index[:, None])  # [n, 1]
    ranks = (1 + (logp > chosen_t).sum(dim=-1)).tolist()  # [n]
    chosen = chosen_t[:, 0].tolist()
    if num_top:
        top_vals, top_ids = logp.topk(min(num_top, logp.shape[-1]), dim=-1)  # [n, num_top]
        pairs = zip(top_ids.tolist(), top_vals.tolist(), strict=True)
        tops = [list(zip(ids, vals, strict=True)) for ids, vals in pairs]
    else:
        tops = [None] * len(targets)
    rows = zip(targets, chosen, tops, ranks, strict=True)
    return [TokenLogprob(t, lp, top, rank) for t, lp, top, rank in rows]


def prompt_logprobs_of(request: Request) -> list[TokenLogprob | None] | None:
    """What RequestOutput reports: None for the first prompt token (nothing precedes it), then
    one entry per scored token; None when the request did not ask."""
    if request.params.prompt_logprobs is None:
        return None
    return [None, *request.prompt_logprobs]
