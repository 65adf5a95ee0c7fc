"""FP8 (E4M3) linear layers: ModelOpt's FP8 and FP8_PER_CHANNEL_PER_TOKEN.

Checkpoint (per Hugging Face linear): `weight` float8_e4m3fn [out, in]; `weight_scale` float32,
one per tensor (FP8) or one per output channel (FP8_PER_CHANNEL_PER_TOKEN), = amax / 448;
FP8 adds `input_scale`, a static per-tensor activation scale (calibrated amax / 448). The
per-channel recipe quantizes activations per token at run time (ModelOpt's dynamic input
quantizer with one block per row): scale = max|x_row| / 448.

What is computed: y = (x_q @ w_q^T) * s_x * s_w, x_q = e4m3(clamp(x * (448 / amax_x), +-448)),
amax_x = s_x * 448 (ModelOpt's fake-quantizer arithmetic: QuantLinear.finish_input_scale):
- CUDA with FP8 tensor cores (compute capability >= 8.9), `backend = "scaled_mm"`:
  `torch._scaled_mm` on the fp8 operands, fp32 accumulation. One weight scale for the whole
  (fused) matrix and a per-tensor input scale: per-tensor scales, output in the compute dtype.
  Per-row weight scales (fused shards with different per-tensor scales, or per-channel) or
  per-token input scales: row-wise scaling in bfloat16; in float16/float32 the unscaled product
  in float32, scaled afterwards.
- elsewhere (`backend = "emulate"`, the CPU): the same numbers without FP8 hardware: x quantized
  to float8_e4m3fn with the same scale, both operands widened to float32 (exactly), one float32
  matmul, the same scaling. So CPU perplexity reflects fp8 compute.
The two differ only in float32 summation order.

On CUDA with the static (FP8) recipe the activation is quantized by one Triton kernel, or by the
kernel that produced it (RMSNorm, SiLU-and-mul: `fp8_input_inv_scale`), which then hands over an
e4m3 tensor; at M <= 4 rows a Triton GEMV (engine/quant/triton_fp8.py) replaces cuBLASLt
(`WORKBENCH_FP8_GEMV=0` turns it off).
"""

from __future__ import annotations

import os

import torch

from engine.numeric import FP8_MAX
from engine.quant.checkpoint import QuantConfig
from engine.quant.linear import QuantLinear, copy_checked, frozen

FP8 = torch.float8_e4m3fn
DEFAULT_INPUT_AMAX = 8.0  # activation range that dummy weights calibrate their scales for
GEMV_ENV_VAR = "WORKBENCH_FP8_GEMV"


def quantize_fp8(x: torch.Tensor, inv_scale: torch.Tensor | float) -> torch.Tensor:
    """x * inv_scale rounded to e4m3 (nearest, ties to even), saturating at +-448, computed in
    float32 as ModelOpt's fake quantizer does. `inv_scale`: [] or broadcastable, e.g. [M, 1]."""
    return (x.float() * inv_scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)


def quantize_fp8_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (x_q [M, K] e4m3, scale [M, 1] float32), one scale per row: ModelOpt's dynamic
    per-token quantizer, including its arithmetic (x * (448 / amax); an all-zero row gets
    amax 1)."""
    amax = x.abs().amax(dim=-1, keepdim=True).float()  # [M, 1]
    amax = torch.where(amax <= 2.0**-24, torch.ones_like(amax), amax)
    inv = FP8_MAX / amax
    return quantize_fp8(x, inv), 1.0 / inv


def fp8_matmul(
    x_q: torch.Tensor,  # [M, K] e4m3
    x_scale: torch.Tensor,  # [] or [M, 1] float32
    w_q: torch.Tensor,  # [N, K] e4m3
    w_scale: torch.Tensor,  # [N] float32
    w_scale_scalar: torch.Tensor | None,  # [] float32 when every row has the same scale
    out_dtype: torch.dtype,
    backend: str,
) -> torch.Tensor:
    """-> (x_q @ w_q^T) * x_scale * w_scale, [M, N] in out_dtype."""
    if backend == "emulate":
        acc = x_q.float() @ w_q.float().t()  # exact products, float32 sums
        return (acc * x_scale * w_scale).to(out_dtype)
    # cuBLASLt wants the second operand column-major: w_q.t() of the row-major [N, K] weight.
    if x_scale.numel() == 1 and w_scale_scalar is not None:
        return torch._scaled_mm(
            x_q, w_q.t(), scale_a=x_scale, scale_b=w_scale_scalar, out_dtype=out_dtype
        )
    m = x_q.shape[0]
    if out_dtype == torch.bfloat16:  # row-wise scaling has a bfloat16 output
        return torch._scaled_mm(
            x_q,
            w_q.t(),
            scale_a=x_scale.expand(m, 1).contiguous(),
            scale_b=w_scale.view(1, -1),
            out_dtype=torch.bfloat16,
        )
    one = torch.ones((), dtype=torch.float32, device=x_q.device)
    acc = torch._scaled_mm(x_q, w_q.t(), scale_a=one, scale_b=one, out_dtype=torch.float32)
    return (acc * x_scale * w_scale).to(out_dtype)


def fp8_backend(device: torch.device, in_features: int, out_features: int) -> str:
    """ "scaled_mm" where FP8 tensor cores and cuBLASLt's shape rules allow, else "emulate"."""
    if (
        device.type == "cuda"
        and torch.cuda.get_device_capability(device) >= (8, 9)
        and in_features % 16 == 0
        and out_features % 16 == 0
    ):
        return "scaled_mm"
    return "emulate"


