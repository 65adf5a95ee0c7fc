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

from engine.quant import texts
from engine.quant.build import BuildResult, BuildSpec, run_build

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
