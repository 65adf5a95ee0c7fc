"""The fused Triton kernels (engine/kernels/) against the torch code they replace, which stays the
reference: RMSNorm and residual add + RMSNorm, rotary embedding in place, SiLU-and-mul.

CPU: the kernels run under the Triton interpreter. TRITON_INTERPRET=1 must be set before
`triton.jit` wraps them and must not leak into other tests, so one subprocess (this file run as a
script) checks every case and reports; each case is then one test here. Skipped when the
interpreter cannot run a probe kernel (no triton).
GPU (`-m gpu`): the same checks compiled on CUDA, the 8B shapes, CUDA-graph replay, and the engine
with the kernels against the engine with the torch ops (WORKBENCH_FUSED_KERNELS=0).

Tolerances against the torch path, per output element (`TOLERANCES`):
- the new residual of the fused add: bit-identical (the add rounds to the dtype once, as torch's);
- rotary: bit-identical on CUDA (same cos/sin values, same roundings, no FMA contraction);
- RMSNorm: only the order of the float32 sum of squares differs, so the normalized row can land
  one ulp off, and the weight product then up to two: rtol 2^-6 in bfloat16, 2^-9 in float16,
  1e-5 (atol 1e-6) in float32;
- SiLU-and-mul: the same tolerance (on CUDA libdevice expf and IEEE division, the functions torch's
  kernel calls, so expected bit-identical).
Under the interpreter the bfloat16 and float16 results are in fact bit-identical in every case.
Engine level (tiny models, |logits| < 16): float32 logits within 1e-4 and greedy tokens equal;
bfloat16 logits within 0.125 (two bf16 ulps of a logit in [8, 16)) with the same argmax, and
greedy tokens as the CUDA-graphs test counts them (every first token equal, >= 90% of positions).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

TOLERANCES = {  # (rtol, atol) of RMSNorm and SiLU-and-mul outputs: two ulps in 16 bits
    torch.bfloat16: (2**-6, 1e-5),
    torch.float16: (2**-9, 1e-5),
    torch.float32: (1e-5, 1e-6),
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
EPS = 1e-6

# Small shapes for the interpreter: odd sizes, non-power-of-two head dims, strided q/k views.
NORM_SHAPES = [(3, 64), (2, 100), (1, 4096)]  # (tokens, hidden)
HEAD_NORM_SHAPES = [(3, 4, 2, 48), (2, 2, 1, 128)]  # (tokens, q heads, kv heads, head_dim)
ROTARY_SHAPES = [  # (tokens, q heads, kv heads, head_dim, rope)
    (3, 4, 2, 16, "llama3"),
    (2, 32, 8, 128, "llama3"),
    (3, 6, 2, 80, "default"),
    (1, 4, 4, 64, "default"),
]
SILU_SHAPES = [(3, 64), (2, 70), (1, 1500)]  # (tokens, intermediate)
# The Llama-3.1-8B shapes, GPU only.
BIG_NORM_SHAPES = [(1, 4096), (64, 4096), (512, 4096)]
BIG_ROTARY_SHAPES = [
    (1, 32, 8, 128, "llama3"),
    (64, 32, 8, 128, "llama3"),
    (512, 32, 8, 128, "llama3"),
]
BIG_SILU_SHAPES = [(1, 14336), (64, 14336), (512, 14336)]


def _randn(shape, dtype, device, gen, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(shape, generator=gen) * scale).to(device=device, dtype=dtype)


def _close(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    rtol, atol = TOLERANCES[want.dtype]
    assert got.dtype == want.dtype and got.shape == want.shape, what
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


def _equal(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    differ = int((got != want).sum())
    assert differ == 0, (
        f"{what}: {differ} of {want.numel()} elements differ, max "
        f"{(got.float() - want.float()).abs().max().item():.3g}"
    )


def _norm(n: int, dtype, device, gen):
    from engine.model.llama import RMSNorm

    norm = RMSNorm(n, EPS).to(device)
    norm.weight.data = (torch.rand(n, generator=gen) + 0.5).to(device=device, dtype=dtype)
    return norm  # norm.fused is False: the torch path


def check_rms_norm(device: str, dtype, tokens: int, hidden: int) -> None:
    from engine import kernels

    gen = torch.Generator().manual_seed(tokens * 1000 + hidden)
    norm = _norm(hidden, dtype, device, gen)
    x = _randn((tokens, hidden), dtype, device, gen, 3.0)
    _close(kernels.rms_norm(x, norm.weight, EPS), norm(x), "rms_norm")


def check_fused_add_rms_norm(device: str, dtype, tokens: int, hidden: int) -> None:
    from engine import kernels

    gen = torch.Generator().manual_seed(tokens * 1000 + hidden + 1)
    norm = _norm(hidden, dtype, device, gen)
    x = _randn((tokens, hidden), dtype, device, gen, 2.0)
    residual = _randn((tokens, hidden), dtype, device, gen, 5.0)
    want, want_residual = norm(x, residual)
    got, got_residual = kernels.fused_add_rms_norm(x.clone(), residual.clone(), norm.weight, EPS)
    _equal(got_residual, want_residual, "fused_add_rms_norm residual")
    _close(got, want, "fused_add_rms_norm")


def check_head_rms_norm(device: str, dtype, tokens: int, heads: int, kv_heads: int, dim: int):
    """Qwen3's q/k norm: a [tokens, heads, head_dim] view into the fused qkv output."""
    from engine import kernels

    gen = torch.Generator().manual_seed(tokens * 1000 + heads * 10 + dim)
    norm = _norm(dim, dtype, device, gen)
    qkv = _randn((tokens, (heads + 2 * kv_heads) * dim), dtype, device, gen, 2.0)
    q = qkv[:, : heads * dim].view(tokens, heads, dim)
    k = qkv[:, heads * dim : (heads + kv_heads) * dim].view(tokens, kv_heads, dim)
    _close(kernels.rms_norm(q, norm.weight, EPS), norm(q), "rms_norm of q heads")
    _close(kernels.rms_norm(k, norm.weight, EPS), norm(k), "rms_norm of k heads")