class Fp8Linear(QuantLinear):
    """ModelOpt FP8: per-tensor (per-shard) weight scale, static per-tensor input scale."""

    REQUIRED = ("weight", "weight_scale", "input_scale")
    PER_SHARD_SCALARS = ("input_scale",)
    per_token = False

    def __init__(
        self,
        in_features: int,
        shard_sizes: list[int],
        bias: bool,
        quant: QuantConfig,
        names: list[str],
    ) -> None:
        super().__init__(in_features, shard_sizes, bias, quant, names)
        self.weight = frozen((self.out_features, in_features), FP8)
        self.weight_scale = frozen((self.out_features,), torch.float32)  # per row
        if not self.per_token:
            self.input_scale = frozen((), torch.float32)
            self.register_buffer("input_inv_scale", None, persistent=False)
        self.register_buffer("weight_scale_scalar", None, persistent=False)
        self.backend = "emulate"
        self.gemv_max_rows = 0  # CUDA: rows up to this go through the Triton GEMV

    def load_rows(self, suffix: str, shard: int, tensor: torch.Tensor, name: str) -> None:
        start, size = self.rows(shard)
        if suffix == "weight":
            copy_checked(self.weight.narrow(0, start, size), tensor, name, dtype=FP8)
        elif tensor.numel() == 1:  # weight_scale, per tensor: the shard's rows share it
            self.weight_scale.narrow(0, start, size).fill_(tensor.float().item())
        else:  # weight_scale, per output channel
            copy_checked(self.weight_scale.narrow(0, start, size), tensor.reshape(-1), name)

    @torch.no_grad()
    def finish_loading(self) -> None:
        if not self.per_token:
            self.finish_input_scale(FP8_MAX)
        first = self.weight_scale[:1]
        uniform = bool((self.weight_scale == first).all())
        self.weight_scale_scalar = first.reshape(()).clone() if uniform else None
        self.backend = fp8_backend(self.weight.device, self.in_features, self.out_features)
        if self.backend == "scaled_mm" and not self.per_token:
            from engine.quant.triton_fp8 import GEMV_MAX_ROWS

            self.gemv_max_rows = GEMV_MAX_ROWS if os.environ.get(GEMV_ENV_VAR, "1") != "0" else 0

    def fp8_input_inv_scale(self) -> torch.Tensor | None:
        if self.backend != "scaled_mm" or self.per_token:
            return None
        return self.input_inv_scale

    @torch.no_grad()
    def quantize_from(self, weight: torch.Tensor) -> None:
        for i in self._shards:
            start, size = self.rows(i)
            rows = weight.narrow(0, start, size).float()  # [size, in]
            if self.per_token:
                scale = rows.abs().amax(dim=1, keepdim=True) / FP8_MAX  # [size, 1]
            else:
                scale = rows.abs().amax().reshape(1, 1) / FP8_MAX
                self.set_shard_scalar("input_scale", i, DEFAULT_INPUT_AMAX / FP8_MAX)
            self.weight.narrow(0, start, size).copy_(quantize_fp8(rows, 1.0 / scale))
            self.weight_scale.narrow(0, start, size).copy_(scale.reshape(-1).expand(size))
        self.finish_loading()

    def activation(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [M, K] -> (x_q [M, K] e4m3, its scale [] or [M, 1])."""
        if x.dtype == FP8:  # quantized by the kernel that produced it (fp8_input_inv_scale)
            return x, self.input_scale
        if self.backend == "scaled_mm" and x.is_cuda:
            from engine.quant.triton_fp8 import quantize_fp8_static

            return quantize_fp8_static(x, self.input_inv_scale), self.input_scale
        return quantize_fp8(x, self.input_inv_scale), self.input_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., K] in the compute dtype, or e4m3 already quantized with input_scale."""
        shape = x.shape
        x = x.reshape(-1, self.in_features)  # [M, K]
        out_dtype = self.compute_dtype if x.dtype == FP8 else x.dtype
        if x.shape[0] <= self.gemv_max_rows:
            from engine.quant.triton_fp8 import fp8_gemv

            y = fp8_gemv(
                x,
                self.input_inv_scale,
                self.input_scale,
                self.weight,
                self.weight_scale,
                self.bias,
                out_dtype,
            )
            return y.reshape(*shape[:-1], self.out_features)
        x_q, x_scale = self.activation(x)
        y = fp8_matmul(
            x_q,
            x_scale,
            self.weight,
            self.weight_scale,
            self.weight_scale_scalar,
            out_dtype,
            self.backend,
        )
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features)


class Fp8PerTokenLinear(Fp8Linear):
    """ModelOpt FP8_PER_CHANNEL_PER_TOKEN: per-output-channel weight scales, activations
    quantized per token at run time (no input_scale in the checkpoint)."""

    REQUIRED = ("weight", "weight_scale")
    PER_SHARD_SCALARS = ()
    per_token = True

    def activation(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return quantize_fp8_per_token(x)
