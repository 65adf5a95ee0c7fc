"""Random weights at real shapes, for benchmarks where no checkpoint can be downloaded."""

from __future__ import annotations

import torch
from torch import nn

from engine.model.moe_fp8 import Fp8Experts
from engine.quant.linear import QuantLinear


@torch.no_grad()
def init_dummy_weights(model: nn.Module, seed: int = 0, std: float = 0.02) -> None:
    """Normal(0, std) matrices and unit norms: the arithmetic of a real model, not its output.
    A quantized projection (or FP8 experts) quantizes its Normal(0, std) matrix as ModelOpt
    would."""
    generator = torch.Generator(device="cpu").manual_seed(seed)

    def normal_(tensor: torch.Tensor, index: int) -> torch.Tensor:
        if tensor.device.type == "cpu":
            return tensor.normal_(0.0, std, generator=generator)
        # A CPU generator cannot feed a GPU tensor; seed the device's own generator instead.
        torch.cuda.manual_seed(seed * 100_003 + index)
        return tensor.normal_(0.0, std)

    quantized = {n: m for n, m in model.named_modules() if isinstance(m, (QuantLinear, Fp8Experts))}
    index = 0
    for index, (name, param) in enumerate(model.named_parameters()):
        if name.rpartition(".")[0] in quantized:
            continue
        if name.endswith("norm.weight"):
            param.fill_(1.0)
        elif name.endswith(".bias"):
            param.zero_()
        else:
            normal_(param, index)
    for offset, module in enumerate(quantized.values(), start=index + 1):
        device = next(module.parameters()).device
        if isinstance(module, Fp8Experts):
            gate_up, down = (
                normal_(torch.empty(p.shape, device=device), offset).to(module.compute_dtype)
                for p in (module.gate_up, module.down)
            )
            module.quantize_from(gate_up, down)  # [E, 2 * inter, hidden], [E, hidden, inter]
            continue
        if module.bias is not None:
            module.bias.zero_()
        weight = torch.empty(module.out_features, module.in_features, device=device)
        module.quantize_from(normal_(weight, offset).to(module.compute_dtype))
