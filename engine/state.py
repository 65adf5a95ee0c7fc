"""`EngineState`: one immutable snapshot of what the engine is doing. The monitor panel,
`/v1/engine/state` and `/metrics` read only this, never the engine's live objects.

Each owner reports its own part, as vLLM's `make_stats()` do: the KV manager a `KVStats`
(`KVCacheManager.make_stats`), the scheduler a `SchedulerStats`, the speculator a `SpecState`;
`EngineCore.state()` puts them together with `EngineState.assemble`. Nothing here reads another
object's internals."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch only where the engine builds a state: a client reading one needs none
    import torch

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
    def of(cls, request: Request, blocks: list[int], now: float) -> RequestState:
        """The request as the monitor shows it; `blocks`: its block table (empty: it holds none)."""
        rate = 0.0
        if request.first_token_time is not None and request.num_output_tokens > 1:
            elapsed = max(now - request.first_token_time, 1e-9)
            rate = (request.num_output_tokens - 1) / elapsed
        return cls(
            request_id=request.request_id,
            state=request.status.value,
            priority=request.priority,
            prompt_len=request.num_prompt_tokens,
            generated=request.num_output_tokens,
            num_computed=request.num_computed_tokens,
            num_cached_tokens=request.num_cached_tokens or 0,
            blocks=tuple(blocks),
            tokens_per_s=rate,
            num_preemptions=request.num_preemptions,
        )

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RequestState:
        values = _known(cls, data)
        values["blocks"] = tuple(values.get("blocks", ()))
        return cls(**values)


@dataclass(frozen=True)
class KVStats:
    """The KV manager's part of `EngineState` (the fields of the same names)."""

    block_size: int
    kv_blocks_total: int
    kv_blocks_used: int
    kv_blocks_cached_free: int
    kv_blocks_free: int  # empty, not holding any cached prefix
    block_map: tuple[int, ...]  # per block: index into `running`, BLOCK_FREE or BLOCK_CACHED
    prefix_cache_hit_rate: float
    kv_tiers: tuple[KVTierState, ...] = ()  # host, then disk; empty without tiers


@dataclass(frozen=True)
class SchedulerStats:
    """The scheduler's part of `EngineState`."""

    running: tuple[RequestState, ...]
    waiting: tuple[RequestState, ...]
    preempted: tuple[RequestState, ...]
    num_preemptions: int


@dataclass(frozen=True)
class SpecState:
    """The speculator's part of `EngineState` (all None without speculation)."""

    spec_acceptance_rate: float | None = None
    spec_mean_accepted: float | None = None
    spec_draft_time_s: float | None = None  # total time proposing drafts
    spec_verify_time_s: float | None = None  # total time of steps that verified drafts


@dataclass(frozen=True)
class ExpertLoad:
    """(token, expert) pairs routed to each expert of each sparse layer of a MoE model: rows in
    `layers` order, one column per expert."""

    layers: tuple[int, ...]  # the sparse layers' indices
    total: tuple[tuple[int, ...], ...]  # since the engine started
    recent: tuple[tuple[int, ...], ...]  # since the previous snapshot
    recent_steps: int  # engine steps that `recent` covers

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ExpertLoad:
        values = _known(cls, data)
        for key in ("total", "recent"):
            values[key] = tuple(tuple(row) for row in values.get(key, ()))
        values["layers"] = tuple(values.get("layers", ()))
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
class RankState:
    """One tensor-parallel rank (engine/distributed/): its shard and its memory."""

    rank: int
    device: str
    pid: int
    weight_bytes: int  # this rank's shard of the weights
    kv_cache_bytes: int  # this rank's share of every KV page
    memory_used: int  # device memory in use (CUDA), or the process's resident set (CPU)
    memory_total: int

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RankState:
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
    expert_load: ExpertLoad | None = None  # MoE models only
    kv_tiers: tuple[KVTierState, ...] = ()  # host, then disk; empty without tiers
    tensor_parallel_size: int = 1
    ranks: tuple[RankState, ...] = ()  # with tensor parallelism: every rank, rank 0 first

    @classmethod
    def assemble(
        cls,
        *,
        kv: KVStats,
        scheduler: SchedulerStats,
        spec: SpecState,
        recent_steps: tuple[StepStats, ...],
        now: float,
        device: torch.device,
        **engine: Any,
    ) -> EngineState:
        """The owners' parts, the recent steps' throughput (over the last THROUGHPUT_WINDOW_S
        seconds, `now` a time.monotonic()), the device's memory and the engine's own fields
        (`engine`: step, model, dtype, ...) as one state."""
        window = [s for s in recent_steps if now - s.end_time <= THROUGHPUT_WINDOW_S]
        span = (now - window[0].end_time + window[0].duration_s) if window else 0.0
        used, total = _device_memory(device)
        return cls(
            **_shallow(kv),
            **_shallow(scheduler),
            **_shallow(spec),
            **engine,
            timestamp=time.time(),
            device=str(device),
            last_step=recent_steps[-1] if recent_steps else None,
            recent_steps=recent_steps[-64:],
            prompt_throughput=sum(s.prefill_tokens for s in window) / span if span > 0 else 0.0,
            generation_throughput=sum(s.num_sampled for s in window) / span if span > 0 else 0.0,
            device_memory_used=used,
            device_memory_total=total,
        )

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
            load = values.get("expert_load")
            values["expert_load"] = ExpertLoad.from_dict(load) if load else None
            values["kv_tiers"] = tuple(KVTierState.from_dict(t) for t in values.get("kv_tiers", ()))
            values["ranks"] = tuple(RankState.from_dict(r) for r in values.get("ranks", ()))
            return cls(**values)
        except (TypeError, AttributeError) as err:
            raise ValueError(f"not an engine state: {err}") from None


def _shallow(part: Any) -> dict[str, Any]:
    """A dataclass's fields by name, values as they are (asdict would copy nested records)."""
    return {f.name: getattr(part, f.name) for f in fields(part)}


def _known(cls: type, data: Mapping[str, Any]) -> dict[str, Any]:
    """The items of `data` that are fields of the dataclass `cls`."""
    return {f.name: data[f.name] for f in fields(cls) if f.name in data}


def _device_memory(device: torch.device) -> tuple[int, int]:
    import torch

    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return total - free, total
    import psutil

    return psutil.Process().memory_info().rss, psutil.virtual_memory().total
