"""KV tiers without a model: exact block ids, hashes, slots and files as blocks move between the
device pool, the host tier and the disk tier (vLLM style), sizes, config, and damaged files."""

from __future__ import annotations

import os
import threading

import pytest
import torch

from engine.config import EngineConfig, SamplingParams
from engine.kv.block_pool import hash_block_tokens
from engine.kv.cache import KVCache, KVLayout
from engine.kv.disk_tier import HEADER, DiskTier
from engine.kv.manager import KVCacheManager
from engine.kv.offload import KVOffloader
from engine.kv.sizes import parse_size
from engine.request import Request

BLOCK = 2  # tokens per block


def make_cache(num_blocks: int, kv_cache_dtype: str = "auto") -> KVCache:
    layout = KVLayout(
        num_layers=2,
        num_kv_heads=1,
        head_dim=4,
        block_size=BLOCK,
        dtype=torch.float32,
        kv_cache_dtype=kv_cache_dtype,
    )
    return KVCache(layout, num_blocks, torch.device("cpu"))


def tiered(tmp_path, num_blocks=4, host_blocks=2, disk_blocks=2, kv_cache_dtype="auto"):
    cache = make_cache(num_blocks, kv_cache_dtype)
    bpb = cache.layout.bytes_per_block
    tiers = KVOffloader(
        cache,
        host_bytes=host_blocks * bpb,
        disk_dir=str(tmp_path),
        disk_bytes=disk_blocks * (HEADER.size + bpb),
        fingerprint="fp",
    )
    kv = KVCacheManager(num_blocks, BLOCK, enable_prefix_caching=True)
    kv.attach_tiers(tiers)
    return cache, kv, tiers


def fill(cache: KVCache, block_id: int, value: float) -> None:
    """Give a block's pages values of its own: layer i's K holds value + 2i, V value + 2i + 1
    (integers, so that int8 pages hold them too)."""
    for i, layer in enumerate(cache.layers):
        layer.k[block_id] = value + 2 * i
        layer.v[block_id] = value + 2 * i + 1
        if layer.k_scale is not None and layer.k_scale.dim():
            layer.k_scale[block_id] = value / 10
            layer.v_scale[block_id] = value / 20


def holds(cache: KVCache, block_id: int, value: float) -> bool:
    ok = True
    for i, layer in enumerate(cache.layers):
        ok &= bool((layer.k[block_id].float() == value + 2 * i).all())
        ok &= bool((layer.v[block_id].float() == value + 2 * i + 1).all())
        if layer.k_scale is not None and layer.k_scale.dim():
            ok &= bool((layer.k_scale[block_id] == value / 10).all())
            ok &= bool((layer.v_scale[block_id] == value / 20).all())
    return ok


def request(rid: str, tokens) -> Request:
    return Request(request_id=rid, prompt_token_ids=list(tokens), params=SamplingParams())


def compute(kv: KVCacheManager, cache: KVCache, req: Request, values=None) -> list[int]:
    """Admit `req` (restoring what the tiers hold), 'compute' its remaining tokens by filling
    their blocks with `values`, register them; -> its block ids."""
    cached = kv.find_cached_prefix(req)
    assert kv.allocate_slots(req, req.num_tokens - cached.num_tokens, cached)
    req.num_computed_tokens = req.num_tokens
    ids = kv.block_ids(req.request_id)
    new_ids = ids[len(cached.blocks) + len(cached.restore) :]
    for block_id, value in zip(new_ids, values or [], strict=False):  # values may be fewer
        fill(cache, block_id, value)
    kv.register_full_blocks(req)
    return ids


def chain(tokens) -> list[int]:
    hashes, parent = [], None
    for i in range(0, len(tokens) - len(tokens) % BLOCK, BLOCK):
        parent = hash_block_tokens(parent, tokens[i : i + BLOCK])
        hashes.append(parent)
    return hashes


