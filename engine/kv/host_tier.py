"""The host tier: block records (a page's K/V of every layer, engine/kv/offload.py) kept in host
memory after the device pool evicted them, with its own LRU and byte budget.

Invariant: a slot is either free or holds exactly one block hash (`slots`); `slots` is ordered
least recently used first. Evicting an entry first hands it to `spill` (the disk tier), so the
slot's bytes are read before they are overwritten. Hashes in `held` (found by a lookup, waiting for
their restore) are never evicted.

On CUDA the slots are pinned and the device copies run asynchronously: `events[slot]` marks the
last device copy that touched the slot, and the host waits for it before it reads or reuses the
slot. PyTorch hands out pinned memory in power-of-two sizes, so the slots come in chunks of at
most `PINNED_CHUNK_BYTES`: one 48 GiB buffer would pin 64 GiB, chunks waste less than a slot each.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable

import torch

PINNED_CHUNK_BYTES = 2**30
Spill = Callable[[int, torch.Tensor], None]  # (block hash, its record [bytes_per_block] uint8)


class HostTier:
    def __init__(
        self,
        num_slots: int,
        bytes_per_block: int,
        pin_memory: bool,
        held: set[int],
        spill: Spill | None = None,
    ) -> None:
        self.num_slots = num_slots
        self.bytes_per_block = bytes_per_block
        chunk = PINNED_CHUNK_BYTES // bytes_per_block if pin_memory else num_slots
        self.rows_per_chunk = max(chunk, 1)
        # each [rows, bytes_per_block] uint8: one block record per row, slot i in row i overall
        self.chunks = [
            torch.empty(
                (min(self.rows_per_chunk, num_slots - start), bytes_per_block),
                dtype=torch.uint8,
                pin_memory=pin_memory,
            )
            for start in range(0, num_slots, self.rows_per_chunk)
        ]
        self.slots: OrderedDict[int, int] = OrderedDict()  # block hash -> slot, LRU first
        self.free_slots: deque[int] = deque(range(num_slots))
        self.events: dict[int, torch.cuda.Event] = {}
        self.held = held  # owned by the offloader
        self.spill = spill
        self.num_evictions = 0

    @property
    def num_used(self) -> int:
        return len(self.slots)

    @property
    def capacity_bytes(self) -> int:
        return self.num_slots * self.bytes_per_block

    def __contains__(self, block_hash: int) -> bool:
        return block_hash in self.slots

    def row(self, slot: int) -> torch.Tensor:
        """The slot's record: [bytes_per_block] uint8."""
        chunk, row = divmod(slot, self.rows_per_chunk)
        return self.chunks[chunk][row]

    def touch(self, block_hash: int) -> None:
        self.slots.move_to_end(block_hash)

    def slot_of(self, block_hash: int) -> int:
        return self.slots[block_hash]

    def wait(self, slot: int) -> None:
        """Block the host until the device copies touching `slot` are done."""
        event = self.events.pop(slot, None)
        if event is not None:
            event.synchronize()

    def next_victim(self) -> int | None:
        """The entry `reserve` evicts next when no slot is free."""
        return next((h for h in self.slots if h not in self.held), None)

    def reserve(self, block_hash: int) -> int | None:
        """A slot for a new entry, most recently used; the least recently used entry not held is
        spilled and evicted when none is free. None when every entry is held (nothing is kept)."""
        if not self.free_slots:
            victim = self.next_victim()
            if victim is None:
                return None
            slot = self.slots.pop(victim)
            self.wait(slot)
            if self.spill is not None:
                self.spill(victim, self.row(slot))
            self.free_slots.append(slot)
            self.num_evictions += 1
        slot = self.free_slots.popleft()
        self.wait(slot)
        self.slots[block_hash] = slot
        return slot
