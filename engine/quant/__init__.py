"""Quantization the engine serves: ModelOpt checkpoints' recipes and the quantized layers.

`checkpoint` reads a checkpoint's recipe into a `QuantConfig`; `linear` holds `QuantLinear`, the
base of the quantized projections (their common loading); `fp8`, `int8` and `int4` (+
`triton_int4`, the GPU kernel) store and compute each scheme and import only the base;
`kv_scales` reads the KV-cache scales. The scheme table and the factory the model builds its
projections with are here, as vLLM keeps its registry in quantization/__init__. Building
quantized checkpoints (ModelOpt calibration and export) is the `engine_build` package's.

Nothing is imported at module level: `engine.config` imports `checkpoint`, which must stay light
(this __init__ runs first), so the schemes and torch are imported when a layer is made.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn

    from engine.quant.checkpoint import QuantConfig
    from engine.quant.linear import QuantLinear


def scheme_classes() -> dict[str, type[QuantLinear]]:
    """ModelOpt quant_algo -> the QuantLinear subclass that serves it."""
    from engine.quant import fp8, int4, int8

    return {
        "FP8": fp8.Fp8Linear,
        "FP8_PER_CHANNEL_PER_TOKEN": fp8.Fp8PerTokenLinear,
        "W8A8_SQ_PER_CHANNEL": int8.Int8SmoothQuantLinear,
        "W4A16_AWQ": int4.Int4AwqLinear,
        "W4A8_AWQ": int4.W4A8AwqLinear,
    }


def make_linear(
    in_features: int,
    shard_sizes: Sequence[int],
    bias: bool,
    quant: QuantConfig | None,
    names: Sequence[str],
) -> nn.Module:
    """nn.Linear for unquantized (or excluded) modules, else the scheme's QuantLinear. The
    shards of a fused module must all be quantized or all excluded."""
    from torch import nn

    from engine.quant.checkpoint import QuantConfigError

    excluded = [quant is None or quant.is_excluded(n) for n in names]
    if all(excluded):
        return nn.Linear(in_features, sum(shard_sizes), bias=bias)
    if any(excluded):
        raise QuantConfigError(
            f"exclude_modules leaves some of {', '.join(names)} unquantized; the engine fuses "
            "them into one matmul, so they must be quantized alike"
        )
    return scheme_classes()[quant.algo](in_features, shard_sizes, bias, quant, names)
