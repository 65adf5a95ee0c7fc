"""FP8 experts (engine/model/moe_fp8.py) on the CPU: ModelOpt's per-expert tensors land in their
rows, the torch reference is each expert computed as our dense fp8 layers compute an MLP, dummy
fp8 weights at the MoE families' shapes serve, and other quantized MoE schemes are refused.
The fused kernel against this reference: tests/test_fused_moe.py; ModelOpt builds:
tests/test_build_moe.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tiny_checkpoints import MOE_FAMILIES, cached_tiny_checkpoint

from engine import LLM, SamplingParams
from engine.model.builder import parameter_bytes
from engine.model.moe import Routing
from engine.model.moe_fp8 import Fp8Experts, moe_reference_fp8
from engine.quant.checkpoint import QuantConfig, QuantConfigError
from engine.quant.fp8 import FP8, Fp8Linear
from engine.quant.linear import QuantLinear

E, HIDDEN, INTER = 3, 32, 16


def expert_tensors(seed: int = 0) -> dict[tuple[int, str], dict[str, torch.Tensor]]:
    """(expert, part) -> weight (e4m3), weight_scale, input_scale: each its own value."""
    gen = torch.Generator().manual_seed(seed)
    shapes = {"gate": (INTER, HIDDEN), "up": (INTER, HIDDEN), "down": (HIDDEN, INTER)}
    out = {}
    for e in range(E):
        for i, (part, shape) in enumerate(shapes.items()):
            out[e, part] = {
                "weight": (torch.randn(shape, generator=gen) * 50).to(FP8),
                "weight_scale": torch.tensor(0.001 * (1 + e + 0.25 * i)),
                "input_scale": torch.tensor(0.01 * (1 + 0.5 * e) * (1 if part == "gate" else 2)),
            }
    return out


def loaded_experts(tensors) -> Fp8Experts:
    experts = Fp8Experts(E, HIDDEN, INTER)
    for (e, part), named in tensors.items():
        for suffix, tensor in named.items():
            experts.load(part, e, tensor, f"model.layers.0.mlp.experts.{e}.{part}.{suffix}")
    assert experts.missing() == []
    experts.finish_loading()
    return experts


def test_modelopt_tensors_land_in_each_experts_rows():
    tensors = expert_tensors()
    experts = loaded_experts(tensors)
    for e in range(E):
        gate, up, down = (tensors[e, p] for p in ("gate", "up", "down"))
        assert torch.equal(
            experts.gate_up[e, :INTER].view(torch.uint8), gate["weight"].view(torch.uint8)
        )
        assert torch.equal(
            experts.gate_up[e, INTER:].view(torch.uint8), up["weight"].view(torch.uint8)
        )
        assert torch.equal(experts.down[e].view(torch.uint8), down["weight"].view(torch.uint8))
        assert set(experts.gate_up_scale[e, :INTER].tolist()) == {gate["weight_scale"].item()}
        assert set(experts.gate_up_scale[e, INTER:].tolist()) == {up["weight_scale"].item()}
        assert set(experts.down_scale[e].tolist()) == {down["weight_scale"].item()}
        assert experts.gate_up_input_scale[e].tolist() == [
            gate["input_scale"].item(),
            up["input_scale"].item(),
        ]
        assert experts.down_input_scale[e].item() == down["input_scale"].item()


def test_bad_expert_tensors_say_what_is_wrong():
    experts = Fp8Experts(E, HIDDEN, INTER)
    name = "model.layers.0.mlp.experts.0.gate_proj"
    weight = torch.zeros(INTER, HIDDEN, dtype=FP8)
    with pytest.raises(ValueError, match="is torch.float32; expected torch.float8_e4m3fn"):
        experts.load("gate", 0, weight.float(), f"{name}.weight")
    with pytest.raises(ValueError, match="this model has 3 experts"):
        experts.load("gate", 3, weight, f"{name}.weight")
    with pytest.raises(ValueError, match="one per-tensor scale"):
        experts.load("gate", 0, torch.ones(INTER), f"{name}.weight_scale")
    experts.load("gate", 0, weight, f"{name}.weight")
    with pytest.raises(ValueError, match="appears twice"):
        experts.load("gate", 0, weight, f"{name}.weight")
    assert "expert 0 gate input_scale" in experts.missing()
    assert len(experts.missing()) == E * 3 * 3 - 1


@pytest.mark.parametrize("expert", range(E))
def test_the_reference_computes_each_expert_as_our_fp8_linears_do(expert):
    """Every token to one expert with weight 1: the MoE is that expert's MLP, which the dense
    Fp8Linear layers (checked against ModelOpt in tests/test_quant_load.py) compute alike."""
    tensors = expert_tensors()
    for part in ("gate", "up"):  # a fused gate_up Fp8Linear needs one input scale
        tensors[expert, part]["input_scale"] = torch.tensor(0.02)
    experts = loaded_experts(tensors)
    quant = QuantConfig(algo="FP8")

    def linear(parts: list[str], in_features: int, out_features: int) -> Fp8Linear:
        layer = Fp8Linear(in_features, [out_features] * len(parts), False, quant, parts)
        for shard, part in enumerate(parts):
            for suffix, tensor in tensors[expert, part].items():
                layer.load(suffix, shard, tensor, f"{part}.{suffix}")
        layer.finish_loading()
        return layer

    gate_up = linear(["gate", "up"], HIDDEN, INTER)
    down = linear(["down"], INTER, HIDDEN)
    x = torch.randn(9, HIDDEN, generator=torch.Generator().manual_seed(1))
    gate, up = gate_up(x).chunk(2, dim=-1)
    want = down(F.silu(gate) * up)
    routing = Routing(torch.ones(9, 1), torch.full((9, 1), expert))
    got = moe_reference_fp8(x, experts, routing)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6 * want.abs().max().item())


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_dummy_fp8_moe_serves_on_the_cpu(family, checkpoint_root):
    path = cached_tiny_checkpoint(checkpoint_root, family)
    llm = LLM(str(path), load_format="dummy", quantization="fp8", dtype="float32", block_size=4)
    model = llm.engine.model
    experts = [m for m in model.modules() if isinstance(m, Fp8Experts)]
    assert len(experts) == len(model.moe_blocks()) > 0
    for _, block in model.moe_blocks():
        assert type(block.gate) is torch.nn.Linear  # the router stays in the compute dtype
        if block.shared_expert is not None:  # Qwen2-MoE: its shared expert is an fp8 MLP
            assert isinstance(block.shared_expert.gate_up_proj, QuantLinear)
    unquantized = LLM(str(path), load_format="dummy", dtype="float32").engine.model
    assert parameter_bytes(model) < parameter_bytes(unquantized)
    prompts = [[1, 2, 3, 4, 5], [7, 8], list(range(30, 47))]
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    alone = [llm.generate([p], params)[0].token_ids for p in prompts]
    assert [o.token_ids for o in llm.generate(prompts, params)] == alone


def test_moe_models_in_other_quantized_schemes_are_refused(checkpoint_root):
    path = cached_tiny_checkpoint(checkpoint_root, "mixtral")
    with pytest.raises(QuantConfigError, match="W4A16_AWQ MoE model; the engine serves MoE"):
        LLM(str(path), load_format="dummy", quantization="int4_awq")
