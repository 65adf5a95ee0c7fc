"""The paged Triton prefill kernel on the GPU (`-m gpu`): against the reference on random block
tables in bfloat16, and the whole engine with it on (WORKBENCH_TRITON_PREFILL=1) against
transformers, with chunked prefill over cached prefixes."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_pool_whole, hf_greedy, random_prompts
from tiny_checkpoints import cached_tiny_checkpoint

from engine import LLM, SamplingParams

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("heads, kv_heads, head_dim", [(32, 8, 128), (14, 2, 64)])
def test_prefill_kernel_matches_reference(dtype, heads, kv_heads, head_dim):
    from engine.attention.metadata import AttentionMetadata
    from engine.attention.torch_ref import TorchAttention
    from engine.attention.triton_prefill import paged_prefill_attention
    from engine.kv.cache import LayerKV

    gen = torch.Generator(device="cuda").manual_seed(0)
    bs, num_blocks = 16, 256
    seqs = [(300, 300), (1000, 77), (64, 16), (17, 1), (513, 200)]
    k = torch.randn(num_blocks, bs, kv_heads, head_dim, device="cuda", generator=gen).to(dtype)
    v = torch.randn_like(k)
    max_blocks = -(-max(n for n, _ in seqs) // bs)
    tables = torch.stack(
        [torch.randperm(num_blocks, device="cuda", generator=gen)[:max_blocks] for _ in seqs]
    )
    seq_lens = torch.tensor([n for n, _ in seqs], device="cuda")
    starts = [0]
    for _, q_len in seqs:
        starts.append(starts[-1] + q_len)
    q = torch.randn(starts[-1], heads, head_dim, device="cuda", generator=gen).to(dtype)
    meta = AttentionMetadata(
        TorchAttention(),
        torch.empty(0, dtype=torch.int64, device="cuda"),
        tables,
        seq_lens,
        starts,
        seq_lens.tolist(),
        0,
        bs,
    )
    ref = torch.cat(
        [
            TorchAttention()._prefill(q[a:b], LayerKV(k, v), meta, i, head_dim**-0.5)
            for i, (a, b) in enumerate(zip(starts, starts[1:], strict=False))
        ]
    )
    out = paged_prefill_attention(
        q, k, v, tables, seq_lens, torch.tensor(starts, device="cuda"), 300, head_dim**-0.5
    )
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("max_num_tokens", [2048, 7], ids=["whole-prompts", "chunks-of-7"])
def test_engine_with_the_prefill_kernel_equals_transformers(
    checkpoint_root, monkeypatch, max_num_tokens
):
    monkeypatch.setenv("WORKBENCH_TRITON_PREFILL", "1")
    path = cached_tiny_checkpoint(checkpoint_root, "llama3")  # head_dim 16 fits the kernel
    prompts = random_prompts([5, 17, 33, 2, 40], seed=41)
    llm = LLM(
        str(path), dtype="float32", block_size=16, max_num_tokens=max_num_tokens, max_num_seqs=8
    )
    assert llm.engine.runner.backend.prefill_kernel
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    outs = llm.generate(prompts, params)
    assert [o.token_ids for o in outs] == [hf_greedy(path, p, 12) for p in prompts]
    again = llm.generate(prompts, params)  # now over cached prefixes
    assert [o.token_ids for o in again] == [o.token_ids for o in outs]
    assert_pool_whole(llm)