def _rope(rope: str, heads: int, kv_heads: int, dim: int, device: str):
    from tiny_checkpoints import tiny_config

    from engine.model.rope import RotaryEmbedding

    family = "llama3" if rope == "llama3" else "qwen2"  # llama3 scaling; default rope, theta 1e6
    config = tiny_config(
        family,
        hidden_size=heads * dim,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=dim,
    )
    with torch.device(device):
        return RotaryEmbedding(config, dim)


def check_rotary(device: str, dtype, tokens: int, heads: int, kv_heads: int, dim: int, rope: str):

    max_positions = 300
    gen = torch.Generator().manual_seed(tokens * 1000 + heads * 10 + dim)
    reference = _rope(rope, heads, kv_heads, dim, device)  # torch path: cos/sin per call
    fused = _rope(rope, heads, kv_heads, dim, device)
    fused.build_cache(max_positions)
    positions = torch.randint(0, max_positions, (tokens,), generator=gen).to(device)
    positions[0] = max_positions - 1
    qkv = _randn((tokens, (heads + 2 * kv_heads) * dim), dtype, device, gen, 2.0)
    q = qkv[:, : heads * dim].view(tokens, heads, dim)  # strided views, as in Attention
    k = qkv[:, heads * dim : (heads + kv_heads) * dim].view(tokens, kv_heads, dim)
    v_before = qkv[:, (heads + kv_heads) * dim :].clone()
    want_q, want_k = reference(positions, q.clone(), k.clone())
    got_q, got_k = fused(positions, q, k)
    assert got_q.data_ptr() == q.data_ptr() and got_k.data_ptr() == k.data_ptr(), "not in place"
    _equal(qkv[:, (heads + kv_heads) * dim :], v_before, "v (must be untouched)")
    if device == "cuda":  # same cos/sin and roundings as the torch path: bit-identical
        _equal(got_q, want_q, "rotary q")
        _equal(got_k, want_k, "rotary k")
    else:  # the CPU's cos/sin may differ by an ulp between the cache's and the per-call tensors
        _close(got_q, want_q, "rotary q")
        _close(got_k, want_k, "rotary k")


def check_silu_and_mul(device: str, dtype, tokens: int, intermediate: int) -> None:
    from engine import kernels

    gen = torch.Generator().manual_seed(tokens * 1000 + intermediate)
    gate_up = _randn((tokens, 2 * intermediate), dtype, device, gen, 4.0)
    gate, up = gate_up.split(intermediate, dim=-1)
    _close(kernels.silu_and_mul(gate_up), F.silu(gate) * up, "silu_and_mul")


