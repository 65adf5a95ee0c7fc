"""Tensor parallelism on the CPU (gloo): the engine split over 2 (and 4) processes gives the
one-process greedy tokens, in mixed batches, chunked prefill, preemption and abort; it reports
its shards; and no worker outlives it, whatever the way it ends.

The one-process engine is the reference: it equals transformers (test_parity.py). A TP engine is
a few seconds to start, so each configuration starts one, shared by its module's tests.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time

import psutil
import pytest
from conftest import assert_pool_whole, random_prompts
from tiny_checkpoints import MOE_FAMILIES, cached_tiny_checkpoint

from engine import LLM, AsyncLLM, SamplingParams
from engine.config import EngineConfig
from engine.distributed.executor import TensorParallelError
from engine.distributed.shard import ShardError
from engine.model.builder import parameter_bytes
from engine.state import EngineState

GREEDY = SamplingParams(max_tokens=12, ignore_eos=True)
LENGTHS = [5, 17, 2, 9]
# Chunked prefill (9-token steps) and preemption (16 pages of 4 tokens for four requests of 81
# tokens in all), in float32 so that the ranks' partial sums round alike enough for argmax.
SMALL = {"dtype": "float32", "block_size": 4, "max_num_tokens": 9, "num_kv_blocks": 16}


def tokens(llm: LLM, prompts, params=GREEDY) -> list[list[int]]:
    return [out.token_ids for out in llm.generate(prompts, params)]


@pytest.fixture(scope="module")
def reference() -> LLM:
    return LLM("tiny", **SMALL)


@pytest.fixture(scope="module")
def tp2():
    with LLM("tiny", tensor_parallel_size=2, **SMALL) as llm:
        yield llm


def test_tp2_greedy_equals_one_process_through_chunks_and_preemption(reference, tp2):
    prompts = random_prompts(LENGTHS, vocab=4096, seed=1)
    want = tokens(reference, prompts)
    preempted = tp2.engine.scheduler.num_preemptions
    assert tokens(tp2, prompts) == want
    assert tp2.engine.scheduler.num_preemptions > preempted  # the pool was too small for all
    chunked = [s for s in tp2.engine.recent_steps if s.prefill_tokens and s.decode_tokens]
    assert chunked  # prefill chunks and decodes shared steps
    assert_pool_whole(tp2)


def test_tp2_text_prompts_and_prefix_cache_hits(reference, tp2):
    prompts = ["The quick brown fox jumps over the lazy dog"] * 2 + ["Once upon a time"]
    params = SamplingParams(max_tokens=8)
    assert tokens(tp2, prompts, params) == tokens(reference, prompts, params)
    hits = tp2.engine.kv.prefix_hits
    again = tp2.generate(prompts[:1], params)[0]
    assert tp2.engine.kv.prefix_hits > hits and again.metrics.num_cached_tokens > 0
    assert again.token_ids == tokens(reference, prompts[:1], params)[0]


def test_tp2_abort_frees_pages_and_leaves_others_exact(reference, tp2):
    engine = tp2.engine
    keep, drop = random_prompts([11, 13], vocab=4096, seed=2)
    kept = engine.add_request(keep, GREEDY)
    dropped = engine.add_request(drop, SamplingParams(max_tokens=40, ignore_eos=True))
    for _ in range(3):
        engine.step()
    assert engine.abort(dropped.request_id)
    while engine.has_unfinished():
        engine.step()
    assert dropped.output_token_ids and len(dropped.output_token_ids) < 40
    assert kept.output_token_ids == tokens(reference, [keep])[0]
    assert_pool_whole(tp2)


def test_tp2_prompt_logprobs_match_one_process(reference, tp2):
    prompt = random_prompts([30], vocab=4096, seed=3)[0]
    params = SamplingParams(max_tokens=2, prompt_logprobs=3, ignore_eos=True)
    want = reference.generate([prompt], params)[0].prompt_logprobs[1:]
    got = tp2.generate([prompt], params)[0].prompt_logprobs[1:]
    assert [g.token_id for g in got] == [w.token_id for w in want]
    assert max(abs(g.logprob - w.logprob) for g, w in zip(got, want, strict=True)) < 1e-4


def test_tp2_state_reports_every_rank_and_its_shard(reference, tp2):
    state, alone = tp2.state(), reference.state()
    assert state.tensor_parallel_size == 2 and alone.tensor_parallel_size == 1
    assert alone.ranks == ()
    assert [r.rank for r in state.ranks] == [0, 1]
    assert len({r.pid for r in state.ranks}) == 2 and state.ranks[0].pid == os.getpid()
    full_weights = parameter_bytes(reference.engine.model)
    for rank in state.ranks:
        # Half of every KV page (2 of the 4 KV heads) and about half the weights (norms are
        # replicated, the vocabulary split exactly).
        assert rank.kv_cache_bytes * 2 == alone.kv_cache_bytes
        assert 0.45 * full_weights < rank.weight_bytes < 0.55 * full_weights
        assert 0 < rank.memory_used < rank.memory_total
    assert EngineState.from_dict(state.to_dict()).ranks == state.ranks


# --- random tiny configs: GQA split, KV heads replicated, 4 ranks, a padded vocabulary -----


@pytest.mark.parametrize(
    ("family", "overrides", "world", "engine_kwargs"),
    [
        # Overlap scheduling: the step's inputs patched from the step in flight's tokens, which
        # rank 0 broadcasts.
        pytest.param(
            "llama3",
            {"vocab_size": 257},
            2,
            {"async_scheduling": True},
            id="llama3-kv2-vocab257-tp2-overlap",
        ),
        pytest.param("qwen2", {"num_key_value_heads": 1}, 2, {}, id="qwen2-bias-tied-kv1-tp2"),
        pytest.param("qwen3", {}, 4, {}, id="qwen3-qknorm-kv2-tp4"),
    ],
)
def test_tiny_configs_equal_one_process(checkpoint_root, family, overrides, world, engine_kwargs):
    path = str(cached_tiny_checkpoint(checkpoint_root, family, **overrides))
    prompts = random_prompts([7, 19, 3], seed=4)
    kwargs = {**SMALL, **engine_kwargs}
    want = tokens(LLM(path, **kwargs), prompts)
    with LLM(path, tensor_parallel_size=world, **kwargs) as llm:
        assert tokens(llm, prompts) == want
        kv_heads = llm.engine.model.num_kv_heads
        assert kv_heads == max(1, llm.engine.model.config.num_key_value_heads // world)


@pytest.mark.parametrize(
    "quant",
    [
        pytest.param(
            {
                "quantization": "fp8",
                "kv_cache_dtype": "int8",
                "speculative": {"method": "ngram", "num_tokens": 3},
            },
            id="fp8-int8kv-ngram",
        ),
        pytest.param({"quantization": "int8_sq", "kv_cache_dtype": "fp8"}, id="int8sq-fp8kv"),
    ],
)
def test_quantized_weights_quantized_kv_and_speculation(checkpoint_root, quant):
    """fp8 or int8 SmoothQuant weights (per-row scales split with their rows, input scales
    replicated, SmoothQuant factors split with o/down's input columns), a quantized KV cache
    (int8: per-slot scales of each rank's heads) and n-gram speculation (the verify step's
    logits rows)."""
    kwargs = {**SMALL, "load_format": "dummy", **quant}
    path = str(cached_tiny_checkpoint(checkpoint_root, "llama3"))
    base = random_prompts([6], seed=5)[0]
    prompts = [base * 4, base * 3 + [1, 2]]  # repeats: the n-gram proposer finds drafts
    params = SamplingParams(max_tokens=10, ignore_eos=True, logprobs=0)
    alone = LLM(path, **kwargs).generate(prompts, params)
    with LLM(path, tensor_parallel_size=2, **kwargs) as llm:
        outs = llm.generate(prompts, params)
        assert (llm.state().spec_acceptance_rate is not None) == ("speculative" in quant)
    assert [o.token_ids for o in outs] == [o.token_ids for o in alone]
    for out, ref in zip(outs, alone, strict=True):
        pairs = zip(out.logprobs, ref.logprobs, strict=True)
        assert max(abs(a.logprob - b.logprob) for a, b in pairs) < 1e-3


# --- what is refused, before any process starts -------------------------------------------


def test_refusals_are_clear_errors():
    before = spawned_workers()
    with pytest.raises(ValueError, match="tensor_parallel_size must be an integer >= 1"):
        EngineConfig(tensor_parallel_size=0)
    with pytest.raises(ShardError, match="does not divide num_attention_heads 8"):
        LLM("tiny", tensor_parallel_size=3)
    with pytest.raises(ValueError, match="KV tiers"):
        LLM("tiny", tensor_parallel_size=2, kv_host_bytes="1MiB")
    assert spawned_workers() == before


@pytest.mark.parametrize(
    ("family", "extra"),
    [
        *((family, {}) for family in MOE_FAMILIES),
        ("qwen3_moe", {"load_format": "dummy", "quantization": "fp8"}),
    ],
    ids=[*MOE_FAMILIES, "qwen3_moe-fp8"],
)
def test_moe_models_split_their_experts(checkpoint_root, family, extra):
    """Mixtral, Qwen2-MoE (a shared expert and dense layers) and Qwen3-MoE, and fp8 experts:
    every expert split by its intermediate size, the router replicated, the block's output
    all-reduced -> the one-process greedy tokens, and the expert load still reported."""
    path = str(cached_tiny_checkpoint(checkpoint_root, family))
    kwargs = {**SMALL, **extra}
    prompts = random_prompts([7, 13], seed=4)
    want = tokens(LLM(path, **kwargs), prompts)
    with LLM(path, tensor_parallel_size=2, **kwargs) as llm:
        assert tokens(llm, prompts) == want
        load = llm.state().expert_load
        assert load is not None and sum(map(sum, load.total)) > 0


def test_moe_experts_that_do_not_split_are_refused(checkpoint_root):
    before = spawned_workers()
    path = cached_tiny_checkpoint(checkpoint_root, "qwen2_moe")  # moe_intermediate_size 32
    with pytest.raises(ShardError, match="moe_intermediate_size 32"):
        LLM(str(path), tensor_parallel_size=3)
    assert spawned_workers() == before


# --- lifecycle ----------------------------------------------------------------------------


def test_a_dead_worker_fails_the_requests_in_flight_never_hangs():
    before = spawned_workers()
    llm = AsyncLLM("tiny", dtype="float32", tensor_parallel_size=2)
    (pid,) = llm.engine.executor.pids

    async def stream() -> list[int]:
        got: list[int] = []
        params = SamplingParams(max_tokens=2000, ignore_eos=True)
        async for out in llm.generate([1, 2, 3], params):
            got = out.token_ids
            if len(got) == 3:
                os.kill(pid, signal.SIGKILL)
        return got

    start = time.monotonic()
    try:
        with pytest.raises(RuntimeError, match=r"tensor-parallel rank 1 \(pid \d+\) exited"):
            asyncio.run(asyncio.wait_for(stream(), timeout=60))
        assert time.monotonic() - start < 60
        with pytest.raises(TensorParallelError, match="rank 1"):  # and so does every later step
            llm.engine.executor.check_alive()
    finally:
        llm.shutdown()
    assert not _alive(pid)
    assert spawned_workers() == before


_ENGINE_SCRIPT = textwrap.dedent(
    """
    import sys, time
    from engine import LLM
    if __name__ == "__main__":
        llm = LLM("tiny", dtype="float32", tensor_parallel_size=2)
        llm.generate([[1, 2, 3]])
        print(*llm.engine.executor.pids, flush=True)
        time.sleep(120)
    """
)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["ctrl-c", "killed"])
def test_no_worker_outlives_its_engine_process(tmp_path, sig):
    script = tmp_path / "engine_proc.py"
    script.write_text(_ENGINE_SCRIPT)
    proc = subprocess.Popen(
        [sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    try:
        pids = [int(p) for p in proc.stdout.readline().split()]
        assert len(pids) == 1 and psutil.pid_exists(pids[0])
        proc.send_signal(sig)
        proc.wait(timeout=30)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and any(_alive(p) for p in pids):
            time.sleep(0.1)
        assert not any(_alive(p) for p in pids)
    finally:
        proc.kill()
        proc.wait()


def spawned_workers() -> set[int]:
    """The pids of this process's live multiprocessing children (not its resource tracker)."""
    return {
        child.pid
        for child in psutil.Process().children()
        if "spawn_main" in " ".join(child.cmdline()) and _alive(child.pid)
    }


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
