"""Fixtures and helpers of the TUI tests (test_tui_*.py): real engines on tiny models, stores in
tmp dirs, and fixed monitor data for snapshots. No tests here.

The engines are real (`LocalEngineClient` around `AsyncLLM`), shared per session because each
costs a model load; each test gets its own app, store and event loop.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from textual.pilot import Pilot

from panels.client import ChatParams, LocalEngineClient
from panels.hardware import GpuProcess, GpuSample, HardwareSample, HostSample
from store import Store, open_store
from workbench.app import WorkbenchApp
from workbench.settings import Settings

BUNDLED = Path(__file__).resolve().parent.parent / "engine" / "bundled" / "tiny"
# 128 blocks of 4 tokens: a block map with some detail, and room for 512-token replies.
ENGINE_OPTIONS: dict[str, Any] = {"block_size": 4, "num_kv_blocks": 128, "max_num_seqs": 8}
GREEDY = ChatParams(temperature=0.0, top_p=1.0, top_k=0, max_tokens=16, seed=None)


def _has_chat_template(path: Path) -> bool:
    config = path / "tokenizer_config.json"
    return config.is_file() and "chat_template" in config.read_text(encoding="utf-8")


@pytest.fixture(scope="session")
def tui_model(llama_checkpoint: Path) -> str:
    """The bundled model when it is there (and chats), else a tiny random llama3 checkpoint."""
    if (BUNDLED / "config.json").is_file() and _has_chat_template(BUNDLED):
        return "tiny"
    return str(llama_checkpoint)


@pytest.fixture(scope="session")
def engine_client(tui_model: str) -> Iterator[LocalEngineClient]:
    client = LocalEngineClient.load(tui_model, **ENGINE_OPTIONS)
    yield client
    client.close()


@pytest.fixture(scope="session")
def snapshot_client(llama_checkpoint: Path) -> Iterator[LocalEngineClient]:
    """Always the random checkpoint: its name and sizes are fixed, so snapshots are too."""
    client = LocalEngineClient.load(str(llama_checkpoint), **ENGINE_OPTIONS)
    yield client
    client.close()


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with open_store(tmp_path / "workbench.db") as s:
        yield s


def make_settings(tmp_path: Path, model: str = "tiny", **chat: Any) -> Settings:
    params = ChatParams.from_dict(chat, GREEDY)
    return Settings(
        model=model,
        chat=params,
        engine=dict(ENGINE_OPTIONS),
        db_path=tmp_path / "workbench.db",
        data_dir=tmp_path,
        config_file=tmp_path / "config.toml",
    )


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing a test does touches the real config or data dirs; times show in UTC."""
    monkeypatch.setenv("WORKBENCH_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()


def run(coro: Any) -> Any:
    return asyncio.run(coro)


async def wait_for(
    pilot: Pilot[Any], condition: Callable[[], bool], timeout: float = 60.0, what: str = ""
) -> None:
    """Let the app run until `condition()` holds (real engine: no fixed sleeps)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or condition}")
        await pilot.pause(0.05)


def app_for(
    tmp_path: Path, store: Store, client: Any = None, model: str = "tiny", **kwargs: Any
) -> WorkbenchApp:
    chat = kwargs.pop("chat", {})
    return WorkbenchApp(make_settings(tmp_path, model, **chat), store, client=client, **kwargs)


# -- fixed data for snapshots ------------------------------------------------------------------


def fixed_host(cpu: float = 37.5) -> HostSample:
    return HostSample(cpu_percent=cpu, ram_used=6 * 2**30, ram_total=16 * 2**30, cpu_count=8)


def fixed_hardware(i: int, gpus: bool) -> HardwareSample:
    """Sample `i` of a made-up machine: one H100 that warms up, or none."""
    if not gpus:
        return HardwareSample(
            (), fixed_host(20 + (i * 7) % 60), "no NVIDIA GPU (NVML Shared Library Not Found)"
        )
    gpu = GpuSample(
        index=0,
        name="NVIDIA H100 80GB HBM3",
        utilization=float(min(97, 10 + i * 6)),
        memory_used=(20 + i) * 2**30,
        memory_total=80 * 2**30,
        power_w=120.0 + i * 20,
        power_limit_w=700.0,
        temperature_c=40.0 + i,
        sm_clock_mhz=1980,
        processes=(GpuProcess(4242, "workbench", (19 + i) * 2**30),),
    )
    return HardwareSample((gpu,), fixed_host(), None)


def fixed_states(n: int = 12) -> list[Any]:
    """A made-up run of the engine: two requests prefill, decode, share a prefix, one finishes."""
    from engine.state import BLOCK_CACHED, BLOCK_FREE, EngineState, RequestState, StepStats

    states = []
    steps: list[StepStats] = []
    for i in range(n):
        prefill = 24 if i in (0, 3) else 0
        decode = 0 if i == 0 else 1 if i < 3 else 2
        steps.append(StepStats(i + 1, 100.0 + i, 0.03, prefill, decode, 1 if i < 3 else 2, 1, 0))
        a_blocks = tuple(range(0, 7 + i // 2))
        b_blocks = (0, 1, 2, *range(20, 22 + i // 3))
        running = [
            RequestState("chat1-1", "running", 0, 26, 4 + i * 3, 30 + i * 3, 0, a_blocks, 31.5, 0)
        ]
        if i >= 3:
            running.append(
                RequestState("chat2-2", "running", 0, 30, 2 + i * 2, 32 + i, 12, b_blocks, 28.0, 0)
            )
        block_map = [BLOCK_FREE] * 64
        for b in range(40, 46):
            block_map[b] = BLOCK_CACHED
        for owner, req in enumerate(running):
            for b in req.blocks:
                if block_map[b] < 0:
                    block_map[b] = owner
        used = sum(1 for v in block_map if v >= 0)
        states.append(
            EngineState(
                step=i + 1,
                timestamp=0.0,
                model="tiny",
                device="cpu",
                dtype="float32",
                block_size=4,
                kv_blocks_total=64,
                kv_blocks_used=used,
                kv_blocks_cached_free=6,
                kv_blocks_free=64 - used - 6,
                kv_cache_bytes=131072,
                block_map=tuple(block_map),
                prefix_cache_hit_rate=0.0 if i < 3 else 0.2,
                running=tuple(running),
                waiting=(RequestState("chat3-3", "waiting", 0, 12, 0, 0, 0, (), 0.0, 0),)
                if i == n - 1
                else (),
                preempted=(),
                last_step=steps[-1],
                recent_steps=tuple(steps),
                prompt_throughput=[0, 480, 300, 420, 200, 90][min(i, 5)] * 1.0,
                generation_throughput=min(60.0, 12.0 * i),
                total_prompt_tokens=24,
                total_generated_tokens=i,
                num_preemptions=0,
                spec_acceptance_rate=None,
                spec_mean_accepted=None,
                device_memory_used=0,
                device_memory_total=0,
            )
        )
    return states


def set_times(store: Store, when: str = "2025-05-01T09:30:00.000000+00:00") -> None:
    """Freeze every timestamp of the store (snapshots show them)."""
    for table in ("sessions", "messages"):
        store.db.execute(f"UPDATE {table} SET created_at = ?, updated_at = ?", [when, when])
    store.db.conn.commit()


def seed_bench_runs(store: Store, when: str = "2025-05-01T09:30:00.000000+00:00") -> None:
    """An offline run and an online one (with goodput and failures), as `workbench bench` saves
    them (abridged), at a frozen time."""

    def stats(mean: float) -> dict[str, float]:
        return {"mean": mean, "p50": mean * 0.9, "p90": mean * 1.4, "p99": mean * 2.0}

    totals = {"total_input_tokens": 4096, "total_output_tokens": 4096, "wall_s": 12.5}
    store.record_bench_run(
        "offline",
        "tiny",
        {
            "command": "workbench bench --num-requests 32 --concurrency 8",
            "bench": {"input_len": 128, "output_len": 128, "prompts_file": None, "warmup": 0},
            "concurrency": 8,
            "engine": {"model": "tiny", "device": "cpu", "dtype": "float32", "block_size": 16,
                       "num_kv_blocks": 1024},
            "system": {"device_name": "AMD EPYC"},
            "peer": {"output_tok_s": 150.0, "ratio": 2.18, "batch_size": 8, "same_tokens": 32},
        },
        {"num_requests": 32, **totals, "request_throughput": 2.56, "output_tok_s": 327.7,
         "total_tok_s": 655.4, "ttft_ms": stats(180.0), "tpot_ms": stats(22.0),
         "e2e_ms": stats(2950.0), "num_steps": 530},
    )  # fmt: skip
    store.record_bench_run(
        "online",
        "tiny",
        {
            "kind": "online",
            "command": "workbench bench --url http://127.0.0.1:8000 --request-rate 4",
            "bench": {"url": "http://127.0.0.1:8000", "endpoint": "completions",
                      "request_rate": 4.0, "max_concurrency": 16, "input_len": 128,
                      "output_len": 128, "prompts_file": None, "ignore_eos": True},
            "server": {"url": "http://127.0.0.1:8000", "model": "tiny",
                       "engine": {"model": "tiny", "device": "cpu", "dtype": "float32",
                                  "block_size": 16, "kv_blocks_total": 1024}},
        },
        {"num_requests": 32, "completed": 30, "failed": 2, **totals,
         "request_throughput": 2.4, "output_tok_s": 307.2, "total_tok_s": 614.4,
         "ttft_ms": stats(95.0), "tpot_ms": stats(25.0), "itl_ms": stats(24.5),
         "e2e_ms": stats(3270.0), "goodput": 1.6, "good_requests": 20,
         "goodput_slo_ms": {"ttft": 200.0, "tpot": 30.0}, "peak_concurrency": 16,
         "errors": {"HTTP 400: the prompt is too long": 2}},
    )  # fmt: skip
    store.db.execute("UPDATE bench_runs SET created_at = ?", [when])
    store.db.conn.commit()
