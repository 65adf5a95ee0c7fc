"""Quantized KV cache (kv_cache_dtype fp8 | int8): pool capacity, round-trip error, the engine on
the bundled model against the unquantized cache, consistency within a quantized engine, checkpoint
scales (ModelOpt's format), the Triton kernel against the reference.

Tolerances, and why:
- fp8 (e4m3, per-layer scale) keeps 3 mantissa bits: a value is off by at most 2^-4 of itself
  (half a step), or half the smallest subnormal step (2^-10 * scale) near zero. int8 (per token
  and KV head) is off by at most half a step, amax / 254.
- Against the unquantized cache (bundled tiny, float32, the 8 story prompts, 32 greedy tokens):
  the first 8 tokens of every prompt equal and most positions equal (fp8 >= 60%, int8 >= 85%);
  teacher-forced perplexity within 1% (the issue's target for fp8 KV; measured fp8 +0.0%,
  int8 +0.0% on 8k held-out tokens).
- Within one quantized engine, runs that split the work differently (chunk sizes, block sizes,
  preemption, prefix-cache hits, speculative verification) compute K/V with matmuls of other
  shapes, whose float32 results differ in the last bits; now and then that moves a value across
  a rounding boundary of the 8-bit grid, a step far larger than float32 noise. So greedy outputs
  are compared up to the first near-tie of the reference (top-2 logprobs closer than 0.05),
  where either token is a right answer; and teacher-forced logprobs for different chunkings
  stay within 0.025 (mean 2.5e-3). Had prefill attended to its chunk's fresh, unquantized K/V
  instead of reading them back from the cache, they would differ by up to 0.25 (mean 0.035).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import BUNDLED, assert_pool_whole, random_prompts
from safetensors.torch import load_file, save_file

from engine import LLM, SamplingParams
from engine.attention.torch_ref import gather_kv, write_kv
from engine.config import EngineConfig
from engine.kv.cache import KVCache, KVLayout
from engine.model.loader import CheckpointError
from engine.perplexity import engine_perplexity, teacher_forced_logprobs
from engine.state import EngineState

ROOT = Path(__file__).resolve().parent.parent
STORIES = (ROOT / "docs" / "prompts" / "story_starts.txt").read_text().splitlines()
STORY_TEXT = " ".join(STORIES)
GREEDY = SamplingParams(max_tokens=24, ignore_eos=True, logprobs=2)
SHORT = SamplingParams(max_tokens=12, ignore_eos=True, logprobs=2)  # consistency runs
NEAR_TIE = 0.05


def assert_equal_until_near_tie(ref, got) -> None:
    """Greedy outputs equal up to the reference's first near-tie (top-2 logprob gap < NEAR_TIE),
    where rounding may pick either token."""
    assert got.token_ids
    for i, (step, token) in enumerate(zip(ref.logprobs, got.token_ids, strict=False)):
        assert token == step.token_id, (i, ref.token_ids, got.token_ids)
        (_, first), (_, second) = step.top[:2]
        if first - second < NEAR_TIE:
            return


@pytest.fixture(scope="module")
def story_runs() -> dict[str, list]:
    """The story prompts on the bundled model with each KV dtype (float32 compute)."""
    return {
        kv: LLM("tiny", kv_cache_dtype=kv).generate(STORIES, GREEDY)
        for kv in ("auto", "fp8", "int8")
    }


# --- capacity ---------------------------------------------------------------------------------


def test_blocks_for_a_byte_budget():
    # The bundled model's shape: 8 layers, 4 KV heads of 32, 16 tokens a page.
    shape = dict(num_layers=8, num_kv_heads=4, head_dim=32, block_size=16)
    budget = 2**22
    per_block = {
        (torch.bfloat16, "auto"): 65536,
        (torch.float32, "auto"): 131072,
        (torch.bfloat16, "fp8"): 32768,
        (torch.float32, "fp8"): 32768,
        # int8 adds a float32 scale per token and KV head: 32 + 4 bytes where bf16 takes 64.
        (torch.float32, "int8"): 2 * 8 * 16 * 4 * (32 + 4),
    }
    for (dtype, kv), nbytes in per_block.items():
        layout = KVLayout(**shape, dtype=dtype, kv_cache_dtype=kv)
        assert layout.bytes_per_block == nbytes
        assert layout.blocks_for_bytes(budget) == budget // nbytes
    assert budget // per_block[torch.bfloat16, "fp8"] == 2 * (budget // 65536)  # twice bf16
    assert budget // per_block[torch.float32, "fp8"] == 4 * (budget // 131072)  # 4x float32


@pytest.mark.parametrize(
    "dtype, kv, blocks",
    [
        ("bfloat16", "auto", 64),
        ("bfloat16", "fp8", 128),
        ("float32", "auto", 32),
        ("float32", "fp8", 128),
        ("float32", "int8", 113),
    ],
)
def test_engine_pool_for_a_byte_budget(dtype, kv, blocks):
    llm = LLM("tiny", dtype=dtype, kv_cache_dtype=kv, kv_cache_memory_bytes=2**22)
    state = llm.state()
    assert state.kv_blocks_total == blocks
    assert state.kv_cache_bytes <= 2**22
    stored = {"auto": getattr(torch, dtype), "fp8": torch.float8_e4m3fn, "int8": torch.int8}
    assert llm.engine.kv_cache.layers[0].k.dtype == stored[kv]


# --- round trip -------------------------------------------------------------------------------


def _round_trip(kv: str, x: torch.Tensor, fp8_scale: float = 1.0) -> torch.Tensor:
    """Write x [n, kv_heads, head_dim] into random slots of a one-layer cache, read it back."""
    n, heads, dim = x.shape
    layout = KVLayout(1, heads, dim, 4, torch.float32, kv)
    scales = [(fp8_scale, fp8_scale)] if kv == "fp8" else None
    cache = KVCache(
        layout, num_blocks=-(-n // 4) + 3, device=torch.device("cpu"), fp8_scales=scales
    )
    layer = cache.layers[0]
    slots = torch.randperm(cache.num_blocks * 4, generator=torch.Generator().manual_seed(0))[:n]
    write_kv(layer, x, -x, slots)
    tables = torch.arange(cache.num_blocks)[None, :]  # one sequence over every page
    keys, values = gather_kv(layer, tables, torch.float32)  # [1, num_blocks * 4, heads, dim]
    assert torch.equal(values[0, slots], -keys[0, slots])  # symmetric grids
    return keys[0, slots]


def _samples() -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(64, 4, 32, generator=gen) * torch.logspace(-3, 1, 64)[:, None, None]
    x[0] = 0.0  # an all-zero token must not divide by zero
    x[1, 0, 0] = 300.0  # an outlier in one head
    return x


def test_round_trip_auto_is_exact():
    x = _samples()
    assert torch.equal(_round_trip("auto", x), x)


@pytest.mark.parametrize("scale", [1.0, 0.02])
def test_round_trip_fp8_error_bound(scale):
    x = _samples().clamp(-400 * scale, 400 * scale)
    got = _round_trip("fp8", x, scale)
    bound = torch.maximum(x.abs() * 2**-4, torch.full_like(x, scale * 2**-10))
    assert torch.all((got - x).abs() <= bound)
    assert (got - x).abs().max() > 0  # it did quantize


def test_fp8_saturates_out_of_range_values():
    x = torch.tensor([[[1000.0, -1000.0, 3.0, float("1e6")]]])
    got = _round_trip("fp8", x, 0.5)
    assert got.tolist() == [[[224.0, -224.0, 3.0, 224.0]]]  # 448 * scale, never NaN


def test_round_trip_int8_error_bound():
    x = _samples()
    got = _round_trip("int8", x)
    step = x.abs().amax(-1, keepdim=True) / 127  # per token and KV head
    assert torch.all((got - x).abs() <= step / 2 * (1 + 1e-5) + 1e-30)
    assert torch.equal(got[0], torch.zeros_like(got[0]))
    # The outlier only coarsens its own head: the other heads of that token keep their grids.
    assert (got[1, 1:] - x[1, 1:]).abs().max() <= x[1, 1:].abs().max() / 254 * (1 + 1e-5)


# --- the engine against the unquantized cache -------------------------------------------------


@pytest.mark.parametrize("kv, min_equal", [("fp8", 0.6), ("int8", 0.85)])
def test_greedy_output_close_to_unquantized(story_runs, kv, min_equal):
    ref, got = story_runs["auto"], story_runs[kv]
    assert all(g.token_ids[:8] == r.token_ids[:8] for g, r in zip(got, ref, strict=True))
    pairs = [(g, r) for g, r in zip(got, ref, strict=True)]
    same = sum(a == b for g, r in pairs for a, b in zip(g.token_ids, r.token_ids, strict=True))
    assert same >= min_equal * sum(len(r.token_ids) for r in ref)


def test_perplexity_close_to_unquantized():
    """Teacher-forced through the engine, so every chunk reads K/V back from the quantized
    cache: within 1% of the unquantized cache (the issue's target for fp8 KV)."""
    ppl, logprobs = {}, {}
    for kv in ("auto", "fp8", "int8"):
        llm = LLM("tiny", kv_cache_dtype=kv)
        ids = llm.tokenizer.encode(STORY_TEXT, add_special_tokens=False)
        logprobs[kv] = teacher_forced_logprobs(llm, ids, chunk_size=16)  # [len(ids) - 1]
        ppl[kv] = float(torch.exp(-logprobs[kv].mean()))
        assert_pool_whole(llm)
    for kv, mean_bound in (("fp8", 0.06), ("int8", 0.01)):
        assert abs(ppl[kv] / ppl["auto"] - 1) < 0.01
        diff = (logprobs[kv] - logprobs["auto"]).abs()
        assert 0 < diff.mean() < mean_bound


# --- consistency within a quantized engine ------------------------------------------------------


@pytest.mark.parametrize("kv", ["fp8", "int8"])
def test_prefill_reads_new_tokens_back_from_the_cache(kv):
    llm = LLM("tiny", kv_cache_dtype=kv)
    ids = llm.tokenizer.encode(" ".join(STORIES[:5]), add_special_tokens=False)
    whole = teacher_forced_logprobs(llm, ids, chunk_size=len(ids))
    for chunk in (3, 7):
        diff = (teacher_forced_logprobs(llm, ids, chunk_size=chunk) - whole).abs()
        assert diff.max() < 0.025 and diff.mean() < 2.5e-3, (chunk, diff.max(), diff.mean())


@pytest.mark.parametrize("kv", ["fp8", "int8"])
def test_batching_choices_agree_within_a_quantized_engine(story_runs, kv):
    """Pages of 2 tokens, prompts in chunks of at most 7 tokens a step, a pool small enough to
    preempt, another batch: against the default engine's run of the story prompts."""
    llm = LLM("tiny", kv_cache_dtype=kv, block_size=2, max_num_tokens=7, num_kv_blocks=36)
    outs = llm.generate(STORIES[:4], SHORT)
    assert llm.engine.scheduler.num_preemptions > 0
    for ref, got in zip(story_runs[kv][:4], outs, strict=True):
        assert_equal_until_near_tie(ref, got)
    assert_pool_whole(llm)


def test_prefix_cache_hits_with_a_quantized_cache():
    base = STORIES[0] + " " + STORIES[1]
    prompts = [base + " " + tail for tail in ("Then", "The dog", "They were")]
    cold = LLM("tiny", kv_cache_dtype="int8", block_size=4, enable_prefix_caching=False)
    want = cold.generate(prompts, SHORT)
    llm = LLM("tiny", kv_cache_dtype="int8", block_size=4)
    llm.generate(prompts[:1], SHORT)
    outs = llm.generate(prompts, SHORT)
    assert all(o.metrics.num_cached_tokens >= 28 for o in outs)
    assert llm.engine.kv.prefix_hits > 0
    for ref, got in zip(want, outs, strict=True):
        assert_equal_until_near_tie(ref, got)
    assert_pool_whole(llm)


@pytest.mark.parametrize(
    "kv, spec",
    [
        ("fp8", {"method": "draft", "num_tokens": 3, "model": "tiny-draft"}),
        ("int8", {"method": "ngram", "num_tokens": 3}),
    ],
    ids=["fp8-draft", "int8-ngram"],
)
def test_speculative_decoding_with_a_quantized_cache(story_runs, kv, spec):
    llm = LLM("tiny", kv_cache_dtype=kv, speculative=spec)
    outs = llm.generate(STORIES[:4], SHORT)
    for ref, got in zip(story_runs[kv][:4], outs, strict=True):
        assert_equal_until_near_tie(ref, got)
    assert llm.state().spec_acceptance_rate > 0
    draft = llm.engine.speculator.draft
    if draft is not None:  # the draft's own pool is stored the same way
        assert draft.cache.layers[0].k.dtype == llm.engine.kv_cache.layers[0].k.dtype
        assert draft.kv.pool.num_free_blocks == draft.kv.pool.num_blocks
    assert_pool_whole(llm)


# --- configuration and reporting ----------------------------------------------------------------


def test_bad_kv_cache_dtype_is_a_clear_error():
    with pytest.raises(ValueError, match="kv_cache_dtype must be auto, fp8 or int8, got 'fp4'"):
        EngineConfig(kv_cache_dtype="fp4")
    from workbench.cli import UsageError, build_parser

    with pytest.raises(UsageError, match="--kv-cache-dtype"):
        build_parser().parse_args(["generate", "--prompt", "x", "--kv-cache-dtype", "float8"])


def test_cli_option_reaches_the_engine_config():
    from workbench.cli import build_parser, engine_config_from_args

    args = build_parser().parse_args(["generate", "--prompt", "x", "--kv-cache-dtype", "int8"])
    assert engine_config_from_args(args).kv_cache_dtype == "int8"
    args = build_parser().parse_args(["generate", "--prompt", "x"])
    assert engine_config_from_args(args).kv_cache_dtype == "auto"


def test_engine_state_reports_the_kv_dtype():
    for kv, name in (("auto", "float32"), ("fp8", "float8_e4m3fn"), ("int8", "int8")):
        state = LLM("tiny", kv_cache_dtype=kv, num_kv_blocks=8).state()
        assert state.kv_cache_dtype == name
        assert EngineState.from_dict(json.loads(json.dumps(state.to_dict()))) == state


# --- checkpoint scales ------------------------------------------------------------------------


def _modelopt_style_checkpoint(
    path: Path, scales: dict[str, float], hf_quant_kv: str | None = "FP8"
) -> Path:
    """The bundled model with KV scales and hf_quant_config.json as ModelOpt exports them."""
    shutil.copytree(BUNDLED, path)
    tensors = load_file(path / "model.safetensors")
    tensors.update({name: torch.tensor(value) for name, value in scales.items()})
    save_file(tensors, path / "model.safetensors")
    quant = {"quant_algo": None, "kv_cache_quant_algo": hf_quant_kv}
    (path / "hf_quant_config.json").write_text(json.dumps({"quantization": quant}))
    return path


def _scale_names(layer: int) -> tuple[str, str]:
    prefix = f"model.layers.{layer}.self_attn"
    return f"{prefix}.k_proj.k_scale", f"{prefix}.v_proj.v_scale"


def test_checkpoint_kv_scales_are_used(tmp_path):
    scales = {}
    for i in range(8):
        k_name, v_name = _scale_names(i)
        scales[k_name], scales[v_name] = 0.01 * (i + 1), 0.005 * (i + 1)
    path = _modelopt_style_checkpoint(tmp_path / "kv-fp8", scales)
    llm = LLM(str(path))  # auto follows the checkpoint's kv_cache_quant_algo
    assert llm.state().kv_cache_dtype == "float8_e4m3fn"
    assert llm.engine.kv_quant.scales_source == "checkpoint"
    for i, layer in enumerate(llm.engine.kv_cache.layers):
        assert float(layer.k_scale) == pytest.approx(0.01 * (i + 1))
        assert float(layer.v_scale) == pytest.approx(0.005 * (i + 1))
    llm.generate(STORIES[:2], GREEDY)
    # Stored as value / scale: layer 0's keys (|k| up to a few units) fill the fp8 range.
    assert llm.engine.kv_cache.layers[0].k.float().abs().max() > 100
    int8 = LLM(str(path), kv_cache_dtype="int8", num_kv_blocks=8)  # fp8 scales are not int8's
    assert int8.state().kv_cache_dtype == "int8"


def test_fp8_without_checkpoint_scales_uses_one():
    llm = LLM("tiny", kv_cache_dtype="fp8", num_kv_blocks=8)
    assert llm.engine.kv_quant.scales_source == "default 1.0"
    assert all(float(layer.k_scale) == 1.0 for layer in llm.engine.kv_cache.layers)


def test_broken_checkpoint_scales_are_clear_errors(tmp_path):
    k_name, v_name = _scale_names(0)
    partial = _modelopt_style_checkpoint(tmp_path / "partial", {k_name: 0.01, v_name: 0.01})
    with pytest.raises(CheckpointError, match="KV scales for some layers but not layer 1"):
        LLM(str(partial))
    scales = {name: 0.01 for i in range(8) for name in _scale_names(i)}
    scales[k_name] = 0.0
    zero = _modelopt_style_checkpoint(tmp_path / "zero", scales)
    with pytest.raises(CheckpointError, match="layer 0 k_scale is 0.0"):
        LLM(str(zero))
    empty = _modelopt_style_checkpoint(tmp_path / "empty", {})
    with pytest.raises(CheckpointError, match="says its KV cache is FP8 but holds no KV scales"):
        LLM(str(empty))


def test_modelopt_fp8_kv_export_is_served(tmp_path):
    """ModelOpt's own FP8 KV calibration and export of the bundled model (weights left as they
    are) load with their scales: amax of K (after RoPE) and of V over the calibration, / 448."""
    mtq = pytest.importorskip("modelopt.torch.quantization")
    from modelopt.torch.export import export_hf_checkpoint
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(BUNDLED, dtype=torch.float16)
    model.config.dtype = torch.float16  # a string here breaks ModelOpt's export (see issue 4)
    tokenizer = AutoTokenizer.from_pretrained(BUNDLED)
    config = {
        "quant_cfg": [{"quantizer_name": "*", "enable": False}] + mtq.FP8_KV_CFG["quant_cfg"],
        "algorithm": "max",
    }

    def calibrate(m) -> None:
        m(tokenizer(STORY_TEXT, return_tensors="pt").input_ids)

    mtq.quantize(model, config, forward_loop=calibrate)
    out = tmp_path / "tiny-kv-fp8"
    export_hf_checkpoint(model, export_dir=out, dtype=torch.float16)
    assert (
        json.loads((out / "hf_quant_config.json").read_text())["quantization"][
            "kv_cache_quant_algo"
        ]
        == "FP8"
    )
    exported = load_file(out / "model.safetensors")
    llm = LLM(str(out), tokenizer="tiny")
    assert llm.state().kv_cache_dtype == "float8_e4m3fn"
    for i, layer in enumerate(llm.engine.kv_cache.layers):
        k_name, v_name = _scale_names(i)
        assert float(layer.k_scale) == float(exported[k_name]) > 0
        assert float(layer.v_scale) == float(exported[v_name]) > 0
    ppl = engine_perplexity(llm, [STORY_TEXT], chunk_size=64).ppl
    ref = engine_perplexity(LLM("tiny"), [STORY_TEXT], chunk_size=64).ppl
    assert abs(ppl / ref - 1) < 0.01


# --- the Triton decode kernel -----------------------------------------------------------------

KERNEL_SCRIPT = textwrap.dedent(
    """
    import sys
    import torch
    from engine.attention.metadata import AttentionMetadata
    from engine.attention.torch_ref import TorchAttention, write_kv
    from engine.attention.triton_decode import paged_decode_attention
    from engine.kv.cache import KVCache, KVLayout

    device = sys.argv[1]
    gen = torch.Generator(device=device).manual_seed(0)
    worst = {}
    cases = [("fp8", torch.float32), ("int8", torch.float16)]  # the interpreter lacks bf16
    if device == "cuda":
        cases = [(kv, dt) for kv in ("fp8", "int8") for dt in (torch.float32, torch.bfloat16)]
    for kv, dtype in cases:
        heads, kv_heads, head_dim, bs, num_blocks = 8, 4, 32, 16, 12
        layout = KVLayout(1, kv_heads, head_dim, bs, dtype, kv)
        scales = [(0.03, 0.01)] if kv == "fp8" else None
        layer = KVCache(layout, num_blocks, torch.device(device), scales).layers[0]
        n = num_blocks * bs
        k = (torch.randn(n, kv_heads, head_dim, device=device, generator=gen) * 3).to(dtype)
        v = torch.randn(n, kv_heads, head_dim, device=device, generator=gen).to(dtype)
        write_kv(layer, k, v, torch.randperm(n, device=device, generator=gen))
        seq_lens = torch.tensor([1, 17, 70, 150], device=device)
        tables = torch.stack([torch.randperm(num_blocks, device=device, generator=gen)[:10]
                              for _ in range(4)])
        q = torch.randn(4, heads, head_dim, device=device, generator=gen).to(dtype)
        meta = AttentionMetadata(TorchAttention(), torch.empty(0, dtype=torch.int64), tables,
                                 seq_lens, list(range(5)), seq_lens.tolist(), 4, bs)
        ref = TorchAttention()._decode(q, layer, meta, head_dim**-0.5).float()
        for splits in (1, 3):
            out = paged_decode_attention(q, layer.k, layer.v, tables, seq_lens, head_dim**-0.5,
                                         num_splits=splits, k_scale=layer.k_scale,
                                         v_scale=layer.v_scale)
            err = (out.float() - ref).abs().max().item()
            worst[f"{kv}-{dtype}"] = max(worst.get(f"{kv}-{dtype}", 0.0), err)
    print(worst)
    """
)


def _kernel_errors(device: str, env: dict[str, str]) -> dict[str, float]:
    done = subprocess.run(
        [sys.executable, "-c", KERNEL_SCRIPT, device],
        env={**os.environ, "PYTHONPATH": str(ROOT), **env},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return eval(done.stdout.strip().splitlines()[-1])  # {case: max abs error}


def _assert_kernel_errors(worst: dict[str, float]) -> None:
    for case, err in worst.items():
        bound = {"float32": 1e-5, "float16": 5e-3, "bfloat16": 2e-2}[case.split("torch.")[1]]
        assert err < bound, (case, err)


def test_triton_kernel_reads_quantized_pages_like_the_reference_on_cpu():
    """Under Triton's interpreter (float16 stands in for bfloat16, which it lacks)."""
    pytest.importorskip("triton")
    _assert_kernel_errors(_kernel_errors("cpu", {"TRITON_INTERPRET": "1"}))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_triton_kernel_reads_quantized_pages_like_the_reference_on_gpu():
    _assert_kernel_errors(_kernel_errors("cuda", {}))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("kv", ["fp8", "int8"])
def test_quantized_cache_on_gpu_with_cuda_graphs(kv):
    """bfloat16, Triton decode in CUDA graphs against the torch reference run eagerly; both
    read the same quantized pages. Tolerance as for bfloat16 graphs against eager (test_gpu.py):
    every first token equal, 90% of tokens equal position by position."""
    prompts = STORIES + random_prompts([5, 40, 9], vocab=4096, seed=44)
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    eager = LLM(
        "tiny", dtype="bfloat16", kv_cache_dtype=kv, attention_backend="torch", enforce_eager=True
    )
    graphs = LLM("tiny", dtype="bfloat16", kv_cache_dtype=kv, max_num_seqs=16)
    assert graphs.engine.runner.graphs is not None
    assert graphs.engine.runner.backend.name == "triton"
    want = [o.token_ids for o in eager.generate(prompts, params)]
    got = [o.token_ids for o in graphs.generate(prompts, params)]
    assert [g[0] for g in got] == [w[0] for w in want]
    same = sum(a == b for g, w in zip(got, want, strict=True) for a, b in zip(g, w, strict=True))
    assert same >= 0.9 * sum(len(w) for w in want)
    auto = engine_perplexity(LLM("tiny", dtype="bfloat16"), [STORY_TEXT], chunk_size=16).ppl
    quantized = engine_perplexity(graphs, [STORY_TEXT], chunk_size=16).ppl
    assert abs(quantized / auto - 1) < 0.01
