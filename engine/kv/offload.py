"""Moving prefix blocks between the device pool and the host and disk tiers.

A block record is one page's bytes for every layer, in this order: per layer K, V, then (int8
caches) K's and V's per-slot scales, each as the page's raw storage bytes. fp8's per-layer scalar
scales are not per page; they are part of the disk tier's fingerprint instead.

Flow: the pool evicts a cached free block for reuse -> `save` copies its pages into the host tier
(on CUDA: a gather on the compute stream, then an asynchronous copy into pinned memory on a side
stream, so the step does not wait and the pages' reuse is ordered after the gather); the host
tier's LRU victims go to disk. `find` continues a prefix lookup that missed the device pool:
the leading run of hashes held by host or disk (host entries held, disk records read into
staging rows) until `restore` copies them into freshly allocated device pages (on the compute
stream, before any prefill that reads them). A disk hit is not copied into the host tier: once
restored it is on the device, and goes to host when the pool evicts it again.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from engine.kv.cache import KVCache
from engine.kv.disk_tier import DiskTier
from engine.kv.fingerprint import kv_fingerprint, weights_identity
from engine.kv.host_tier import HostTier
from engine.state import KVTierState

if TYPE_CHECKING:
    from engine.config import EngineConfig
    from engine.model.builder import LoadedModel

RATE_WINDOW_S = 5.0


@dataclass
class TierStats:
    hits: int = 0  # blocks found here by prefix lookups
    bytes_in: int = 0  # written into this tier
    bytes_out: int = 0  # read back out of it towards the device
    _moves: deque[tuple[float, int]] = field(default_factory=deque)  # (monotonic, bytes)

    def moved(self, num_bytes: int, into: bool) -> None:
        if into:
            self.bytes_in += num_bytes
        else:
            self.bytes_out += num_bytes
        self._moves.append((time.monotonic(), num_bytes))

    def bytes_per_s(self, now: float) -> float:
        """Bytes moved in or out over the last RATE_WINDOW_S seconds, per second."""
        while self._moves and now - self._moves[0][0] > RATE_WINDOW_S:
            self._moves.popleft()
        return sum(n for _, n in self._moves) / RATE_WINDOW_S


class KVOffloader:
    def __init__(
        self,
        cache: KVCache,
        host_bytes: int,
        disk_dir: str | None = None,
        disk_bytes: int = 0,
        fingerprint: str | None = None,
    ) -> None:
        layout = cache.layout
        self.bytes_per_block = layout.bytes_per_block
        self.device = cache.layers[0].k.device
        self.on_cuda = self.device.type == "cuda"
        self.held: set[int] = set()  # host entries found by `find`, waiting for `restore`
        self._staged: dict[int, torch.Tensor] = {}  # disk records found by `find`, likewise
        self.disk: DiskTier | None = None
        if disk_dir is not None:
            if fingerprint is None:
                raise ValueError("a disk tier needs the model's fingerprint")
            self.disk = DiskTier(disk_dir, fingerprint, disk_bytes, self.bytes_per_block)
        self.host = HostTier(
            host_bytes // self.bytes_per_block,
            self.bytes_per_block,
            pin_memory=self.on_cuda,
            held=self.held,
            spill=self._spill if self.disk is not None else None,
        )
        self.host_stats = TierStats()
        self.disk_stats = TierStats()
        self.side_stream = torch.cuda.Stream(self.device) if self.on_cuda else None
        tensors: list[torch.Tensor] = []
        for layer in cache.layers:
            tensors += [layer.k, layer.v]
            if layout.slot_scales:
                tensors += [layer.k_scale, layer.v_scale]
        # Byte views sharing the pages' storage: [num_blocks, bytes of one block of that tensor]
        self._byte_views = [t.view(t.shape[0], -1).view(torch.uint8) for t in tensors]
        assert sum(v.shape[1] for v in self._byte_views) == self.bytes_per_block

    # --- records <-> device pages -------------------------------------------------------------

    def _gather(self, block_ids: torch.Tensor) -> torch.Tensor:
        """-> [n, bytes_per_block] uint8 on the device: the blocks' records."""
        return torch.cat([v.index_select(0, block_ids) for v in self._byte_views], dim=1)

    def _scatter(self, block_ids: torch.Tensor, records: torch.Tensor) -> None:
        """Write records [n, bytes_per_block] (on the device) into the blocks' pages."""
        offset = 0
        for view in self._byte_views:
            width = view.shape[1]
            view.index_copy_(0, block_ids, records[:, offset : offset + width].contiguous())
            offset += width

    # --- device -> host (-> disk) -------------------------------------------------------------

    def save(self, evicted: list[tuple[int, int]]) -> None:
        """The pool is about to reuse these (block id, hash) pages: keep their records, in
        order (the first is the least recently used). Called before the pages are handed out,
        so any later write to them is queued after the gather."""
        pending: dict[int, tuple[int, int]] = {}  # hash -> (block id, slot), not yet copied
        for block_id, block_hash in evicted:
            if block_hash in self.host:  # restored earlier and unchanged since: keep that copy
                self.host.touch(block_hash)
                continue
            if not self.host.free_slots and self.host.next_victim() in pending:
                # More blocks than slots: the victim's record must arrive before it spills.
                self._copy_out(list(pending.values()))
                pending.clear()
            slot = self.host.reserve(block_hash)
            if slot is not None:  # None: every host entry is held for a restore
                pending[block_hash] = (block_id, slot)
        if pending:
            self._copy_out(list(pending.values()))

    def close(self) -> None:
        """The disk tier's queued writes land (waiting at most its CLOSE_TIMEOUT_S), so a new
        engine started right after finds them. The host tier is memory: it goes with the engine."""
        if self.disk is not None:
            self.disk.flush()

    def states(self) -> tuple[KVTierState, ...]:
        """Each tier's snapshot for `EngineState`: host, then disk."""
        now = time.monotonic()
        tiers = [("host", self.host, self.host_stats)]
        if self.disk is not None:
            tiers.append(("disk", self.disk, self.disk_stats))
        return tuple(
            KVTierState(
                name=name,
                blocks_used=tier.num_used,
                blocks_capacity=tier.num_slots,
                capacity_bytes=tier.capacity_bytes,
                hits=stats.hits,
                bytes_in=stats.bytes_in,
                bytes_out=stats.bytes_out,
                bytes_per_s=stats.bytes_per_s(now),
            )
            for name, tier, stats in tiers
        )

    def _copy_out(self, moves: list[tuple[int, int]]) -> None:
        """Device pages -> host slots, for (block id, slot) pairs."""
        block_ids = torch.tensor([block_id for block_id, _ in moves], device=self.device)
        slots = [slot for _, slot in moves]
        records = self._gather(block_ids)  # [n, bytes_per_block] uint8
        if self.on_cuda:
            side = self.side_stream
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                for i, slot in enumerate(slots):
                    self.host.row(slot).copy_(records[i], non_blocking=True)
                event = torch.cuda.Event()
                event.record(side)
            records.record_stream(side)  # the gather's memory lives until the copies are done
            for slot in slots:
                self.host.events[slot] = event
        else:
            for i, slot in enumerate(slots):
                self.host.row(slot).copy_(records[i])
        self.host_stats.moved(len(moves) * self.bytes_per_block, into=True)

    def _spill(self, block_hash: int, record: torch.Tensor) -> None:
        """The host tier evicts `block_hash`: its record goes to disk."""
        if block_hash not in self.disk and self.disk.put(block_hash, record):
            self.disk_stats.moved(self.bytes_per_block, into=True)
        elif block_hash in self.disk:
            self.disk.touch(block_hash)

    # --- lookup and restore -------------------------------------------------------------------

    def find(self, hashes: Sequence[int]) -> list[int]:
        """The leading run of `hashes` held by the host or disk tier. Host entries stay held
        and disk records are read into staging rows until `restore` (or the next `find`)."""
        run: list[int] = []
        staged: dict[int, torch.Tensor] = {}
        for block_hash in hashes:
            if block_hash in self.host:
                self.host.touch(block_hash)
            elif block_hash in self._staged:  # read for this request at an earlier lookup
                staged[block_hash] = self._staged[block_hash]
            elif self.disk is not None and block_hash in self.disk:
                row = torch.empty(self.bytes_per_block, dtype=torch.uint8, pin_memory=self.on_cuda)
                if not self.disk.get(block_hash, row):
                    break  # a damaged file ends the run: its tokens are recomputed
                self.disk_stats.moved(self.bytes_per_block, into=False)
                staged[block_hash] = row
            else:
                break
            run.append(block_hash)
        self._staged = staged
        self.held.clear()
        self.held.update(h for h in run if h not in staged)
        return run

    def restore(self, hashes: Sequence[int], block_ids: Sequence[int]) -> None:
        """Copy the records of `hashes` (found by `find`) into device pages `block_ids`."""
        sources = [
            self._staged[h] if h in self._staged else self.host.row(self.host.slot_of(h))
            for h in hashes
        ]  # each [bytes_per_block] uint8 on the host
        ids = torch.tensor(list(block_ids), device=self.device)
        if self.on_cuda:
            stream = torch.cuda.current_stream(self.device)
            records = torch.empty(
                (len(sources), self.bytes_per_block), dtype=torch.uint8, device=self.device
            )
            host_slots = [self.host.slot_of(h) for h in hashes if h not in self._staged]
            for slot in host_slots:
                pending = self.host.events.get(slot)
                if pending is not None:  # its copy from the device may still be in flight
                    stream.wait_event(pending)
            for i, source in enumerate(sources):
                records[i].copy_(source, non_blocking=True)
            event = torch.cuda.Event()
            event.record(stream)
            for slot in host_slots:
                self.host.events[slot] = event  # the host must not reuse a slot still being read
        else:
            records = torch.stack(sources)
        self._scatter(ids, records)
        # Hits count once, when restored (a blocked request is looked up again each step).
        num_from_disk = sum(1 for h in hashes if h in self._staged)
        self.disk_stats.hits += num_from_disk
        self.host_stats.hits += len(hashes) - num_from_disk
        self.host_stats.moved((len(hashes) - num_from_disk) * self.bytes_per_block, into=False)
        self.held.difference_update(hashes)
        for block_hash in hashes:
            self._staged.pop(block_hash, None)


def build_offloader(config: EngineConfig, loaded: LoadedModel, cache: KVCache) -> KVOffloader:
    """The tiers `config` asks for, the disk directory named by the loaded model's fingerprint."""
    fingerprint = None
    if config.kv_disk_dir is not None:
        dummy = config.load_format == "dummy"
        weights = weights_identity(loaded.model_dir, loaded.hf_config, dummy, config.seed)
        fingerprint = kv_fingerprint(
            weights,
            cache.layout,
            loaded.device.type,
            cache.fp8_scales,
            repr(loaded.quant) if loaded.quant is not None else None,
        )
    return KVOffloader(
        cache, config.kv_host_bytes, config.kv_disk_dir, config.kv_disk_bytes or 0, fingerprint
    )