A = [1, 2, 3, 4, 5]  # two full blocks (a0, a1) and one token
B = [7, 8, 9, 10, 11]


def test_evicted_blocks_go_to_host_then_disk_in_lru_order(tmp_path):
    cache, kv, tiers = tiered(tmp_path)
    a0, a1 = chain(A)
    b0, b1 = chain(B)
    a = request("a", A)
    assert compute(kv, cache, a, [10, 11, 12]) == [0, 1, 2]
    kv.free(a)  # queue: 3, then a's blocks tail first: 2, 1, 0
    assert list(kv.pool.free_queue) == [3, 2, 1, 0]

    b = request("b", B)
    assert compute(kv, cache, b, [20, 21, 22]) == [3, 2, 1]  # evicts a1 (block 1)
    assert list(tiers.host.slots.items()) == [(a1, 0)]
    kv.free(b)  # queue: 0 (a0), then 1 (b2), 2 (b1), 3 (b0)
    c = request("c", [30, 31, 32])
    assert compute(kv, cache, c, [30, 31]) == [0, 1]  # evicts a0
    assert list(tiers.host.slots.items()) == [(a1, 0), (a0, 1)]
    assert tiers.disk.num_used == 0
    kv.free(c)  # queue: 2 (b1), 3 (b0), 1 (c1), 0 (c0)
    d = request("d", [40, 41, 42, 43, 44, 45, 46])
    assert compute(kv, cache, d, [40, 41, 42, 43]) == [2, 3, 1, 0]  # evicts b1, b0, c0
    # Host holds two: a1 and a0 went to disk (LRU first), then b1 too, pushing a1 out of disk.
    c0 = chain([30, 31, 32])[0]
    assert list(tiers.host.slots) == [b0, c0]
    assert list(tiers.disk.files) == [a0, b1]
    assert tiers.disk.wait()  # the writer thread's files
    assert sorted(p.name for p in tiers.disk.directory.iterdir()) == sorted(
        f"{h:016x}.kv" for h in (a0, b1)
    )
    assert tiers.host.num_evictions == 3 and tiers.disk.num_evictions == 1


def test_a_lookup_continues_in_host_and_disk_and_restores_the_exact_pages(tmp_path):
    cache, kv, tiers = tiered(tmp_path, num_blocks=4, host_blocks=1, disk_blocks=4)
    a0, a1 = chain(A)
    a = request("a", A)
    compute(kv, cache, a, [10, 11, 12])
    kv.free(a)
    filler = request("f", [50, 51, 52, 53, 54, 55, 56])
    compute(kv, cache, filler, [50, 51, 52, 53])  # evicts a1 then a0: a1 spills to disk
    assert list(tiers.host.slots) == [a0] and list(tiers.disk.files) == [a1]
    kv.free(filler)
    for block_id in range(4):
        fill(cache, block_id, -1)  # what the pages held is gone from the device

    again = request("again", A + [6, 7])  # three full blocks; the third was never computed
    hit = kv.find_cached_prefix(again)
    assert hit.blocks == [] and hit.restore == (a0, a1) and hit.num_tokens == 4
    assert kv.allocate_slots(again, again.num_tokens - hit.num_tokens, hit)
    ids = kv.block_ids("again")
    assert holds(cache, ids[0], 10) and holds(cache, ids[1], 11)
    assert [kv.pool.blocks[i].block_hash for i in ids[:2]] == [a0, a1]  # cached on device again
    assert tiers.host_stats.hits == 1 and tiers.disk_stats.hits == 1
    assert kv.req_num_registered["again"] == 2


