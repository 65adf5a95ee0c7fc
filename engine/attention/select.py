"""Which attention backend serves a model. Triton is imported only when it is chosen, so the CPU
build of torch (which has no Triton) never touches it."""

from __future__ import annotations

import torch

from engine.attention.metadata import AttentionBackend
from engine.attention.torch_ref import TorchAttention


def _triton_supports(block_size: int, head_dim: int) -> bool:
    """tl.dot needs power-of-two tiles of at least 16."""
    return all(n >= 16 and n & (n - 1) == 0 for n in (block_size, head_dim))


def _triton_reads_fp8(device: torch.device) -> bool:
    """Triton converts float8_e4m3fn ("fp8e4nv") only on compute capability 8.9 and up."""
    return torch.cuda.get_device_capability(device) >= (8, 9)


def make_backend(
    name: str,
    device: torch.device,
    block_size: int,
    head_dim: int,
    kv_dtype: torch.dtype | None = None,
) -> AttentionBackend:
    """ "auto": Triton on CUDA when its kernel supports the shapes and the KV pages' dtype, else
    the torch reference."""
    if name == "torch" or device.type != "cuda":
        if name == "triton":
            raise ValueError("attention_backend 'triton' needs a CUDA device")
        return TorchAttention()
    if kv_dtype == torch.float8_e4m3fn and not _triton_reads_fp8(device):
        if name == "triton":
            raise ValueError(
                "the Triton kernel reads an fp8 KV cache only on GPUs of compute capability 8.9 "
                "or later (Ada, Hopper); use attention_backend 'torch' or kv_cache_dtype int8"
            )
        return TorchAttention()
    if not _triton_supports(block_size, head_dim):
        if name == "triton":
            raise ValueError(
                f"the Triton kernel needs block_size and head_dim powers of two >= 16, got "
                f"{block_size} and {head_dim}"
            )
        return TorchAttention()
    from engine.attention.triton_backend import TritonAttention

    return TritonAttention()
