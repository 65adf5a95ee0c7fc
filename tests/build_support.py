"""Shared by the build tests: real builds of the bundled model on CPU, each made once per session.

Small on purpose: 4 calibration samples of 128 tokens in one batch, and perplexity on the first
two built-in held-out stories in 256-token windows, so that every recipe builds in seconds.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from engine_build import texts
from engine_build.build import STAGES, BuildResult, BuildSpec, run_build

FAST = {"calib_size": 4, "calib_seq_len": 128, "calib_batch_size": 4, "eval_window": 256}


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Tiny matmuls on a shared CPU: thread hand-offs cost more than they bring."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="session")
def eval_text(tmp_path_factory) -> Path:
    """The first two built-in held-out stories, as a text file of their own."""
    docs = texts.read_documents("heldout")[:2]
    path = tmp_path_factory.mktemp("eval") / "two_stories.txt"
    path.write_text("\n<|endoftext|>\n".join(docs) + "\n", "utf-8")
    return path


class Builds:
    """Engine directories built on demand, once per (recipe, KV cache dtype)."""

    def __init__(self, root: Path, eval_text: Path) -> None:
        self.root = root
        self.eval_text = eval_text
        self.results: dict[tuple[str, str], BuildResult] = {}
        self.events: dict[tuple[str, str], list] = {}

    def spec(self, quant: str, kv: str = "auto", **overrides) -> BuildSpec:
        values = {**FAST, "eval_texts": (str(self.eval_text),), **overrides}
        return BuildSpec(model="tiny", out=self.root / f"{quant}-{kv}", quant=quant,
                         kv_cache_dtype=kv, **values)  # fmt: skip

    def get(self, quant: str, kv: str = "auto") -> BuildResult:
        key = (quant, kv)
        if key not in self.results:
            events: list = []
            with one_thread():
                self.results[key] = run_build(self.spec(quant, kv), events.append)
            self.events[key] = events
        return self.results[key]


@pytest.fixture(scope="session")
def builds(tmp_path_factory, eval_text) -> Builds:
    return Builds(tmp_path_factory.mktemp("engines"), eval_text)


def _report(recipe: str, ppl: tuple[float, float, float], size: int, times: tuple, limit: float):
    load, calibrate, quantize, export, evaluate = times
    source, build, simulated = ppl
    samples = {"samples": 16, "seq_len": 256, "algorithm": "awq_lite" if "awq" in recipe else "max"}

    def measured(value: float) -> dict:
        return {"perplexity": value, "nll": 0.0, "tokens": 3327}

    return {
        "recipe": recipe,
        "kv_cache_dtype": "auto",
        "model": "tiny",
        "perplexity": {
            "texts": {
                "heldout": {
                    "source": measured(source),
                    "build": measured(build),
                    "delta_rel": round(build / source - 1, 6),
                    "simulated": measured(simulated),
                }
            }
        },
        "limit_rel": limit,
        "within_limit": build / source - 1 <= limit,
        "size": {"source_bytes": 14696720, "build_bytes": size + 300000,
                 "build_weights_bytes": size, "ratio": round(size / 14696720, 4)},
        "timings_s": dict(zip((*STAGES, "total"), (*times, round(sum(times), 1)), strict=True)),
        "calibration": samples,
    }  # fmt: skip


def seed_builds(store, when: str = "2025-05-01T09:30:00.000000+00:00") -> list[int]:
    """Four builds as `workbench build` records them (abridged reports), at a frozen time: a
    failed fp8, a complete int4_awq, an int8_sq still calibrating (in this process, so it is
    alive) and a complete w4a8_awq. Returns their ids, oldest first."""
    ids = []
    failed = store.record_build("tiny", "fp8", "auto", "/home/user/engines/tiny-fp8")
    store.update_build(failed, status="failed", stage="calibrate", error="RuntimeError: boom")
    ids.append(failed)
    rows = [
        ("int4_awq", (33.503, 33.898, 33.719), 5480232, (1.1, 39.8, 0.9, 0.0, 14.3), 0.06),
        ("int8_sq", None, None, None, 0.03),
        ("w4a8_awq", (33.503, 33.910, 33.681), 5480744, (1.4, 46.8, 1.0, 0.0, 15.9), 0.06),
    ]
    for recipe, ppl, size, times, limit in rows:
        build_id = store.record_build("tiny", recipe, "auto", f"/home/user/engines/tiny-{recipe}")
        if ppl is None:
            store.update_build(build_id, stage="calibrate")
        else:
            report = _report(recipe, ppl, size, times, limit)
            store.update_build(build_id, "complete", report, report["timings_s"], stage="evaluate")
        ids.append(build_id)
    store.db.execute("UPDATE builds SET created_at = ?, updated_at = ?", [when, when])
    store.db.conn.commit()
    return ids
