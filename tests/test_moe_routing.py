"""The sparse MoE block against transformers' own block, bit for bit in float32: random routing,
ties, every token to one expert, an expert that gets no token; and the weight loader's errors."""

from __future__ import annotations

import pytest
import torch
from tiny_checkpoints import MOE_FAMILIES, _randomize, cached_tiny_checkpoint, tiny_config
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

from engine.model.loader import iter_safetensors, load_config
from engine.model.moe import MoeSpec, route
from engine.model.moe_model import MoeForCausalLM, SparseMoeBlock

HF_BLOCKS = {
    "mixtral": MixtralSparseMoeBlock,
    "qwen2_moe": Qwen2MoeSparseMoeBlock,
    "qwen3_moe": Qwen3MoeSparseMoeBlock,
}
NUM_TOKENS = 37


@torch.no_grad()
def paired_blocks(family: str, **overrides) -> tuple[torch.nn.Module, SparseMoeBlock]:
    """transformers' sparse MoE block of a tiny config (random weights) and ours with the same."""
    config = tiny_config(family, **overrides)
    # What from_pretrained picks on the CPU (test_oracle_uses_the_grouped_experts_path); a block
    # built alone would fall back to the per-expert loop.
    config._experts_implementation = "grouped_mm"
    hf = HF_BLOCKS[family](config).eval()
    _randomize(hf, seed=1, std=0.2)
    ours = SparseMoeBlock(config, MoeSpec.of(config), layer_index=1)
    ours.gate.weight.copy_(hf.gate.weight)
    ours.experts.load("gate_up", None, hf.experts.gate_up_proj, "gate_up_proj")
    ours.experts.load("down", None, hf.experts.down_proj, "down_proj")
    assert ours.experts.missing() == []
    if ours.shared_expert is not None:
        shared = hf.shared_expert
        fused = torch.cat([shared.gate_proj.weight, shared.up_proj.weight])
        ours.shared_expert.gate_up_proj.weight.copy_(fused)
        ours.shared_expert.down_proj.weight.copy_(shared.down_proj.weight)
        ours.shared_expert_gate.weight.copy_(hf.shared_expert_gate.weight)
    return hf, ours


@torch.no_grad()
def assert_same_as_transformers(hf, ours: SparseMoeBlock, x: torch.Tensor) -> None:
    """Same experts chosen in the same slot order, same weights, same output bits.

    Qwen2-MoE's shared expert is a plain MLP whose gate and up projections we fuse into one
    GEMM; on some CPUs the BLAS blocks that GEMM's float32 sums differently from two, so it
    matches transformers' within rounding, and the block is compared bit for bit with
    transformers' shared expert computing as ours does."""
    _, hf_weights, hf_ids = hf.gate(x)
    routing = route(ours.gate(x), ours.spec)
    assert torch.equal(routing.expert_ids, hf_ids)
    assert torch.equal(routing.weights, hf_weights)
    if ours.shared_expert is None:
        assert torch.equal(ours(x), hf(x[None])[0])
        return
    torch.testing.assert_close(ours.shared_expert(x), hf.shared_expert(x), rtol=1e-6, atol=1e-6)
    own_shared = hf.shared_expert
    hf.shared_expert = ours.shared_expert
    try:
        assert torch.equal(ours(x), hf(x[None])[0])
    finally:
        hf.shared_expert = own_shared


