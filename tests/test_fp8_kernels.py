"""The fp8 activation kernels (engine/quant/triton_fp8.py, and RMSNorm / SiLU-and-mul writing e4m3)
against the torch arithmetic they replace (`quantize_fp8`, the emulated `fp8_matmul`).

CPU: under the Triton interpreter, in a subprocess (TRITON_INTERPRET=1 must be set before triton
compiles). The interpreter's float8 cast neither rounds ties to even nor keeps subnormals, so
there the quantized values are held to one e4m3 step of torch's, and the GEMV is checked exactly
where its inputs are already e4m3 (products exact in float32: only the summation order differs).
GPU (`-m gpu`): quantization bit for bit, the GEMV at the 8B shapes within float32 summation
order of the emulated matmul, and the fp8 engine with the fused kernels and the GEMV against the
engine without them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

FP8 = torch.float8_e4m3fn


def _interpreter_equal(got: torch.Tensor, want: torch.Tensor) -> bool:
    """e4m3 values equal to torch's, but for the interpreter's cast: where rounding up carries
    into the next power of two it drops the carry (124 -> 64 instead of 128), and it may round
    a tie the other way (one e4m3 step)."""
    got, want = got.float(), want.float()
    mantissa, _ = torch.frexp(want.abs())
    dropped_carry = (mantissa == 0.5) & (got.abs() * 2 == want.abs())
    step = torch.exp2(torch.floor(torch.log2(want.abs().clamp_min(2.0**-6))) - 3)
    return bool(((got - want).abs().le(step) | dropped_carry).all())


def check_quantize(device: str) -> None:
    from engine.quant.fp8 import quantize_fp8
    from engine.quant.triton_fp8 import quantize_fp8_static

    gen = torch.Generator().manual_seed(0)
    for dtype in (torch.float16, torch.float32) if device == "cpu" else (torch.bfloat16,):
        x = (torch.randn(5, 3000, generator=gen) * 4).to(dtype).to(device)
        x[0, :3] = torch.tensor([1e4, -1e4, 0.0])  # saturates at +-448
        inv = torch.tensor(448.0 / 10.0, device=device)
        got = quantize_fp8_static(x, inv)
        want = quantize_fp8(x, inv)
        if device == "cpu":
            assert _interpreter_equal(got, want)
        else:
            assert torch.equal(got.float(), want.float())


def check_gemv(device: str) -> None:
    from engine.quant.fp8 import fp8_matmul, quantize_fp8
    from engine.quant.triton_fp8 import fp8_gemv

    gen = torch.Generator().manual_seed(1)
    shapes = [(1, 96, 40), (3, 700, 33)] if device == "cpu" else [(1, 4096, 6144), (4, 14336, 4096)]
    for m, k, n in shapes:
        x = torch.randn(m, k, generator=gen).to(device)
        w = (torch.randn(n, k, generator=gen) * 0.05).to(device)
        w_scale = w.abs().amax(1) / 448  # per row
        w_q = quantize_fp8(w, (1 / w_scale)[:, None])
        x_scale = torch.tensor(6.0 / 448, device=device)
        inv = 1 / x_scale
        bias = torch.randn(n, generator=gen).to(device)
        x_q = quantize_fp8(x, inv)
        want = fp8_matmul(x_q, x_scale, w_q, w_scale, None, torch.float32, "emulate")
        # Already-quantized input: exact products, float32 sums in another order.
        got = fp8_gemv(x_q, inv, x_scale, w_q, w_scale, None, torch.float32)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
        got = fp8_gemv(x_q, inv, x_scale, w_q, w_scale, bias, torch.float32)
        torch.testing.assert_close(got, want + bias, rtol=1e-5, atol=1e-4)
        # Quantized inside the kernel.
        got = fp8_gemv(x, inv, x_scale, w_q, w_scale, None, torch.float32)
        if device == "cpu":  # the interpreter's e4m3 cast rounds differently: a loose bound
            scale = (x.abs().max() * w.abs().max() * k**0.5).item()
            assert (got - want).abs().max().item() < 0.1 * scale
        else:
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


def check_fused_producers(device: str) -> None:
    """RMSNorm, add + RMSNorm and SiLU-and-mul writing e4m3 = quantize_fp8 of their output."""
    from engine import kernels
    from engine.quant.fp8 import quantize_fp8

    gen = torch.Generator().manual_seed(2)
    dtype = torch.float16 if device == "cpu" else torch.bfloat16
    inv = torch.tensor(448.0 / 3.0, device=device)
    x = torch.randn(3, 200, generator=gen).to(dtype).to(device)
    res = torch.randn(3, 200, generator=gen).to(dtype).to(device)
    w = torch.randn(200, generator=gen).to(dtype).to(device)
    pairs = []
    plain = kernels.rms_norm(x, w, 1e-6)
    pairs.append((kernels.rms_norm(x, w, 1e-6, inv), quantize_fp8(plain, inv)))
    normed, new_res = kernels.fused_add_rms_norm(x.clone(), res.clone(), w, 1e-6)
    q, q_res = kernels.fused_add_rms_norm(x.clone(), res.clone(), w, 1e-6, inv)
    assert torch.equal(q_res, new_res)
    pairs.append((q, quantize_fp8(normed, inv)))
    gate_up = torch.randn(3, 2 * 150, generator=gen).to(dtype).to(device)
    plain = kernels.silu_and_mul(gate_up)
    pairs.append((kernels.silu_and_mul(gate_up, inv), quantize_fp8(plain, inv)))
    for got, want in pairs:
        assert got.dtype == FP8
        if device == "cpu":
            assert _interpreter_equal(got, want)
        else:
            assert torch.equal(got.float(), want.float())


CHECKS = {"quantize": check_quantize, "gemv": check_gemv, "fused_producers": check_fused_producers}


@pytest.fixture(scope="module")
def interpreted() -> dict[str, str]:
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve())],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=Path(__file__).resolve().parent.parent,
    )
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        pytest.fail(f"interpreter run failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1])


@pytest.mark.parametrize("name", list(CHECKS))
def test_fp8_kernel_under_the_interpreter(interpreted, name):
    assert interpreted[name] == "ok", interpreted[name]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", list(CHECKS))
def test_fp8_kernel_on_gpu(name):
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("e4m3 needs compute capability 8.9")
    CHECKS[name]("cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fp8_engine_with_fused_quantization_and_gemv_matches_the_unfused_engine(monkeypatch):
    """Dummy fp8 weights at a small Llama shape, bf16: the engine with the fused quantizing
    kernels and the GEMV against the engine with plain torch ops and cuBLASLt only; batch 1
    decodes take the GEMV, the prompt's prefill the fused producers."""
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("e4m3 needs compute capability 8.9")
    from engine import LLM, SamplingParams

    # Random weights make near-ties everywhere, so tokens are compared only where both engines
    # are sure: the first token, and the log-probability each gives the other's top tokens.
    prompts = [[1, 5, 9], [1, 5, 9, 200, 31, 7, 99, 4000] * 3]  # 3 rows: GEMV; 24: cuBLASLt
    params = SamplingParams(max_tokens=1, logprobs=5)
    outs = {}
    for label, fused, gemv in (("plain", "0", "0"), ("fast", "1", "1")):
        monkeypatch.setenv("WORKBENCH_FUSED_KERNELS", fused)
        monkeypatch.setenv("WORKBENCH_FP8_GEMV", gemv)
        llm = LLM(
            "llama-3.2-1b",
            load_format="dummy",
            quantization="fp8",
            dtype="bfloat16",
            max_model_len=256,
            num_kv_blocks=64,
        )
        outs[label] = [dict(o.logprobs[0].top) for o in llm.generate(prompts, params)]
        del llm
        torch.cuda.empty_cache()
    for plain, fast in zip(outs["plain"], outs["fast"], strict=True):
        shared = plain.keys() & fast.keys()
        assert len(shared) >= 3
        assert max(abs(plain[t] - fast[t]) for t in shared) < 0.05


if __name__ == "__main__":
    import traceback

    results = {}
    for name, check in CHECKS.items():
        try:
            check("cpu")
            results[name] = "ok"
        except Exception:  # noqa: BLE001
            results[name] = traceback.format_exc(limit=4)
    print(json.dumps(results))
