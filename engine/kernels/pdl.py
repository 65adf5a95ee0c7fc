"""Programmatic dependent launch (PDL, Hopper and later) for the Triton kernels of a decode step.

A batch-1 decode step is ~350 kernels of 2-30 us, and between two of them the GPU idles for the
launch and the ramp of the next (about 3 us per fp8 GEMV on the H200, whatever its size). A kernel
launched with PDL may start while its predecessor's last programs still run. Every kernel here
begins with `wait_for_predecessor`: `gdc_wait` (the predecessor complete, its writes visible),
then `gdc_launch_dependents` (the successor may start once all of this kernel's programs are
running). So a kernel overlaps only its neighbours and never reads or writes before the kernel
before it is done; a kernel launched without PDL (torch's, cuBLAS) serializes as usual. The fp8
GEMV loads its first weight tile before the wait: no step writes the weights.

`WORKBENCH_PDL=0` turns it off; it is off under the Triton interpreter and before Hopper.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

ENV_VAR = "WORKBENCH_PDL"


@functools.cache
def _supported(device_index: int) -> bool:
    if os.environ.get(ENV_VAR, "1").strip() == "0":
        return False
    if torch.cuda.get_device_capability(device_index) < (9, 0):
        return False
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
    except ImportError:
        return False
    has_option = "launch_pdl" in getattr(CUDAOptions, "__dataclass_fields__", {})
    return has_option and hasattr(tl.extra.cuda, "gdc_wait")


def pdl_launch(device: torch.device) -> dict:
    """Keywords for launching a kernel that starts with `wait_for_predecessor` on `device`."""
    if device.type != "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        return {"USE_GDC": False}
    index = device.index if device.index is not None else torch.cuda.current_device()
    return {"USE_GDC": True, "launch_pdl": True} if _supported(index) else {"USE_GDC": False}


@triton.jit
def wait_for_predecessor(USE_GDC: tl.constexpr):
    """The predecessor kernel is complete and its writes are visible; the successor may launch."""
    if USE_GDC:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
