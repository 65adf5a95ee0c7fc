"""Scheduled batch -> flat tensors -> model -> logits of the rows that sample this step.

A sequence samples when this step computes up to its last known token: every decode, and the
final chunk of a prefill. Earlier prefill chunks only fill the cache.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from engine.attention.metadata import AttentionBackend, AttentionMetadata
from engine.kv.cache import KVCache
from engine.kv.manager import KVCacheManager
from engine.model.llama import LlamaForCausalLM
from engine.request import Request
from engine.scheduler import SchedulerOutput


class StepBatch(NamedTuple):
    input_ids: torch.Tensor  # [num_tokens]
    positions: torch.Tensor  # [num_tokens]
    meta: AttentionMetadata
    logits_indices: torch.Tensor  # [num_sampling] rows of the flat batch whose logits are needed
    sampling: list[Request]  # requests that get a token this step, in logits order


class ModelRunner:
    def __init__(
        self,
        model: LlamaForCausalLM,
        kv_cache: KVCache,
        kv: KVCacheManager,
        backend: AttentionBackend,
        device: torch.device,
    ) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.kv = kv
        self.backend = backend
        self.device = device
        self.block_size = kv.block_size

    def prepare(self, out: SchedulerOutput) -> StepBatch:
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        starts = [0]
        seq_lens: list[int] = []
        tables: list[list[int]] = []
        logits_indices: list[int] = []
        sampling: list[Request] = []
        bs = self.block_size
        for request, num_new in out.scheduled:
            start = request.num_computed_tokens
            end = start + num_new
            table = self.kv.block_ids(request.request_id)
            input_ids.extend(request.all_token_ids[start:end])
            positions.extend(range(start, end))
            slots.extend(table[p // bs] * bs + p % bs for p in range(start, end))
            starts.append(starts[-1] + num_new)
            seq_lens.append(end)
            tables.append(table)
            if end == request.num_tokens:
                logits_indices.append(starts[-1] - 1)
                sampling.append(request)
        width = max(len(t) for t in tables)
        padded = [t + [0] * (width - len(t)) for t in tables]
        dev = self.device
        meta = AttentionMetadata(
            backend=self.backend,
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=dev),
            block_tables=torch.tensor(padded, dtype=torch.int64, device=dev),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int64, device=dev),
            query_start_loc=starts,
            seq_lens_host=seq_lens,
            num_decodes=len(out.decodes),
            block_size=bs,
        )
        return StepBatch(
            input_ids=torch.tensor(input_ids, dtype=torch.int64, device=dev),
            positions=torch.tensor(positions, dtype=torch.int64, device=dev),
            meta=meta,
            logits_indices=torch.tensor(logits_indices, dtype=torch.int64, device=dev),
            sampling=sampling,
        )

    @torch.inference_mode()
    def run(self, out: SchedulerOutput) -> tuple[torch.Tensor, list[Request]]:
        """-> (logits [num_sampling, vocab] float32, the requests they belong to)."""
        batch = self.prepare(out)
        hidden = self.model(batch.input_ids, batch.positions, self.kv_cache.layers, batch.meta)
        return self.model.logits(hidden[batch.logits_indices]), batch.sampling
