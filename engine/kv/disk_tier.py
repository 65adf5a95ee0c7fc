"""The disk tier: block records the host tier evicted, one file per block hash, in a directory
named by the fingerprint of everything that shapes the bytes (engine/kv/fingerprint.py). It
survives restarts: a new engine with the same fingerprint scans the directory and finds the
blocks again; an engine with another fingerprint looks in another directory.

A file is `HEADER` (magic, format version, block hash, payload length, CRC-32 of the payload)
followed by the record. Writes go to a temporary file renamed into place, so a reader sees a whole
file or none; a file that is short, has another header or fails its checksum is removed and counts
as a miss. Invariant: `files` holds the hashes whose files are in the directory, least recently
used first (the scan orders them by mtime, and a hit touches the file's mtime so the order
survives a restart).
"""

from __future__ import annotations

import os
import struct
import threading
import zlib
from collections import OrderedDict
from pathlib import Path

import torch

MAGIC = b"WBKV"
FORMAT_VERSION = 1
HEADER = struct.Struct("<4sIQQI")  # magic, version, block hash, payload bytes, crc32
SUFFIX = ".kv"


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
        self._scan()

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
        self.path(victim).unlink(missing_ok=True)
        self.num_evictions += 1

    def _remove(self, path: Path) -> None:
        self.num_corrupt += 1
        path.unlink(missing_ok=True)

    def put(self, block_hash: int, record: torch.Tensor) -> bool:
        """Store a record ([bytes_per_block] uint8, on the CPU); False when there is no room."""
        if block_hash in self.files:
            self.touch(block_hash)
            return True
        if self.num_slots == 0:
            return False
        if len(self.files) >= self.num_slots:
            self._evict()
        payload = record.numpy().tobytes()
        header = HEADER.pack(MAGIC, FORMAT_VERSION, block_hash, len(payload), zlib.crc32(payload))
        path = self.path(block_hash)
        # Unique per process and thread: two engines may write the same block at once.
        tmp = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        try:
            with open(tmp, "wb") as f:
                f.write(header)
                f.write(payload)
            os.replace(tmp, path)
        except OSError:
            tmp.unlink(missing_ok=True)
            return False  # a full or read-only disk loses the block, never the request
        self.files[block_hash] = None
        return True

    def touch(self, block_hash: int) -> None:
        self.files.move_to_end(block_hash)
        try:
            os.utime(self.path(block_hash))
        except OSError:
            pass

    def get(self, block_hash: int, out: torch.Tensor) -> bool:
        """Read a record into `out` ([bytes_per_block] uint8, CPU). A missing, short or corrupt
        file is removed and forgotten, and reads as False."""
        if block_hash not in self.files:
            return False
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
