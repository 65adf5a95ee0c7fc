"""Quantized linear layers (engine/quant/) against references computed here from the float
weight, without the layers' own storage or kernels:

- FP8: x -> e4m3(x * 448 / amax_x) * amax_x / 448, W -> its e4m3 values times their scales,
  F.linear in float32 (ModelOpt's fake quantization); per-token: amax per row;
- INT8 SmoothQuant: x * smoothing, int8 round-half-even clamp [-128, 127], the same F.linear;
- INT4 AWQ: q = round(W / s) clamp [-8, 7] with s = group amax / 7, F.linear with q * s;
- W4A8 AWQ: e4m3(q * s / s2) * s2 with s2 = shard amax / 448, fp8 activations.
Tolerances: float32 rtol 1e-5 (the same products summed in another order); bfloat16/float16
outputs within two ulps of the dtype (the layer rounds once, at its output).

Each compute path is checked on the CPU: the FP8 `_scaled_mm` calls through torch's CPU
implementation, `_int_mm` with the CUDA padding, and the Triton int4 kernel under
TRITON_INTERPRET=1 in a subprocess (this file run as a script; the interpreter's bfloat16 tl.dot
is broken in Triton 3.9, so bfloat16 is left to the GPU). `-m gpu` runs the compiled paths on
CUDA at Llama-3.1-8B shapes against the CPU-style fallbacks, and the engine on dummy quantized
8B weights.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from engine.quant import make_linear
from engine.quant.checkpoint import QuantConfig, QuantConfigError
from engine.quant.int4 import pack_int4, unpack_int4
from engine.quant.linear import QuantLinear

ALGOS = ("FP8", "FP8_PER_CHANNEL_PER_TOKEN", "W8A8_SQ_PER_CHANNEL", "W4A16_AWQ", "W4A8_AWQ")
GROUP = 64
SHARDS = [96, 32, 32]  # a fused q/k/v of different sizes
IN_FEATURES = 256
ULPS = {torch.float32: 1e-5, torch.bfloat16: 2**-7, torch.float16: 2**-10}  # rtol


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _names(n: int) -> list[str]:
    return [f"model.layers.0.self_attn.{p}_proj" for p in "qkv"[:n]] if n > 1 else ["m.o_proj"]


def make_layer(
    algo: str,
    shards: list[int] = SHARDS,
    in_features: int = IN_FEATURES,
    dtype: torch.dtype = torch.float32,
    bias: bool = False,
    seed: int = 0,
    device: str = "cpu",
) -> tuple[QuantLinear, torch.Tensor]:
    """A layer quantized from a random float weight (shards of different magnitudes, so their
    per-tensor scales differ) -> (layer, the float weight [out, in])."""
    generator = torch.Generator().manual_seed(seed)
    parts = [
        torch.randn(s, in_features, generator=generator) * (0.02 * (i + 1))
        for i, s in enumerate(shards)
    ]
    weight = torch.cat(parts).to(device)
    quant = QuantConfig(algo, group_size=GROUP if "AWQ" in algo else None)
    with default_dtype(dtype), torch.device(device):
        layer = make_linear(in_features, shards, bias, quant, _names(len(shards)))
    if bias:
        layer.bias.data.copy_(torch.randn(sum(shards), generator=generator) * 0.1)
    layer.quantize_from(weight.to(dtype))
    return layer, weight.to(dtype).float()


def _fp8(x: torch.Tensor) -> torch.Tensor:
    return x.clamp(-448, 448).to(torch.float8_e4m3fn).float()


def reference(layer: QuantLinear, weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """ModelOpt's fake-quantized arithmetic for `layer`'s recipe, from the float weight; the
    activation scales are the layer's (|x| <= 8 for dummy weights)."""
    algo = layer.quant.algo
    x32 = x.float()
    rows = [weight[s : s + n] for s, n in zip(layer.shard_starts, layer.shard_sizes, strict=True)]
    if algo in ("FP8", "FP8_PER_CHANNEL_PER_TOKEN"):
        if algo == "FP8":
            amax_x = layer.input_scale.float() * 448
            xq = _fp8(x32 * (448 / amax_x)) * (1 / (448 / amax_x))
            w = torch.cat([_fp8(r / (r.abs().amax() / 448)) * (r.abs().amax() / 448) for r in rows])
        else:
            amax_x = x32.abs().amax(-1, keepdim=True)
            xq = _fp8(x32 * (448 / amax_x)) * (1 / (448 / amax_x))
            s = weight.abs().amax(1, keepdim=True) / 448
            w = _fp8(weight / s) * s
        out = F.linear(xq, w)
    elif algo == "W8A8_SQ_PER_CHANNEL":
        amax_x = layer.input_scale.float() * 127
        xs = x32 if layer.pre_quant_scale is None else (x * layer.pre_quant_scale).float()
        xq = (xs * (127 / amax_x)).round().clamp(-128, 127) * (1 / (127 / amax_x))
        s = weight.abs().amax(1, keepdim=True) / 127
        out = F.linear(xq, (weight / s).round().clamp(-128, 127) * s)
    else:
        g = weight.view(weight.shape[0], -1, GROUP)
        s = g.abs().amax(-1, keepdim=True) / 7
        w = ((g / s).round().clamp(-8, 7) * s).view_as(weight)  # int4 * group scale
        if algo == "W4A16_AWQ":
            return F.linear(x32, w)
        s2 = [
            w[st : st + n].abs().amax() / 448
            for st, n in zip(layer.shard_starts, layer.shard_sizes, strict=True)
        ]
        w = torch.cat(
            [
                _fp8(w[st : st + n] / t) * t
                for (st, n), t in zip(
                    zip(layer.shard_starts, layer.shard_sizes, strict=True), s2, strict=True
                )
            ]
        )
        amax_x = layer.input_scale.float() * 448
        xq = _fp8(x32 * (448 / amax_x)) * (1 / (448 / amax_x))
        out = F.linear(xq, w)
    return out


