"""The disk tier's file I/O off the engine thread: one writer thread, operations in FIFO order.

The engine thread keeps the disk tier's index and only enqueues: writes (a whole file, written to
a temporary name and renamed into place), removals and mtime touches. FIFO order is what makes
this safe without locks on the files: a removal or touch queued after a write of the same path
happens after it. The records of queued writes are bounded by the tier (`DiskTier.max_pending`);
the other operations are a path each.

`close(timeout)` lets the queue drain (waiting at most `timeout` seconds) and stops the thread; a
write still queued then is lost like a write cut off by a crash: no file, or a temporary one that
the next scan removes. A writer that is never closed is closed the same way when it is garbage
collected or the interpreter exits (`weakref.finalize`); the thread holds no reference to it.
"""

from __future__ import annotations

import os
import queue
import threading
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

# (block hash, the record it was written from, written) once a write has finished or failed
Done = Callable[[int, Any, bool], None]


EXIT_TIMEOUT_S = 30.0  # what an unclosed writer waits for its queue at exit


class DiskWriter:
    def __init__(self, on_written: Done) -> None:
        """`on_written`: a bound method, called on the writer thread (held weakly)."""
        self._queue: queue.SimpleQueue[tuple | None] = queue.SimpleQueue()
        self._thread = threading.Thread(
            target=_run,
            args=(self._queue, weakref.WeakMethod(on_written)),
            name="kv-disk-writer",
            daemon=True,
        )
        self._thread.start()
        self._finalizer = weakref.finalize(self, _stop, self._queue, self._thread, EXIT_TIMEOUT_S)
        self.closed = False

    def write(
        self, block_hash: int, record: Any, path: Path, header: bytes, payload: memoryview
    ) -> None:
        """Queue header + payload (a view of `record`, which is handed back to on_written)."""
        self._queue.put(("write", block_hash, record, path, header, payload))

    def remove(self, path: Path) -> None:
        self._queue.put(("remove", path))

    def touch(self, path: Path) -> None:
        self._queue.put(("touch", path))

    def wait(self, timeout: float) -> bool:
        """Block until everything queued so far is done (at most `timeout` s); True if it is."""
        if self.closed:
            self._thread.join(timeout)
            return not self._thread.is_alive()
        done = threading.Event()
        self._queue.put(("barrier", done))
        return done.wait(timeout)

    def close(self, timeout: float) -> bool:
        """Drain the queue (at most `timeout` seconds) and stop; True when everything queued was
        done."""
        self.closed = True
        if self._finalizer.detach() is not None:
            self._queue.put(None)
        self._thread.join(timeout)
        return not self._thread.is_alive()


def _stop(ops: queue.SimpleQueue, thread: threading.Thread, timeout: float) -> None:
    ops.put(None)
    thread.join(timeout)


def _run(ops: queue.SimpleQueue, on_written: weakref.WeakMethod) -> None:
    """The writer thread: operations in order until None."""
    while (op := ops.get()) is not None:
        kind, *args = op
        if kind == "write":
            block_hash, record, path, header, payload = args
            written = write_atomically(path, header, payload)
            callback = on_written()
            if callback is not None:
                callback(block_hash, record, written)
        elif kind == "remove":
            args[0].unlink(missing_ok=True)
        elif kind == "barrier":
            args[0].set()
        else:
            try:
                os.utime(args[0])
            except OSError:
                pass  # removed meanwhile, or a read-only disk: the order is a hint


def write_atomically(path: Path, header: bytes, payload: memoryview) -> bool:
    """header + payload into `path`, through a temporary file renamed into place, so a reader
    sees a whole file or none. False (and no file) on a full or read-only disk."""
    # Unique per process and thread: two engines may write the same block at once.
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(header)
            f.write(payload)
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
        return False
    return True
