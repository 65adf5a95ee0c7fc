"""INT8 SmoothQuant linear layers: ModelOpt's W8A8_SQ_PER_CHANNEL.

Checkpoint (per Hugging Face linear): `weight` int8 [out, in] (already multiplied by the smoothing
factors); `weight_scale` float32 [out] (= per-channel amax / 127); `input_scale` float32 [] (static,
calibrated amax / 127); `pre_quant_scale` [in], the SmoothQuant factor the input is *multiplied*
by before it is quantized (ModelOpt's TensorQuantizer: `inputs = inputs * pre_quant_scale`).
ModelOpt's int8 range is [-128, 127] (narrow_range off) with round-half-to-even.

What is computed: x_s = x * pre_quant_scale (in the compute dtype), x_q = clamp(round(x_s / s_x),
-128, 127) int8, y = (x_q @ w_q^T as int32) * s_x * s_w. The int32 product is exact:
- `torch._int_mm` on CUDA (cuBLASLt; it needs more than 16 rows, so decode batches are padded
  to 17) and on the CPU (torch >= 2.2 has a CPU kernel);
- elsewhere, float32 products of the integers (exact while |sums| < 2^24).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.numeric import INT8_MAX
from engine.quant.checkpoint import QuantConfig
from engine.quant.fp8 import DEFAULT_INPUT_AMAX
from engine.quant.linear import QuantLinear, copy_checked, frozen

_INT_MM_MIN_ROWS = 17  # cuBLASLt int8 GEMM: mat1 needs more than 16 rows


def quantize_int8(x: torch.Tensor, inv_scale: torch.Tensor | float) -> torch.Tensor:
    """round(x * inv_scale) clamped to [-128, 127], in float32 as ModelOpt's fake quantizer."""
    return (x.float() * inv_scale).round_().clamp_(-128.0, INT8_MAX).to(torch.int8)


def int8_matmul(x_q: torch.Tensor, w_q: torch.Tensor, backend: str) -> torch.Tensor:
    """x_q [M, K] int8 @ w_q [N, K]^T -> [M, N] exact int32 (float32 for "emulate")."""
    if backend == "emulate":
        return x_q.float() @ w_q.float().t()
    m = x_q.shape[0]
    if backend == "int_mm_padded" and m < _INT_MM_MIN_ROWS:
        x_q = F.pad(x_q, (0, 0, 0, _INT_MM_MIN_ROWS - m))
        return torch._int_mm(x_q, w_q.t())[:m]
    return torch._int_mm(x_q, w_q.t())


def int8_backend(device: torch.device, in_features: int, out_features: int) -> str:
    if device.type == "cpu":
        return "int_mm"
    if device.type == "cuda" and in_features % 8 == 0 and out_features % 8 == 0:
        return "int_mm_padded"
    return "emulate"


class Int8SmoothQuantLinear(QuantLinear):
    REQUIRED = ("weight", "weight_scale", "input_scale")
    OPTIONAL = ("pre_quant_scale",)
    PER_SHARD_SCALARS = ("input_scale", "pre_quant_scale")

    def __init__(
        self,
        in_features: int,
        shard_sizes: list[int],
        bias: bool,
        quant: QuantConfig,
        names: list[str],
    ) -> None:
        super().__init__(in_features, shard_sizes, bias, quant, names)
        self.weight = frozen((self.out_features, in_features), torch.int8)
        self.weight_scale = frozen((self.out_features,), torch.float32)
        self.input_scale = frozen((), torch.float32)
        self.register_buffer("input_inv_scale", None, persistent=False)
        self.register_parameter("pre_quant_scale", None)  # [in], set by finish_loading
        self.backend = "emulate"

    def load_rows(self, suffix: str, shard: int, tensor: torch.Tensor, name: str) -> None:
        start, size = self.rows(shard)
        if suffix == "weight":
            copy_checked(self.weight.narrow(0, start, size), tensor, name, dtype=torch.int8)
        else:  # weight_scale, per output channel
            copy_checked(self.weight_scale.narrow(0, start, size), tensor.reshape(-1), name)

    @torch.no_grad()
    def finish_loading(self) -> None:
        self.finish_input_scale(INT8_MAX)
        self.finish_pre_quant_scale()
        self.backend = int8_backend(self.weight.device, self.in_features, self.out_features)

    @torch.no_grad()
    def quantize_from(self, weight: torch.Tensor) -> None:
        scale = weight.float().abs().amax(dim=1) / INT8_MAX  # [out]
        self.weight.copy_(quantize_int8(weight, 1.0 / scale[:, None]))
        self.weight_scale.copy_(scale)
        for i in self._shards:
            self.set_shard_scalar("input_scale", i, DEFAULT_INPUT_AMAX / INT8_MAX)
        self.finish_loading()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, self.in_features)  # [M, K]
        if self.pre_quant_scale is not None:
            x = x * self.pre_quant_scale
        x_q = quantize_int8(x, self.input_inv_scale)
        acc = int8_matmul(x_q, self.weight, self.backend)  # [M, N]
        y = (acc.float() * self.input_scale * self.weight_scale).to(x.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features)