def _close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, what: str = "") -> None:
    scale = want.abs().max().item()
    rtol = ULPS[dtype]
    torch.testing.assert_close(
        got.float(), want.float(), rtol=rtol, atol=rtol * scale, msg=lambda m: f"{what}: {m}"
    )


# -- int4 packing ----------------------------------------------------------------------------


def test_int4_pack_round_trip_is_exact() -> None:
    values = torch.arange(-8, 8, dtype=torch.int8)
    pairs = torch.stack(torch.meshgrid(values, values, indexing="ij")).reshape(2, -1).t()
    packed = pack_int4(pairs)  # [256, 1]: every (even column, odd column) pair once
    assert packed.dtype == torch.uint8 and packed.shape == (256, 1)
    assert sorted(packed[:, 0].tolist()) == list(range(256))  # a bijection onto the bytes
    low, high = pairs[:, 0], pairs[:, 1]
    assert torch.equal(
        packed[:, 0], (low & 0xF).to(torch.uint8) | ((high & 0xF) << 4).to(torch.uint8)
    )
    assert torch.equal(unpack_int4(packed), pairs)
    generator = torch.Generator().manual_seed(1)
    q = torch.randint(-8, 8, (40, 96), generator=generator, dtype=torch.int8)
    assert torch.equal(unpack_int4(pack_int4(q)), q)
    with pytest.raises(ValueError, match="even number of columns"):
        pack_int4(q[:, :5])


# -- each scheme against its reference -------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("algo", ALGOS)
def test_layer_matches_fake_quant_reference(algo: str, dtype: torch.dtype) -> None:
    layer, weight = make_layer(algo, dtype=dtype, bias=True)
    generator = torch.Generator().manual_seed(2)
    for tokens in (1, 7):
        x = (torch.randn(tokens, IN_FEATURES, generator=generator) * 2).to(dtype)
        with torch.no_grad():
            got = layer(x)
        assert got.dtype == dtype and got.shape == (tokens, sum(SHARDS))
        want = reference(layer, weight, x) + layer.bias.float()
        _close(got, want.to(dtype), dtype, f"{algo} {tokens} tokens")


def test_saturating_activations_stay_finite() -> None:
    """Static scales meet activations beyond the calibrated range: e4m3 and int8 saturate."""
    for algo in ("FP8", "W8A8_SQ_PER_CHANNEL", "W4A8_AWQ"):
        layer, weight = make_layer(algo)
        x = torch.full((2, IN_FEATURES), 1e4)
        with torch.no_grad():
            got = layer(x)
        assert torch.isfinite(got).all(), algo
        _close(got, reference(layer, weight, x), torch.float32, algo)


