"""Mixtral, Qwen2-MoE and Qwen3-MoE: the Llama-family model with sparse MoE blocks as MLPs.

Attention, norms and rotary are the Llama family's (llama.py: Qwen2-MoE has q/k/v biases, Qwen3-MoE
the q/k RMSNorm); the feed-forward block of a sparse layer is a `SparseMoeBlock` (router, stacked
experts, and Qwen2-MoE's shared expert with its sigmoid gate), of a dense layer (Qwen's
`mlp_only_layers`, `decoder_sparse_step`) the usual MLP. The experts run the torch reference
(moe.py) on the CPU and the fused Triton kernel (fused_moe.py) on CUDA. A ModelOpt FP8 checkpoint
(or dummy fp8 weights) makes the routed experts `Fp8Experts` (moe_fp8.py) and the attention,
dense and shared-expert projections the usual fp8 linears; the router and the shared expert's
gate stay in the compute dtype, as ModelOpt leaves them.

Each block counts the (token, expert) pairs it routes in a device buffer (`routed_tokens`), with no
host sync; `read_expert_load()` reads them when the engine state is built. Under CUDA graphs the
padding rows of a captured batch are routed and counted too, and so are the warm-up passes before
capture (in `total`, and in the first snapshot's `recent`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from engine.model.llama import MLP, LlamaForCausalLM
from engine.model.moe import MOE_ARCHITECTURES, MoeSpec, Routing, moe_reference, route
from engine.model.moe_fp8 import Fp8Experts
from engine.quant.checkpoint import QuantConfig, QuantConfigError
from engine.state import ExpertLoad

# Hugging Face names of expert tensors: one per expert and projection (every published checkpoint,
# and what transformers 5 writes) or transformers 5's in-memory stacked layout.
_EXPERT_TENSOR = re.compile(
    r"(model\.layers\.\d+)\.(?:block_sparse_moe|mlp)\.experts\."
    r"(\d+)\.(w1|w2|w3|gate_proj|up_proj|down_proj)\.(weight|weight_scale|input_scale)"
)
_STACKED_TENSOR = re.compile(r"(model\.layers\.\d+)\.(?:block_sparse_moe|mlp)\.experts\.(\w+)")
_PART = {
    **{"w1": "gate", "w3": "up", "w2": "down"},  # Mixtral
    **{"gate_proj": "gate", "up_proj": "up", "down_proj": "down"},  # Qwen MoEs
}
# transformers (5.x) stacked expert tensors -> our Experts parameter names.
STACKED_PART = {"gate_up_proj": "gate_up", "down_proj": "down"}
_MIXTRAL_BLOCK = ".block_sparse_moe."  # Mixtral's name for the MoE block; ours is `.mlp.`


class Experts(nn.Module):
    """The routed experts of one layer, stacked (moe.py's layout). Loads its own checkpoint
    tensors (`load`), one expert projection at a time or a whole stack."""

    def __init__(self, num_experts: int, hidden_size: int, expert_size: int) -> None:
        super().__init__()
        self.num_experts, self.expert_size = num_experts, expert_size
        self.gate_up = nn.Parameter(torch.empty(num_experts, 2 * expert_size, hidden_size))
        self.down = nn.Parameter(torch.empty(num_experts, hidden_size, expert_size))
        self._loaded: set[tuple[int, str]] = set()

    def forward(self, hidden: torch.Tensor, routing: Routing) -> torch.Tensor:
        # The reference reads group sizes on the host, which a CUDA graph cannot capture: CUDA
        # always takes the fused kernel.
        if hidden.is_cuda:
            from engine.model.fused_moe import fused_moe  # triton: imported on first CUDA use

            return fused_moe(hidden, self.gate_up, self.down, routing)
        return moe_reference(hidden, self.gate_up, self.down, routing)

    def load(self, part: str, expert: int | None, tensor: torch.Tensor, name: str) -> None:
        """Copy checkpoint tensor `name`: `part` gate, up or down of `expert`, or (expert None)
        the stacked gate_up or down of all experts."""
        size = self.expert_size
        experts = range(self.num_experts) if expert is None else [expert]
        if expert is not None and not 0 <= expert < self.num_experts:
            raise ValueError(
                f"checkpoint tensor {name!r}: this model has {self.num_experts} experts"
            )
        if part == "gate_up":
            dst, parts = self.gate_up.data, ("gate", "up")
        elif part == "down":
            dst, parts = self.down.data if expert is None else self.down.data[expert], ("down",)
        else:
            start = 0 if part == "gate" else size
            dst, parts = self.gate_up.data[expert, start : start + size], (part,)
        if dst.shape != tensor.shape:
            raise ValueError(
                f"checkpoint tensor {name!r} has shape {tuple(tensor.shape)}, "
                f"the model expects {tuple(dst.shape)}"
            )
        dst.copy_(tensor)
        self._loaded |= {(e, p) for e in experts for p in parts}

    def missing(self) -> list[str]:
        want = {(e, p) for e in range(self.num_experts) for p in ("gate", "up", "down")}
        return [f"expert {e} {p}" for e, p in sorted(want - self._loaded)]


class SparseMoeBlock(nn.Module):
    """Router -> top-k experts -> weighted sum, plus Qwen2-MoE's gated shared expert."""

    def __init__(
        self, config, spec: MoeSpec, layer_index: int, quant: QuantConfig | None = None
    ) -> None:
        super().__init__()
        self.spec = spec
        hidden = config.hidden_size
        self.gate = nn.Linear(hidden, spec.num_experts, bias=False)  # the router
        experts_class = Fp8Experts if _experts_quantized(config, layer_index, quant) else Experts
        self.experts = experts_class(spec.num_experts, hidden, spec.expert_size)
        self.shared_expert: MLP | None = None
        if spec.shared_expert_size:
            self.shared_expert = MLP(
                config, layer_index, quant, spec.shared_expert_size, hf_name="mlp.shared_expert"
            )
            self.shared_expert_gate = nn.Linear(hidden, 1, bias=False)
        # (token, expert) pairs routed to each expert since the engine started
        self.register_buffer(
            "routed_tokens", torch.zeros(spec.num_experts, dtype=torch.int64), persistent=False
        )
        # Under tensor parallelism each rank holds a slice of every expert's intermediate size
        # (and of the shared expert's), so its output is a partial sum: the sum over the ranks
        # (one all-reduce, set by engine/distributed/shard.py). None: one process.
        self.reduce: Callable[[torch.Tensor], torch.Tensor] | None = None

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # [num_tokens, hidden]
        routing = route(self.gate(hidden), self.spec)
        pairs = routing.expert_ids.reshape(-1)  # [num_tokens * top_k]
        self.routed_tokens.index_add_(0, pairs, torch.ones_like(pairs))  # graph-safe, no sync
        out = self.experts(hidden, routing)
        if self.shared_expert is not None:
            shared = self.shared_expert(hidden)
            out = out + F.sigmoid(self.shared_expert_gate(hidden)) * shared
        return out if self.reduce is None else self.reduce(out)


class MoeForCausalLM(LlamaForCausalLM):
    """The Llama-family model whose sparse layers' MLP is a SparseMoeBlock."""

    def __init__(self, config, quant: QuantConfig | None = None) -> None:
        if quant is not None and quant.algo not in MOE_QUANT_ALGOS:
            raise QuantConfigError(
                f"{quant.source or 'the checkpoint'} is a {quant.algo} MoE model; the engine "
                f"serves MoE models unquantized or in {', '.join(MOE_QUANT_ALGOS)} (recipe fp8)"
            )
        self.moe = MoeSpec.of(config)
        super().__init__(config, quant)
        self._last_load: tuple[int, torch.Tensor] | None = None  # read_expert_load's last

    def make_mlp(self, config, layer_index: int, quant: QuantConfig | None) -> nn.Module:
        if self.moe.is_sparse(layer_index):
            return SparseMoeBlock(config, self.moe, layer_index, quant)
        return MLP(config, layer_index, quant)

    def moe_blocks(self) -> list[tuple[int, SparseMoeBlock]]:
        """(layer index, block) of each sparse layer, in order."""
        return [
            (i, layer.mlp)
            for i, layer in enumerate(self.model.layers)
            if isinstance(layer.mlp, SparseMoeBlock)
        ]

    def read_expert_load(self, step: int) -> ExpertLoad:
        """The pairs routed so far, and since the previous read (here at engine step `step`):
        one small device-to-host copy."""
        blocks = self.moe_blocks()
        counts = torch.stack([b.routed_tokens for _, b in blocks]).cpu()  # [layers, experts]
        last_step, last = self._last_load or (0, torch.zeros_like(counts))
        self._last_load = (step, counts)
        return ExpertLoad(
            layers=tuple(i for i, _ in blocks),
            total=tuple(map(tuple, counts.tolist())),
            recent=tuple(map(tuple, (counts - last).tolist())),
            recent_steps=step - last_step,
        )

    @torch.no_grad()
    def load_weights(
        self,
        weights: Iterable[tuple[str, torch.Tensor]],
        loaded_elsewhere: frozenset[str] = frozenset(),
    ) -> None:
        """The Llama-family load, with the expert tensors taken out of the stream and copied
        into each layer's stacked `Experts`, and Mixtral's block renamed to ours."""
        experts = {n: m for n, m in self.named_modules() if isinstance(m, (Experts, Fp8Experts))}
        super().load_weights(
            self._route_experts(weights, experts), loaded_elsewhere | experts.keys()
        )
        missing = [f"{n}: {m}" for n, module in experts.items() for m in module.missing()]
        if missing:
            raise ValueError(f"checkpoint lacks {len(missing)} expert tensors, e.g. {missing[:3]}")
        for module in experts.values():
            if isinstance(module, Fp8Experts):
                module.finish_loading()

    def _route_experts(
        self,
        weights: Iterable[tuple[str, torch.Tensor]],
        experts: dict[str, Experts | Fp8Experts],
    ) -> Iterator[tuple[str, torch.Tensor]]:
        for name, tensor in weights:
            per_expert = _EXPERT_TENSOR.fullmatch(name)
            stacked = _STACKED_TENSOR.fullmatch(name)
            if per_expert is not None:
                layer, expert, part, suffix = per_expert.groups()
                target, load = f"{layer}.mlp.experts", (_PART[part], int(expert))
                if suffix != "weight" and not isinstance(experts.get(target), Fp8Experts):
                    raise ValueError(
                        f"checkpoint tensor {name!r} is a quantization scale, but this model's "
                        "experts are not quantized"
                    )
            elif stacked is not None and stacked.group(2) in STACKED_PART:
                target, load = f"{stacked.group(1)}.mlp.experts", (STACKED_PART[stacked[2]], None)
            else:
                yield name.replace(_MIXTRAL_BLOCK, ".mlp."), tensor
                continue
            if target not in experts:
                raise ValueError(f"checkpoint tensor {name!r} has no place in this model")
            experts[target].load(*load, tensor, name)

    def _shard_range(self, target: str, shard: int) -> tuple[int, int]:
        if ".shared_expert." in target:
            size = self.moe.shared_expert_size
            return shard * size, size
        return super()._shard_range(target, shard)


MOE_QUANT_ALGOS = ("FP8",)  # ModelOpt algorithms the experts are served in (Fp8Experts)


def _experts_quantized(config, layer_index: int, quant: QuantConfig | None) -> bool:
    """Whether a layer's routed experts are FP8: quantized, and not in exclude_modules (checked
    on expert 0's gate under the checkpoint's own block name)."""
    if quant is None:
        return False
    block = "block_sparse_moe" if config.model_type == "mixtral" else "mlp"
    gate = "w1" if config.model_type == "mixtral" else "gate_proj"
    return not quant.is_excluded(f"model.layers.{layer_index}.{block}.experts.0.{gate}")


def idle_expert_bytes(model: nn.Module) -> int:
    """Weight bytes a batch-1 decode step does not read: in each sparse layer, the experts its
    token is not routed to (num_experts - top_k of them; scales included). 0 for a dense model."""
    if not isinstance(model, MoeForCausalLM):
        return 0
    total = 0
    for _, block in model.moe_blocks():
        experts = block.experts
        stacked = sum(p.numel() * p.element_size() for p in experts.parameters())
        total += stacked // experts.num_experts * (experts.num_experts - block.spec.top_k)
    return total


def read_expert_load(model: nn.Module, step: int) -> ExpertLoad | None:
    """The expert load of a MoE model for EngineState; None for a dense one."""
    return model.read_expert_load(step) if isinstance(model, MoeForCausalLM) else None


def model_class(config) -> type[LlamaForCausalLM]:
    """The engine's model class for a config: MoE or the plain Llama family."""
    moe = set(config.architectures or ()) & MOE_ARCHITECTURES.keys()
    return (
        MoeForCausalLM
        if moe or config.model_type in MOE_ARCHITECTURES.values()
        else LlamaForCausalLM
    )
