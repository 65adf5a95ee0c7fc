"""The ranks' process group: a standalone torch.distributed group (no global default group, so
several engines, or a user's own torch.distributed, live side by side in one process).

Rendezvous goes through a TCPStore that rank 0 hosts on 127.0.0.1. Every collective waits at most
`timeout_s` (WORKBENCH_TP_TIMEOUT_S, default 120): a rank that stops answering is an error, never
a hang. Collectives only run inside steps, so an idle engine never times out.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

TIMEOUT_ENV = "WORKBENCH_TP_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 120.0


def collective_timeout_s() -> float:
    return float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S))


@dataclass(frozen=True)
class Rendezvous:
    """Where the ranks meet (picklable: sent to the worker processes)."""

    host: str
    port: int
    world_size: int
    timeout_s: float


class TPGroup:
    """This rank's handle on the group: rank, size and the collectives the layers use."""

    def __init__(self, rendezvous: Rendezvous, rank: int, device: torch.device) -> None:
        timeout = timedelta(seconds=rendezvous.timeout_s)
        self.rank = rank
        self.world_size = rendezvous.world_size
        self.device = device
        # Rank 0's store (the server) is made by `host_store` before the workers start.
        self._store = dist.TCPStore(
            rendezvous.host,
            rendezvous.port,
            rendezvous.world_size,
            is_master=False,
            timeout=timeout,
        )
        if device.type == "cuda":
            options = dist.ProcessGroupNCCL.Options()
            options._timeout = timeout
            self._pg = dist.ProcessGroupNCCL(self._store, rank, self.world_size, options)
            # NCCL makes its communicator at the first collective, which must not be inside a
            # CUDA graph capture.
            self.barrier()
        else:
            self._pg = dist.ProcessGroupGloo(self._store, rank, self.world_size, timeout)

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum `tensor` over the ranks, in place; -> tensor."""
        self._pg.allreduce([tensor]).wait()
        return tensor

    def all_gather_last(self, tensor: torch.Tensor) -> torch.Tensor:
        """[rows, n] on each rank -> [rows, world_size * n], rank 0's columns first."""
        rows, n = tensor.shape
        if self.device.type == "cuda":  # one flat buffer: what NCCL (and a CUDA graph) wants
            flat = tensor.new_empty(self.world_size * rows, n)  # [world * rows, n]
            self._pg._allgather_base(flat, tensor.contiguous()).wait()
            return flat.view(self.world_size, rows, n).permute(1, 0, 2).reshape(rows, -1)
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        self._pg.allgather([parts], [tensor.contiguous()]).wait()
        return torch.cat(parts, dim=-1)

    def broadcast(self, tensor: torch.Tensor) -> torch.Tensor:
        """Rank 0's `tensor` into every rank's (same shape and dtype), in place."""
        self._pg.broadcast(tensor, 0).wait()
        return tensor

    def barrier(self) -> None:
        self.all_reduce(torch.zeros(1, device=self.device))


def host_store(world_size: int, timeout_s: float) -> tuple[dist.TCPStore, Rendezvous]:
    """Rank 0: start the rendezvous server on a free port -> (the store, to keep alive, and
    where the ranks find it)."""
    store = dist.TCPStore(
        "127.0.0.1",
        0,
        world_size,
        is_master=True,
        timeout=timedelta(seconds=timeout_s),
        wait_for_workers=False,
    )
    return store, Rendezvous("127.0.0.1", store.port, world_size, timeout_s)