def test_fused_shards_with_different_scales_load_exactly() -> None:
    """Separately quantized q/k/v, each with its own per-tensor scale, load bit for bit into one
    fused layer (no shard is requantized) and compute what the three layers compute."""
    singles = [make_layer("FP8", [n], seed=i)[0] for i, n in enumerate(SHARDS)]
    scales = [s.weight_scale[0].item() for s in singles]
    assert len(set(scales)) == 3
    quant = QuantConfig("FP8")
    fused = make_linear(IN_FEATURES, SHARDS, False, quant, _names(3))
    for i, single in enumerate(singles):
        name = fused.names[i]
        fused.load("weight", i, single.weight.data, name + ".weight")
        fused.load("weight_scale", i, torch.tensor(scales[i]), name + ".weight_scale")
        fused.load("input_scale", i, single.input_scale.data.clone(), name + ".input_scale")
    assert fused.missing() == []
    fused.finish_loading()
    assert fused.weight_scale_scalar is None  # per-row scales
    for i, single in enumerate(singles):
        start, size = fused.rows(i)
        assert torch.equal(
            fused.weight[start : start + size].view(torch.uint8), single.weight.view(torch.uint8)
        )
        assert (fused.weight_scale[start : start + size] == scales[i]).all()
    x = torch.randn(5, IN_FEATURES)
    with torch.no_grad():
        want = torch.cat([s(x) for s in singles], dim=-1)
        got = fused(x)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


def test_w4a8_shards_keep_their_own_fp8_scale() -> None:
    layer, weight = make_layer("W4A8_AWQ")
    per_shard = [layer.weight_scale_2[s].item() for s in layer.shard_starts]
    assert len(set(per_shard)) == 3
    for start, size in zip(layer.shard_starts, layer.shard_sizes, strict=True):
        assert (layer.weight_scale_2[start : start + size] == layer.weight_scale_2[start]).all()


def test_shards_must_share_activation_scales() -> None:
    for algo, suffix in [("FP8", "input_scale"), ("W8A8_SQ_PER_CHANNEL", "pre_quant_scale")]:
        layer = make_linear(IN_FEATURES, SHARDS, False, QuantConfig(algo), _names(3))
        for i in range(3):
            value = (
                torch.full((IN_FEATURES,), 0.5)
                if suffix == "pre_quant_scale"
                else torch.tensor(0.01)
            )
            layer.load(suffix, i, value * (2 if i == 2 else 1), f"{layer.names[i]}.{suffix}")
        with pytest.raises(
            QuantConfigError, match=f"v_proj.{suffix} differs from .*q_proj.{suffix}"
        ):
            layer.shared_scalar(suffix)
    # A factor some shards have and others lack is reported missing.
    layer = make_linear(
        IN_FEATURES, SHARDS, False, QuantConfig("W4A16_AWQ", group_size=64), _names(3)
    )
    layer.load("pre_quant_scale", 0, torch.ones(IN_FEATURES), "q.pre_quant_scale")
    assert f"{layer.names[1]}.pre_quant_scale" in layer.missing()
    with pytest.raises(ValueError, match="appears twice"):
        layer.load("pre_quant_scale", 0, torch.ones(IN_FEATURES), "q.pre_quant_scale")


