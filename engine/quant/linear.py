"""Quantized linear layers: the base class that loads ModelOpt-exported shards. The schemes
(fp8, int8, int4) subclass it and import nothing else of each other's; the factory the model
builds its projections with and the scheme table are in `engine.quant` (its __init__).

One module may hold several Hugging Face linears fused along the output dimension (q/k/v into
qkv_proj, gate/up into gate_up_proj). Shard i covers output rows [starts[i], starts[i] + sizes[i])
and is loaded from the checkpoint tensors of the i-th Hugging Face module
(`model.layers.0.self_attn.k_proj.weight`, `...k_proj.weight_scale`, ...). Per-row quantities
(weights, per-channel or group scales) are copied into their rows. Per-shard scalars are kept
until every shard is in, then `finish_loading` checks and combines them: a per-tensor weight
scale becomes a per-row scale vector (exact: no shard is requantized), while the activation-side
tensors of the one fused matmul (`input_scale`, `pre_quant_scale`) must be equal across shards,
since the shared input is quantized once.

Every quantized tensor is an `nn.Parameter` (requires_grad False), so `parameters()` counts the
model's real memory; small derived per-column vectors are non-persistent buffers.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import accumulate

import torch
from torch import nn

from engine.quant.checkpoint import QuantConfig, QuantConfigError


class QuantLinear(nn.Module):
    """y = x @ W^T (+ bias) with W stored quantized; subclasses store and compute one scheme."""

    REQUIRED: tuple[str, ...] = ("weight", "weight_scale")  # tensors every shard brings
    OPTIONAL: tuple[str, ...] = ()  # tensors all shards bring or none does
    PER_SHARD_SCALARS: tuple[str, ...] = ()  # collected per shard, combined in finish_loading

    def __init__(
        self,
        in_features: int,
        shard_sizes: Sequence[int],
        bias: bool,
        quant: QuantConfig,
        names: Sequence[str],
    ) -> None:
        super().__init__()
        if len(shard_sizes) != len(names):
            raise ValueError("one Hugging Face module name per shard")
        self.in_features = in_features
        self.shard_sizes = tuple(shard_sizes)
        self.shard_starts = tuple(accumulate((0, *self.shard_sizes[:-1])))
        self.out_features = sum(self.shard_sizes)
        self.names = tuple(names)
        self.quant = quant
        self.compute_dtype = torch.get_default_dtype()  # the model is built under its dtype
        # Biases stay in the compute dtype (ModelOpt exports them unquantized).
        self.bias = nn.Parameter(torch.zeros(self.out_features)) if bias else None
        self._seen: set[tuple[str, int]] = set()
        self._scalars: dict[str, list[torch.Tensor | None]] = {
            s: [None] * len(self.shard_sizes) for s in self.PER_SHARD_SCALARS
        }

    # -- loading -----------------------------------------------------------------------------

    @torch.no_grad()
    def load(self, suffix: str, shard: int, tensor: torch.Tensor, name: str) -> None:
        """Take checkpoint tensor `name` (= names[shard] + "." + suffix)."""
        allowed = self.REQUIRED + self.OPTIONAL + (("bias",) if self.bias is not None else ())
        if suffix not in allowed:
            raise ValueError(
                f"checkpoint tensor {name!r} has no place in this {self.quant.algo} layer "
                f"(expected {', '.join(allowed)})"
            )
        if (suffix, shard) in self._seen:
            raise ValueError(f"checkpoint tensor {name!r} appears twice")
        self._seen.add((suffix, shard))
        if suffix == "bias":
            copy_checked(self.bias.narrow(0, *self.rows(shard)), tensor, name)
        elif suffix in self._scalars:
            self._scalars[suffix][shard] = tensor.detach().float().cpu()
        else:
            self.load_rows(suffix, shard, tensor, name)

    def load_rows(self, suffix: str, shard: int, tensor: torch.Tensor, name: str) -> None:
        raise NotImplementedError

    def rows(self, shard: int) -> tuple[int, int]:
        """(start, size) of shard's output rows."""
        return self.shard_starts[shard], self.shard_sizes[shard]

    def missing(self) -> list[str]:
        """Checkpoint names this module still lacks (an OPTIONAL tensor only once some shard
        brought it)."""
        wanted = list(self.REQUIRED) + (["bias"] if self.bias is not None else [])
        wanted += [s for s in self.OPTIONAL if any((s, i) in self._seen for i in self._shards)]
        return [
            f"{self.names[i]}.{s}" for s in wanted for i in self._shards if (s, i) not in self._seen
        ]

    @property
    def _shards(self) -> range:
        return range(len(self.shard_sizes))

    def fp8_input_inv_scale(self) -> torch.Tensor | None:
        """[] float32 when the kernel that produces this layer's input may hand it over already
        quantized to e4m3 with this scale (fused into RMSNorm or SiLU-and-mul); None otherwise."""
        return None

    def finish_loading(self) -> None:
        """Called once every tensor is in: check and combine the per-shard scalars, derive what
        the forward needs, pick the compute path for the device."""
        raise NotImplementedError

    def shared_scalar(self, suffix: str) -> torch.Tensor | None:
        """The one value of a per-shard activation-side tensor that the fused matmul applies to
        its single input; None when no shard has it. Shards that differ are an error: their
        input would have to be quantized (or smoothed) differently per shard."""
        values = self._scalars[suffix]
        if all(v is None for v in values):
            return None
        first = values[0]
        for i, value in enumerate(values):
            if value is None or value.shape != first.shape or not torch.equal(value, first):
                raise QuantConfigError(
                    f"{self.names[i]}.{suffix} differs from {self.names[0]}.{suffix}, but the "
                    f"fused {'/'.join(n.rsplit('.', 1)[-1] for n in self.names)} matmul "
                    "quantizes its one input once; the checkpoint must give the shards the "
                    "same value (ModelOpt's export does)"
                )
        return first

    def finish_input_scale(self, maxbound: float) -> None:
        """The shards' static activation scale into the parameter `input_scale` [], and the
        buffer `input_inv_scale` [] that activations are multiplied by before rounding. ModelOpt's
        fake quantizer multiplies by maxbound / amax; the checkpoint holds amax / maxbound, so
        amax is rebuilt first, which repeats ModelOpt's float32 roundings whenever amax survives
        the round trip (a division by the scale instead can land a value on the other side of a
        rounding boundary)."""
        scale = self.shared_scalar("input_scale")
        if scale.numel() != 1:
            raise QuantConfigError(
                f"{self.names[0]}.input_scale has shape {tuple(scale.shape)}; expected one "
                "per-tensor value"
            )
        self.input_scale.copy_(scale.reshape(()))
        self.input_inv_scale = maxbound / (self.input_scale * maxbound)

    def finish_pre_quant_scale(self) -> None:
        """The SmoothQuant / AWQ factor the input is multiplied by, shared by the shards, as the
        parameter `pre_quant_scale` [in_features] in the compute dtype (None without one)."""
        smooth = self.shared_scalar("pre_quant_scale")
        if smooth is None:
            return
        if smooth.numel() != self.in_features:
            raise ValueError(
                f"{self.names[0]}.pre_quant_scale has shape {tuple(smooth.shape)}; "
                f"expected ({self.in_features},)"
            )
        device = next(self.parameters()).device
        self.pre_quant_scale = nn.Parameter(
            smooth.reshape(-1).to(device=device, dtype=self.compute_dtype), requires_grad=False
        )

    def per_row(self, suffix: str) -> torch.Tensor:
        """A per-shard scalar (e.g. a per-tensor weight scale) as a per-row vector
        [out_features] float32: each shard's value over its rows, so shards with different
        scales keep their exact quantized weights."""
        out = torch.empty(self.out_features, dtype=torch.float32)
        for i, value in enumerate(self._scalars[suffix]):
            if value is None or value.numel() != 1:
                raise QuantConfigError(
                    f"{self.names[i]}.{suffix} must be one per-tensor value, got "
                    f"{'nothing' if value is None else tuple(value.shape)}"
                )
            out.narrow(0, *self.rows(i)).fill_(value.item())
        return out

    # -- dummy weights -------------------------------------------------------------------------

    @torch.no_grad()
    def quantize_from(self, weight: torch.Tensor) -> None:
        """Quantize a float weight [out_features, in_features] into this module, each shard
        with its own scales as ModelOpt would, activation scales set for |x| <= 8: the arithmetic
        of a real checkpoint for `load_format="dummy"`, and a reference for tests."""
        raise NotImplementedError

    def set_shard_scalar(self, suffix: str, shard: int, value: float) -> None:
        self._scalars[suffix][shard] = torch.tensor(value, dtype=torch.float32)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"shards={list(self.shard_sizes)}, algo={self.quant.algo}, bias={self.bias is not None}"
        )


def frozen(shape: Sequence[int], dtype: torch.dtype) -> nn.Parameter:
    """An uninitialised parameter that is never trained (integer and float8 tensors cannot be)."""
    return nn.Parameter(torch.empty(tuple(shape), dtype=dtype), requires_grad=False)


def copy_checked(
    dst: torch.Tensor, src: torch.Tensor, name: str, dtype: torch.dtype | None = None
) -> None:
    """Copy a checkpoint tensor into `dst`, failing on a shape (or, given `dtype`, a dtype)
    other than expected: a float weight copied into an int8 one would be silently wrong."""
    if dtype is not None and src.dtype != dtype:
        raise ValueError(f"checkpoint tensor {name!r} is {src.dtype}; expected {dtype}")
    if dst.shape != src.shape:
        raise ValueError(
            f"checkpoint tensor {name!r} has shape {tuple(src.shape)}, "
            f"the model expects {tuple(dst.shape)}"
        )
    dst.copy_(src)
