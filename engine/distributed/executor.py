"""Rank 0's side of tensor parallelism: it starts one worker process per other rank
(torch.multiprocessing, spawn), sends each step to them over a pipe each and watches them.

Lifecycle, the invariant: no worker outlives the engine. Workers are daemon processes (Python
terminates them when rank 0 exits, Ctrl-C included), leave when their pipe closes (rank 0 killed),
and `shutdown` stops them (asked, then terminated, then killed). A worker that dies or fails is a
`TensorParallelError` for the step in flight and every later one, never a hang: before each step
every worker's liveness is checked, a collective with a dead peer fails at once (its connection
closes) and a stuck one after the group's timeout (engine/distributed/group.py).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from multiprocessing.connection import Connection
from typing import Any

import torch
import torch.multiprocessing as mp

from engine.config import EngineConfig
from engine.distributed.group import TPGroup, collective_timeout_s, host_store
from engine.distributed.shard import check_shardable, shard_loaded
from engine.distributed.worker import measure_memory, worker_main
from engine.model.builder import LoadedModel
from engine.runner import InputPatch, ModelRunner, SeqChunk
from engine.state import RankState
from engine.worker import Worker

REPLY_TIMEOUT_S = 30.0  # a memory report; loading waits as long as the worker lives
STOP_TIMEOUT_S = 5.0


class TensorParallelError(RuntimeError):
    """A tensor-parallel rank died or failed: the engine can run no more steps."""


class TPExecutor:
    def __init__(self, config: EngineConfig, loaded: LoadedModel) -> None:
        """Check that `loaded` (rank 0's whole model) splits, start the workers, join the
        group and cut rank 0's shard. Raises ShardError before starting anything."""
        world = config.tensor_parallel_size
        check_shardable(loaded.model, world)
        if config.kv_tiers_enabled:
            raise ValueError(
                "KV tiers (kv_host_bytes) are not supported with tensor_parallel_size > 1 yet: "
                "each rank holds only its share of every page"
            )
        if loaded.device.type == "cuda":
            first = loaded.device.index or 0
            if first + world > torch.cuda.device_count():
                raise ValueError(
                    f"tensor_parallel_size {world} needs GPUs cuda:{first} to "
                    f"cuda:{first + world - 1}; this host has {torch.cuda.device_count()}"
                )
        self.world_size = world
        self.failure: str | None = None
        self._memory: tuple[RankState, ...] = ()
        self._store, rendezvous = host_store(world, collective_timeout_s())
        context = mp.get_context("spawn")
        self._procs: list[mp.Process] = []
        self._conns: list[Connection] = []
        try:
            for rank in range(1, world):
                parent, child = context.Pipe()
                proc = context.Process(
                    target=worker_main,
                    args=(config, rank, rendezvous, child),
                    name=f"workbench-tp-rank{rank}",
                    daemon=True,
                )
                proc.start()
                child.close()
                self._procs.append(proc)
                self._conns.append(parent)
            self.group = TPGroup(rendezvous, 0, loaded.device)
            shard_loaded(loaded, self.group)
        except BaseException:
            self.shutdown()
            raise
        self._device = loaded.device
        self._weight_bytes = loaded.weight_bytes
        self._kv_bytes = 0

    def build_workers(self, num_blocks: int) -> None:
        """Have every worker build its share of a pool of `num_blocks` pages (rank 0's)."""
        for conn in self._conns:
            conn.send(("build", num_blocks))

    def attach(self, worker: Worker) -> TPRunner:
        """Wait for the workers built by `build_workers` -> rank 0's runner over `worker`,
        which sends each step to them."""
        self._kv_bytes = worker.kv_cache.num_bytes
        self._memory = tuple(self._reply(rank, "ready", None) for rank in self.worker_ranks)
        return TPRunner(worker.runner, self)

    @property
    def worker_ranks(self) -> range:
        return range(1, self.world_size)

    @property
    def pids(self) -> list[int]:
        return [proc.pid for proc in self._procs]

    # --- steps -------------------------------------------------------------------------------

    @contextlib.contextmanager
    def step(self, message: tuple[Any, ...]) -> Iterator[None]:
        """Send `message` to every worker; a collective failing inside the block becomes the
        TensorParallelError that says which rank is gone."""
        self.check_alive()
        try:
            for conn in self._conns:
                conn.send(message)
            yield
        except (RuntimeError, OSError) as exc:
            if isinstance(exc, TensorParallelError):
                raise
            raise self._failed(f"a collective failed ({exc})", wait_s=2.0) from exc

    def check_alive(self) -> None:
        if self.failure is None:
            self._find_dead()
        if self.failure is not None:
            raise TensorParallelError(self.failure)

    def _find_dead(self) -> None:
        for rank, proc in zip(self.worker_ranks, self._procs, strict=True):
            if not proc.is_alive():
                self._set_failure(
                    f"tensor-parallel rank {rank} (pid {proc.pid}) exited with code {proc.exitcode}"
                )
                return

    def _failed(self, what: str, wait_s: float) -> TensorParallelError:
        """The error for a failure seen from rank 0: the dead or failing rank when one shows
        within `wait_s`, else `what`."""
        deadline = time.monotonic() + wait_s
        while self.failure is None and time.monotonic() < deadline:
            self._find_dead()
            time.sleep(0.05)
        if self.failure is None:
            self._set_failure(what)
        return TensorParallelError(self.failure)

    def _set_failure(self, what: str) -> None:
        """Record the first failure, with a worker's own error report when one was sent."""
        reports = []
        for conn in self._conns:
            with contextlib.suppress(OSError, EOFError):
                while conn.poll():
                    message = conn.recv()
                    if message[0] == "error":
                        reports.append(message[1].strip())
        self.failure = what + (": " + "\n".join(reports) if reports else "")

    def _reply(self, rank: int, kind: str, timeout_s: float | None) -> Any:
        """Wait for rank's reply of `kind` while it lives (at most timeout_s) -> its payload."""
        conn, proc = self._conns[rank - 1], self._procs[rank - 1]
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while not conn.poll(0.2):
            if not proc.is_alive() and not conn.poll():
                raise self._failed(f"tensor-parallel rank {rank} exited", wait_s=0.0)
            if deadline is not None and time.monotonic() > deadline:
                raise self._failed(f"tensor-parallel rank {rank} did not answer", wait_s=0.0)
        try:
            message = conn.recv()
        except EOFError:
            raise self._failed(f"tensor-parallel rank {rank} exited", wait_s=1.0) from None
        if message[0] == "error":
            self.failure = message[1].strip()
            raise TensorParallelError(self.failure)
        assert message[0] == kind, message[0]
        return message[1]

    # --- state and shutdown -----------------------------------------------------------------

    def rank_memory(self) -> tuple[RankState, ...]:
        """Every rank's memory now; a broken group's last known figures for the workers."""
        own = measure_memory(0, self._device, self._weight_bytes, self._kv_bytes)
        if self.failure is None:
            try:
                with self.step(("memory",)):
                    self._memory = tuple(
                        self._reply(rank, "memory", REPLY_TIMEOUT_S) for rank in self.worker_ranks
                    )
            except TensorParallelError:
                pass  # the next step reports it
        return (own, *self._memory)

    def shutdown(self) -> None:
        """Stop every worker (asked first, then terminated, then killed); idempotent."""
        for conn in self._conns:
            with contextlib.suppress(OSError):
                conn.send(("stop",))
        for proc in self._procs:
            proc.join(STOP_TIMEOUT_S)
            if proc.is_alive():
                proc.terminate()
                proc.join(STOP_TIMEOUT_S)
            if proc.is_alive():
                proc.kill()
                proc.join()
        for conn in self._conns:
            conn.close()
        self._conns, self._procs = [], []
        self.world_size = min(self.world_size, 1)
        if self.failure is None:
            self.failure = "the engine is shut down"


class TPRunner:
    """Rank 0's runner: each step goes to the workers first, then through rank 0's own shard
    (the same `ModelRunner` interface the engine calls)."""

    def __init__(self, inner: ModelRunner, executor: TPExecutor) -> None:
        self.inner = inner
        self.executor = executor
        self.model = inner.model

    def run(
        self, chunks: list[SeqChunk], num_decodes: int, patch: InputPatch | None = None
    ) -> torch.Tensor:
        """-> logits [sum of num_logits, vocab] float32 (see ModelRunner.run)."""
        spec = None if patch is None else (patch.positions, patch.rows, patch.source.numel())
        with self.executor.step(("run", chunks, num_decodes, spec)):
            if patch is not None:
                self.executor.group.broadcast(patch.source)
            return self.inner.run(chunks, num_decodes, patch)

    def run_with_prompt_hidden(
        self, chunks: list[SeqChunk], num_decodes: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """ModelRunner.run_with_prompt_hidden; the workers then replay the caller's logits
        slices (engine/prompt_logprobs.score_slices)."""
        with self.executor.step(("score", chunks, num_decodes)):
            return self.inner.run_with_prompt_hidden(chunks, num_decodes)
