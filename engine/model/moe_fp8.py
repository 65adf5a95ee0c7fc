"""FP8 experts: ModelOpt's FP8 recipe (per-tensor e4m3 weights, static per-tensor activation
scales) on a MoE layer's routed experts.

Checkpoint, per expert and projection (moe_model's Hugging Face names: Mixtral's w1/w3/w2, the
Qwen MoEs' gate_proj/up_proj/down_proj), as ModelOpt's export writes every quantized linear:
`...experts.{e}.{proj}.weight` float8_e4m3fn [out, in], `.weight_scale` float32 [] (amax / 448)
and `.input_scale` float32 [] (the calibrated activation amax / 448). Every expert has its own
scales, and gate and up each their own (they are two linears in the checkpoint), so nothing is
requantized: the weights are used bit for bit.

Stored stacked (moe.py's layout): gate_up e4m3 [E, 2 * inter, hidden] and down e4m3
[E, hidden, inter], a float32 weight scale per expert and output row (gate's rows take gate's
scale), input scales [E, 2] (gate, up) and [E] (down).

What is computed, per expert e and projection (engine/quant/fp8.py's FP8 arithmetic):
y = (x_q @ w_q^T) * s_x[e] * s_w[e], x_q = e4m3(clamp(x * (448 / amax_x), +-448)), in float32,
rounded to the compute dtype; then silu(gate) * up, quantized with down's input scale, and the
down product. `moe_reference_fp8` does it with torch (the CPU path and the fused kernel's oracle);
CUDA runs fused_moe with the scales (FP8 tensor cores on sm89+).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from engine.model.moe import Routing, grouped_experts
from engine.numeric import FP8_MAX
from engine.quant.fp8 import DEFAULT_INPUT_AMAX, FP8, fp8_matmul, quantize_fp8
from engine.quant.linear import copy_checked, frozen

if TYPE_CHECKING:
    from engine.model.fused_moe import Fp8Scales

_GATE_UP_INDEX = {"gate": 0, "up": 1}
SUFFIXES = ("weight", "weight_scale", "input_scale")


def _fp8_linear(
    x: torch.Tensor,  # [n, in] in the compute dtype
    w_q: torch.Tensor,  # [out, in] e4m3
    w_scale: torch.Tensor,  # [out] float32
    x_scale: torch.Tensor,  # [] float32
    x_inv_scale: torch.Tensor,  # [] float32
) -> torch.Tensor:
    """-> [n, out] in x's dtype: fp8_matmul's CPU arithmetic."""
    return fp8_matmul(quantize_fp8(x, x_inv_scale), x_scale, w_q, w_scale, None, x.dtype, "emulate")


def moe_reference_fp8(
    hidden: torch.Tensor,  # [num_tokens, hidden] in the compute dtype
    experts: Fp8Experts,
    routing: Routing,
) -> torch.Tensor:
    """The FP8 experts' weighted sum -> [num_tokens, hidden], grouped as moe.moe_reference."""
    inter = experts.expert_size
    s = experts

    def mlp(rows: torch.Tensor, e: int) -> torch.Tensor:
        gate = _fp8_linear(
            rows,
            s.gate_up[e, :inter],
            s.gate_up_scale[e, :inter],
            s.gate_up_input_scale[e, 0],
            s.gate_up_input_inv_scale[e, 0],
        )
        up = _fp8_linear(
            rows,
            s.gate_up[e, inter:],
            s.gate_up_scale[e, inter:],
            s.gate_up_input_scale[e, 1],
            s.gate_up_input_inv_scale[e, 1],
        )
        return _fp8_linear(
            F.silu(gate) * up,
            s.down[e],
            s.down_scale[e],
            s.down_input_scale[e],
            s.down_input_inv_scale[e],
        )

    return grouped_experts(hidden, routing, experts.num_experts, mlp)


