"""EAGLE-3 proposer: the draft head (engine/spec/eagle.py) over the target's hidden states, on a
paged KV pool of its own (one layer), batched over requests.

The target keeps the residual stream at the head's three aux layers for every token it computes
(`LlamaForCausalLM.aux_hidden_layers`); after each target forward `capture` fuses them (`fc`)
and files the rows under their requests. At position t the head reads (h_t, token t + 1), so a
proposal first runs the head over the rows the target computed since the last one (1 + accepted
drafts in steady state, the prompt the first time, chunk by chunk), which also gives the first
draft, then k - 1 steps each fed its own previous pre-norm output.

Invariant per request (`EagleSeq`): the head's cache holds positions [offset, offset + n) (n =
num_computed_tokens), each computed from the target's hidden state there; `pending` holds the
target's fused rows for the positions after them. The head's cache rows written by draft steps
are dropped after every proposal: the next one recomputes those positions from the target's
rows. The last row is always kept pending (it gives the first draft again if the request was
proposed for but not scheduled).

Prefix-cache hits: the target computes nothing for a cached prefix, so there are no hidden
states for it. vLLM keeps the draft's KV in the target's (shared) blocks, so a hit brings the
draft's KV with it, and drops the last matched block to recompute the hidden states it needs;
our head has its own pool without a prefix cache, so its context starts at the first position
the target computes (`offset`; the head's RoPE still uses absolute positions). Lossless either
way; a hit costs acceptance only while the context the head attends to is short. Preemption
frees the head's state with the request's pages; the re-prefill rebuilds it from the recompute.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from engine.attention.select import make_backend
from engine.config import EngineConfig
from engine.kv.cache import KVCache, KVLayout
from engine.kv.manager import KVCacheManager
from engine.model import loader
from engine.model.builder import resolve_device, resolve_dtype
from engine.model.llama import LlamaForCausalLM
from engine.request import Request
from engine.runner import ModelRunner, SeqChunk
from engine.sampler import Sampler
from engine.spec.draft_sampling import DraftSampling
from engine.spec.eagle import Eagle3Head, aux_layer_ids, load_head_config


@dataclass
class EagleSeq:
    """A request as the head's KV pool holds it."""

    request_id: str
    offset: int  # the first position in the head's context
    num_computed_tokens: int = 0  # positions [offset, offset + n) are in the head's cache
    pending: list[torch.Tensor] = field(default_factory=list)  # [m, hidden] fused target rows

    @property
    def next_position(self) -> int:
        """The position after the last row held (cache or pending)."""
        return self.offset + self.num_computed_tokens + sum(len(p) for p in self.pending)

    def keep_pending_below(self, position: int) -> None:
        """Drop pending rows at `position` and after (rejected drafts the target computed)."""
        rows = self.pending_rows()
        keep = max(position - self.offset - self.num_computed_tokens, 0)
        self.pending = [rows[:keep]] if rows is not None and keep else []

    def pending_rows(self) -> torch.Tensor | None:
        if not self.pending:
            return None
        if len(self.pending) > 1:
            self.pending = [torch.cat(self.pending)]
        return self.pending[0]


