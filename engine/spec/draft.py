"""Draft-model proposer: a small model with the target's tokenizer runs k autoregressive steps
per engine step, batched over requests, on its own paged KV pool.

Invariant: `computed[rid]` tokens of the request are in the draft's cache and equal the request's
tokens. After verification only the accepted prefix stays valid, so `rollback` lowers it; the next
proposal first catches up on the tokens the draft has not seen (1 or 2 in steady state, the whole
prompt the first time).
"""

from __future__ import annotations

from dataclasses import replace

import torch

from engine.attention.select import make_backend
from engine.config import EngineConfig
from engine.kv.cache import KVCache, KVLayout
from engine.kv.manager import KVCacheManager
from engine.model.builder import load_model
from engine.quant.kv_scales import kv_quant_for
from engine.request import Request
from engine.runner import ModelRunner, SeqChunk
from engine.sampler import Sampler, SamplingRow, make_generator


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
        kv_quant = kv_quant_for(draft_config, loaded)
        layout = KVLayout.of(self.model, target.block_size, loaded.dtype, kv_quant.kv_cache_dtype)
        self.kv = KVCacheManager(num_blocks, target.block_size, enable_prefix_caching=False)
        self.cache = KVCache(layout, num_blocks, loaded.device, kv_quant.fp8_scales)
        backend = make_backend(
            target.attention_backend,
            loaded.device,
            target.block_size,
            self.model.head_dim,
            layout.storage_dtype,
        )
        self.runner = ModelRunner(self.model, self.cache, backend, loaded.device)
        self.sampler = sampler
        self.device = loaded.device
        self.computed: dict[str, int] = {}
        self.generators: dict[str, torch.Generator | None] = {}

    def _generator(self, request: Request) -> torch.Generator | None:
        rid = request.request_id
        if rid not in self.generators:
            seed = request.params.seed
            # Seeded requests draw their drafts from a generator of their own, derived from the
            # seed, so their output does not depend on the batch around them.
            self.generators[rid] = (
                None if seed is None else make_generator(seed * 1_000_003 + 17, self.device)
            )
        return self.generators[rid]

    def propose(
        self, requests: list[Request], ks: list[int]
    ) -> list[tuple[list[int], torch.Tensor | None]]:
        """-> per request (draft tokens, their draft distributions [len, vocab])."""
        active: list[int] = []
        chunks: list[SeqChunk] = []
        for i, (request, k) in enumerate(zip(requests, ks, strict=True)):
            rid = request.request_id
            # The last token is always recomputed: its logits give the first draft.
            done = min(self.computed.get(rid, 0), request.num_tokens - 1)
            new = request.all_token_ids[done:]
            probe = _Probe(rid, done)
            # Room for the catch-up tokens and the k - 1 drafts that get computed in the cache.
            if not self.kv.allocate_slots(probe, len(new), num_lookahead_tokens=k - 1):
                continue
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
            rows = [self._row(requests[i], drafts[i]) for i in active]
            q = self.sampler.probabilities(self.sampler.process_logits(logits, rows), rows)
            tokens = self.sampler.draw(q, rows).tolist()
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
                self.computed[request.request_id] = request.num_tokens + len(drafts[i]) - 1
            chunks, active, num_decodes = next_chunks, next_active, len(next_chunks)
            if not chunks:
                break
        for i, tokens in drafts.items():
            results[i] = (tokens, torch.stack(probs[i]))
        return results

    def _row(self, request: Request, drafts: list[int]) -> SamplingRow:
        return SamplingRow(
            params=request.params,
            prompt_token_ids=request.prompt_token_ids,
            output_token_ids=request.output_token_ids + drafts,
            generator=self._generator(request),
            eos_token_ids=request.eos_token_ids,
        )

    def rollback(self, request: Request, num_valid: int) -> None:
        """Only the first `num_valid` tokens in the draft cache still match the request."""
        rid = request.request_id
        if rid in self.computed:
            self.computed[rid] = min(self.computed[rid], num_valid)
            self.kv.trim(_Probe(rid, self.computed[rid]), self.computed[rid])

    def free(self, request: Request) -> None:
        rid = request.request_id
        self.kv.free(_Probe(rid, 0))
        self.computed.pop(rid, None)
        self.generators.pop(rid, None)


class _Probe:
    """The two fields of a Request the draft's KV manager reads, with the draft's progress."""

    def __init__(self, request_id: str, num_computed_tokens: int) -> None:
        self.request_id = request_id
        self.num_computed_tokens = num_computed_tokens
