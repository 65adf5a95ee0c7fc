"""Mixture-of-experts arithmetic: what each family's config asks for, routing, and the torch
reference MoE (the CPU path, and the oracle of the fused GPU kernel in fused_moe.py).

Routing follows transformers (5.x `*TopKRouter`) op for op, so that ties and roundings fall the same
way: router logits in the hidden dtype, softmax in float32, `torch.topk` (equal probabilities keep
torch.topk's order, as in transformers), renormalisation of the top-k where the config asks
(always for Mixtral, `norm_topk_prob` for the Qwen MoEs). Mixtral keeps the routing weights in
float32; the Qwen MoEs cast them to the hidden dtype. The weighted sum runs over each token's top-k
slots in slot order, as transformers' grouped path does.

Expert weights are stacked: gate_up [num_experts, 2 * intermediate, hidden] (gate rows first, then
up, as transformers stacks them) and down [num_experts, hidden, intermediate].
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

# architecture -> model_type
MOE_ARCHITECTURES = {
    "MixtralForCausalLM": "mixtral",
    "Qwen2MoeForCausalLM": "qwen2_moe",
    "Qwen3MoeForCausalLM": "qwen3_moe",
}


@dataclass(frozen=True)
class MoeSpec:
    """What the MoE families differ in, read from a config."""

    num_experts: int
    top_k: int
    expert_size: int  # intermediate size of one expert
    renormalize: bool  # divide the top-k probabilities by their sum
    float32_weights: bool  # routing weights stay float32 (Mixtral) or take the hidden dtype (Qwen)
    shared_expert_size: int  # 0: no shared expert (Qwen2-MoE has one, gated by a sigmoid)
    sparse_step: int  # every sparse_step-th layer is sparse (Qwen: decoder_sparse_step)
    dense_layers: frozenset[int]  # layers with a dense MLP whatever the step (mlp_only_layers)

    @classmethod
    def of(cls, config) -> MoeSpec:
        act = getattr(config, "hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"MoE experts with activation {act!r} are not supported (only silu)")
        if config.model_type == "mixtral":
            return cls(
                num_experts=config.num_local_experts,
                top_k=config.num_experts_per_tok,
                expert_size=config.intermediate_size,
                renormalize=True,
                float32_weights=True,
                shared_expert_size=0,
                sparse_step=1,
                dense_layers=frozenset(),
            )
        if config.model_type not in ("qwen2_moe", "qwen3_moe"):
            raise ValueError(f"model_type {config.model_type!r} is not a mixture of experts")
        shared = getattr(config, "shared_expert_intermediate_size", 0) or 0
        return cls(
            num_experts=config.num_experts,
            top_k=config.num_experts_per_tok,
            expert_size=config.moe_intermediate_size,
            renormalize=bool(config.norm_topk_prob),
            float32_weights=False,
            shared_expert_size=shared if config.model_type == "qwen2_moe" else 0,
            sparse_step=config.decoder_sparse_step,
            dense_layers=frozenset(config.mlp_only_layers or ()),
        )

    def is_sparse(self, layer_index: int) -> bool:
        """Transformers' rule (Qwen2MoeDecoderLayer): not listed as dense, experts present, and
        (layer_index + 1) a multiple of the sparse step."""
        return (
            layer_index not in self.dense_layers
            and self.num_experts > 0
            and (layer_index + 1) % self.sparse_step == 0
        )


class Routing(NamedTuple):
    weights: torch.Tensor  # [num_tokens, top_k], float32 or the hidden dtype (MoeSpec)
    expert_ids: torch.Tensor  # [num_tokens, top_k] int64, by descending probability


def route(router_logits: torch.Tensor, spec: MoeSpec) -> Routing:
    """router_logits [num_tokens, num_experts] (in the hidden dtype) -> each token's experts."""
    probs = torch.softmax(router_logits, dim=-1, dtype=torch.float32)
    weights, expert_ids = torch.topk(probs, spec.top_k, dim=-1)
    if spec.renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    if not spec.float32_weights:
        weights = weights.to(router_logits.dtype)
    return Routing(weights, expert_ids)


def combine(
    expert_out: torch.Tensor,  # [num_tokens * top_k, hidden], the (token, slot) pairs in order
    routing: Routing,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Weighted sum over each token's slots -> [num_tokens, hidden] in `dtype`. Weights times
    outputs in their promoted dtype (float32 for Mixtral), summed over the slots, then cast."""
    num_tokens, top_k = routing.expert_ids.shape
    weighted = expert_out * routing.weights.reshape(-1, 1)
    return weighted.view(num_tokens, top_k, -1).sum(dim=1).to(dtype)


def expert_mlp(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """x [n, hidden], gate_up [2 * inter, hidden], down [hidden, inter] -> [n, hidden]."""
    gate, up = F.linear(x, gate_up).chunk(2, dim=-1)
    return F.linear(F.silu(gate) * up, down)


def moe_reference(
    hidden: torch.Tensor,  # [num_tokens, hidden]
    gate_up: torch.Tensor,  # [num_experts, 2 * inter, hidden]
    down: torch.Tensor,  # [num_experts, hidden, inter]
    routing: Routing,
) -> torch.Tensor:
    """The routed experts' weighted sum -> [num_tokens, hidden] (see `grouped_experts`)."""
    return grouped_experts(
        hidden,
        routing,
        gate_up.shape[0],
        lambda rows, expert: expert_mlp(rows, gate_up[expert], down[expert]),
    )


def grouped_experts(
    hidden: torch.Tensor,  # [num_tokens, hidden]
    routing: Routing,
    num_experts: int,
    mlp: Callable[[torch.Tensor, int], torch.Tensor],  # (rows [n, hidden], expert) -> [n, hidden]
) -> torch.Tensor:
    """The routed experts' weighted sum -> [num_tokens, hidden]: the (token, slot) pairs grouped by
    expert, one `mlp` call per expert that got any, the outputs put back in pair order and summed
    per token. Reads the group sizes on the host (a sync), so it is not for CUDA graphs.

    The pairs are grouped with `torch.sort`, as transformers' grouped path does: each expert's
    matmul then sees the same rows in the same order, which makes the result bit-identical to
    transformers' on the CPU (a GEMM row's rounding can depend on the rows around it)."""
    num_tokens, top_k = routing.expert_ids.shape
    pair_experts = routing.expert_ids.reshape(-1)  # [num_tokens * top_k]
    order = torch.sort(pair_experts).indices  # pairs grouped by expert
    counts = torch.bincount(pair_experts, minlength=num_experts).tolist()
    rows = hidden[order // top_k]  # [num_tokens * top_k, hidden], grouped
    grouped = torch.empty_like(rows)
    start = 0
    for expert, count in enumerate(counts):
        if count:
            end = start + count
            grouped[start:end] = mlp(rows[start:end], expert)
            start = end
    pairs = torch.empty_like(grouped)
    pairs[order] = grouped  # back to (token, slot) order
    return combine(pairs, routing, hidden.dtype)
