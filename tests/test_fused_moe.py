"""The fused MoE (engine/model/fused_moe.py) against the torch reference: the expert alignment
and the tile table in-process, the Triton kernels under Triton's interpreter on the CPU
(TRITON_INTERPRET=1 must be set before triton compiles anything, so they run in a subprocess; the
interpreter has no bfloat16, float16 stands in), bf16/fp16/float32 and FP8 experts on the GPU."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

from engine.model.fused_moe import BLOCK_M, MoeTiles, align_by_expert, moe_tiles  # noqa: E402
from engine.model.moe import MoeSpec, Routing, moe_reference, route  # noqa: E402
from engine.model.moe_fp8 import Fp8Experts, moe_reference_fp8  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent

SCRIPT = textwrap.dedent(
    """
    import torch
    from engine.model.fused_moe import fused_moe
    from engine.model.moe import Routing, moe_reference

    gen = torch.Generator().manual_seed(0)
    worst = {}
    # (tokens, experts, top_k, hidden, inter, case): inter 48 leaves a masked N tile, hidden 80 a
    # masked K tile; "one" sends every token to expert 2 first and none to expert 1.
    cases = [(37, 8, 2, 64, 32, "random"), (5, 4, 3, 80, 48, "random"), (1, 8, 2, 64, 32, "random"),
             (23, 4, 2, 64, 48, "one")]
    for dtype in (torch.float32, torch.float16):
        for tokens, experts, top_k, hidden, inter, case in cases:
            x = torch.randn(tokens, hidden, generator=gen)
            gate_up = torch.randn(experts, 2 * inter, hidden, generator=gen) * 0.2
            down = torch.randn(experts, hidden, inter, generator=gen) * 0.2
            logits = torch.randn(tokens, experts, generator=gen)
            if case == "one":
                logits[:, 2], logits[:, 1] = 10.0, -10.0
            probs = torch.softmax(logits, -1)
            weights, ids = torch.topk(probs, top_k, -1)
            routing = Routing(weights, ids)
            ref = moe_reference(x, gate_up, down, routing)  # float32: the exact answer
            low = Routing(weights.to(dtype), ids)
            out = fused_moe(x.to(dtype), gate_up.to(dtype), down.to(dtype), low)
            assert out.dtype == dtype
            err = ((out.float() - ref).abs().max() / ref.abs().max()).item()
            worst[str(dtype)] = max(worst.get(str(dtype), 0.0), err)
    print(worst)
    """
)


FP8_SCRIPT = textwrap.dedent(
    """
    import torch
    from engine.model.fused_moe import MoeTiles, fused_moe
    from engine.model.moe import Routing
    from engine.model.moe_fp8 import Fp8Experts, moe_reference_fp8

    gen = torch.Generator().manual_seed(1)
    worst = {}
    # (tokens, experts, top_k, hidden, inter, case, tiles): masked N and K tiles as above; "one"
    # routes every token to expert 2 first and none to expert 1; "prefill" takes 64-row blocks.
    prefill = (MoeTiles(64, 32, 32), MoeTiles(64, 32, 16))
    cases = [(37, 8, 2, 64, 32, "random", None), (5, 4, 3, 80, 48, "random", None),
             (1, 8, 2, 64, 32, "random", None), (23, 4, 2, 64, 48, "one", None),
             (70, 4, 2, 64, 32, "random", prefill)]
    for dtype in (torch.float32, torch.float16):
        for tokens, experts, top_k, hidden, inter, case, tiles in cases:
            torch.set_default_dtype(dtype)
            fp8 = Fp8Experts(experts, hidden, inter)
            torch.set_default_dtype(torch.float32)
            # Each expert and projection its own weight scale; gate's and up's input scales differ.
            spread = torch.rand(experts, 1, 1, generator=gen) + 0.5
            gate_up = torch.randn(experts, 2 * inter, hidden, generator=gen) * 0.2 * spread
            down = torch.randn(experts, hidden, inter, generator=gen) * 0.2 * spread
            fp8.quantize_from(gate_up.to(dtype), down.to(dtype))
            fp8.gate_up_input_scale[:, 1] *= 1.5
            fp8.down_input_scale[::2] *= 0.5
            fp8.finish_loading()
            x = torch.randn(tokens, hidden, generator=gen).to(dtype)
            logits = torch.randn(tokens, experts, generator=gen)
            if case == "one":
                logits[:, 2], logits[:, 1] = 10.0, -10.0
            weights, ids = torch.topk(torch.softmax(logits, -1), top_k, -1)
            routing = Routing(weights.to(dtype), ids)
            ref = moe_reference_fp8(x, fp8, routing).float()
            scales = fp8.fp8_scales()
            out = fused_moe(x, fp8.gate_up, fp8.down, routing, fp8=scales, tiles=tiles)
            assert out.dtype == dtype
            err = ((out.float() - ref).abs().max() / ref.abs().max()).item()
            worst[str(dtype)] = max(worst.get(str(dtype), 0.0), err)
    print(worst)
    """
)


def _interpret(script: str) -> dict[str, float]:
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return eval(done.stdout.strip().splitlines()[-1])


def test_fused_moe_kernels_under_the_interpreter():
    worst = _interpret(SCRIPT)
    assert worst["torch.float32"] < 1e-5
    assert worst["torch.float16"] < 5e-3


def test_fp8_fused_moe_kernels_under_the_interpreter():
    """FP8 experts: e4m3 weights, a weight scale per expert and projection, activations
    quantized per expert with gate's, up's and down's own input scales, as the reference does.
    float32: the same e4m3 products and scales, float32 sums in another order."""
    worst = _interpret(FP8_SCRIPT)
    assert worst["torch.float32"] < 1e-5
    assert worst["torch.float16"] < 5e-3


def test_tiles_narrow_for_decode_and_widen_for_prefill():
    # Mixtral-8x7B batch-1 decode: 2 active experts; gate_up's 14336 columns, down's 4096.
    assert moe_tiles(2, 8, 14336, 4096, fp8=False) == MoeTiles(16, 32, 128)
    assert moe_tiles(2, 8, 4096, 14336, fp8=False) == MoeTiles(16, 16, 128)
    assert moe_tiles(2, 8, 4096, 14336, fp8=True).block_k == 256  # one-byte weights
    # Qwen3-30B-A3B at batch 64: 512 pairs over 128 experts of 768: enough programs at 128.
    assert moe_tiles(512, 128, 768, 2048, fp8=True) == MoeTiles(16, 128, 256)
    # Prefill: many rows per expert.
    assert moe_tiles(8192, 8, 14336, 4096, fp8=False) == MoeTiles(64, 128, 64, num_warps=8)
    assert moe_tiles(1, 4, 32, 48, fp8=False).block_k == 64  # never past the next power of two
    for pairs, experts in [(2, 8), (512, 128), (8192, 8), (300, 128)]:
        gate_up = moe_tiles(pairs, experts, 768, 2048, fp8=True)
        down = moe_tiles(pairs, experts, 2048, 768, fp8=True)
        assert gate_up.block_m == down.block_m  # one alignment feeds both kernels


def test_alignment_groups_pairs_by_expert_in_padded_blocks():
    ids = torch.tensor([[2, 0], [2, 3], [0, 2], [2, 0]])  # expert 1 gets no pair
    align = align_by_expert(ids, num_experts=4)
    pairs, experts = align.sorted_pairs.tolist(), align.block_experts.tolist()
    num_pairs = ids.numel()
    real = [p for p in pairs if p < num_pairs]
    assert sorted(real) == list(range(num_pairs))  # each pair once
    # Blocks in expert order; expert 1 has none; past the groups, blocks belong to no expert (4).
    assert experts[:3] == [0, 2, 3] and set(experts[3:]) <= {4}
    for block, expert in enumerate(experts[:3]):
        rows = pairs[block * BLOCK_M : (block + 1) * BLOCK_M]
        assert {ids.flatten()[p].item() for p in rows if p < num_pairs} == {expert}
    assert len(pairs) % BLOCK_M == 0 and len(pairs) >= num_pairs + 4 * (BLOCK_M - 1)


def test_alignment_sizes_follow_the_shapes_alone():
    """What a CUDA graph needs: the same sizes whatever the routing."""
    first = align_by_expert(torch.zeros(9, 2, dtype=torch.int64), num_experts=8)
    spread = align_by_expert(torch.arange(18).reshape(9, 2) % 8, num_experts=8)
    assert first.sorted_pairs.shape == spread.sorted_pairs.shape
    assert first.block_experts.shape == spread.block_experts.shape


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_fused_moe_on_the_gpu(dtype):
    from engine.model.fused_moe import fused_moe

    gen = torch.Generator(device="cuda").manual_seed(0)
    spec = MoeSpec(8, 2, 256, True, True, 0, 1, frozenset())
    for tokens in (1, 7, 300):
        x = torch.randn(tokens, 512, device="cuda", generator=gen)
        gate_up = torch.randn(8, 512, 512, device="cuda", generator=gen) * 0.05
        down = torch.randn(8, 512, 256, device="cuda", generator=gen) * 0.05
        routing = route(torch.randn(tokens, 8, device="cuda", generator=gen), spec)
        ref = moe_reference(x, gate_up, down, routing)
        low = Routing(routing.weights, routing.expert_ids)
        out = fused_moe(x.to(dtype), gate_up.to(dtype), down.to(dtype), low)
        err = ((out.float() - ref).abs().max() / ref.abs().max()).item()
        assert err < (1e-5 if dtype == torch.float32 else 2e-2), (tokens, err)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tokens", [1, 7, 64, 300])
@pytest.mark.parametrize("fp8_dot", ["1", "0"])
def test_fp8_fused_moe_on_the_gpu(dtype, tokens, fp8_dot, monkeypatch):
    """FP8 tensor cores (sm89+; WORKBENCH_MOE_FP8_DOT=0: operands widened to float16), against
    the torch reference of the same e4m3 operands and scales: within the dtype's rounding (the
    intermediate is rounded to it)."""
    from engine.model.fused_moe import FP8_DOT_ENV_VAR, fused_moe

    monkeypatch.setenv(FP8_DOT_ENV_VAR, fp8_dot)

    gen = torch.Generator(device="cuda").manual_seed(tokens)
    with torch.device("cuda"):
        torch.set_default_dtype(dtype)
        try:
            fp8 = Fp8Experts(8, 512, 256)
        finally:
            torch.set_default_dtype(torch.float32)
        gate_up = torch.randn(8, 512, 512, device="cuda", generator=gen) * 0.05
        down = torch.randn(8, 512, 256, device="cuda", generator=gen) * 0.05
        fp8.quantize_from(gate_up.to(dtype), down.to(dtype))
    spec = MoeSpec(8, 2, 256, True, False, 0, 1, frozenset())
    x = torch.randn(tokens, 512, device="cuda", generator=gen).to(dtype)
    routing = route(torch.randn(tokens, 8, device="cuda", generator=gen).to(dtype), spec)
    ref = moe_reference_fp8(x, fp8, routing).float()
    out = fused_moe(x, fp8.gate_up, fp8.down, routing, fp8=fp8.fp8_scales())
    err = ((out.float() - ref).abs().max() / ref.abs().max()).item()
    assert err < 2e-2, (tokens, err)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("preset", ["mixtral-8x7b", "qwen3-30b-a3b"])
def test_fp8_dummy_presets_load_and_decode_on_the_gpu(preset):
    """The shapes the lead measures: fp8 experts at real shape, CUDA graphs on."""
    from engine import LLM, SamplingParams

    llm = LLM(preset, load_format="dummy", quantization="fp8", max_num_seqs=8, max_model_len=512)
    model = llm.engine.model
    assert any(isinstance(m, Fp8Experts) for m in model.modules())
    outs = llm.generate([[1, 2, 3], [4, 5]], SamplingParams(max_tokens=4, ignore_eos=True))
    assert [len(o.token_ids) for o in outs] == [4, 4]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fused_moe_replays_in_a_cuda_graph():
    from engine.model.fused_moe import fused_moe

    spec = MoeSpec(8, 2, 128, True, False, 0, 1, frozenset())
    x = torch.randn(16, 256, device="cuda", dtype=torch.bfloat16)
    gate_up = torch.randn(8, 256, 256, device="cuda", dtype=torch.bfloat16) * 0.05
    down = torch.randn(8, 256, 128, device="cuda", dtype=torch.bfloat16) * 0.05
    logits = torch.randn(16, 8, device="cuda", dtype=torch.bfloat16)
    fused_moe(x, gate_up, down, route(logits, spec))  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fused_moe(x, gate_up, down, route(logits, spec))
    for seed in range(3):  # new inputs, new routing: the same graph
        torch.manual_seed(seed)
        x.copy_(torch.randn_like(x))
        logits.copy_(torch.randn_like(logits))
        graph.replay()
        want = fused_moe(x, gate_up, down, route(logits, spec))
        assert torch.equal(out, want)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "qwen3_moe"])
def test_float32_moe_engine_on_gpu_matches_transformers(family, checkpoint_root):
    """The fused kernel inside the engine, CUDA graphs on, against the CPU oracle."""
    from conftest import hf_greedy, random_prompts
    from tiny_checkpoints import cached_tiny_checkpoint

    from engine import LLM, SamplingParams

    path = cached_tiny_checkpoint(checkpoint_root, family)
    prompts = random_prompts([5, 17, 33, 2, 40, 9], seed=41)
    llm = LLM(str(path), dtype="float32", block_size=16, max_num_seqs=8)
    assert llm.engine.runner.graphs is not None
    outs = llm.generate(prompts, SamplingParams(max_tokens=12, ignore_eos=True))
    assert [o.token_ids for o in outs] == [hf_greedy(path, p, 12) for p in prompts]