def _engine_logits(llm, names: frozenset[str]) -> torch.Tensor:
    from engine.runner import SeqChunk

    llm.engine.model.enable_fused_kernels(names, max_positions=512)
    chunks = [
        SeqChunk([5, 17, 33, 2, 40], 0, [0, 1], 5),
        SeqChunk([100, 7, 250], 0, [2], 3),
    ]
    return llm.engine.runner.run(chunks, 0)  # [8, vocab] float32


def _check_engine(device: str, dtype_name: str, family: str) -> None:
    from tiny_checkpoints import make_tiny_checkpoint

    from engine import LLM
    from engine.kernels import KERNELS

    with tempfile.TemporaryDirectory() as tmp:
        path = make_tiny_checkpoint(family, Path(tmp) / family)
        llm = LLM(
            str(path),
            dtype=dtype_name,
            device=device,
            block_size=4,
            num_kv_blocks=16,
            enforce_eager=True,  # only the eager path runs here
        )
        want = _engine_logits(llm, frozenset())
        got = _engine_logits(llm, frozenset(KERNELS))
    tol = 1e-4 if dtype_name == "float32" else 0.125
    torch.testing.assert_close(got, want, rtol=0, atol=tol)
    assert torch.equal(got.argmax(-1), want.argmax(-1))


def cases(gpu: bool = False) -> dict[str, tuple]:
    """id -> (check function, args after device and dtype)."""
    out: dict[str, tuple] = {}
    norm_shapes = NORM_SHAPES + (BIG_NORM_SHAPES if gpu else [])
    rotary_shapes = ROTARY_SHAPES + (BIG_ROTARY_SHAPES if gpu else [])
    silu_shapes = SILU_SHAPES + (BIG_SILU_SHAPES if gpu else [])
    for name, dtype in DTYPES.items():
        for shape in norm_shapes:
            out[f"rms_norm-{name}-{shape}"] = (check_rms_norm, dtype, *shape)
            out[f"fused_add_rms_norm-{name}-{shape}"] = (check_fused_add_rms_norm, dtype, *shape)
        for shape in HEAD_NORM_SHAPES:
            out[f"head_rms_norm-{name}-{shape}"] = (check_head_rms_norm, dtype, *shape)
        for shape in rotary_shapes:
            out[f"rotary-{name}-{shape}"] = (check_rotary, dtype, *shape)
        for shape in silu_shapes:
            out[f"silu_and_mul-{name}-{shape}"] = (check_silu_and_mul, dtype, *shape)
    return {key.replace(" ", ""): value for key, value in out.items()}


ENGINE_CASES = {
    "engine-qwen3-bfloat16": ("bfloat16", "qwen3"),
    "engine-llama3-float32": ("float32", "llama3"),
}


# --- CPU: the Triton interpreter, in one subprocess -------------------------------------------


def _interpreter_main() -> None:
    """Run every CPU case under TRITON_INTERPRET=1; print one JSON object: id -> "ok" | error."""
    import traceback

    results: dict[str, str] = {}
    try:
        _probe()
    except Exception as exc:  # noqa: BLE001  (any failure here means no interpreter)
        print(json.dumps({"__skip__": f"the Triton interpreter cannot run: {exc!r}"}))
        return
    jobs = {key: (fn, ("cpu", *args)) for key, (fn, *args) in cases().items()}
    jobs |= {key: (_check_engine, ("cpu", *args)) for key, args in ENGINE_CASES.items()}
    for key, (fn, args) in jobs.items():
        try:
            fn(*args)
            results[key] = "ok"
        except Exception:  # noqa: BLE001
            results[key] = traceback.format_exc(limit=3)
    print(json.dumps(results))


def _probe() -> None:
    import triton
    import triton.language as tl

    @triton.jit
    def add_one(ptr, N: tl.constexpr):
        offs = tl.arange(0, N)
        tl.store(ptr + offs, tl.load(ptr + offs) + 1)

    x = torch.zeros(4)
    add_one[(1,)](x, N=4)
    assert x.tolist() == [1.0] * 4


