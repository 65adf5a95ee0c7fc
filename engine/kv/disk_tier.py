"""The disk tier: block records the host tier evicted, one file per block hash, in a directory
named by the fingerprint of everything that shapes the bytes (engine/kv/fingerprint.py). It
survives restarts: a new engine with the same fingerprint scans the directory and finds the
blocks again; an engine with another fingerprint looks in another directory.

A file is `HEADER` (magic, format version, block hash, payload length, CRC-32 of the payload)
followed by the record. Writes go to a temporary file renamed into place, so a reader sees a whole
file or none; a file that is short, has another header or fails its checksum is removed and counts
as a miss. Invariant: `files` holds the hashes whose files are in the directory or queued to be
written there, least recently used first (the scan orders them by mtime, and a hit touches the
file's mtime so the order survives a restart).

Writes, removals and touches run on a writer thread (disk_writer.py), so a spill costs the engine
thread a copy of the record, not a file write. A block whose write is still queued is in `pending`
and is read from there: a hit on it gets the right bytes. At most `max_pending` records wait: a
spill beyond that waits for the writer (a burst larger than the bound, e.g. a long prompt evicted
at once), for at most `put_wait_s`, and is dropped after that (the block is not kept, and counts
in `num_dropped`), which bounds the memory and the stall a slow disk can cause. A write that
fails (a full or read-only disk) takes the block out of the index. Only the engine thread reads
and changes `files`; `pending` is shared, under a lock. `flush` (engine close) waits, bounded, for
the queued writes: a restart right after it sees every block.
"""

from __future__ import annotations

import os
import struct
import threading
import zlib
from collections import OrderedDict
from pathlib import Path

import torch

from engine.kv.disk_writer import DiskWriter

MAGIC = b"WBKV"
FORMAT_VERSION = 1
HEADER = struct.Struct("<4sIQQI")  # magic, version, block hash, payload bytes, crc32
SUFFIX = ".kv"
MAX_PENDING_BYTES = 256 * 2**20  # records waiting for the writer thread, at most
CLOSE_TIMEOUT_S = 30.0  # how long closing waits for the queued writes
PUT_WAIT_S = 1.0  # how long a spill waits for room among the pending records before it is dropped


