"""The Triton attention kernels on the CPU, through Triton's interpreter (TRITON_INTERPRET=1
must be set before triton compiles anything, so the checks run in subprocesses): split-K decode
results against the torch reference for every split count, the fp8/int8 dequantizing loads
against the same kernel over dequantized pages, and the K/V write kernel against
`write_quantized`. The interpreter has no bfloat16 (float16 stands in for it), and its float8
cast neither rounds ties to even nor keeps subnormals, so fp8 writes are checked on the GPU only
(tests/test_gpu.py).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parent.parent

SCRIPT = textwrap.dedent(
    """
    import torch
    from engine.attention.metadata import AttentionMetadata
    from engine.attention.torch_ref import TorchAttention
    from engine.attention.triton_decode import paged_decode_attention
    from engine.kv.cache import LayerKV

    gen = torch.Generator().manual_seed(0)
    worst = {}
    cases = [(torch.float32, 8, 4, 16, (1, 7)), (torch.float16, 6, 2, 32, (3,))]
    for dtype, heads, kv_heads, head_dim, split_counts in cases:
        bs, num_blocks = 16, 16
        k = torch.randn(num_blocks, bs, kv_heads, head_dim, generator=gen)
        v = torch.randn_like(k)
        seq_lens = torch.tensor([1, 40, 100])
        tables = torch.stack([torch.randperm(num_blocks, generator=gen)[:7] for _ in range(3)])
        q = torch.randn(3, heads, head_dim, generator=gen)
        meta = AttentionMetadata(TorchAttention(), torch.empty(0, dtype=torch.int64), tables,
                                 seq_lens, list(range(4)), seq_lens.tolist(), 3, bs)
        ref = TorchAttention()._decode(q, LayerKV(k, v), meta, head_dim**-0.5)
        for splits in split_counts:
            out = paged_decode_attention(q.to(dtype), k.to(dtype), v.to(dtype), tables,
                                         seq_lens, head_dim**-0.5, num_splits=splits)
            err = (out.float() - ref).abs().max().item()
            worst[str(dtype)] = max(worst.get(str(dtype), 0.0), err)
        # Quantized pages: the kernel's dequantizing loads against dequantized pages.
        ks, vs = k.abs().amax(-1) / 127, v.abs().amax(-1) / 127  # per slot and KV head
        k8 = (k / ks[..., None]).round().to(torch.int8)
        v8 = (v / vs[..., None]).round().to(torch.int8)
        out = paged_decode_attention(q, k8, v8, tables, seq_lens, 0.25, num_splits=3,
                                     k_scale=ks, v_scale=vs)
        deq = paged_decode_attention(q, k8 * ks[..., None], v8 * vs[..., None], tables,
                                     seq_lens, 0.25, num_splits=3)
        worst["int8"] = max(worst.get("int8", 0.0), (out - deq).abs().max().item())
        two = torch.tensor(2.0)
        kf, vf = (k / 2).to(torch.float8_e4m3fn), (v / 2).to(torch.float8_e4m3fn)
        out = paged_decode_attention(q, kf, vf, tables, seq_lens, 0.25, num_splits=3,
                                     k_scale=two, v_scale=two)
        deq = paged_decode_attention(q, kf.float() * 2, vf.float() * 2, tables, seq_lens,
                                     0.25, num_splits=3)
        worst["fp8"] = max(worst.get("fp8", 0.0), (out - deq).abs().max().item())
    print(worst)
    """
)


WRITE_SCRIPT = textwrap.dedent(
    """
    import torch
    from engine.attention.triton_kv_write import write_kv_triton
    from engine.kv.cache import LayerKV
    from engine.kv.quant import write_quantized

    gen = torch.Generator().manual_seed(0)
    worst = {}
    for dtype in (torch.float32, torch.float16):
        for store in ("auto", "int8"):  # fp8: the interpreter's float8 cast is not torch's
            nb, bs, kvh, hd = 4, 4, 2, 24  # head_dim 24: a masked tail in the kernel
            pd = {"auto": dtype, "fp8": torch.float8_e4m3fn, "int8": torch.int8}[store]

            def fresh():
                kp = torch.zeros(nb, bs, kvh, hd, dtype=pd)
                if store == "fp8":
                    return LayerKV(kp, kp.clone(), torch.tensor(0.05), torch.tensor(0.07))
                if store == "int8":
                    scales = torch.zeros(nb, bs, kvh)
                    return LayerKV(kp, kp.clone(), scales, scales.clone())
                return LayerKV(kp, kp.clone())

            k = (torch.randn(5, kvh, hd, generator=gen) * 3).to(dtype)
            v = torch.randn_like(k)
            k[0, 0] = 0  # an all-zero head gets the minimum scale
            slots = torch.tensor([3, 0, 15, 7, 8])
            ref, out = fresh(), fresh()
            write_quantized(ref.k, ref.k_scale, k, slots)
            write_quantized(ref.v, ref.v_scale, v, slots)
            write_kv_triton(out, k, v, slots)
            err = max((ref.k.float() - out.k.float()).abs().max().item(),
                      (ref.v.float() - out.v.float()).abs().max().item())
            if store == "int8":
                err = max(err, (ref.k_scale - out.k_scale).abs().max().item(),
                          (ref.v_scale - out.v_scale).abs().max().item())
            worst[store] = max(worst.get(store, 0.0), err)
    print(worst)
    """
)


PREFILL_SCRIPT = textwrap.dedent(
    """
    import torch
    from engine.attention.metadata import AttentionMetadata
    from engine.attention.torch_ref import TorchAttention
    from engine.attention.triton_backend import TritonAttention
    from engine.attention.triton_prefill import paged_prefill_attention
    from engine.kv.cache import LayerKV

    gen = torch.Generator().manual_seed(0)
    worst = {}
    # (context length, chunk length): whole prompts, chunks over a cached prefix (page-aligned
    # and not), a one-token chunk, and a chunk longer than one block of queries.
    seqs = [(40, 40), (100, 13), (48, 16), (17, 1), (90, 70)]
    for dtype, heads, kv_heads, head_dim in [(torch.float32, 8, 2, 16), (torch.float16, 4, 4, 32)]:
        bs, num_blocks = 16, 48
        k = torch.randn(num_blocks, bs, kv_heads, head_dim, generator=gen)
        v = torch.randn_like(k)
        tables = torch.stack(
            [torch.randperm(num_blocks, generator=gen)[:7] for _ in range(len(seqs))]
        )
        seq_lens = torch.tensor([n for n, _ in seqs])
        starts = [0]
        for _, q_len in seqs:
            starts.append(starts[-1] + q_len)
        q = torch.randn(starts[-1], heads, head_dim, generator=gen)
        meta = AttentionMetadata(TorchAttention(), torch.empty(0, dtype=torch.int64), tables,
                                 seq_lens, starts, seq_lens.tolist(), 0, bs)
        ref = torch.cat([
            TorchAttention()._prefill(q[a:b], LayerKV(k, v), meta, i, 0.3)
            for i, (a, b) in enumerate(zip(starts, starts[1:]))
        ])
        out = paged_prefill_attention(q.to(dtype), k.to(dtype), v.to(dtype), tables, seq_lens,
                                      torch.tensor(starts), 70, 0.3)
        worst[str(dtype)] = max(worst.get(str(dtype), 0.0), (out.float() - ref).abs().max().item())
        # Quantized pages: the dequantizing loads against dequantized pages.
        ks, vs = k.abs().amax(-1) / 127, v.abs().amax(-1) / 127  # per slot and KV head
        k8 = (k / ks[..., None]).round().to(torch.int8)
        v8 = (v / vs[..., None]).round().to(torch.int8)
        args = (tables, seq_lens, torch.tensor(starts), 70, 0.3)
        out = paged_prefill_attention(q, k8, v8, *args, k_scale=ks, v_scale=vs)
        deq = paged_prefill_attention(q, k8 * ks[..., None], v8 * vs[..., None], *args)
        worst["int8"] = max(worst.get("int8", 0.0), (out - deq).abs().max().item())
        two = torch.tensor(2.0)
        kf, vf = (k / 2).to(torch.float8_e4m3fn), (v / 2).to(torch.float8_e4m3fn)
        out = paged_prefill_attention(q, kf, vf, *args, k_scale=two, v_scale=two)
        deq = paged_prefill_attention(q, kf.float() * 2, vf.float() * 2, *args)
        worst["fp8"] = max(worst.get("fp8", 0.0), (out - deq).abs().max().item())

    # The backend on a mixed step: two decodes first, then three chunks; K/V written first.
    heads, kv_heads, head_dim, bs = 4, 2, 16, 16
    seqs = [(30, 1), (7, 1), (40, 40), (100, 13), (33, 17)]
    tables = torch.stack([torch.randperm(64, generator=gen)[:7] for _ in range(len(seqs))])
    starts = [0]
    for _, q_len in seqs:
        starts.append(starts[-1] + q_len)
    slots = torch.tensor([int(tables[i, p // bs]) * bs + p % bs
                          for i, (n, q_len) in enumerate(seqs) for p in range(n - q_len, n)])
    seq_lens = torch.tensor([n for n, _ in seqs])
    q = torch.randn(starts[-1], heads, head_dim, generator=gen)
    new_k, new_v = (torch.randn(starts[-1], kv_heads, head_dim, generator=gen) for _ in "kv")
    old_k, old_v = (torch.randn(64, bs, kv_heads, head_dim, generator=gen) for _ in "kv")
    results = []
    for backend in (TorchAttention(), TritonAttention(prefill_kernel=True)):
        cache = LayerKV(old_k.clone(), old_v.clone())  # the cached prefixes; this step's K/V next
        meta = AttentionMetadata(backend, slots, tables, seq_lens, starts, seq_lens.tolist(), 2, bs)
        results.append(backend.forward(q, new_k, new_v, cache, meta, 0.25))
    worst["backend"] = (results[0] - results[1]).abs().max().item()
    print(worst)
    """
)


def _interpret(script: str) -> dict[str, float]:
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return eval(done.stdout.strip().splitlines()[-1])  # {case: max abs error}


def test_kv_write_kernel_under_the_interpreter():
    worst = _interpret(WRITE_SCRIPT)
    assert worst["auto"] == 0.0
    assert worst["int8"] == 0.0


def test_split_k_decode_kernel_under_the_interpreter():
    worst = _interpret(SCRIPT)
    assert worst["torch.float32"] < 1e-5
    assert worst["torch.float16"] < 5e-3
    assert worst["int8"] < 1e-5
    assert worst["fp8"] < 1e-5


def test_paged_prefill_kernel_under_the_interpreter():
    """Chunks over cached prefixes, whole prompts and GQA, in float32 and float16, from
    unquantized, int8 and fp8 pages; and the Triton backend with the kernel on a step mixing
    decodes and chunks against the torch reference."""
    worst = _interpret(PREFILL_SCRIPT)
    assert worst["torch.float32"] < 1e-5
    assert worst["torch.float16"] < 5e-3
    assert worst["int8"] < 1e-5
    assert worst["fp8"] < 1e-5
    assert worst["backend"] < 1e-5
