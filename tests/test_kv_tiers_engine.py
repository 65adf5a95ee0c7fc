"""KV tiers in the real engine on the CPU: greedy output with tiers equals output without (and
transformers), evicted prompts come back from host and disk as cached tokens, the disk tier
re-warms a new process, damaged files and other models' files are never read, and preemption
and aborts keep the pool whole."""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import assert_pool_whole, hf_greedy, random_prompts

from engine import LLM, SamplingParams
from engine.kv.block_pool import hash_block_tokens

BLOCK = 16
PROMPT = 200  # 12 full blocks: (200 - 1) // 16, the last token is always computed
FULL = (PROMPT - 1) // BLOCK * BLOCK
GREEDY = SamplingParams(max_tokens=8, ignore_eos=True)
# 16 device blocks hold one 200-token request (13 blocks) at a time, so each new prompt evicts
# most of the previous one.
SMALL_POOL = {"block_size": BLOCK, "num_kv_blocks": 16}


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    return random_prompts([PROMPT] * n, seed=seed)


def one_by_one(llm: LLM, batch: list[list[int]], params=GREEDY):
    return [llm.generate([p], params)[0] for p in batch]


def tokens(outs) -> list[list[int]]:
    return [o.token_ids for o in outs]


def block_hashes(prompt: list[int]) -> list[int]:
    hashes, parent = [], None
    for i in range(0, FULL, BLOCK):
        parent = hash_block_tokens(parent, prompt[i : i + BLOCK])
        hashes.append(parent)
    return hashes


@pytest.fixture(scope="module")
def plain_outputs():
    """Outputs of the engine without tiers for prompts a, b, a."""
    a, b = prompts(2)
    return one_by_one(LLM("tiny", **SMALL_POOL), [a, b, a])


@pytest.fixture(scope="module")
def baseline(plain_outputs):
    """Their tokens: the reference."""
    return tokens(plain_outputs)


def test_a_prompt_evicted_to_host_comes_back_whole_and_exact(baseline):
    a, b = prompts(2)
    llm = LLM("tiny", kv_host_bytes="8MiB", **SMALL_POOL)
    outs = one_by_one(llm, [a, b, a])
    assert tokens(outs) == baseline
    tiers = llm.engine.kv.tiers
    # b evicted 9 of a's 12 full blocks (the 3 left on the device are hits there); all come back.
    assert [o.metrics.num_cached_tokens for o in outs] == [0, 0, FULL]
    assert tiers.host_stats.hits == 9 and tiers.disk is None
    assert_pool_whole(llm)


def test_without_tiers_the_same_prompt_is_mostly_recomputed(plain_outputs):
    assert plain_outputs[2].metrics.num_cached_tokens == 3 * BLOCK


def test_restored_prefix_matches_transformers(llama_checkpoint):
    a, b = prompts(2, seed=5)
    llm = LLM(str(llama_checkpoint), kv_host_bytes="8MiB", **SMALL_POOL)
    outs = one_by_one(llm, [a, b, a, a[:100] + b[:50]])
    assert outs[2].metrics.num_cached_tokens == FULL
    assert outs[3].metrics.num_cached_tokens == 96  # a's first 6 blocks
    assert tokens(outs) == [hf_greedy(llama_checkpoint, p, 8) for p in (a, b, a, a[:100] + b[:50])]


def test_int8_pages_restored_give_the_same_tokens():
    a, b = prompts(2, seed=1)
    plain = one_by_one(LLM("tiny", kv_cache_dtype="int8", **SMALL_POOL), [a, b, a])
    llm = LLM("tiny", kv_cache_dtype="int8", kv_host_bytes="8MiB", **SMALL_POOL)
    outs = one_by_one(llm, [a, b, a])
    assert tokens(outs) == tokens(plain)
    assert outs[2].metrics.num_cached_tokens == FULL


# --- the disk tier across processes -----------------------------------------------------------