class DiskTier:
    def __init__(
        self,
        root: str | os.PathLike,
        fingerprint: str,
        budget_bytes: int,
        bytes_per_block: int,
    ) -> None:
        self.directory = Path(root) / fingerprint
        self.directory.mkdir(parents=True, exist_ok=True)
        self.bytes_per_block = bytes_per_block
        self.file_bytes = HEADER.size + bytes_per_block
        self.num_slots = budget_bytes // self.file_bytes
        self.files: OrderedDict[int, None] = OrderedDict()
        self.num_evictions = 0
        self.num_corrupt = 0
        self.num_dropped = 0  # spills dropped because max_pending records were waiting
        self.num_write_errors = 0
        self.max_pending = max(1, MAX_PENDING_BYTES // max(bytes_per_block, 1))
        self.put_wait_s = PUT_WAIT_S
        self._lock = threading.Condition()  # guards pending and _failed; notified as they shrink
        self.pending: dict[int, torch.Tensor] = {}  # hash -> record queued for writing
        self._failed: list[int] = []  # hashes whose write failed, for the engine thread to drop
        self._scan()
        self.writer = DiskWriter(self._written)

    @property
    def num_used(self) -> int:
        return len(self.files)

    @property
    def capacity_bytes(self) -> int:
        return self.num_slots * self.file_bytes

    def __contains__(self, block_hash: int) -> bool:
        return block_hash in self.files

    def path(self, block_hash: int) -> Path:
        return self.directory / f"{block_hash:016x}{SUFFIX}"

    def _scan(self) -> None:
        """Index the files a previous engine left, oldest first; drop what cannot be ours."""
        found: list[tuple[int, int]] = []  # (mtime_ns, hash)
        for entry in os.scandir(self.directory):
            path = Path(entry.path)
            if path.suffix != SUFFIX:
                if ".tmp" in path.name:  # a write that never reached its rename
                    path.unlink(missing_ok=True)
                continue
            try:
                block_hash = int(path.stem, 16)
                stat = entry.stat()
            except (ValueError, OSError):
                continue
            if stat.st_size != self.file_bytes:
                self._remove(path)
                continue
            found.append((stat.st_mtime_ns, block_hash))
        for _, block_hash in sorted(found):
            self.files[block_hash] = None
        while len(self.files) > self.num_slots:  # a smaller budget than last time
            self._evict()

    def _evict(self) -> None:
        victim, _ = self.files.popitem(last=False)
        with self._lock:
            if self.pending.pop(victim, None) is not None:  # its write still lands; then removed
                self._lock.notify_all()
        self._unlink(self.path(victim))
        self.num_evictions += 1

    def _unlink(self, path: Path) -> None:
        if hasattr(self, "writer"):
            self.writer.remove(path)  # after any queued write of the same path
        else:  # the scan, before the writer starts
            path.unlink(missing_ok=True)

    def _remove(self, path: Path) -> None:
        self.num_corrupt += 1
        self._unlink(path)

    def put(self, block_hash: int, record: torch.Tensor) -> bool:
        """Queue a record ([bytes_per_block] uint8, on the CPU; copied, so the caller may reuse
        it at once) for writing; False when it is not kept (no room, or too many waiting)."""
        self._drop_failed()
        if block_hash in self.files:
            self.touch(block_hash)
            return True
        if self.num_slots == 0 or self.writer.closed:
            return False
        with self._lock:
            if not self._lock.wait_for(self._has_room, timeout=self.put_wait_s):
                self.num_dropped += 1
                return False
        if len(self.files) >= self.num_slots:
            self._evict()
        record = record.clone()  # [bytes_per_block] uint8: the caller's row is reused next
        payload = memoryview(record.numpy()).cast("B")
        header = HEADER.pack(MAGIC, FORMAT_VERSION, block_hash, len(payload), zlib.crc32(payload))
        with self._lock:
            self.pending[block_hash] = record
        self.files[block_hash] = None
        self.writer.write(block_hash, record, self.path(block_hash), header, payload)
        return True

    def _has_room(self) -> bool:
        return len(self.pending) < self.max_pending

    def _written(self, block_hash: int, record: torch.Tensor, ok: bool) -> None:
        """The writer thread finished writing `record` (ok False: it failed)."""
        with self._lock:
            if self.pending.get(block_hash) is not record:
                return  # evicted meanwhile (and maybe queued again, with another record)
            del self.pending[block_hash]
            self._lock.notify_all()
            if not ok:
                self.num_write_errors += 1
                self._failed.append(block_hash)

    def _drop_failed(self) -> None:
        """Forget the blocks whose writes failed: a lookup must not count on them."""
        with self._lock:
            failed, self._failed = self._failed, []
        for block_hash in failed:
            if block_hash not in self.pending:  # not queued again since
                self.files.pop(block_hash, None)

    def wait(self, timeout: float = CLOSE_TIMEOUT_S) -> bool:
        """Block until the queued writes are on disk (at most `timeout` s); True if they are."""
        done = self.writer.wait(timeout)
        self._drop_failed()
        return done

    def flush(self, timeout: float = CLOSE_TIMEOUT_S) -> bool:
        """Stop the writer once the queued writes are done (waiting at most `timeout` s);
        True when none was left behind. The tier keeps answering lookups, from its files."""
        done = self.writer.close(timeout)
        self._drop_failed()
        return done

    def touch(self, block_hash: int) -> None:
        self.files.move_to_end(block_hash)
        if not self.writer.closed:
            self.writer.touch(self.path(block_hash))

    def get(self, block_hash: int, out: torch.Tensor) -> bool:
        """Read a record into `out` ([bytes_per_block] uint8, CPU): from memory while its write
        is queued, else from its file. A missing, short or corrupt file is removed and
        forgotten, and reads as False."""
        self._drop_failed()
        if block_hash not in self.files:
            return False
        with self._lock:
            queued = self.pending.get(block_hash)
            if queued is not None:
                out.copy_(queued)
        if queued is not None:
            self.touch(block_hash)
            return True
        path = self.path(block_hash)
        view = out.numpy()  # the read lands in `out` itself: no staging copy
        try:
            with open(path, "rb") as f:
                header = f.read(HEADER.size)
                num_read = f.readinto(view)
                trailing = f.read(1)
        except OSError:
            header, num_read, trailing = b"", 0, b""
        if (
            trailing
            or num_read != self.bytes_per_block
            or not self._valid(block_hash, header, view)
        ):
            del self.files[block_hash]
            self._remove(path)
            return False
        self.touch(block_hash)
        return True

    def _valid(self, block_hash: int, header: bytes, payload) -> bool:
        if len(header) != HEADER.size:
            return False
        magic, version, stored_hash, length, crc = HEADER.unpack(header)
        return (
            magic == MAGIC
            and version == FORMAT_VERSION
            and stored_hash == block_hash
            and length == self.bytes_per_block
            and zlib.crc32(payload) == crc
        )