class Fp8Experts(nn.Module):
    """The routed experts of one layer in FP8, stacked; loads ModelOpt's per-expert tensors
    (`load`) and checks them (`missing`, `finish_loading`)."""

    def __init__(self, num_experts: int, hidden_size: int, expert_size: int) -> None:
        super().__init__()
        self.num_experts, self.expert_size = num_experts, expert_size
        self.compute_dtype = torch.get_default_dtype()  # the model is built under its dtype
        self.gate_up = frozen((num_experts, 2 * expert_size, hidden_size), FP8)
        self.down = frozen((num_experts, hidden_size, expert_size), FP8)
        self.gate_up_scale = frozen((num_experts, 2 * expert_size), torch.float32)
        self.down_scale = frozen((num_experts, hidden_size), torch.float32)
        self.gate_up_input_scale = frozen((num_experts, 2), torch.float32)
        self.down_input_scale = frozen((num_experts,), torch.float32)
        # What activations are multiplied by before rounding (finish_loading).
        self.register_buffer("gate_up_input_inv_scale", None, persistent=False)
        self.register_buffer("down_input_inv_scale", None, persistent=False)
        self._loaded: set[tuple[int, str, str]] = set()

    def forward(self, hidden: torch.Tensor, routing: Routing) -> torch.Tensor:
        if hidden.is_cuda:  # the reference syncs on the group sizes: CUDA takes the kernel
            from engine.model.fused_moe import fused_moe

            return fused_moe(hidden, self.gate_up, self.down, routing, fp8=self.fp8_scales())
        return moe_reference_fp8(hidden, self, routing)

    def fp8_scales(self) -> Fp8Scales:
        """The scales as the fused kernel takes them (triton: imported on first CUDA use)."""
        from engine.model.fused_moe import Fp8Scales

        return Fp8Scales(
            self.gate_up_scale,
            self.down_scale,
            self.gate_up_input_scale,
            self.gate_up_input_inv_scale,
            self.down_input_scale,
            self.down_input_inv_scale,
        )

    @torch.no_grad()
    def load(self, part: str, expert: int | None, tensor: torch.Tensor, name: str) -> None:
        """Copy checkpoint tensor `name`: part gate, up or down of `expert`; its suffix (weight,
        weight_scale or input_scale) is the name's last component."""
        suffix = name.rpartition(".")[2]
        if expert is None or suffix not in SUFFIXES:
            raise ValueError(
                f"checkpoint tensor {name!r} has no place in FP8 experts (one weight, "
                "weight_scale and input_scale per expert and projection)"
            )
        if not 0 <= expert < self.num_experts:
            raise ValueError(
                f"checkpoint tensor {name!r}: this model has {self.num_experts} experts"
            )
        if (expert, part, suffix) in self._loaded:
            raise ValueError(f"checkpoint tensor {name!r} appears twice")
        size = self.expert_size
        rows = slice(None)
        if part != "down":
            rows = slice(_GATE_UP_INDEX[part] * size, (_GATE_UP_INDEX[part] + 1) * size)
        if suffix == "weight":
            dst = self.down[expert] if part == "down" else self.gate_up[expert, rows]
            copy_checked(dst, tensor, name, dtype=FP8)
        else:
            if tensor.numel() != 1:
                raise ValueError(
                    f"checkpoint tensor {name!r} has shape {tuple(tensor.shape)}; FP8 experts "
                    "take one per-tensor scale"
                )
            value = tensor.float().item()
            if suffix == "weight_scale":
                scales = self.down_scale[expert] if part == "down" else self.gate_up_scale[expert]
                scales[rows].fill_(value)
            elif part == "down":
                self.down_input_scale[expert].fill_(value)
            else:
                self.gate_up_input_scale[expert, _GATE_UP_INDEX[part]].fill_(value)
        self._loaded.add((expert, part, suffix))

    def missing(self) -> list[str]:
        parts = ("gate", "up", "down")
        want = {(e, p, s) for e in range(self.num_experts) for p in parts for s in SUFFIXES}
        return [f"expert {e} {p} {s}" for e, p, s in sorted(want - self._loaded)]

    @torch.no_grad()
    def finish_loading(self) -> None:
        """The inverse input scales, with ModelOpt's arithmetic (QuantLinear.finish_input_scale:
        448 / (s * 448), not 1 / s)."""
        for name, scale in (
            ("gate_up", self.gate_up_input_scale),
            ("down", self.down_input_scale),
        ):
            if not bool((scale > 0).all()):
                raise ValueError(f"FP8 experts: an input_scale of the {name} projections is <= 0")
        self.gate_up_input_inv_scale = FP8_MAX / (self.gate_up_input_scale * FP8_MAX)
        self.down_input_inv_scale = FP8_MAX / (self.down_input_scale * FP8_MAX)

    @torch.no_grad()
    def quantize_from(self, gate_up: torch.Tensor, down: torch.Tensor) -> None:
        """Quantize float stacks (gate_up [E, 2 * inter, hidden], down [E, hidden, inter]) as
        ModelOpt would, one per-tensor scale per expert and projection, input scales for |x| <= 8:
        `load_format="dummy"`, and a reference for tests."""
        size = self.expert_size
        for e in range(self.num_experts):
            parts = [("gate", gate_up[e, :size]), ("up", gate_up[e, size:]), ("down", down[e])]
            for part, weight in parts:
                w = weight.float()
                scale = (w.abs().amax() / FP8_MAX).clamp_min(2.0**-24)
                quantized = quantize_fp8(w, 1.0 / scale)
                name = f"expert {e} {part}"
                self.load(part, e, quantized, f"{name}.weight")
                self.load(part, e, scale, f"{name}.weight_scale")
                input_scale = torch.tensor(DEFAULT_INPUT_AMAX / FP8_MAX)
                self.load(part, e, input_scale, f"{name}.input_scale")
        self.finish_loading()
