"""Fused Triton kernels for the elementwise and reduction work between the GEMMs of a decoder layer:
residual add + RMSNorm, rotary embedding, SiLU-and-mul. One launch each instead of the 3-10 torch
ops they replace, which at batch-1 decode are hundreds of 1-3 us kernels per step.

The torch code in engine/model/ stays the reference and the CPU path; these serve CUDA models in
bfloat16, float16 and float32. Each kernel repeats the torch path's roundings (statistics in
float32, the same casts to the model dtype in the same order), so the results agree with it to
the last bit or within one ulp of the dtype (tests/test_kernels.py states each tolerance).

Triton is imported only when a kernel is first used, so the CPU build of torch never needs it.
`WORKBENCH_FUSED_KERNELS` picks them at model load: unset or "1" = all, "0" = none, or a comma
list of KERNELS (e.g. "rmsnorm,silu") for A/B runs.
"""

from __future__ import annotations

import importlib
import importlib.util
import os

import torch

ENV_VAR = "WORKBENCH_FUSED_KERNELS"
KERNELS = ("rmsnorm", "rotary", "silu")
DTYPES = (torch.bfloat16, torch.float16, torch.float32)

_LAZY = {
    "rms_norm": "engine.kernels.rmsnorm",
    "fused_add_rms_norm": "engine.kernels.rmsnorm",
    "rotary_embedding": "engine.kernels.rotary",
    "silu_and_mul": "engine.kernels.activation",
}


def fused_kernel_names(device: torch.device, dtype: torch.dtype) -> frozenset[str]:
    """Which fused kernels a model on `device` in `dtype` should use (empty: the torch path)."""
    if device.type != "cuda" or dtype not in DTYPES:
        return frozenset()
    value = os.environ.get(ENV_VAR, "1").strip().lower()
    if value in ("", "1", "on", "true", "all"):
        names = frozenset(KERNELS)
    elif value in ("0", "off", "false", "none"):
        names = frozenset()
    else:
        names = frozenset(n.strip() for n in value.split(",") if n.strip())
        unknown = names - set(KERNELS)
        if unknown:
            raise ValueError(
                f"{ENV_VAR} must be 0, 1 or a comma list of {', '.join(KERNELS)}; "
                f"got unknown {', '.join(sorted(unknown))}"
            )
    if names and importlib.util.find_spec("triton") is None:
        return frozenset()
    return names


def __getattr__(name: str):
    # The kernels' modules import triton; load one on first use and keep its function here, so
    # later lookups are plain module attributes.
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
