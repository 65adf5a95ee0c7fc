"""INT4 AWQ linear layers: ModelOpt's W4A16_AWQ and W4A8_AWQ.

Checkpoint (per Hugging Face linear), from modelopt/torch/export/quant_utils.py:
- `weight` uint8 [out / 2, in]: two output rows per byte, `pack_int4_in_uint8`: byte [j, k] =
  (q[2j, k] & 0xF) | (q[2j + 1, k] << 4), q the signed int4 value in [-8, 7];
- `weight_scale` float32 [out, in / group]: the group scales (amax / 7), W = q * scale;
- `pre_quant_scale` [in], the AWQ factor the input is multiplied by: written for o_proj and
  down_proj; for q/k/v and gate/up ModelOpt folds it into the preceding RMSNorm weight;
- W4A8_AWQ adds `weight_scale_2` float32 [] (= amax / 448 of a second, per-tensor fp8 weight
  quantizer) and `input_scale` float32 [] (static fp8 activations). Its weight is
  W = e4m3((q * scale) / weight_scale_2) * weight_scale_2: the int4 value times the group scale,
  rounded to fp8 in units of weight_scale_2, with ModelOpt's roundings in that order (q * (scale /
  weight_scale_2) would land a few weights per 10^4 on the other side of an e4m3 midpoint).

Stored here (repacked at load, same bytes): `qweight` uint8 [in, out / 2] = the checkpoint's
packed weight transposed, so a K-tile of the Triton kernel reads whole rows and unpacks them to
[BLOCK_K, BLOCK_N] by joining the nibbles; `group_scale` float32 [in / group, out]; W4A8
`weight_scale_2` [out] per row (fused shards keep their own) and `input_scale` [].

What is computed, y = (x * pre_quant_scale) @ W^T:
- CUDA, `backend = "triton"`: engine/quant/triton_int4.py, int4 unpacked and scaled in the kernel
  (W4A16: tl.dot of x with the int4 values, times the group scale per K-tile; W4A8: x quantized to
  e4m3 with input_scale first, the kernel rounds (q * group_scale) / weight_scale_2 to e4m3 values
  and dots them, the output times input_scale * weight_scale_2);
- elsewhere, `backend = "torch"`: unpack, dequantize to float32, one float32 matmul (W4A8: the
  same e4m3 roundings through torch's float8_e4m3fn conversion).
"""

from __future__ import annotations

import torch

from engine.quant.checkpoint import QuantConfig, QuantConfigError
from engine.quant.fp8 import DEFAULT_INPUT_AMAX, FP8, FP8_MAX, quantize_fp8
from engine.quant.linear import QuantLinear, copy_checked, frozen

INT4_MAX = 7.0


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int8 [..., cols] in [-8, 7] -> uint8 [..., cols / 2]: column 2j in the low nibble of byte
    j, column 2j + 1 in the high one. ModelOpt packs output rows so: its [out / 2, in] tensor is
    pack_int4(q.t()).t() of q [out, in]."""
    if q.shape[-1] % 2:
        raise ValueError(f"int4 packing needs an even number of columns, got {q.shape[-1]}")
    low = q[..., 0::2].to(torch.uint8) & 0xF
    high = q[..., 1::2].to(torch.uint8) & 0xF
    return low | (high << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [..., cols / 2] -> int8 [..., cols], the inverse of `pack_int4`."""
    nibbles = torch.stack((packed & 0xF, packed >> 4), dim=-1)  # [..., cols / 2, 2]
    # Sign-extend in uint8 (wrapping): 0..7 stay, 8..15 -> 248..255, i.e. int8 -8..-1.
    return ((nibbles ^ 8) - 8).view(torch.int8).view(*packed.shape[:-1], -1)


