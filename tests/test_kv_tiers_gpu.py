"""KV tiers on CUDA: pinned host memory, copies on a side stream ordered before the pages' reuse,
restores ordered before the prefill that reads them, and engine parity with overlap scheduling."""

from __future__ import annotations

import pytest
import torch
from conftest import random_prompts

from engine import LLM, SamplingParams
from engine.kv.cache import KVCache, KVLayout
from engine.kv.disk_tier import HEADER
from engine.kv.offload import KVOffloader

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

CUDA = torch.device("cuda")


def cuda_tiers(tmp_path, kv_cache_dtype="auto", num_blocks=8, host_blocks=4):
    layout = KVLayout(
        num_layers=4,
        num_kv_heads=8,
        head_dim=128,
        block_size=16,
        dtype=torch.bfloat16,
        kv_cache_dtype=kv_cache_dtype,
    )
    cache = KVCache(layout, num_blocks, CUDA)
    bpb = layout.bytes_per_block
    tiers = KVOffloader(
        cache, host_blocks * bpb, str(tmp_path), 16 * (HEADER.size + bpb), fingerprint="gpu"
    )
    return cache, tiers


def fill(cache: KVCache, block_id: int, value: float) -> None:
    for layer in cache.layers:
        layer.k[block_id].fill_(value)
        layer.v[block_id].fill_(-value)
        if layer.k_scale is not None and layer.k_scale.dim():
            layer.k_scale[block_id].fill_(value / 8)


def snapshot(cache: KVCache, block_id: int) -> list[torch.Tensor]:
    """The block's bytes in every per-page tensor, on the CPU."""
    out = []
    for layer in cache.layers:
        for t in (layer.k, layer.v, layer.k_scale, layer.v_scale):
            if t is not None and t.dim():
                out.append(t[block_id].contiguous().view(torch.uint8).cpu())
    return out


def same(x: list[torch.Tensor], y: list[torch.Tensor]) -> bool:
    return len(x) == len(y) and all(torch.equal(a, b) for a, b in zip(x, y, strict=True))


def test_the_host_tier_is_pinned(tmp_path):
    _, tiers = cuda_tiers(tmp_path)
    assert tiers.host.chunks and all(c.is_pinned() for c in tiers.host.chunks)
    assert tiers.side_stream is not None


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "int8", "fp8"])
def test_a_saved_page_overwritten_at_once_comes_back_as_it_was(tmp_path, kv_cache_dtype):
    cache, tiers = cuda_tiers(tmp_path, kv_cache_dtype)
    fill(cache, 2, 3.0)
    want = snapshot(cache, 2)
    # A long kernel queued first makes the side-stream copy race the overwrite if unordered.
    big = torch.randn(4096, 4096, device=CUDA)
    for _ in range(20):
        big = big @ big.T / 4096
    tiers.save([(2, 42)])
    fill(cache, 2, 0.0)  # the page's reuse, queued right after the save
    hit = tiers.find([42])
    assert hit == [42]
    tiers.restore(hit, [5])
    torch.cuda.synchronize()
    assert same(snapshot(cache, 5), want)


def test_host_slots_spill_to_disk_after_their_copy_landed(tmp_path):
    cache, tiers = cuda_tiers(tmp_path, host_blocks=2)
    for block_id in range(6):
        fill(cache, block_id, float(block_id + 1))
    wants = [snapshot(cache, b) for b in range(6)]
    tiers.save([(b, 100 + b) for b in range(6)])  # 4 of 6 spill through 2 slots, in order
    for block_id in range(6):
        fill(cache, block_id, 0.0)
    assert list(tiers.disk.files) == [100, 101, 102, 103]
    hit = tiers.find([100 + b for b in range(6)])
    assert hit == [100 + b for b in range(6)]
    tiers.restore(hit, list(range(6)))
    torch.cuda.synchronize()
    assert all(same(snapshot(cache, b), wants[b]) for b in range(6))


@pytest.mark.parametrize("async_scheduling", [True, False])
def test_engine_outputs_with_tiers_equal_outputs_without_on_cuda(tmp_path, async_scheduling):
    a, b, c = random_prompts([900, 900, 300], seed=2)
    params = SamplingParams(max_tokens=16, ignore_eos=True)
    cfg = {"device": "cuda", "block_size": 16, "num_kv_blocks": 64}
    cfg["async_scheduling"] = async_scheduling

    def run(llm):
        return [llm.generate([p], params)[0] for p in (a, b, a, [*a[:400], *c], b)]

    plain = run(LLM("tiny", **cfg))
    tiered = LLM("tiny", kv_host_bytes="64MiB", kv_disk_dir=str(tmp_path), **cfg)
    outs = run(tiered)
    assert [o.token_ids for o in outs] == [o.token_ids for o in plain]
    assert outs[2].metrics.num_cached_tokens == (900 - 1) // 16 * 16
    assert tiered.engine.kv.tiers.host_stats.hits > 0


def test_pinned_slots_come_in_chunks(monkeypatch):
    from engine.kv import host_tier

    monkeypatch.setattr(host_tier, "PINNED_CHUNK_BYTES", 4 * 64)
    tier = host_tier.HostTier(10, 64, pin_memory=True, held=set())
    assert [c.shape[0] for c in tier.chunks] == [4, 4, 2]
    assert tier.row(9).data_ptr() == tier.chunks[2][1].data_ptr()
    assert all(c.is_pinned() for c in tier.chunks)