def test_int8_pages_come_back_with_their_scales(tmp_path):
    cache, kv, tiers = tiered(tmp_path, host_blocks=4, kv_cache_dtype="int8")
    assert cache.layout.slot_scales
    a = request("a", A)
    compute(kv, cache, a, [3, 4, 5])
    kv.free(a)
    f = request("f", [60] * 7)
    compute(kv, cache, f, [1, 1, 1, 1])  # evicts both of a's blocks
    kv.free(f)
    again = request("again", A)
    hit = kv.find_cached_prefix(again)
    assert kv.allocate_slots(again, 1, hit) and hit.num_tokens == 4
    ids = kv.block_ids("again")
    assert holds(cache, ids[0], 3) and holds(cache, ids[1], 4)


def test_a_block_already_in_host_is_not_copied_again(tmp_path):
    cache, kv, tiers = tiered(tmp_path, host_blocks=4)
    a0, a1 = chain(A)
    bpb = cache.layout.bytes_per_block
    a = request("a", A)
    compute(kv, cache, a, [10, 11, 12])
    kv.free(a)
    f = request("f", [60] * 7)  # blocks f0, f1, f2 full
    compute(kv, cache, f, [1, 2, 3, 4])  # evicts a1, a0
    kv.free(f)
    assert tiers.host_stats.bytes_in == 2 * bpb
    again = request("again", A)
    compute(kv, cache, again)  # restores a0, a1 into pages evicted from f: f2, f1 saved
    assert list(tiers.host.slots) == [a0, a1, *chain([60] * 7)[2:0:-1]]
    kv.free(again)
    compute(kv, cache, request("g", [70] * 7), [5, 6, 7, 8])  # evicts f0, a1, a0, in order
    # f0 takes the LRU slot (a0 spills to disk); a1 is still in host: touched, not copied; a0
    # is copied back in, spilling f2.
    f0, f1, f2 = chain([60] * 7)
    assert tiers.host_stats.bytes_in == 6 * bpb
    assert list(tiers.host.slots) == [f1, f0, a1, a0]
    assert list(tiers.disk.files) == [a0, f2]


def test_pinned_blocks_are_not_evicted_by_the_allocation_that_restores_them(tmp_path):
    # Host of 2 slots holds a0, a1; restoring them allocates pages that evict two other cached
    # blocks, which must not push a0 or a1 out before they are copied back.
    cache, kv, tiers = tiered(tmp_path, num_blocks=4, host_blocks=2, disk_blocks=0)
    a0, a1 = chain(A)
    a = request("a", A)
    compute(kv, cache, a, [10, 11, 12])
    kv.free(a)
    f = request("f", [80, 81, 82, 83, 84, 85, 86])
    compute(kv, cache, f, [80, 81, 82, 83])  # evicts a1, a0 into host
    kv.free(f)
    assert list(tiers.host.slots) == [a1, a0]
    again = request("again", A)
    hit = kv.find_cached_prefix(again)
    assert hit.restore == (a0, a1)
    assert kv.allocate_slots(again, 1, hit)  # takes pages of f's cached blocks
    ids = kv.block_ids("again")
    assert holds(cache, ids[0], 10) and holds(cache, ids[1], 11)
    assert a0 in tiers.host and a1 in tiers.host  # f's blocks found no unpinned slot


# --- the disk tier's files --------------------------------------------------------------------


def record(value: int, size: int) -> torch.Tensor:
    return torch.full((size,), value, dtype=torch.uint8)


def test_disk_files_survive_a_new_tier_in_lru_order(tmp_path):
    size = 64
    disk = DiskTier(tmp_path, "fp", 3 * (HEADER.size + size), size)
    for h in (1, 2, 3):
        assert disk.put(h, record(h, size))
        assert disk.wait()
        os.utime(disk.path(h), ns=(h * 10**9, h * 10**9))  # distinct mtimes, oldest first
    again = DiskTier(tmp_path, "fp", 2 * (HEADER.size + size), size)
    assert list(again.files) == [2, 3]  # the smaller budget evicted the oldest
    out = torch.empty(size, dtype=torch.uint8)
    assert again.get(3, out) and bool((out == 3).all())
    assert list(DiskTier(tmp_path, "other", 10**6, size).files) == []