def quantize_int4(weight: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """float [out, in] -> (q int8 [out, in], scale float32 [out, in / group]) with scale =
    group amax / 7, as ModelOpt's static block quantizer."""
    rows, cols = weight.shape
    w = weight.float().view(rows, cols // group, group)
    scale = (w.abs().amax(dim=-1) / INT4_MAX).clamp_min(torch.finfo(torch.float32).tiny)
    q = (w / scale[..., None]).round().clamp(-8, INT4_MAX).to(torch.int8)
    return q.view(rows, cols), scale


def fp8_round(x: torch.Tensor) -> torch.Tensor:
    """float32 -> the nearest e4m3 value (saturating), as float32."""
    return x.clamp(-FP8_MAX, FP8_MAX).to(FP8).float()


def dequantize_int4(
    qweight: torch.Tensor,  # [in, out / 2] uint8
    group_scale: torch.Tensor,  # [in / group, out] float32
    weight_scale_2: torch.Tensor | None = None,  # [out] float32: W4A8
) -> torch.Tensor:
    """-> W^T [in, out] float32 (W4A8: e4m3 values, in units of weight_scale_2)."""
    q = unpack_int4(qweight)  # [in, out] int8
    k, n = q.shape
    groups = group_scale.shape[0]
    w = (q.float().view(groups, k // groups, n) * group_scale[:, None, :]).view(k, n)
    return w if weight_scale_2 is None else fp8_round(w / weight_scale_2)


class Int4AwqLinear(QuantLinear):
    """ModelOpt W4A16_AWQ: int4 weights with group scales, activations in the compute dtype."""

    REQUIRED = ("weight", "weight_scale")
    OPTIONAL = ("pre_quant_scale",)
    PER_SHARD_SCALARS = ("pre_quant_scale",)

    def __init__(
        self,
        in_features: int,
        shard_sizes: list[int],
        bias: bool,
        quant: QuantConfig,
        names: list[str],
    ) -> None:
        super().__init__(in_features, shard_sizes, bias, quant, names)
        odd = [n for n, s in zip(names, shard_sizes, strict=True) if s % 2]
        if odd:
            raise QuantConfigError(f"{odd[0]} has an odd number of rows; int4 packs row pairs")
        self.qweight = frozen((in_features, self.out_features // 2), torch.uint8)
        self.register_parameter("group_scale", None)  # [in / group, out], once group is known
        self.group_size = 0
        if quant.group_size is not None:
            self._alloc_group_scale(quant.group_size, names[0])
        self.register_parameter("pre_quant_scale", None)
        self.backend = "torch"

    def _alloc_group_scale(self, group: int, name: str) -> None:
        if group < 16 or group % 16 or self.in_features % group:
            raise QuantConfigError(
                f"{name}: group size {group} is not supported for {self.in_features} input "
                "channels (it must be a multiple of 16 that divides them)"
            )
        self.group_size = group
        device = self.qweight.device
        self.group_scale = torch.nn.Parameter(
            torch.empty(
                self.in_features // group, self.out_features, device=device, dtype=torch.float32
            ),
            requires_grad=False,
        )

    def load_rows(self, suffix: str, shard: int, tensor: torch.Tensor, name: str) -> None:
        start, size = self.rows(shard)
        if suffix == "weight":
            dst = self.qweight.narrow(1, start // 2, size // 2)  # [in, size / 2]
            copy_checked(dst.t(), tensor, name, dtype=torch.uint8)
            return
        # weight_scale [size, in / group]
        if tensor.dim() != 2 or tensor.shape[1] == 0 or self.in_features % tensor.shape[1]:
            raise ValueError(
                f"checkpoint tensor {name!r} has shape {tuple(tensor.shape)}; expected "
                f"({size}, in_features / group_size) group scales"
            )
        group = self.in_features // tensor.shape[1]
        if self.group_scale is None:
            self._alloc_group_scale(group, name)
        elif group != self.group_size:
            raise QuantConfigError(
                f"{name} has group size {group}; the checkpoint's config says {self.group_size}"
            )
        copy_checked(self.group_scale.narrow(1, start, size).t(), tensor.float(), name)

    @torch.no_grad()
    def finish_loading(self) -> None:
        self.finish_pre_quant_scale()
        self.backend = _int4_backend(self.qweight.device, self.compute_dtype)

    @torch.no_grad()
    def quantize_from(self, weight: torch.Tensor) -> None:
        if self.group_scale is None:
            raise QuantConfigError("group size unknown: the config gives none")
        q, scale = quantize_int4(weight, self.group_size)  # [out, in], [out, in / group]
        self.qweight.copy_(pack_int4(q.t()))
        self.group_scale.copy_(scale.t())
        self.dummy_scalars(q, scale)
        self.finish_loading()

    def dummy_scalars(self, q: torch.Tensor, scale: torch.Tensor) -> None:
        pass

    def dequantized_t(self) -> torch.Tensor:
        """W^T [in, out] float32 the torch backend multiplies by."""
        return dequantize_int4(
            self.qweight, self.group_scale, getattr(self, "weight_scale_2", None)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, self.in_features)  # [M, K]
        if self.pre_quant_scale is not None:
            x = x * self.pre_quant_scale
        if self.backend == "triton":
            from engine.quant.triton_int4 import int4_gemm

            y = int4_gemm(x, self.qweight, self.group_scale, self.group_size)
        else:
            y = (x.float() @ self.dequantized_t()).to(x.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features)


class W4A8AwqLinear(Int4AwqLinear):
    """ModelOpt W4A8_AWQ: int4 weights with group scales and a per-tensor fp8 scale, static fp8
    activations."""

    REQUIRED = ("weight", "weight_scale", "weight_scale_2", "input_scale")
    PER_SHARD_SCALARS = ("pre_quant_scale", "weight_scale_2", "input_scale")

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.weight_scale_2 = frozen((self.out_features,), torch.float32)  # per row
        self.input_scale = frozen((), torch.float32)
        self.register_buffer("input_inv_scale", None, persistent=False)
        self.register_buffer("out_scale", None, persistent=False)  # [out] input * weight_2

    @torch.no_grad()
    def finish_loading(self) -> None:
        self.finish_input_scale(FP8_MAX)
        self.weight_scale_2.copy_(self.per_row("weight_scale_2"))
        self.out_scale = self.input_scale * self.weight_scale_2
        super().finish_loading()

    def dummy_scalars(self, q: torch.Tensor, scale: torch.Tensor) -> None:
        w = q.float().view(*scale.shape, -1) * scale[..., None]  # [out, in / group, group]
        for i in self._shards:
            start, size = self.rows(i)
            amax = w.narrow(0, start, size).abs().amax().item()
            self.set_shard_scalar("weight_scale_2", i, max(amax, 1e-12) / FP8_MAX)
            self.set_shard_scalar("input_scale", i, DEFAULT_INPUT_AMAX / FP8_MAX)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, self.in_features)  # [M, K]
        if self.pre_quant_scale is not None:
            x = x * self.pre_quant_scale
        x_q = quantize_fp8(x, self.input_inv_scale)  # [M, K] e4m3
        if self.backend == "triton":
            from engine.quant.triton_int4 import int4_gemm

            # e4m3 values are exact in bfloat16, float16 and float32
            y = int4_gemm(
                x_q.to(x.dtype),
                self.qweight,
                self.group_scale,
                self.group_size,
                w4a8_scales=(self.weight_scale_2, self.out_scale),
            )
        else:
            y = ((x_q.float() @ self.dequantized_t()) * self.out_scale).to(x.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features)


def _int4_backend(device: torch.device, dtype: torch.dtype) -> str:
    import importlib.util

    if (
        device.type == "cuda"
        and dtype in (torch.bfloat16, torch.float16, torch.float32)
        and importlib.util.find_spec("triton") is not None
    ):
        return "triton"
    return "torch"
