"""A tensor-parallel worker process (ranks 1 .. world_size - 1), started by `TPExecutor`.

It joins the group, loads and shards the model, builds its share of the KV pool (the number of
pages rank 0 sized), and then runs what rank 0 sends over its pipe, one message at a time:

    ("run", chunks, num_decodes, patch)   the step's forward (patch: positions, rows, numel of
                                          overlap scheduling's tokens, broadcast from rank 0)
    ("score", chunks, num_decodes)        a prompt-logprobs step: forward, then each logits slice
    ("memory",)                           -> ("memory", RankState)
    ("stop",)                             exit

Replies are ("ready", RankState) once built and ("error", text) before exiting on a failure.
The worker leaves when its pipe closes (rank 0 gone, whatever the way), on Ctrl-C and on
"stop", so no worker outlives its engine.
"""

from __future__ import annotations

import os
import traceback
from dataclasses import replace
from multiprocessing.connection import Connection

import torch

from engine.config import EngineConfig
from engine.distributed.group import Rendezvous, TPGroup
from engine.prompt_logprobs import score_slices
from engine.runner import InputPatch, ModelRunner, SeqChunk
from engine.state import RankState


def rank_config(config: EngineConfig, rank: int) -> EngineConfig:
    """Rank's own config: on CUDA rank r runs on the r-th GPU after rank 0's (cuda:r when rank
    0 is on cuda:0); no tokenizer (rank 0 tokenizes)."""
    from engine.model.builder import resolve_device

    config = replace(config, skip_tokenizer_init=True)
    device = resolve_device(config.device)
    if device.type == "cuda":
        return replace(config, device=f"cuda:{(device.index or 0) + rank}")
    return config


def measure_memory(rank: int, device: torch.device, weight_bytes: int, kv_bytes: int) -> RankState:
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        free, total = torch.cuda.mem_get_info(device)
        used = total - free
    else:
        import psutil

        used, total = psutil.Process().memory_info().rss, psutil.virtual_memory().total
    return RankState(rank, str(device), os.getpid(), weight_bytes, kv_bytes, used, total)


def worker_main(config: EngineConfig, rank: int, rendezvous: Rendezvous, conn: Connection) -> None:
    """The worker process's entry point (spawned: it shares nothing with rank 0 but the pipe)."""
    try:
        _serve(rank_config(config, rank), rank, rendezvous, conn)
    except (EOFError, KeyboardInterrupt, BrokenPipeError):
        pass  # rank 0 is gone or the user pressed Ctrl-C: leave quietly
    except BaseException:
        try:
            conn.send(("error", f"rank {rank}: {traceback.format_exc()}"))
        except OSError:
            pass
        raise SystemExit(1) from None


def _serve(config: EngineConfig, rank: int, rendezvous: Rendezvous, conn: Connection) -> None:
    from engine.distributed.shard import load_shard
    from engine.worker import build_worker

    if config.device.startswith("cuda"):
        torch.cuda.set_device(torch.device(config.device))
    else:  # the ranks share the host's cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // rendezvous.world_size))
    from engine.model.builder import resolve_device

    group = TPGroup(rendezvous, rank, resolve_device(config.device))
    loaded = load_shard(config, group)
    kind, num_blocks = conn.recv()
    assert kind == "build", kind
    worker = build_worker(
        config,
        loaded,
        num_blocks=lambda layout: num_blocks,
        enable_prefix_caching=False,  # the blocks are rank 0's to manage
        use_graphs=loaded.device.type == "cuda" and not config.enforce_eager,
    )
    kv_bytes = worker.kv_cache.num_bytes

    def memory() -> RankState:
        return measure_memory(rank, loaded.device, loaded.weight_bytes, kv_bytes)

    conn.send(("ready", memory()))
    while True:
        message = conn.recv()
        kind = message[0]
        if kind == "run":
            _, chunks, num_decodes, patch = message
            worker.runner.run(chunks, num_decodes, _receive_patch(group, patch, loaded.device))
        elif kind == "score":
            _, chunks, num_decodes = message
            _score(worker.runner, chunks, num_decodes)
        elif kind == "memory":
            conn.send(("memory", memory()))
        elif kind == "stop":
            return
        else:
            raise ValueError(f"unknown message {kind!r}")


def _receive_patch(
    group: TPGroup, patch: tuple[list[int], list[int], int] | None, device: torch.device
) -> InputPatch | None:
    """Rank 0's patch of overlap scheduling's tokens: the indices come in the message, the
    values (still on rank 0's device) by a broadcast."""
    if patch is None:
        return None
    positions, rows, numel = patch
    source = group.broadcast(torch.empty(numel, dtype=torch.int64, device=device))
    return InputPatch(positions, rows, source)


@torch.inference_mode()
def _score(runner: ModelRunner, chunks: list[SeqChunk], num_decodes: int) -> None:
    """A prompt-logprobs step's collectives, in rank 0's order (engine/prompt_logprobs.py)."""
    _, hidden = runner.run_with_prompt_hidden(chunks, num_decodes)
    for _, _, rows in score_slices(chunks):
        runner.model.logits(hidden[rows.start : rows.stop])