def tokens(seed: int = 0) -> torch.Tensor:
    return torch.randn(NUM_TOKENS, 64, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_block_equals_transformers_bit_for_bit(family):
    hf, ours = paired_blocks(family)
    assert_same_as_transformers(hf, ours, tokens())
    assert_same_as_transformers(hf, ours, tokens(1)[:1])  # a single decode token


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_tied_probabilities_break_as_in_transformers(family):
    # Experts 0 and 3 get the same router row, larger than the others: where it wins, a token's
    # top-1 is a tie between them, decided by torch.topk alone, in both implementations.
    hf, ours = paired_blocks(family, num_experts_per_tok=1)
    row = 5 * hf.gate.weight.data[0]
    for block in (hf, ours):
        block.gate.weight.data[0] = block.gate.weight.data[3] = row
    x = tokens()
    probs = torch.softmax(ours.gate(x), dim=-1, dtype=torch.float32)
    assert torch.equal(probs[:, 0], probs[:, 3])
    assert_same_as_transformers(hf, ours, x)
    chosen = route(ours.gate(x), ours.spec).expert_ids.flatten().tolist()
    assert sum(e in (0, 3) for e in chosen) > NUM_TOKENS // 4  # the tie decided many tokens


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_every_token_to_one_expert_and_one_expert_to_none(family):
    # Positive inputs; the router scores expert 2 high, expert 1 low and the rest zero: every
    # token's first choice is 2, its other slots are ties among the zero-logit experts, and
    # expert 1 gets no token at all.
    hf, ours = paired_blocks(family)
    for block in (hf, ours):
        block.gate.weight.data.zero_()
        block.gate.weight.data[2] = 1.0
        block.gate.weight.data[1] = -1.0
    x = tokens().abs()
    assert_same_as_transformers(hf, ours, x)
    ours.routed_tokens.zero_()
    ours(x)
    counts = ours.routed_tokens.tolist()
    assert counts[2] == NUM_TOKENS
    assert counts[1] == 0
    assert sum(counts) == NUM_TOKENS * ours.spec.top_k


def test_oracle_uses_the_grouped_experts_path(checkpoint_root):
    from conftest import _hf_model

    path = cached_tiny_checkpoint(checkpoint_root, "qwen3_moe")
    assert _hf_model(str(path)).config._experts_implementation == "grouped_mm"


def test_sparse_and_dense_layers_follow_the_config():
    qwen2 = MoeSpec.of(tiny_config("qwen2_moe"))  # decoder_sparse_step 2
    assert [qwen2.is_sparse(i) for i in range(4)] == [False, True, False, True]
    qwen3 = MoeSpec.of(tiny_config("qwen3_moe"))  # mlp_only_layers [0]
    assert [qwen3.is_sparse(i) for i in range(3)] == [False, True, True]
    mixtral = MoeSpec.of(tiny_config("mixtral"))
    assert (mixtral.renormalize, mixtral.float32_weights) == (True, True)
    assert (qwen2.renormalize, qwen3.renormalize) == (False, True)
    assert (qwen2.shared_expert_size, qwen3.shared_expert_size) == (48, 0)


def test_missing_or_misshapen_expert_tensors_fail_loudly(checkpoint_root):
    path = cached_tiny_checkpoint(checkpoint_root, "mixtral")
    config = load_config(path)
    model = MoeForCausalLM(config)
    tensors = list(iter_safetensors(path))
    without = [
        (n, t) for n, t in tensors if n != "model.layers.1.block_sparse_moe.experts.3.w2.weight"
    ]
    with pytest.raises(
        ValueError, match=r"lacks 1 expert tensors.*layers\.1\.mlp\.experts.*3 down"
    ):
        model.load_weights(without)
    bad = [(n, t[:, :-1] if n.endswith("experts.0.w1.weight") else t) for n, t in tensors]
    with pytest.raises(ValueError, match=r"experts\.0\.w1\.weight.*shape"):
        model.load_weights(bad)
    extra = [*tensors, ("model.layers.1.block_sparse_moe.experts.4.w1.weight", tensors[0][1])]
    with pytest.raises(ValueError, match="has 4 experts"):
        model.load_weights(extra)


@pytest.mark.parametrize("family", ["qwen2_moe", "mixtral"])
def test_fused_kernel_switches_reach_sparse_and_dense_layers(family):
    """What the CUDA loader calls: every kernel on (the sparse layers have no gate_up_proj for
    the norm to quantize for), then off again."""
    from engine.kernels import KERNELS

    model = MoeForCausalLM(tiny_config(family))
    model.enable_fused_kernels(frozenset(KERNELS), max_positions=64)
    norms = [layer.post_attention_layernorm for layer in model.model.layers]
    assert all(n.fused and n.out_inv_scale is None for n in norms)
    model.enable_fused_kernels(frozenset(), max_positions=64)
    assert not any(n.fused for n in norms)
