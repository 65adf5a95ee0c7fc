"""Random weights at real shapes, for benchmarks where no checkpoint can be downloaded."""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def init_dummy_weights(model: nn.Module, seed: int = 0, std: float = 0.02) -> None:
    """Normal(0, std) matrices and unit norms: the arithmetic of a real model, not its output."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    for index, (name, param) in enumerate(model.named_parameters()):
        if name.endswith("norm.weight"):
            param.fill_(1.0)
        elif name.endswith(".bias"):
            param.zero_()
        elif param.device.type == "cpu":
            param.normal_(0.0, std, generator=generator)
        else:
            # A CPU generator cannot feed a GPU tensor; seed the device's own generator instead.
            torch.cuda.manual_seed(seed * 100_003 + index)
            param.normal_(0.0, std)
