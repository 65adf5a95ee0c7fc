"""`EngineState`: one immutable snapshot of what the engine is doing. The monitor panel,
`/v1/engine/state` and `/metrics` read only this, never the engine's live objects."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch only where the engine builds a state: a client reading one needs none
    import torch

    from engine.core import EngineCore
    from engine.request import Request

THROUGHPUT_WINDOW_S = 5.0

# Values of `EngineState.block_map` besides owner indices (>= 0 index into `running`).
BLOCK_FREE = -1  # never used or evicted: empty
BLOCK_CACHED = -2  # free, but still holds a cached prefix that a new request can reuse


@dataclass(frozen=True)
class StepStats:
    index: int
    end_time: float  # time.monotonic()
    duration_s: float
    prefill_tokens: int
    decode_tokens: int
    batch_size: int
    num_sampled: int
    num_preempted: int

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> StepStats:
        return cls(**_known(cls, data))


@dataclass(frozen=True)
class RequestState:
    request_id: str
    state: str  # waiting | running | preempted
    priority: int
    prompt_len: int
    generated: int
    num_computed: int
    num_cached_tokens: int  # prefix-cache hit at admission
    blocks: tuple[int, ...]  # block table, in order
    tokens_per_s: float  # generation rate since the first token
    num_preemptions: int

    @property
    def blocks_held(self) -> int:
        return len(self.blocks)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RequestState:
        values = _known(cls, data)
        values["blocks"] = tuple(values.get("blocks", ()))
        return cls(**values)


@dataclass(frozen=True)
class KVTierState:
    """One KV tier (engine/kv/offload.py): host RAM or disk."""

    name: str  # host | disk
    blocks_used: int
    blocks_capacity: int
    capacity_bytes: int
    hits: int  # blocks restored from this tier into the device pool
    bytes_in: int  # written into this tier, in all
    bytes_out: int  # read out of it towards the device, in all
    bytes_per_s: float  # moved in or out over the last seconds

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> KVTierState:
        return cls(**_known(cls, data))


@dataclass(frozen=True)
class EngineState:
    step: int
    timestamp: float  # time.time()
    model: str
    device: str
    dtype: str
    block_size: int
    kv_blocks_total: int
    kv_blocks_used: int
    kv_blocks_cached_free: int
    kv_blocks_free: int  # empty, not holding any cached prefix
    kv_cache_bytes: int
    block_map: tuple[int, ...]  # per block: index into `running`, BLOCK_FREE or BLOCK_CACHED
    prefix_cache_hit_rate: float
    running: tuple[RequestState, ...]
    waiting: tuple[RequestState, ...]
    preempted: tuple[RequestState, ...]
    last_step: StepStats | None
    recent_steps: tuple[StepStats, ...]
    prompt_throughput: float  # tokens/s over the last few seconds
    generation_throughput: float
    total_prompt_tokens: int
    total_generated_tokens: int
    num_preemptions: int
    spec_acceptance_rate: float | None
    spec_mean_accepted: float | None
    device_memory_used: int
    device_memory_total: int
    spec_draft_time_s: float | None = None  # total time proposing drafts
    spec_verify_time_s: float | None = None  # total time of steps that verified drafts
    kv_cache_dtype: str | None = None  # how KV pages are stored: float8_e4m3fn, int8 or as dtype
    kv_tiers: tuple[KVTierState, ...] = ()  # host, then disk; empty without tiers

    @property
    def kv_usage(self) -> float:
        return self.kv_blocks_used / self.kv_blocks_total if self.kv_blocks_total else 0.0

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["kv_usage"] = self.kv_usage
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EngineState:
        """The inverse of `to_dict` (the JSON of /v1/engine/state): nested records rebuilt, lists
        back to tuples. Keys it does not know (a newer server) are ignored; a missing one raises
        ValueError unless the field has a default (an older server)."""
        try:
            values = _known(cls, data)
            for key in ("running", "waiting", "preempted"):
                values[key] = tuple(RequestState.from_dict(r) for r in values.get(key, ()))
            values["recent_steps"] = tuple(
                StepStats.from_dict(s) for s in values.get("recent_steps", ())
            )
            last = values.get("last_step")
            values["last_step"] = StepStats.from_dict(last) if last else None
            values["block_map"] = tuple(values.get("block_map", ()))
            values["kv_tiers"] = tuple(KVTierState.from_dict(t) for t in values.get("kv_tiers", ()))
            return cls(**values)
        except (TypeError, AttributeError) as err:
            raise ValueError(f"not an engine state: {err}") from None


def _known(cls: type, data: Mapping[str, Any]) -> dict[str, Any]:
    """The items of `data` that are fields of the dataclass `cls`."""
    return {f.name: data[f.name] for f in fields(cls) if f.name in data}


def _request_state(request: Request, blocks: list[int], now: float) -> RequestState:
    rate = 0.0
    if request.first_token_time is not None and request.num_output_tokens > 1:
        elapsed = max(now - request.first_token_time, 1e-9)
        rate = (request.num_output_tokens - 1) / elapsed
    return RequestState(
        request_id=request.request_id,
        state=request.status.value,
        priority=request.priority,
        prompt_len=request.num_prompt_tokens,
        generated=request.num_output_tokens,
        num_computed=request.num_computed_tokens,
        num_cached_tokens=max(request.num_cached_tokens, 0),
        blocks=tuple(blocks),
        tokens_per_s=rate,
        num_preemptions=request.num_preemptions,
    )


def _device_memory(device: torch.device) -> tuple[int, int]:
    import torch

    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return total - free, total
    import psutil

    return psutil.Process().memory_info().rss, psutil.virtual_memory().total


def build_state(core: EngineCore) -> EngineState:
    now = time.monotonic()
    kv = core.kv
    pool = kv.pool
    running = core.scheduler.running
    block_map = [BLOCK_FREE] * pool.num_blocks
    for block in pool.free_queue.values():
        if block.block_hash is not None:
            block_map[block.block_id] = BLOCK_CACHED
    for index, request in enumerate(running):
        for block_id in kv.block_ids(request.request_id):
            # A shared prefix block shows its oldest owner.
            if block_map[block_id] < 0:
                block_map[block_id] = index
    cached_free = sum(1 for v in block_map if v == BLOCK_CACHED)
    recent = tuple(core.recent_steps)
    window = [s for s in recent if now - s.end_time <= THROUGHPUT_WINDOW_S]
    span = (now - window[0].end_time + window[0].duration_s) if window else 0.0
    prompt_tp = sum(s.prefill_tokens for s in window) / span if span > 0 else 0.0
    gen_tp = sum(s.num_sampled for s in window) / span if span > 0 else 0.0
    waiting = core.scheduler.waiting
    used, total = _device_memory(core.device)
    spec = core.speculator.stats if core.speculator is not None else None
    return EngineState(
        step=core.step_index,
        timestamp=time.time(),
        model=core.model_name,
        device=str(core.device),
        dtype=str(core.dtype).removeprefix("torch."),
        block_size=kv.block_size,
        kv_blocks_total=pool.num_blocks,
        kv_blocks_used=pool.num_used_blocks,
        kv_blocks_cached_free=cached_free,
        kv_blocks_free=pool.num_free_blocks - cached_free,
        kv_cache_bytes=core.kv_cache.num_bytes,
        kv_cache_dtype=str(core.kv_cache.layout.storage_dtype).removeprefix("torch."),
        block_map=tuple(block_map),
        prefix_cache_hit_rate=kv.prefix_hit_rate,
        running=tuple(_request_state(r, kv.block_ids(r.request_id), now) for r in running),
        waiting=tuple(_request_state(r, [], now) for r in waiting if r.status.value == "waiting"),
        preempted=tuple(
            _request_state(r, [], now) for r in waiting if r.status.value == "preempted"
        ),
        last_step=recent[-1] if recent else None,
        recent_steps=recent[-64:],
        prompt_throughput=prompt_tp,
        generation_throughput=gen_tp,
        total_prompt_tokens=core.total_prompt_tokens,
        total_generated_tokens=core.total_generated_tokens,
        num_preemptions=core.scheduler.num_preemptions,
        spec_acceptance_rate=spec.acceptance_rate if spec else None,
        spec_mean_accepted=spec.mean_accepted if spec else None,
        device_memory_used=used,
        device_memory_total=total,
        spec_draft_time_s=spec.draft_time_s if spec else None,
        spec_verify_time_s=spec.verify_time_s if spec else None,
        kv_tiers=kv.tiers.states() if kv.tiers is not None else (),
    )
