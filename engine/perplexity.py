"""Perplexity of text teacher-forced through the engine itself (its weights, its KV cache).

Each text is fed through the model runner in chunks, as chunked prefill would feed a prompt: every
chunk attends to the earlier chunks' K/V as the cache stores them (fp8 or int8 when the cache is
quantized), and the logits of every position score the next token. So the number measures what
serving with this engine, quantized weights and KV cache included, does to the model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch

from engine.core import EngineCore
from engine.llm import LLM
from engine.runner import SeqChunk


class Perplexity(NamedTuple):
    nll: float  # mean negative log-likelihood (nats) per scored token
    num_tokens: int  # tokens scored: every token of a window but its first

    @property
    def ppl(self) -> float:
        return math.exp(self.nll)


class _Probe:
    """What the KV manager reads of a request."""

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self.num_computed_tokens = 0


@torch.inference_mode()
def engine_perplexity(
    llm: LLM | EngineCore,
    texts: Sequence[str | list[int]],
    chunk_size: int = 64,
    window: int | None = None,
) -> Perplexity:
    """Perplexity over `texts` (strings, tokenized without special tokens, or token ids). A text
    longer than `window` (default and at most: the engine's max_model_len) is scored in
    consecutive windows, each from an empty context. The engine must be idle: the windows take
    pages from its pool (and give them back)."""
    core = llm.engine if isinstance(llm, LLM) else llm
    window = min(window or core.max_model_len, core.max_model_len)
    if window < 2:
        raise ValueError(f"window must be >= 2 tokens, got {window}")
    total_nll, total_tokens = 0.0, 0
    for text in texts:
        ids = (
            core.tokenizer.encode(text, add_special_tokens=False) if isinstance(text, str) else text
        )
        for start in range(0, len(ids) - 1, window):
            piece = ids[start : start + window]
            if len(piece) >= 2:
                logprobs = teacher_forced_logprobs(core, piece, chunk_size)
                total_nll -= float(logprobs.sum())
                total_tokens += len(logprobs)
    if total_tokens == 0:
        raise ValueError("no text to score: each text needs at least two tokens")
    return Perplexity(total_nll / total_tokens, total_tokens)


@torch.inference_mode()
def teacher_forced_logprobs(
    llm: LLM | EngineCore, ids: Sequence[int], chunk_size: int = 64
) -> torch.Tensor:  # [len(ids) - 1] float32
    """log p(ids[i + 1] | ids[: i + 1]) for every i, fed through the engine's runner in chunks
    of `chunk_size` over one sequence's pages. The engine must be idle."""
    core = llm.engine if isinstance(llm, LLM) else llm
    if core.has_unfinished():
        raise ValueError("teacher forcing needs an idle engine")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if not 2 <= len(ids) <= core.max_model_len:
        raise ValueError(f"need 2 to max_model_len ({core.max_model_len}) tokens, got {len(ids)}")
    ids = list(ids)
    probe = _Probe("teacher-forcing")
    if not core.kv.allocate_slots(probe, len(ids)):
        raise ValueError(f"the KV pool has no room for {len(ids)} tokens")
    try:
        table = core.kv.block_ids(probe.request_id)
        targets = torch.tensor(ids[1:], device=core.device)  # [len(ids) - 1]
        out = []
        for start in range(0, len(ids) - 1, chunk_size):
            end = min(start + chunk_size, len(ids) - 1)  # the last token predicts nothing
            chunk = SeqChunk(ids[start:end], start, table, end - start)
            logits = core.runner.run([chunk], num_decodes=0)  # [end - start, vocab] float32
            logprobs = torch.log_softmax(logits, dim=-1)
            out.append(logprobs.gather(1, targets[start:end, None])[:, 0])
        return torch.cat(out)
    finally:
        core.kv.free(probe)
