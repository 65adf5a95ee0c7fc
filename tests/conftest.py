"""Shared fixtures: tiny random checkpoints of each family, the transformers oracle, and engines.

Every engine test runs the real engine on CPU in float32; the oracle is Hugging Face transformers
greedy decoding on the same weights.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from functools import cache
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from tiny_checkpoints import FAMILIES, cached_tiny_checkpoint  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))

BUNDLED = Path(__file__).resolve().parent.parent / "engine" / "bundled" / "tiny"


@pytest.fixture(scope="session", autouse=True)
def _workbench_home(tmp_path_factory) -> Iterator[None]:
    """No test writes to the user's config or data dirs (`workbench bench` saves every run to
    the store); tests that need their own home set WORKBENCH_HOME themselves."""
    patch = pytest.MonkeyPatch()
    patch.setenv("WORKBENCH_HOME", str(tmp_path_factory.mktemp("workbench-home")))
    yield
    patch.undo()


@pytest.fixture(scope="session")
def checkpoint_root(tmp_path_factory) -> Path:
    return tmp_path_factory.getbasetemp() / "tiny-checkpoints"


@pytest.fixture(scope="session", params=FAMILIES)
def family_checkpoint(request, checkpoint_root) -> Path:
    return cached_tiny_checkpoint(checkpoint_root, request.param)


@pytest.fixture(scope="session")
def llama_checkpoint(checkpoint_root) -> Path:
    return cached_tiny_checkpoint(checkpoint_root, "llama3")


@cache
def _hf_model(path: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def hf_greedy(path: Path, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """The oracle: transformers' model, greedy (argmax) for exactly max_new_tokens tokens with its
    KV cache. A plain loop rather than `generate(min_new_tokens=...)`: that masks the EOS token
    until the last step, while the engine's `ignore_eos` only keeps going past EOS (as vLLM's
    does); a tiny Mixtral whose greedy choice was its EOS id (249) told the two apart."""
    model = _hf_model(str(path))
    tokens: list[int] = []
    past = None
    step_input = torch.tensor([prompt_ids])
    with torch.no_grad():
        for _ in range(max_new_tokens):
            out = model(input_ids=step_input, past_key_values=past, use_cache=True)
            past = out.past_key_values
            tokens.append(int(out.logits[0, -1].argmax()))
            step_input = torch.tensor([[tokens[-1]]])
    return tokens


def random_prompts(lengths: list[int], vocab: int = 256, seed: int = 0) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=generator).tolist() for n in lengths]


def assert_pool_whole(llm) -> None:
    """No request holds a block and every reference was given back."""
    pool = llm.engine.kv.pool
    assert llm.engine.kv.req_blocks == {}
    assert pool.num_free_blocks == pool.num_blocks
    assert all(b.ref_cnt == 0 for b in pool.blocks)
