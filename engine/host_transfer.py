"""Host <-> device copies that never make the host wait for the GPU's queue.

`torch.tensor(values, device="cuda")` copies from pageable memory, which synchronizes the whole
stream: the host waits for every kernel queued before it. With overlap scheduling the queue holds
the step in flight, so every small index or parameter tensor would wait for it. These helpers go
through pinned memory with non-blocking copies instead (torch's caching host allocator keeps a
pinned block alive until the copies that read it are done). On the CPU they are plain tensors.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def to_device(values: Sequence, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A tensor of `values` (a list, or a list of equal-length lists) on `device`, queued
    behind the work already on the stream rather than waiting for it."""
    host = torch.tensor(values, dtype=dtype)
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


class HostCopy:
    """Device tensors copied to host memory in the background: `wait()` returns the host
    tensors once the copies (and the work queued before them) are done.

    The copy is queued at construction; the host is free until `wait()`, and then waits for this
    copy only, not for work queued on the stream after it."""

    def __init__(self, tensors: Sequence[torch.Tensor | None]) -> None:
        self._event = None
        self._host: list[torch.Tensor | None] = []
        for tensor in tensors:
            if tensor is None or tensor.device.type != "cuda":
                self._host.append(tensor)
                continue
            host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            host.copy_(tensor, non_blocking=True)
            self._host.append(host)
        if any(t is not None and t.device.type == "cuda" for t in tensors):
            self._event = torch.cuda.Event()
            self._event.record()

    def wait(self) -> list[torch.Tensor | None]:
        if self._event is not None:
            self._event.synchronize()
            self._event = None
        return self._host
