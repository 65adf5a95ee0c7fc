"""Draft-model proposer: a small model with the target's tokenizer runs k autoregressive steps
per engine step, batched over requests, on its own paged KV pool.

Invariant: the first `seqs[rid].num_computed_tokens` tokens of the request are in the draft's
cache and equal the request's tokens. After verification only the accepted prefix stays valid,
so `rollback` lowers it; the next proposal first catches up on the tokens the draft has not seen
(1 or 2 in steady state, the whole prompt the first time).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from engine.config import EngineConfig
from engine.model.builder import load_model
from engine.request import Request
from engine.runner import SeqChunk
from engine.sampler import Sampler
from engine.spec.draft_sampling import DraftSampling
from engine.worker import build_worker


@dataclass
class DraftSeq:
    """A request as the draft's KV pool holds it (what its KV manager reads of a sequence)."""

    request_id: str
    num_computed_tokens: int = 0  # the request's first tokens, in the draft's cache


class DraftProposer:
    def __init__(
        self,
        model: str,
        target: EngineConfig,
        target_vocab: int,
        num_blocks: int,
        sampler: Sampler,
    ) -> None:
        # The draft serves what its own checkpoint holds: the target's weight recipe is not its.
        draft_config = replace(
            target,
            model=model,
            speculative=None,
            tokenizer=None,
            num_kv_blocks=num_blocks,
            quantization=None,
        )
        loaded = load_model(draft_config)
        if loaded.hf_config.vocab_size != target_vocab:
            raise ValueError(
                f"draft model {model!r} has a vocabulary of {loaded.hf_config.vocab_size}, the "
                f"target {target_vocab}: a draft must share the target's tokenizer"
            )
        self.model = loaded.model
        # The draft's pool is stored like the target's (kv_cache_dtype), with its own scales.
        worker = build_worker(
            draft_config, loaded, num_blocks=lambda layout: num_blocks, enable_prefix_caching=False
        )
        self.kv = worker.kv
        self.cache = worker.kv_cache
        self.runner = worker.runner
        self.device = loaded.device
        self.sampling = DraftSampling(sampler, loaded.device)
        self.seqs: dict[str, DraftSeq] = {}

    def propose(
        self, requests: list[Request], ks: list[int]
    ) -> list[tuple[list[int], torch.Tensor | None]]:
        """-> per request (draft tokens, their draft distributions [len, vocab])."""
        active: list[int] = []
        chunks: list[SeqChunk] = []
        for i, (request, k) in enumerate(zip(requests, ks, strict=True)):
            rid = request.request_id
            seq = self.seqs.get(rid) or DraftSeq(rid)
            before = seq.num_computed_tokens
            # The last token is always recomputed: its logits give the first draft.
            done = seq.num_computed_tokens = min(before, request.num_tokens - 1)
            new = request.all_token_ids[done:]
            # Room for the catch-up tokens and the k - 1 drafts that get computed in the cache.
            if not self.kv.allocate_slots(seq, len(new), num_lookahead_tokens=k - 1):
                seq.num_computed_tokens = before  # nothing changed
                continue
            self.seqs[rid] = seq
            chunks.append(SeqChunk(new, done, self.kv.block_ids(rid), 1))
            active.append(i)
        results: list[tuple[list[int], torch.Tensor | None]] = [([], None)] * len(requests)
        if not active:
            return results
        drafts: dict[int, list[int]] = {i: [] for i in active}
        probs: dict[int, list[torch.Tensor]] = {i: [] for i in active}
        num_decodes = sum(1 for c in chunks if len(c.token_ids) == 1)
        order = sorted(range(len(chunks)), key=lambda j: len(chunks[j].token_ids) != 1)
        chunks = [chunks[j] for j in order]
        active = [active[j] for j in order]
        for step in range(max(ks[i] for i in active)):
            logits = self.runner.run(chunks, num_decodes)  # [len(chunks), vocab]
            rows = [self.sampling.row(requests[i], drafts[i]) for i in active]
            tokens, q = self.sampling.draw(logits, rows)
            next_chunks, next_active = [], []
            for j, i in enumerate(active):
                drafts[i].append(tokens[j])
                probs[i].append(q[j])
                if len(drafts[i]) < ks[i]:
                    request = requests[i]
                    position = request.num_tokens + step
                    next_chunks.append(
                        SeqChunk([tokens[j]], position, self.kv.block_ids(request.request_id), 1)
                    )
                    next_active.append(i)
            for i in active:
                request = requests[i]
                self.seqs[request.request_id].num_computed_tokens = (
                    request.num_tokens + len(drafts[i]) - 1
                )
            chunks, active, num_decodes = next_chunks, next_active, len(next_chunks)
            if not chunks:
                break
        for i, tokens in drafts.items():
            results[i] = (tokens, torch.stack(probs[i]))
        return results

    def rollback(self, request: Request, num_valid: int) -> None:
        """Only the first `num_valid` tokens in the draft cache still match the request."""
        seq = self.seqs.get(request.request_id)
        if seq is not None:
            seq.num_computed_tokens = min(seq.num_computed_tokens, num_valid)
            self.kv.trim(seq, seq.num_computed_tokens)

    def free(self, request: Request) -> None:
        seq = self.seqs.pop(request.request_id, None)
        if seq is not None:  # it holds pages only once an allocation succeeded
            self.kv.free(seq)
        self.sampling.forget(request)
