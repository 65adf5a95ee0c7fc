"""Sequence chunks -> flat tensors -> model -> logits of the positions that need them.

The runner knows nothing of requests or schedulers: the target engine and the draft model of
speculative decoding both hand it `SeqChunk`s, decodes (one token) first.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import torch

from engine.attention.metadata import AttentionBackend, AttentionMetadata
from engine.host_transfer import to_device
from engine.kv.cache import KVCache
from engine.model.llama import LlamaForCausalLM

if TYPE_CHECKING:
    from engine.cuda_graphs import DecodeGraphs


class SeqChunk(NamedTuple):
    token_ids: list[int]  # the tokens computed this step
    start: int  # position of token_ids[0]; the tokens before it are in the cache
    block_table: list[int]  # covers start + len(token_ids) tokens
    num_logits: int  # how many of the last positions need logits (0: a mid-prompt chunk)
    # offsets into token_ids whose logits score prompt tokens (engine/prompt_logprobs.py)
    score_offsets: range = range(0)


def token_slots(block_table: list[int], start: int, end: int, block_size: int) -> list[int]:
    """The KV-cache slots (page * block_size + offset) of positions [start, end) of a sequence
    whose pages are `block_table`: where the step writes those tokens' K/V."""
    return [block_table[p // block_size] * block_size + p % block_size for p in range(start, end)]


class InputPatch(NamedTuple):
    """Input tokens whose values are still on the device (overlap scheduling: sampled by the step
    in flight). The host passes PLACEHOLDER for them; the patch fills them in on the device."""

    positions: list[int]  # flat indices into the step's input_ids
    rows: list[int]  # for each, its row of `source`
    source: torch.Tensor  # [num_sampled_rows] int64, the previous step's sampled tokens

    def apply(self, input_ids: torch.Tensor) -> None:
        """input_ids: [num_tokens] int64, on the device; filled in place."""
        device = input_ids.device
        values = self.source.index_select(0, to_device(self.rows, torch.int64, device))
        input_ids.index_copy_(0, to_device(self.positions, torch.int64, device), values)


class StepBatch(NamedTuple):
    input_ids: torch.Tensor  # [num_tokens]
    positions: torch.Tensor  # [num_tokens]
    meta: AttentionMetadata
    logits_indices: torch.Tensor  # [num_logits] rows of the flat batch whose logits are needed


class ModelRunner:
    def __init__(
        self,
        model: LlamaForCausalLM,
        kv_cache: KVCache,
        backend: AttentionBackend,
        device: torch.device,
        graphs: DecodeGraphs | None = None,
    ) -> None:
        """`graphs`: CUDA graphs of decode-only steps, replayed when a step fits them."""
        self.model = model
        self.kv_cache = kv_cache
        self.backend = backend
        self.device = device
        self.block_size = kv_cache.layout.block_size
        self.graphs = graphs

    def prepare(self, chunks: list[SeqChunk], num_decodes: int) -> StepBatch:
        """The first `num_decodes` chunks must be single-token decodes."""
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        starts = [0]
        seq_lens: list[int] = []
        logits_indices: list[int] = []
        bs = self.block_size
        for chunk in chunks:
            end = chunk.start + len(chunk.token_ids)
            table = chunk.block_table
            input_ids.extend(chunk.token_ids)
            positions.extend(range(chunk.start, end))
            slots.extend(token_slots(table, chunk.start, end, bs))
            starts.append(starts[-1] + len(chunk.token_ids))
            seq_lens.append(end)
            logits_indices.extend(range(starts[-1] - chunk.num_logits, starts[-1]))
        width = max(len(c.block_table) for c in chunks)
        padded = [c.block_table + [0] * (width - len(c.block_table)) for c in chunks]
        dev = self.device
        meta = AttentionMetadata(
            backend=self.backend,
            slot_mapping=to_device(slots, torch.int64, dev),
            block_tables=to_device(padded, torch.int64, dev),
            seq_lens=to_device(seq_lens, torch.int64, dev),
            query_start_loc=starts,
            seq_lens_host=seq_lens,
            num_decodes=num_decodes,
            block_size=bs,
        )
        return StepBatch(
            input_ids=to_device(input_ids, torch.int64, dev),
            positions=to_device(positions, torch.int64, dev),
            meta=meta,
            logits_indices=to_device(logits_indices, torch.int64, dev),
        )

    @torch.inference_mode()
    def run(
        self, chunks: list[SeqChunk], num_decodes: int, patch: InputPatch | None = None
    ) -> torch.Tensor:
        """-> logits [sum of num_logits, vocab] float32, in chunk order. Queues the work and
        returns without waiting for the device."""
        if self.graphs is not None and self.graphs.can_run(chunks, num_decodes):
            return self.graphs.run(chunks, patch)
        batch = self.prepare(chunks, num_decodes)
        if patch is not None:
            patch.apply(batch.input_ids)
        hidden = self.model(batch.input_ids, batch.positions, self.kv_cache.layers, batch.meta)
        return self.model.logits(hidden[batch.logits_indices])

    @torch.inference_mode()
    def run_with_prompt_hidden(
        self, chunks: list[SeqChunk], num_decodes: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (run's logits, the final hidden states [sum of len(score_offsets), hidden] of the
        chunks' score_offsets positions, in chunk order; their logits are the caller's to take,
        a slice at a time). Eager: prefill steps have no graph."""
        batch = self.prepare(chunks, num_decodes)
        hidden = self.model(batch.input_ids, batch.positions, self.kv_cache.layers, batch.meta)
        rows: list[int] = []
        start = 0
        for chunk in chunks:
            rows.extend(start + offset for offset in chunk.score_offsets)
            start += len(chunk.token_ids)
        scored = hidden[to_device(rows, torch.int64, self.device)]  # [num_scored, hidden]
        return self.model.logits(hidden[batch.logits_indices]), scored
