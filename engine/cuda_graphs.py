"""CUDA graphs of the decode-only step at a set of batch sizes, captured at start-up.

A decode step of a large model is hundreds of small kernels; launching them one by one from a slow
host CPU costs more than running them. A graph replays them with one launch. A batch of n decodes
runs in the smallest captured size >= n; the padding rows write their K/V into a scratch page that
no request owns and attend only to it.
"""

from __future__ import annotations

import torch

from engine.attention.metadata import AttentionBackend, AttentionMetadata
from engine.kv.cache import KVCache
from engine.model.llama import LlamaForCausalLM
from engine.runner import InputPatch, SeqChunk, token_slots


def capture_sizes(max_batch: int) -> list[int]:
    sizes = [1, 2, 4, 8] + list(range(16, 257, 16)) + list(range(288, 1025, 32))
    sizes += list(range(1088, 2049, 64))
    return [s for s in sizes if s < max_batch] + [max_batch]


class DecodeGraphs:
    def __init__(
        self,
        model: LlamaForCausalLM,
        kv_cache: KVCache,
        backend: AttentionBackend,
        device: torch.device,
        max_batch: int,
        max_blocks_per_seq: int,
        scratch_block: int,
    ) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.device = device
        self.block_size = kv_cache.layout.block_size
        self.max_blocks = max_blocks_per_seq
        self.scratch_block = scratch_block
        self.sizes = capture_sizes(max_batch)
        n = self.sizes[-1]
        i64 = dict(dtype=torch.int64, device=device)
        self.input_ids = torch.zeros(n, **i64)  # [max_batch]
        self.positions = torch.zeros(n, **i64)
        self.slot_mapping = torch.zeros(n, **i64)
        self.block_tables = torch.zeros(n, max_blocks_per_seq, **i64)  # [max_batch, max_blocks]
        self.seq_lens = torch.ones(n, **i64)
        # The step's inputs are written on the host into pinned memory and sent with a few async
        # copies. Two sets, used in turn: with overlap scheduling the host writes step n+1's
        # inputs while step n's copies may still be queued; an event per set says when its last
        # copies are done.
        # [4, n]: token, position, slot, context length of each row (one contiguous run per field)
        self._host_sets = [
            (
                torch.empty(4, n, dtype=torch.int64, pin_memory=True),
                torch.empty(n * max_blocks_per_seq, dtype=torch.int64, pin_memory=True),
                torch.cuda.Event(),
            )
            for _ in range(2)
        ]
        self._next_set = 0
        self._tables_staging = torch.empty(n * max_blocks_per_seq, **i64)
        # Every graph writes its logits into this one buffer (its first bs rows): a graph's own
        # output would stay allocated for each of the ~45 sizes (22 GB at batch 2048 of a
        # 128k vocabulary). The sampler reads them before the next replay, in stream order.
        vocab = model.lm_head_weight.shape[0]
        # [max_batch, vocab]
        self.logits = torch.empty(n, vocab, dtype=torch.float32, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.backend = backend
        self._capture_all()

    def _meta(self, bs: int) -> AttentionMetadata:
        return AttentionMetadata(
            backend=self.backend,
            slot_mapping=self.slot_mapping[:bs],
            block_tables=self.block_tables[:bs],
            seq_lens=self.seq_lens[:bs],
            query_start_loc=list(range(bs + 1)),
            seq_lens_host=[1] * bs,
            num_decodes=bs,
            block_size=self.block_size,
        )

    def _forward(self, bs: int) -> torch.Tensor:
        hidden = self.model(
            self.input_ids[:bs], self.positions[:bs], self.kv_cache.layers, self._meta(bs)
        )
        return self.model.logits(hidden, out=self.logits[:bs])  # [bs, vocab]

    @torch.inference_mode()
    def _capture_all(self) -> None:
        self._reset_padding(0)
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for bs in reversed(self.sizes):  # largest first: later graphs reuse its memory
                self._forward(bs)  # warm-up: compile kernels, settle the allocator
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool, stream=stream):
                    self._forward(bs)
                self.graphs[bs] = graph
        torch.cuda.current_stream(self.device).wait_stream(stream)
        torch.cuda.synchronize(self.device)

    def _reset_padding(self, start: int) -> None:
        """Rows from `start` on: a one-token context in the scratch page."""
        self.slot_mapping[start:] = self.scratch_block * self.block_size
        self.block_tables[start:] = self.scratch_block
        self.seq_lens[start:] = 1
        self.positions[start:] = 0
        self.input_ids[start:] = 0

    def can_run(self, chunks: list[SeqChunk], num_decodes: int) -> bool:
        return (
            num_decodes == len(chunks)
            and 0 < len(chunks) <= self.sizes[-1]
            and all(len(c.block_table) <= self.max_blocks for c in chunks)
        )

    @torch.inference_mode()
    def run(self, chunks: list[SeqChunk], patch: InputPatch | None = None) -> torch.Tensor:
        """Decode-only chunks -> logits [len(chunks), vocab] float32.

        Rows from len(chunks) up to the graph's size are padding: a one-token context in the
        scratch page. Table columns past the batch's widest row keep earlier steps' (valid) block
        ids: the kernels read only the pages a context covers, the reference masks the rest."""
        n = len(chunks)
        bs = next(s for s in self.sizes if s >= n)
        bsz = self.block_size
        width = max(len(c.block_table) for c in chunks)
        host, host_tables, copied = self._host_sets[self._next_set]
        self._next_set ^= 1
        copied.synchronize()  # this set's copies two steps ago are done (at once if never used)
        fields = host.numpy()  # [4, n]
        tables = host_tables[: bs * width].view(bs, width).numpy()  # [bs, width]
        tables.fill(self.scratch_block)  # short rows and padding rows end in the scratch page
        for i, c in enumerate(chunks):
            table = c.block_table
            fields[:, i] = (
                c.token_ids[0],
                c.start,
                token_slots(table, c.start, c.start + 1, bsz)[0],
                c.start + 1,
            )
            tables[i, : len(table)] = table
        fields[:, n:bs] = ((0,), (0,), (self.scratch_block * bsz,), (1,))
        for dst, field in (
            (self.input_ids, 0),
            (self.positions, 1),
            (self.slot_mapping, 2),
            (self.seq_lens, 3),
        ):
            dst[:bs].copy_(host[field, :bs], non_blocking=True)
        staging = self._tables_staging[: bs * width]
        staging.copy_(host_tables[: bs * width], non_blocking=True)
        copied.record()
        self.block_tables[:bs, :width] = staging.view(bs, width)
        if patch is not None:
            patch.apply(self.input_ids[:bs])
        self.graphs[bs].replay()
        return self.logits[:n]