@pytest.mark.parametrize("damage", ["truncate", "flip", "header", "empty"])
def test_a_damaged_file_is_a_miss_and_is_removed(tmp_path, damage):
    size = 64
    disk = DiskTier(tmp_path, "fp", 10**6, size)
    disk.put(7, record(7, size))
    assert disk.flush()
    path = disk.path(7)
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[:-5]
    elif damage == "flip":
        data[-1] ^= 0xFF
    elif damage == "header":
        data[:4] = b"XXXX"
    else:
        data = bytearray()
    path.write_bytes(bytes(data))
    fresh = DiskTier(tmp_path, "fp", 10**6, size)
    # A wrong size is caught by the scan; a wrong byte only by the checksum when read.
    assert not fresh.get(7, torch.empty(size, dtype=torch.uint8))
    assert fresh.wait()  # the removal runs on the writer thread
    assert 7 not in fresh and not path.exists()


def test_a_write_that_never_finished_leaves_no_block(tmp_path):
    size = 64
    disk = DiskTier(tmp_path, "fp", 10**6, size)
    (disk.directory / f"{9:016x}.kv.123.tmp").write_bytes(b"partial")
    fresh = DiskTier(tmp_path, "fp", 10**6, size)
    assert list(fresh.files) == [] and list(fresh.directory.iterdir()) == []


# --- the disk tier's writer thread ------------------------------------------------------------


@pytest.fixture
def stalled_writes(monkeypatch):
    """Writes on the writer thread wait until the returned event is set (a slow disk); every
    write's result can be forced through `results` (False: a full disk)."""
    from engine.kv import disk_writer

    go = threading.Event()
    results: list[bool] = []
    real = disk_writer.write_atomically

    def slow(path, header, payload):
        assert go.wait(10)
        written = real(path, header, payload)
        return results.pop(0) if results else written

    monkeypatch.setattr(disk_writer, "write_atomically", slow)
    go.results = results
    yield go
    go.set()


def test_a_block_still_being_written_is_read_from_memory(tmp_path, stalled_writes):
    size = 64
    disk = DiskTier(tmp_path, "fp", 10**6, size)
    row = record(5, size)
    assert disk.put(5, row)
    row.fill_(0)  # the caller reuses its row at once: the tier kept a copy
    assert 5 in disk and not disk.path(5).exists()
    out = torch.empty(size, dtype=torch.uint8)
    assert disk.get(5, out) and bool((out == 5).all())
    stalled_writes.set()
    assert disk.wait()
    assert disk.path(5).exists() and disk.pending == {}
    out.zero_()
    assert disk.get(5, out) and bool((out == 5).all())  # now from its file


def test_a_block_evicted_while_queued_leaves_no_file(tmp_path, stalled_writes):
    size = 64
    disk = DiskTier(tmp_path, "fp", 1 * (HEADER.size + size), size)  # room for one
    assert disk.put(1, record(1, size)) and disk.put(2, record(2, size))  # 2 evicts 1
    assert list(disk.files) == [2] and list(disk.pending) == [2]
    assert not disk.get(1, torch.empty(size, dtype=torch.uint8))
    stalled_writes.set()
    assert disk.wait()
    assert sorted(p.name for p in disk.directory.iterdir()) == [f"{2:016x}.kv"]


def test_spills_beyond_the_queue_bound_are_dropped(tmp_path, stalled_writes):
    size = 64
    disk = DiskTier(tmp_path, "fp", 10**6, size)
    disk.max_pending, disk.put_wait_s = 2, 0.05
    assert disk.put(1, record(1, size)) and disk.put(2, record(2, size))
    assert not disk.put(3, record(3, size))  # two records wait, and keep waiting: not kept
    assert 3 not in disk and disk.num_dropped == 1
    stalled_writes.set()
    assert disk.wait()
    assert disk.put(3, record(3, size))  # the queue drained: room again