@pytest.fixture(scope="module")
def interpreted() -> dict[str, str]:
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve())],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        pytest.fail(f"interpreter run failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    results = json.loads(lines[-1])
    if "__skip__" in results:
        pytest.skip(results["__skip__"])
    return results


@pytest.mark.parametrize("case", [*cases(), *ENGINE_CASES])
def test_kernel_under_interpreter(interpreted, case):
    result = interpreted.get(case, "not run")
    assert result == "ok", result


# --- GPU ------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", list(cases(gpu=True)))
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_kernel_on_gpu(case):
    fn, *args = cases(gpu=True)[case]
    fn("cuda", *args)


@pytest.mark.parametrize("case", list(ENGINE_CASES))
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_model_logits_on_gpu(case):
    _check_engine("cuda", *ENGINE_CASES[case])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_kernels_replay_in_cuda_graphs(dtype):
    """Captured once, replayed on new contents of the same static inputs: same as eager."""
    from engine import kernels

    gen = torch.Generator().manual_seed(0)
    tokens, hidden, heads, kv_heads, dim, inter = 8, 256, 4, 2, 64, 320
    norm = _norm(hidden, dtype, "cuda", gen)
    rope = _rope("llama3", heads, kv_heads, dim, "cuda")
    rope.build_cache(512)
    static = {
        "x": _randn((tokens, hidden), dtype, "cuda", gen),
        "res": _randn((tokens, hidden), dtype, "cuda", gen),
        "qkv": _randn((tokens, (heads + 2 * kv_heads) * dim), dtype, "cuda", gen),
        "pos": torch.randint(0, 512, (tokens,), generator=gen).cuda(),
        "gu": _randn((tokens, 2 * inter), dtype, "cuda", gen),
    }

    def step(t):
        normed, res = kernels.fused_add_rms_norm(t["x"], t["res"], norm.weight, EPS)
        plain = kernels.rms_norm(res, norm.weight, EPS)
        q = t["qkv"][:, : heads * dim].view(tokens, heads, dim)
        k = t["qkv"][:, heads * dim : (heads + kv_heads) * dim].view(tokens, kv_heads, dim)
        kernels.rotary_embedding(t["pos"], q, k, rope.cos_sin_cache)
        return normed, res, plain, t["qkv"], kernels.silu_and_mul(t["gu"])

    originals = {name: value.clone() for name, value in static.items()}
    step({name: value.clone() for name, value in static.items()})  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = step(static)
    for trial in range(3):
        fresh = {
            name: (value + trial + 1 if name != "pos" else (value * (trial + 3)) % 512)
            for name, value in originals.items()
        }
        for name, value in fresh.items():
            static[name].copy_(value)
        graph.replay()
        want = step({name: value.clone() for name, value in fresh.items()})
        for got, expected in zip(outs, want, strict=True):
            assert torch.equal(got, expected)


@pytest.fixture(scope="module")
def gpu_family_checkpoints(checkpoint_root):
    from tiny_checkpoints import cached_tiny_checkpoint

    return {f: cached_tiny_checkpoint(checkpoint_root, f) for f in ("llama3", "qwen3", "qwen2")}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("family", ["llama3", "qwen3", "qwen2"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_engine_with_kernels_matches_torch_ops(monkeypatch, gpu_family_checkpoints, family, dtype):
    """Greedy decoding (prefill eager, decode in CUDA graphs) with the kernels and without."""
    from conftest import random_prompts

    from engine import LLM, SamplingParams

    path = str(gpu_family_checkpoints[family])
    prompts = random_prompts([5, 17, 33, 2, 40, 9, 3, 21], seed=44)
    params = SamplingParams(max_tokens=16, ignore_eos=True)
    monkeypatch.setenv("WORKBENCH_FUSED_KERNELS", "0")
    plain = LLM(path, dtype=dtype, block_size=16, max_num_seqs=8)
    assert plain.engine.model.rotary.cos_sin_cache is None
    want = [o.token_ids for o in plain.generate(prompts, params)]
    del plain
    monkeypatch.setenv("WORKBENCH_FUSED_KERNELS", "1")
    fused = LLM(path, dtype=dtype, block_size=16, max_num_seqs=8)
    model = fused.engine.model
    assert model.rotary.cos_sin_cache is not None and model.model.norm.fused
    assert model.model.layers[0].mlp.fused
    got = [o.token_ids for o in fused.generate(prompts, params)]
    if dtype == "float32":
        assert got == want
    else:
        assert [g[0] for g in got] == [w[0] for w in want]
        same = sum(
            a == b for g, w in zip(got, want, strict=True) for a, b in zip(g, w, strict=True)
        )
        assert same >= 0.9 * sum(len(w) for w in want)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    _interpreter_main()