class EagleProposer:
    def __init__(
        self,
        model: str,
        target: EngineConfig,
        target_model: LlamaForCausalLM,
        num_blocks: int,
        sampler: Sampler,
    ) -> None:
        model_dir = loader.resolve_model_dir(model)
        head_config = load_head_config(model_dir)
        target_config = target_model.config
        device = resolve_device(target.device)
        dtype = resolve_dtype(target.dtype, device)
        self.head = Eagle3Head(head_config, target_config.hidden_size, target_config.vocab_size)
        self.head.load_weights(loader.iter_safetensors(model_dir))
        self.head.to(device=device, dtype=dtype).eval()  # d2t/t2d keep their integer dtypes
        if self.head.embed_tokens is None and head_config.hidden_size != target_config.hidden_size:
            raise ValueError(
                f"EAGLE head {model!r} has hidden size {head_config.hidden_size} and no "
                f"embeddings of its own; the target's are {target_config.hidden_size} wide"
            )
        self.embed = self.head.embed_tokens or target_model.model.embed_tokens
        target_model.aux_hidden_layers = aux_layer_ids(head_config, target_config.num_hidden_layers)
        self.target_model = target_model
        # The head's one layer, stored in the compute dtype (its pool is small; no KV scales).
        layout = KVLayout(1, self.head.num_kv_heads, self.head.head_dim, target.block_size, dtype)
        self.cache = KVCache(layout, num_blocks, device)
        self.kv = KVCacheManager(num_blocks, target.block_size, enable_prefix_caching=False)
        backend = make_backend(
            target.attention_backend, device, target.block_size, self.head.head_dim, dtype
        )
        self.runner = ModelRunner(self.head, self.cache, backend, device)  # prepare() only
        self.device = device
        self.sampling = DraftSampling(sampler, device)
        self.seqs: dict[str, EagleSeq] = {}

    # --- after the target's forward -------------------------------------------------------

    @torch.inference_mode()
    def capture(self, requests: list[Request], chunks: list[SeqChunk]) -> None:
        """File the target's aux states of this step's chunks (flat, in chunk order) under
        their requests."""
        aux = self.target_model.aux_hidden_states  # [num_tokens, 3 * target_hidden]
        if aux is None:
            return
        fused = self.head.combine(aux.to(self.head.fc.weight.dtype))  # [num_tokens, hidden]
        row = 0
        for request, chunk in zip(requests, chunks, strict=True):
            n = len(chunk.token_ids)
            rows, row = fused[row : row + n], row + n
            seq = self.seqs.get(request.request_id)
            if seq is not None:
                seq.keep_pending_below(chunk.start)
                if seq.next_position != chunk.start:  # a gap: start the head's context afresh
                    self.free(request, keep_sampling=True)
                    seq = None
            if seq is None:
                seq = self.seqs[request.request_id] = EagleSeq(request.request_id, chunk.start)
            seq.pending.append(rows)
        self.target_model.aux_hidden_states = None

    # --- before scheduling ----------------------------------------------------------------

    @torch.inference_mode()
    def propose(
        self, requests: list[Request], ks: list[int]
    ) -> list[tuple[list[int], torch.Tensor | None]]:
        """-> per request (draft tokens, their draft distributions [len, vocab])."""
        results: list[tuple[list[int], torch.Tensor | None]] = [([], None)] * len(requests)
        active: list[int] = []
        chunks: list[SeqChunk] = []
        inputs: list[torch.Tensor] = []
        for i, (request, k) in enumerate(zip(requests, ks, strict=True)):
            seq = self.seqs.get(request.request_id)
            if seq is None:
                continue
            # The target has computed every token but the last: rows for [.., num_tokens - 1).
            last = request.num_tokens - 1
            seq.keep_pending_below(last)
            rows = seq.pending_rows()
            if rows is None or seq.next_position != last:
                continue  # hidden states missing (cannot happen in a step-by-step engine)
            if not self.kv.allocate_slots(seq, len(rows), num_lookahead_tokens=k - 1):
                continue
            first = seq.offset + seq.num_computed_tokens
            tokens = request.all_token_ids[first + 1 : last + 1]  # token t + 1 for each row t
            chunks.append(
                SeqChunk(tokens, seq.num_computed_tokens, self.kv.block_ids(seq.request_id), 1)
            )
            inputs.append(rows)
            active.append(i)
        if not active:
            return results
        order = sorted(range(len(chunks)), key=lambda j: len(chunks[j].token_ids) != 1)
        chunks = [chunks[j] for j in order]
        inputs = [inputs[j] for j in order]
        active = [active[j] for j in order]
        offsets = [self.seqs[requests[i].request_id].offset for i in active]
        drafts: dict[int, list[int]] = {i: [] for i in active}
        probs: dict[int, list[torch.Tensor]] = {i: [] for i in active}
        for i, chunk in zip(active, chunks, strict=True):
            seq = self.seqs[requests[i].request_id]
            # The catch-up rows stay in the cache but the last, which is recomputed next time.
            seq.num_computed_tokens += len(chunk.token_ids) - 1
            seq.pending = [seq.pending[0][-1:]]
        hidden = torch.cat(inputs)  # [num_tokens, hidden]
        num_decodes = sum(1 for c in chunks if len(c.token_ids) == 1)
        for _ in range(max(ks[i] for i in active)):
            normed, hidden = self._forward(chunks, num_decodes, hidden, offsets)
            rows = [self.sampling.row(requests[i], drafts[i]) for i in active]
            tokens, q = self.sampling.draw(self.head.logits(normed), rows)
            keep, next_chunks = [], []
            for j, i in enumerate(active):
                drafts[i].append(tokens[j])
                probs[i].append(q[j])
                if len(drafts[i]) < ks[i]:
                    chunk = chunks[j]
                    start = chunk.start + len(chunk.token_ids)
                    next_chunks.append(SeqChunk([tokens[j]], start, chunk.block_table, 1))
                    keep.append(j)
            if not keep:
                break
            index = torch.tensor(keep, device=self.device)
            hidden = hidden.index_select(0, index)  # [len(keep), hidden]
            active = [active[j] for j in keep]
            offsets = [offsets[j] for j in keep]
            chunks, num_decodes = next_chunks, len(next_chunks)
        for i, tokens in drafts.items():
            results[i] = (tokens, torch.stack(probs[i]))
        return results

    def _forward(
        self, chunks: list[SeqChunk], num_decodes: int, hidden: torch.Tensor, offsets: list[int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """hidden [num_tokens, hidden] -> (normed, pre-norm) of each chunk's last row."""
        batch = self.runner.prepare(chunks, num_decodes)
        # The cache index is position - offset; RoPE takes the absolute position.
        shift = [o for o, c in zip(offsets, chunks, strict=True) for _ in c.token_ids]
        positions = batch.positions + torch.tensor(shift, device=self.device)
        embeds = self.embed(batch.input_ids)  # [num_tokens, hidden]
        normed, prenorm = self.head(embeds, hidden, positions, self.cache.layers[0], batch.meta)
        last = batch.logits_indices
        return normed[last], prenorm[last]

    # --- after verification ---------------------------------------------------------------

    def rollback(self, request: Request, num_valid: int) -> None:
        """Drop the head's cache rows the draft steps wrote (`capture` drops the target's rows
        of rejected drafts when the target recomputes from there)."""
        seq = self.seqs.get(request.request_id)
        if seq is not None:
            self.kv.trim(seq, seq.num_computed_tokens)

    def free(self, request: Request, keep_sampling: bool = False) -> None:
        seq = self.seqs.pop(request.request_id, None)
        if seq is not None:
            self.kv.free(seq)
        if not keep_sampling:
            self.sampling.forget(request)