WRITER = textwrap.dedent(
    """
    import sys
    from engine import LLM, SamplingParams
    sys.path.insert(0, {tests!r})
    from conftest import random_prompts
    a, *others = random_prompts([{n}] * 5, seed=0)
    llm = LLM("tiny", block_size={bs}, num_kv_blocks=16, kv_host_bytes=2 * {bpb},
              kv_disk_dir={disk!r})
    for p in [a, *others]:  # each evicts the last; the host tier's 2 slots spill the rest
        llm.generate([p], SamplingParams(max_tokens=8, ignore_eos=True))
    print(llm.engine.kv.tiers.disk.num_used)
    """
)
BYTES_PER_BLOCK = 2 * 8 * BLOCK * 4 * 32 * 4  # tiny: 8 layers, 4 KV heads of 32, float32


@pytest.fixture(scope="module")
def written_disk(tmp_path_factory) -> Path:
    """A disk tier written by another process, holding all of prompt a's full blocks."""
    disk = tmp_path_factory.mktemp("kv-disk")
    script = WRITER.format(
        tests=str(Path(__file__).parent),
        n=PROMPT,
        bs=BLOCK,
        bpb=BYTES_PER_BLOCK,
        disk=str(disk),
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert int(done.stdout.split()[-1]) >= 12
    return disk


@pytest.fixture
def warm_disk(written_disk, tmp_path) -> Path:
    """A copy of the written disk tier, for a test to read and damage."""
    copy = tmp_path / "kv-disk"
    shutil.copytree(written_disk, copy)
    return copy


def test_a_new_process_rewarms_from_disk(warm_disk, baseline):
    (fingerprint_dir,) = warm_disk.iterdir()
    a = prompts(1)[0]
    assert all((fingerprint_dir / f"{h:016x}.kv").exists() for h in block_hashes(a))
    llm = LLM("tiny", kv_host_bytes=2 * BYTES_PER_BLOCK, kv_disk_dir=str(warm_disk), **SMALL_POOL)
    out = llm.generate([a], GREEDY)[0]
    assert out.metrics.num_cached_tokens == FULL
    assert out.token_ids == baseline[0]
    assert llm.engine.kv.tiers.disk_stats.hits == 12
    assert_pool_whole(llm)


def test_a_damaged_file_is_skipped_removed_and_recomputed(warm_disk, baseline):
    (fingerprint_dir,) = warm_disk.iterdir()
    a = prompts(1)[0]
    damaged = fingerprint_dir / f"{block_hashes(a)[4]:016x}.kv"
    data = bytearray(damaged.read_bytes())
    data[-100] ^= 0x01  # one bit of one value: only the checksum can tell
    damaged.write_bytes(bytes(data))
    truncated = fingerprint_dir / f"{block_hashes(a)[8]:016x}.kv"
    truncated.write_bytes(truncated.read_bytes()[:1000])
    llm = LLM("tiny", kv_host_bytes=2 * BYTES_PER_BLOCK, kv_disk_dir=str(warm_disk), **SMALL_POOL)
    out = llm.generate([a], GREEDY)[0]
    assert out.metrics.num_cached_tokens == 4 * BLOCK  # the run ends at the damaged block
    assert out.token_ids == baseline[0]
    assert not damaged.exists() and not truncated.exists()


def test_a_restart_right_after_close_finds_every_spilled_block(tmp_path, baseline):
    """In one process: the spills are written on the writer thread, close() waits for them, and
    an engine started at once after finds all of prompt a's blocks on disk."""
    a, *others = prompts(4)
    tiers = {"kv_host_bytes": 2 * BYTES_PER_BLOCK, "kv_disk_dir": str(tmp_path)}
    with LLM("tiny", **tiers, **SMALL_POOL) as llm:
        one_by_one(llm, [a, *others])  # each evicts the last; host's two slots spill to disk
        disk = llm.engine.kv.tiers.disk
        assert set(block_hashes(a)) <= set(disk.files)
    assert disk.pending == {} and disk.writer.closed
    restarted = LLM("tiny", **tiers, **SMALL_POOL)
    out = restarted.generate([a], GREEDY)[0]
    assert out.metrics.num_cached_tokens == FULL and out.token_ids == baseline[0]
    assert restarted.engine.kv.tiers.disk_stats.hits == FULL // BLOCK
    restarted.shutdown()


@pytest.mark.parametrize(
    "change",
    [
        pytest.param({"block_size": 8, "num_kv_blocks": 32}, id="block-size"),
        pytest.param({"load_format": "dummy", **SMALL_POOL}, id="other-weights"),
        pytest.param({"kv_cache_dtype": "int8", **SMALL_POOL}, id="kv-dtype"),
    ],
)
def test_another_model_or_layout_never_reads_the_files(warm_disk, change):
    (written,) = warm_disk.iterdir()
    a = prompts(1)[0]
    llm = LLM("tiny", kv_host_bytes=2 * BYTES_PER_BLOCK, kv_disk_dir=str(warm_disk), **change)
    out = llm.generate([a], GREEDY)[0]
    assert out.metrics.num_cached_tokens == 0
    assert llm.engine.kv.tiers.disk.directory != written
    assert len(list(written.iterdir())) >= 12  # left alone


def test_another_checkpoint_never_reads_the_files(warm_disk, llama_checkpoint):
    (written,) = warm_disk.iterdir()
    a = prompts(1)[0]
    llm = LLM(str(llama_checkpoint), kv_host_bytes="1MiB", kv_disk_dir=str(warm_disk), **SMALL_POOL)
    assert llm.generate([a], GREEDY)[0].metrics.num_cached_tokens == 0
    assert llm.engine.kv.tiers.disk.directory != written


# --- preemption and aborts --------------------------------------------------------------------


def shared_prefix_prompts() -> list[list[int]]:
    base = random_prompts([96], seed=7)[0]
    tails = random_prompts([5, 40, 17, 60, 3, 33], seed=8)
    return [base + t for t in tails]


def test_preemption_with_tiers_keeps_outputs_exact():
    batch = shared_prefix_prompts()
    params = SamplingParams(max_tokens=16, ignore_eos=True)
    cfg = {"block_size": 8, "num_kv_blocks": 36}
    plain = LLM("tiny", **cfg)
    want = tokens(plain.generate(batch, params))
    assert plain.engine.scheduler.num_preemptions > 0
    llm = LLM("tiny", kv_host_bytes="4MiB", **cfg)
    for _ in range(2):  # the second round finds the first's blocks in host
        outs = llm.generate(batch, params)
        assert tokens(outs) == want
    assert llm.engine.scheduler.num_preemptions > 0
    assert llm.engine.kv.tiers.host_stats.hits > 0
    assert_pool_whole(llm)


def test_aborts_with_tiers_free_everything_and_spare_the_others():
    batch = shared_prefix_prompts()
    params = SamplingParams(max_tokens=16, ignore_eos=True)
    cfg = {"block_size": 8, "num_kv_blocks": 40}
    want = tokens(LLM("tiny", **cfg).generate(batch, params))
    llm = LLM("tiny", kv_host_bytes="4MiB", **cfg)
    core = llm.engine
    for _ in range(2):
        ids = [core.add_request(p, params).request_id for p in batch]
        done: dict[str, list[int]] = {}
        steps = 0
        while core.has_unfinished():
            for out in core.step():
                if out.finished:
                    done[out.request_id] = out.token_ids
            steps += 1
            if steps == 3:
                assert core.abort(ids[1]) and core.abort(ids[4])
        kept = [i for i in range(len(batch)) if i not in (1, 4)]
        assert [done[ids[i]] for i in kept] == [want[i] for i in kept]
    assert_pool_whole(llm)
    assert core.kv.tiers.held == set()