def test_int4_group_size_is_checked() -> None:
    layer = make_linear(IN_FEATURES, [64], False, QuantConfig("W4A16_AWQ", group_size=128), ["o"])
    with pytest.raises(QuantConfigError, match="group size 64; the checkpoint's config says 128"):
        layer.load("weight_scale", 0, torch.ones(64, IN_FEATURES // 64), "o.weight_scale")
    with pytest.raises(QuantConfigError, match="group size 32 is not supported for 80 input"):
        make_linear(80, [64], False, QuantConfig("W4A16_AWQ", group_size=32), ["o"])


# -- the GPU call paths, on the CPU ----------------------------------------------------------


@pytest.mark.parametrize(
    "algo, shards, dtype",
    [
        ("FP8", [128], torch.float32),  # one scale: per-tensor _scaled_mm
        ("FP8", SHARDS, torch.bfloat16),  # per-row scales: row-wise _scaled_mm
        ("FP8", SHARDS, torch.float32),  # per-row scales, float32: unscaled product, then scales
        ("FP8_PER_CHANNEL_PER_TOKEN", SHARDS, torch.bfloat16),
        ("FP8_PER_CHANNEL_PER_TOKEN", SHARDS, torch.float16),
    ],
)
def test_fp8_scaled_mm_calls_match_emulation(algo, shards, dtype) -> None:
    layer, _ = make_layer(algo, shards, dtype=dtype)
    assert layer.backend == "emulate"
    x = (torch.randn(9, IN_FEATURES) * 2).to(dtype)
    with torch.no_grad():
        want = layer(x)
        layer.backend = "scaled_mm"  # torch has a CPU _scaled_mm: the same call as on CUDA
        got = layer(x)
    _close(got, want, dtype)


def test_int8_int_mm_paths_are_exact() -> None:
    layer, _ = make_layer("W8A8_SQ_PER_CHANNEL")
    assert layer.backend == "int_mm"
    for tokens in (1, 16, 17, 40):
        x = torch.randn(tokens, IN_FEATURES) * 2
        outs = {}
        for backend in ("int_mm", "int_mm_padded", "emulate"):
            layer.backend = backend
            with torch.no_grad():
                outs[backend] = layer(x)
        assert torch.equal(outs["int_mm"], outs["int_mm_padded"])
        assert torch.equal(outs["int_mm"], outs["emulate"])


# -- the Triton int4 kernel under the interpreter ---------------------------------------------

INTERPRETER_SHAPES = [  # (M, N, K, group, dtype)
    (1, 64, 128, 128, "fp32"),
    (5, 96, 256, 64, "fp32"),
    (40, 160, 256, 128, "fp32"),
    (3, 64, 256, 32, "fp16"),
    (20, 128, 128, 64, "fp16"),
]
# Forced tiles (block_m, block_n, block_k, split_k, gemv), besides each shape's default: K split
# unevenly, the tensor-core kernel at decode sizes, the GEMV kernel (off by default: see
# triton_int4.GEMV_MAX_ROWS) with its own tiles and with a row block wider than M.
SPLITS = [
    (16, 32, 32, 4, False),
    (16, 64, 64, 3, False),
    (1, 128, 32, 2, True),
    (4, 64, 16, 3, True),
]


def _interpreter_cases() -> dict[str, object]:
    """Runs with TRITON_INTERPRET=1 (see __main__): every check's worst error, by name."""
    from engine.quant.fp8 import quantize_fp8
    from engine.quant.int4 import Int4AwqLinear, fp8_round
    from engine.quant.triton_int4 import TileConfig, int4_gemm, round_e4m3

    results: dict[str, object] = {}
    # e4m3 rounding: every midpoint between neighbouring e4m3 values, one float32 ulp either
    # side of it, subnormals, saturation, and random magnitudes.
    codes = torch.arange(0, 127, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    mids = (codes[:-1] + codes[1:]) / 2
    near = torch.cat([mids, mids.nextafter(torch.tensor(0.0)), mids.nextafter(torch.tensor(1e9))])
    generator = torch.Generator().manual_seed(0)
    wild = torch.randn(20000, generator=generator) * torch.exp(
        torch.randn(20000, generator=generator) * 4
    )
    values = torch.cat([near, -near, codes, wild, torch.tensor([448.0, 464.0, 1e30, -1e30, 0.0])])
    results["round_e4m3 mismatches"] = int((round_e4m3(values) != fp8_round(values)).sum())

    dtypes = {"fp32": torch.float32, "fp16": torch.float16}
    for m, n, k, group, dtype_name in INTERPRETER_SHAPES:
        dtype = dtypes[dtype_name]
        with default_dtype(dtype):
            for algo in ("W4A16_AWQ", "W4A8_AWQ"):
                quant = QuantConfig(algo, group_size=group)
                layer = make_linear(k, [n // 2, n // 2], False, quant, _names(2))
                assert isinstance(layer, Int4AwqLinear)
                w = torch.randn(n, k, generator=generator) * 0.05
                layer.quantize_from(w.to(dtype))
                x = (torch.randn(m, k, generator=generator) * 2).to(dtype)
                with torch.no_grad():
                    want = layer(x).float()
                    layer.backend = "triton"
                    got = layer(x).float()
                    errors = [(got - want).abs().max().item()]
                    if algo == "W4A16_AWQ":
                        x_in, scales = x, None
                    else:
                        x_in = quantize_fp8(x, layer.input_inv_scale).to(dtype)
                        scales = (layer.weight_scale_2, layer.out_scale)
                    for bm, bn, bk, split, gemv in SPLITS:
                        if group % bk == 0 and (not gemv or m <= bm):
                            cfg = TileConfig(bm, bn, bk, split, 4, 1, gemv)
                            y = int4_gemm(
                                x_in, layer.qweight, layer.group_scale, group, scales, cfg
                            )
                            errors.append((y.float() - want).abs().max().item())
                scale = want.abs().max().item()
                results[f"{algo} {m}x{n}x{k} g{group} {dtype_name}"] = max(errors) / scale
    return results


@cache
def _interpreter_results() -> dict[str, object]:
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run(
        [sys.executable, __file__, "--interpreter"],
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_e4m3_rounding_in_the_kernel_is_torchs() -> None:
    assert _interpreter_results()["round_e4m3 mismatches"] == 0


@pytest.mark.parametrize("algo", ["W4A16_AWQ", "W4A8_AWQ"])
@pytest.mark.parametrize("shape", INTERPRETER_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_triton_int4_matches_torch_path(algo, shape) -> None:
    m, n, k, group, dtype_name = shape
    error = _interpreter_results()[f"{algo} {m}x{n}x{k} g{group} {dtype_name}"]
    # Relative to the output's largest value: float32 sums in another order; float16 outputs
    # rounded once (the torch path rounds its float32 result the same way).
    assert error <= (2e-6 if dtype_name == "fp32" else 2**-10)


# -- on the GPU -------------------------------------------------------------------------------

# (M, N, K, shards): Llama-3.1-8B's qkv, gate_up, down and o projections
GPU_SHAPES = [
    (1, 6144, 4096, [4096, 1024, 1024]),
    (16, 28672, 4096, [14336, 14336]),
    (64, 4096, 14336, [4096]),
    (512, 4096, 4096, [4096]),
    (3000, 6144, 4096, [4096, 1024, 1024]),
]


def _cuda() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("algo", ALGOS)
def test_gpu_paths_match_fallbacks(algo: str, dtype: torch.dtype) -> None:
    _cuda()
    for m, n, k, shards in GPU_SHAPES:
        layer, _ = make_layer(algo, shards, k, dtype=dtype, device="cuda")
        fast = layer.backend
        assert fast == {
            "FP8": "scaled_mm",
            "FP8_PER_CHANNEL_PER_TOKEN": "scaled_mm",
            "W8A8_SQ_PER_CHANNEL": "int_mm_padded",
        }.get(algo, "triton")
        x = (torch.randn(m, k, device="cuda") * 2).to(dtype)
        with torch.no_grad():
            got = layer(x)
            layer.backend = {"scaled_mm": "emulate", "int_mm_padded": "emulate"}.get(fast, "torch")
            want = layer(x)
        if algo == "W8A8_SQ_PER_CHANNEL":  # exact int32 products on both paths
            assert torch.equal(got, want)
        else:  # float32 sums in another order; 16-bit outputs rounded once
            rtol = ULPS[dtype] if dtype != torch.float32 else 1e-4
            if fast == "scaled_mm" and dtype == torch.float32:
                # Hopper's FP8 tensor cores accumulate with fewer bits than float32 between
                # cuBLASLt's promotions, so a float32 output differs from exact-product float32
                # sums by about as much as the float16 case's (which passes at 2**-10: the same
                # float32 product, rounded once more). 1e-4 failed at 1x6144x4096 on the H100.
                rtol = ULPS[torch.float16]
            scale = want.abs().max().item()
            torch.testing.assert_close(
                got.float(), want.float(), rtol=rtol, atol=rtol * scale, msg=f"{algo} {m}x{n}x{k}"
            )


@pytest.mark.gpu
@pytest.mark.parametrize("recipe", ["fp8", "int4_awq", "w4a8_awq", "int8_sq", "fp8_per_channel"])
def test_gpu_engine_on_dummy_8b(recipe: str) -> None:
    _cuda()
    from engine import LLM, SamplingParams
    from engine.model.builder import parameter_bytes

    llm = LLM("llama-3.1-8b", load_format="dummy", quantization=recipe, max_model_len=512)
    weight_bytes = parameter_bytes(llm.engine.model)
    print(f"{recipe}: {weight_bytes / 2**30:.2f} GiB of weights (bf16: ~14.96 GiB)")
    assert weight_bytes < (9.5 if recipe in ("fp8", "int8_sq", "fp8_per_channel") else 6.5) * 2**30
    outs = llm.generate([[1, 2, 3, 4], [5, 6, 7]], SamplingParams(max_tokens=16, ignore_eos=True))
    assert [len(o.token_ids) for o in outs] == [16, 16]


if __name__ == "__main__" and "--interpreter" in sys.argv:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    print(json.dumps(_interpreter_cases()))