def test_a_burst_of_spills_waits_for_the_writer_rather_than_dropping(tmp_path):
    size = 64
    disk = DiskTier(tmp_path, "fp", 10**6, size)
    disk.max_pending = 2
    assert all(disk.put(h, record(h, size)) for h in range(1, 41))  # 40 through 2 places
    assert disk.num_dropped == 0 and disk.wait()
    assert len(list(disk.directory.iterdir())) == 40


def test_a_failed_write_is_a_miss_not_a_block(tmp_path, stalled_writes):
    size = 64
    disk = DiskTier(tmp_path, "fp", 10**6, size)
    stalled_writes.results.append(False)  # the disk is full for this one
    assert disk.put(4, record(4, size))
    stalled_writes.set()
    assert disk.wait()
    assert 4 not in disk and disk.num_write_errors == 1
    assert not disk.get(4, torch.empty(size, dtype=torch.uint8))


def test_close_waits_for_the_queued_writes_and_a_new_tier_finds_them(tmp_path, stalled_writes):
    size = 64
    disk = DiskTier(tmp_path, "fp", 10**6, size)
    for h in range(1, 6):
        assert disk.put(h, record(h, size))
    assert not disk.flush(timeout=0.05)  # bounded: the stalled disk is not waited for forever
    stalled_writes.set()
    assert disk.flush()
    assert not disk.put(9, record(9, size))  # closed: nothing more is queued
    again = DiskTier(tmp_path, "fp", 10**6, size)
    assert sorted(again.files) == [1, 2, 3, 4, 5]
    out = torch.empty(size, dtype=torch.uint8)
    assert all(again.get(h, out) and bool((out == h).all()) for h in range(1, 6))


# --- sizes and config -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, value",
    [("512MiB", 512 * 2**20), ("4GB", 4 * 10**9), ("1.5 GiB", 3 * 2**29), ("2048", 2048), (7, 7)],
)
def test_sizes_take_units(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["12XB", "-1", "GiB", "", -3, True])
def test_bad_sizes_say_so(text):
    with pytest.raises(ValueError, match="size|>= 0"):
        parse_size(text, "kv_host_bytes")


def test_config_validates_the_tiers(tmp_path):
    config = EngineConfig(kv_host_bytes="1MiB", kv_disk_dir=tmp_path)
    assert config.kv_host_bytes == 2**20 and config.kv_disk_bytes == 16 * 2**30
    assert config.kv_tiers_enabled
    assert not EngineConfig(kv_host_bytes="1MiB", enable_prefix_caching=False).kv_tiers_enabled
    with pytest.raises(ValueError, match="kv_disk_dir needs kv_host_bytes"):
        EngineConfig(kv_disk_dir=str(tmp_path))
    with pytest.raises(ValueError, match="kv_disk_bytes needs kv_disk_dir"):
        EngineConfig(kv_host_bytes=10, kv_disk_bytes=10)
    with pytest.raises(ValueError, match="kv_disk_bytes"):
        EngineConfig(kv_host_bytes=10, kv_disk_dir=str(tmp_path), kv_disk_bytes="lots")


def test_cli_flags_take_sizes_with_units(tmp_path, capsys):
    from workbench.cli import build_parser, engine_config_from_args, main

    args = build_parser().parse_args(
        ["generate", "--prompt", "x", "--kv-host-bytes", "512MiB", "--kv-disk-dir",
         str(tmp_path), "--kv-disk-bytes", "4GB"]
    )  # fmt: skip
    config = engine_config_from_args(args)
    assert (config.kv_host_bytes, config.kv_disk_dir, config.kv_disk_bytes) == (
        512 * 2**20, str(tmp_path), 4 * 10**9
    )  # fmt: skip
    assert main(["generate", "--prompt", "x", "--kv-host-bytes", "lots"]) == 2
    assert "kv_host_bytes must be a byte size" in capsys.readouterr().err
