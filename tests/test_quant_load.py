"""ModelOpt checkpoints served by the engine.

Each recipe quantizes the bundled model with nvidia-modelopt on the CPU in float32
(`mtq.quantize` with ModelOpt's own config, one calibration text, `export_hf_checkpoint`), and
`LLM(export_dir)` serves the export. The oracle is Hugging Face transformers running ModelOpt's
fake quantization, in the state ModelOpt exported:

- `export_hf_checkpoint` first unifies the scales of linears that share an input
  (`requantize_resmooth_fused_llm_layers`: AWQ factors averaged over q/k/v and gate/up, weights
  re-smoothed and requantized, AWQ factors folded into the RMSNorms); the same step is applied to
  the reference. It moves an AWQ model's logits by up to ~1.2 from the model as calibrated: that
  gap is ModelOpt's (recorded, bounded by CALIBRATED_ATOL), not the engine's.
- ModelOpt's fake quantizer rounds w * (maxbound / amax) while its export rounds
  w / (amax / maxbound); one float32 ulp apart, they disagree on weights that sit on a rounding
  midpoint (measured: see `weight_flips`). The reference is given the exported weights (its
  weight quantizers map them onto themselves, which the fixture checks, and are then switched off
  to keep the CPU reference fast).

What is asserted, and why these tolerances:
- every quantized linear of the engine against the reference's linears on the reference's own
  activations: relative 1e-5 (the same products, float32 sums in another order);
- logits of whole prompts: int4_awq (no activation quantization) within 1e-4. Where activations
  are quantized, the float32 rounding differences of the unquantized parts (attention sums in
  another order, ~1e-7) move the few activations that sit near an e4m3/int8 rounding boundary by a
  whole step, which then propagates: measured up to ~0.25 on logits of magnitude ~15, so
  LOGIT_ATOL bounds each recipe at about twice what was measured, argmax equal at every position;
- greedy tokens equal to the reference's for GREEDY_PREFIX tokens of every prompt (the whole
  GREEDY_TOKENS for most prompts; a near-tie flipped at token 13 in one w4a8 run).
"""

from __future__ import annotations

import copy
import json
import re
import shutil
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from engine import LLM, SamplingParams
from engine.config import EngineConfig
from engine.model.builder import load_model, parameter_bytes
from engine.quant.checkpoint import QuantConfigError, read_quant_config
from engine.quant.int4 import pack_int4
from engine.quant.linear import QuantLinear
from engine.runner import SeqChunk

BUNDLED = Path(__file__).resolve().parent.parent / "engine" / "bundled" / "tiny"
RECIPES = {  # recipe -> ModelOpt config
    "fp8": "FP8_DEFAULT_CFG",
    "fp8_per_channel": "FP8_PER_CHANNEL_PER_TOKEN_CFG",
    "int8_sq": "INT8_SMOOTHQUANT_CFG",
    "int4_awq": "INT4_AWQ_CFG",
    "w4a8_awq": "W4A8_AWQ_BETA_CFG",
}
CALIBRATION = (
    "Once upon a time there was a little girl named Lily. She loved to play outside with her "
    "dog, Max. One day they found a big red ball in the park and played until the sun went down."
)
PROMPTS = [
    "Tom and his mom went to the store to buy",
    "The cat sat on the mat and looked at the bird. The bird",
    "One day, a little boy named Ben",
]
LOGIT_ATOL = {  # measured: fp8 0.22, fp8_per_channel 0.25, int8_sq 0.04, int4 8e-6, w4a8 0.21
    "fp8": 0.5,
    "fp8_per_channel": 0.5,
    "int8_sq": 0.1,
    "int4_awq": 1e-4,
    "w4a8_awq": 0.5,
}
CALIBRATED_ATOL = 2.0
GREEDY_TOKENS = 16
GREEDY_PREFIX = 8
KV_BLOCKS = 64  # the engine's CPU default would allocate 512 MiB of KV pages per engine


@dataclass
class Export:
    recipe: str
    path: Path
    prompts: list[list[int]]
    reference_logits: list[torch.Tensor]  # [len, vocab] per prompt: fake quant as exported
    calibrated_logits: torch.Tensor  # [len, vocab] of the first prompt: fake quant as calibrated
    reference_greedy: list[list[int]]  # GREEDY_TOKENS per prompt
    # Hugging Face linear name -> (inputs [tokens, in], outputs [tokens, out]) over the prompts
    linear_io: dict[str, tuple[torch.Tensor, torch.Tensor]]
    weight_flips: float  # share of weights where fake quantizer and export disagree


@cache
def _modelopt():
    mtq = pytest.importorskip("modelopt.torch.quantization")
    from modelopt.torch.export import export_hf_checkpoint
    from modelopt.torch.export.unified_export_hf import requantize_resmooth_fused_llm_layers

    return mtq, export_hf_checkpoint, requantize_resmooth_fused_llm_layers


def dequantized(algo: str, tensors: dict[str, torch.Tensor], prefix: str) -> torch.Tensor:
    """The exported weight of one linear, float32 [out, in], read off the format directly."""
    w, s = tensors[prefix + "weight"], tensors[prefix + "weight_scale"].float()
    if w.dtype == torch.float8_e4m3fn:
        return w.float() * (s if s.dim() == 0 else s[:, None])
    if w.dtype == torch.int8:
        return w.float() * s[:, None]
    low, high = (w & 0xF).to(torch.int8), (w >> 4).to(torch.int8)
    q = torch.stack([low, high], dim=1).reshape(-1, w.shape[1])  # rows 2j, 2j + 1
    q = torch.where(q > 7, q - 16, q).float()
    deq = q * s.repeat_interleave(w.shape[1] // s.shape[1], dim=1)
    if algo == "W4A8_AWQ":
        s2 = tensors[prefix + "weight_scale_2"].float()
        deq = (deq / s2).clamp(-448, 448).to(torch.float8_e4m3fn).float() * s2
    return deq


def make_export(
    root: Path, recipe: str, disable: tuple[str, ...] = (), name: str = "", greedy: bool = True
) -> Export:
    """Quantize the bundled model with `recipe` (quantizers matching `disable` left off), export
    it with its tokenizer under root/name, and record the reference (greedy tokens too unless
    `greedy` is False)."""
    mtq, export_hf_checkpoint, resmooth = _modelopt()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(BUNDLED)
    model = AutoModelForCausalLM.from_pretrained(BUNDLED, dtype=torch.float32).eval()
    model.config.dtype = torch.float32  # a string here breaks ModelOpt 0.47's int4/int8 export
    config = copy.deepcopy(getattr(mtq, RECIPES[recipe]))
    config["quant_cfg"] = list(config["quant_cfg"]) + [
        {"quantizer_name": pattern, "enable": False} for pattern in disable
    ]
    calib = tokenizer(CALIBRATION, return_tensors="pt").input_ids
    prompts = [tokenizer(p).input_ids for p in PROMPTS]

    def logits(prompts: list[list[int]] = prompts) -> list[torch.Tensor]:
        return [model(torch.tensor([p])).logits[0] for p in prompts]

    with torch.no_grad():
        mtq.quantize(model, config, forward_loop=lambda m: m(calib))
        calibrated = logits(prompts[:1])[0]
        path = root / (name or recipe)
        export_hf_checkpoint(copy.deepcopy(model), export_dir=path, dtype=torch.float32)
        tokenizer.save_pretrained(path)

        resmooth(model)  # the export's own scale unification, on the reference
        tensors = load_file(path / "model.safetensors")
        algo = read_quant_config(path).algo
        flips = total = 0
        linears: dict[str, nn.Module] = {}
        for module_name, module in model.named_modules():
            if module_name + ".weight_scale" not in tensors:
                continue
            weight = module._parameters["weight"]
            exported = dequantized(algo, tensors, module_name + ".")
            # Another integer / e4m3 value, not just the last bit of the scale:
            fake = module.weight_quantizer(weight)
            flips += int((~torch.isclose(fake, exported, rtol=1e-6, atol=0)).sum())
            total += weight.numel()
            weight.copy_(exported)
            # Its own quantizer maps the exported weights onto themselves (the same integer /
            # e4m3 values; the scale rebuilt from amax may differ in the last float32 bit).
            again = module.weight_quantizer(weight)
            torch.testing.assert_close(again, exported, rtol=1e-6, atol=0, msg=module_name)
            linears[module_name] = module
        mtq.disable_quantizer(model, "*weight_quantizer")

        io: dict[str, list[list[torch.Tensor]]] = {n: [[], []] for n in linears}

        def record(name: str):
            def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
                io[name][0].append(args[0][0])  # [tokens, in] of the batch of one
                io[name][1].append(out[0])

            return hook

        hooks = [module.register_forward_hook(record(n)) for n, module in linears.items()]
        reference = logits()
        for hook in hooks:
            hook.remove()
        tokens = [
            model.generate(
                torch.tensor([p]),
                attention_mask=torch.ones(1, len(p), dtype=torch.long),
                max_new_tokens=GREEDY_TOKENS,
                min_new_tokens=GREEDY_TOKENS,
                do_sample=False,
                pad_token_id=0,
            )[0, len(p) :].tolist()
            for p in (prompts if greedy else [])
        ]
    linear_io = {n: (torch.cat(x), torch.cat(y)) for n, (x, y) in io.items()}
    return Export(recipe, path, prompts, reference, calibrated, tokens, linear_io, flips / total)


@pytest.fixture(scope="session")
def export_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("modelopt-exports")


_EXPORTS: dict[str, Export] = {}


def cached_export(root: Path, recipe: str) -> Export:
    if recipe not in _EXPORTS:
        _EXPORTS[recipe] = make_export(root, recipe)
    return _EXPORTS[recipe]


@pytest.fixture(scope="session", params=list(RECIPES))
def export(request, export_root) -> Export:
    return cached_export(export_root, request.param)


@pytest.fixture(scope="session")
def fp8_export(export_root) -> Export:
    return cached_export(export_root, "fp8")


def engine(path: Path | str, **kwargs) -> LLM:
    return LLM(str(path), num_kv_blocks=KV_BLOCKS, **kwargs)


def engine_logits(llm: LLM, prompts: list[list[int]]) -> list[torch.Tensor]:
    """Prefill logits of every position of each prompt, all prompts in one step."""
    bs = llm.config.block_size
    chunks, next_block = [], 0
    for p in prompts:
        blocks = -(-len(p) // bs)
        chunks.append(SeqChunk(p, 0, list(range(next_block, next_block + blocks)), len(p)))
        next_block += blocks
    out = llm.engine.runner.run(chunks, 0)  # [sum of lengths, vocab]
    return list(out.split([len(p) for p in prompts]))


def quant_linears(llm: LLM) -> dict[str, QuantLinear]:
    return {n: m for n, m in llm.engine.model.named_modules() if isinstance(m, QuantLinear)}


# -- each recipe against ModelOpt's fake quantization -------------------------------------------


def test_linears_match_fake_quant(export: Export) -> None:
    llm = engine(export.path)
    modules = quant_linears(llm)
    covered = [n for m in modules.values() for n in m.names]
    assert sorted(covered) == sorted(export.linear_io)  # every quantized HF linear, once
    assert export.weight_flips < 1e-3
    for name, module in modules.items():
        x = export.linear_io[module.names[0]][0]  # [tokens, in]
        for shard in module.names[1:]:
            assert torch.equal(export.linear_io[shard][0], x), f"{shard} has another input"
        want = torch.cat([export.linear_io[n][1] for n in module.names], dim=-1)
        with torch.no_grad():
            got = module(x)
        scale = want.abs().max().item()
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * scale, msg=name)


def test_logits_match_fake_quant(export: Export) -> None:
    llm = engine(export.path, block_size=4)
    assert llm.engine.model.quant.recipe == export.recipe
    got = engine_logits(llm, export.prompts)
    worst = max(
        (g - r).abs().max().item() for g, r in zip(got, export.reference_logits, strict=True)
    )
    drift = (got[0] - export.calibrated_logits).abs().max().item()
    print(
        f"{export.recipe}: |engine - fake quant| <= {worst:.2e}; vs the model as calibrated "
        f"{drift:.3f}; weights ModelOpt's fake quantizer and export disagree on: "
        f"{export.weight_flips:.1e}"
    )
    tolerance = LOGIT_ATOL[export.recipe]
    assert worst <= tolerance
    assert drift <= CALIBRATED_ATOL
    for g, r in zip(got, export.reference_logits, strict=True):
        # The same argmax, except where the reference's own top two are within the tolerance.
        picked, want = g.argmax(-1), r.argmax(-1)
        gap = r.gather(-1, want[:, None]) - r.gather(-1, picked[:, None])  # [len, 1]
        assert ((picked == want) | (gap[:, 0] <= 2 * tolerance)).all()


def test_greedy_matches_fake_quant(export: Export) -> None:
    # Chunked prefill (chunks of 16 tokens) and the three prompts batched.
    llm = engine(export.path, block_size=4, max_num_tokens=16)
    params = SamplingParams(max_tokens=GREEDY_TOKENS, ignore_eos=True)
    outs = llm.generate(export.prompts, params)
    for out, want in zip(outs, export.reference_greedy, strict=True):
        same = next(
            (i for i, (a, b) in enumerate(zip(out.token_ids, want, strict=True)) if a != b),
            len(want),
        )
        print(f"{export.recipe}: greedy equal for {same} of {len(want)} tokens")
        assert same >= GREEDY_PREFIX
        if export.recipe == "int4_awq":
            assert out.token_ids == want


def test_int4_packing_is_modelopts() -> None:
    _modelopt()
    from modelopt.torch.export.quant_utils import pack_int4_in_uint8

    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(64, 256, generator=generator)
    scale = weight.view(64, 2, 128).abs().amax(-1) / 7  # [64, 2]
    q = (weight.view(64, 2, 128) / scale[..., None]).round().clamp(-8, 7).to(torch.int8)
    packed = pack_int4(q.view(64, 256).t()).t()  # ModelOpt packs output rows in pairs
    assert torch.equal(packed, pack_int4_in_uint8(weight, scale, 128))


# -- what the engine reads from an export -------------------------------------------------------


def test_exclude_modules_are_served_unquantized(export_root) -> None:
    partial = make_export(
        export_root,
        "fp8",
        disable=("*layers.1.mlp*", "*layers.2.self_attn.o_proj*"),
        name="fp8-partial",
        greedy=False,
    )
    config = read_quant_config(partial.path)
    assert config.is_excluded("model.layers.1.mlp.down_proj")
    assert config.is_excluded("model.layers.2.self_attn.o_proj")
    assert not config.is_excluded("model.layers.2.self_attn.q_proj")
    llm = engine(partial.path)
    layers = llm.engine.model.model.layers
    for layer, part in [(1, "mlp.gate_up_proj"), (1, "mlp.down_proj"), (2, "self_attn.o_proj")]:
        module = layers[layer].get_submodule(part)
        assert type(module) is nn.Linear and module.weight.dtype == torch.float32, part
    assert isinstance(layers[2].self_attn.qkv_proj, QuantLinear)
    assert isinstance(layers[1].self_attn.o_proj, QuantLinear)
    assert type(llm.engine.model.model.embed_tokens) is nn.Embedding
    got = engine_logits(llm, partial.prompts)
    worst = max(
        (g - r).abs().max().item() for g, r in zip(got, partial.reference_logits, strict=True)
    )
    assert worst <= LOGIT_ATOL["fp8"]


def test_config_json_alone_is_enough(export_root) -> None:
    """Published checkpoints may carry only config.json's quantization_config (no group size):
    the group size is then read off the weight scales."""
    source = cached_export(export_root, "int4_awq")
    path = export_root / "int4-config-json-only"
    shutil.copytree(source.path, path)
    (path / "hf_quant_config.json").unlink()
    config = read_quant_config(path)
    assert (config.algo, config.group_size) == ("W4A16_AWQ", None)
    assert config.exclude_modules == ("lm_head", "model.embed_tokens")
    llm = engine(path)
    assert {m.group_size for m in quant_linears(llm).values()} == {128}
    want = engine_logits(engine(source.path), source.prompts)
    for got, ref in zip(engine_logits(llm, source.prompts), want, strict=True):
        assert torch.equal(got, ref)


def _expected_bytes(tensors: dict[str, torch.Tensor], dtype_bytes: int) -> int:
    """What the engine should hold for an export, from its tensors: weights at their stored
    width (int4: the packed bytes), weight scales in float32 with a per-tensor scale widened to one
    per row (W4A8's weight_scale_2 too), one input_scale and one AWQ / SmoothQuant factor (in the
    compute dtype) per fused matmul, everything unquantized in the compute dtype."""
    total = 0
    fused: dict[str, dict[str, None]] = {}  # fused matmul -> its HF linears, in order
    for name, t in tensors.items():
        prefix = name.rpartition(".")[0]
        if prefix + ".weight_scale" not in tensors:
            total += t.numel() * dtype_bytes
        else:
            key = re.sub(r"\.(q|k|v|gate|up)_proj$", ".fused", prefix)
            fused.setdefault(key, {})[prefix] = None
    for prefixes in fused.values():
        for p in prefixes:
            weight, scale = tensors[p + ".weight"], tensors[p + ".weight_scale"]
            rows = scale.shape[0] if scale.dim() >= 1 else weight.shape[0]
            total += weight.numel() + (scale.numel() if scale.dim() == 2 else rows) * 4
            total += rows * 4 if p + ".weight_scale_2" in tensors else 0
        first = next(iter(prefixes))
        total += 4 if first + ".input_scale" in tensors else 0
        smooth = tensors.get(first + ".pre_quant_scale")
        total += smooth.numel() * dtype_bytes if smooth is not None else 0
    return total


def test_weights_stay_quantized_in_memory(export: Export) -> None:
    loaded = load_model(EngineConfig(model=str(export.path), dtype="bfloat16"))
    quantized = loaded.weight_bytes
    assert quantized == parameter_bytes(loaded.model)
    tensors = load_file(export.path / "model.safetensors")
    assert quantized == _expected_bytes(tensors, 2)
    bf16 = load_model(EngineConfig(model="tiny", dtype="bfloat16")).weight_bytes
    ratio = quantized / bf16
    print(f"{export.recipe}: {quantized} bytes, {ratio:.3f} of bfloat16 ({bf16})")
    # Linear weights are 86% of the bundled model; the embedding (tied lm_head) stays bf16.
    assert ratio < (0.4 if "4" in export.recipe else 0.6)


# -- bad input -----------------------------------------------------------------------------------


def _write(path: Path, name: str, data: dict) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / name).write_text(json.dumps(data))
    return path


def test_quant_config_forms(tmp_path) -> None:
    hf = _write(
        tmp_path / "hf",
        "hf_quant_config.json",
        {
            "producer": {"name": "modelopt", "version": "0.47.0"},
            "quantization": {
                "quant_algo": "W4A8_AWQ",
                "group_size": 64,
                "kv_cache_quant_algo": "FP8",
                "exclude_modules": ["lm_head", "model.layers.0.mlp*"],
            },
        },
    )
    _write(hf, "config.json", {"quantization_config": {"quant_method": "gptq"}})  # ignored
    config = read_quant_config(hf)
    assert (config.algo, config.group_size, config.kv_cache_quant_algo) == ("W4A8_AWQ", 64, "FP8")
    assert config.recipe == "w4a8_awq"
    assert config.is_excluded("lm_head") and config.is_excluded("model.layers.0.mlp.up_proj")
    assert not config.is_excluded("model.layers.10.mlp.up_proj")
    published = _write(
        tmp_path / "hub",
        "config.json",
        {
            "quantization_config": {
                "quant_method": "modelopt",
                "quant_algo": "FP8",
                "ignore": ["lm_head"],
            }
        },
    )
    assert read_quant_config(published).exclude_modules == ("lm_head",)
    kv_only = _write(
        tmp_path / "kv",
        "hf_quant_config.json",
        {"quantization": {"quant_algo": None, "kv_cache_quant_algo": "FP8"}},
    )
    assert read_quant_config(kv_only) is None
    assert read_quant_config(_write(tmp_path / "plain", "config.json", {})) is None


@pytest.mark.parametrize(
    "files, message",
    [
        (
            {"hf_quant_config.json": {"quantization": {"quant_algo": "NVFP4"}}},
            r"'NVFP4' \(in .*\) is not supported; supported ModelOpt algorithms: FP8, "
            "FP8_PER_CHANNEL_PER_TOKEN, W8A8_SQ_PER_CHANNEL, W4A16_AWQ, W4A8_AWQ",
        ),
        (
            {"hf_quant_config.json": {"quantization": {"quant_algo": "MIXED_PRECISION"}}},
            "MIXED_PRECISION quantization is not supported",
        ),
        (
            {
                "hf_quant_config.json": {
                    "quantization": {"quant_algo": "W4A16_AWQ", "group_size": 100}
                }
            },
            "group_size 100 .* must be a multiple of 16",
        ),
        (
            {
                "hf_quant_config.json": {
                    "quantization": {"quant_algo": "FP8", "exclude_modules": "lm_head"}
                }
            },
            "exclude_modules must be a list",
        ),
        (
            {"config.json": {"quantization_config": {"quant_method": "awq", "bits": 4}}},
            "quant_method 'awq'; the engine serves ModelOpt checkpoints",
        ),
        ({"hf_quant_config.json": "FP8"}, "does not hold a JSON object"),
    ],
)
def test_bad_quant_configs_are_clear_errors(tmp_path, files, message) -> None:
    for name, data in files.items():
        _write(tmp_path, name, data)
    with pytest.raises(QuantConfigError, match=message):
        read_quant_config(tmp_path)


def test_bad_quantization_options() -> None:
    with pytest.raises(ValueError, match="quantization must be None or one of fp8, "):
        EngineConfig(quantization="nvfp4")
    with pytest.raises(QuantConfigError, match="'fp8' was asked for, but .* is not quantized"):
        load_model(EngineConfig(model="tiny", quantization="fp8"))


def test_recipe_must_match_the_checkpoint(fp8_export: Export) -> None:
    with pytest.raises(
        QuantConfigError, match=r"'int4_awq' \(W4A16_AWQ\) was asked for, but .* FP8"
    ):
        load_model(EngineConfig(model=str(fp8_export.path), quantization="int4_awq"))
    assert load_model(EngineConfig(model=str(fp8_export.path), quantization="fp8")).quant


def _edited_copy(source: Path, target: Path, edit) -> Path:
    shutil.copytree(source, target)
    tensors = load_file(target / "model.safetensors")
    edit(tensors)
    save_file(tensors, target / "model.safetensors", metadata={"format": "pt"})
    return target


@pytest.mark.parametrize(
    "edit, message",
    [
        (
            lambda t: t.pop("model.layers.3.self_attn.v_proj.input_scale"),
            r"checkpoint lacks 1 tensors, e.g. \['model.layers.3.self_attn.v_proj.input_scale'\]",
        ),
        (
            lambda t: t.__setitem__(
                "model.layers.2.self_attn.k_proj.input_scale",
                t["model.layers.2.self_attn.k_proj.input_scale"] * 2,
            ),
            "model.layers.2.self_attn.k_proj.input_scale differs from "
            "model.layers.2.self_attn.q_proj.input_scale, but the fused q_proj/k_proj/v_proj",
        ),
        (
            lambda t: t.__setitem__(
                "model.layers.0.mlp.up_proj.input_scale",
                t["model.layers.0.mlp.up_proj.input_scale"] * 1.01,
            ),
            "up_proj.input_scale differs from model.layers.0.mlp.gate_proj.input_scale",
        ),
        (
            lambda t: t.__setitem__(
                "model.layers.1.mlp.down_proj.weight",
                t["model.layers.1.mlp.down_proj.weight"].float(),
            ),
            "'model.layers.1.mlp.down_proj.weight' is torch.float32; expected torch.float8_e4m3fn",
        ),
        (
            lambda t: t.__setitem__(
                "model.layers.1.mlp.down_proj.weight_scale_2", torch.tensor(1.0)
            ),
            "'model.layers.1.mlp.down_proj.weight_scale_2' has no place in this FP8 layer",
        ),
        (
            lambda t: t.__setitem__(
                "model.layers.1.mlp.gate_proj.weight",
                t["model.layers.1.mlp.gate_proj.weight"][:, :128].contiguous(),
            ),
            r"gate_proj.weight' has shape \(768, 128\), the model expects \(768, 256\)",
        ),
    ],
    ids=["missing", "qkv-input-scales", "gate-up-input-scales", "dtype", "extra", "shape"],
)
def test_bad_checkpoints_are_clear_errors(fp8_export: Export, tmp_path, edit, message) -> None:
    path = _edited_copy(fp8_export.path, tmp_path / "bad", edit)
    with pytest.raises((ValueError, QuantConfigError), match=message):
        load_model(EngineConfig(model=str(path)))


def test_quantized_lm_head_is_refused() -> None:
    from transformers import AutoConfig

    from engine.model.llama import LlamaForCausalLM
    from engine.quant.checkpoint import QuantConfig

    config = AutoConfig.from_pretrained(BUNDLED)
    config.tie_word_embeddings = False
    with pytest.raises(QuantConfigError, match="quantizes lm_head"):
        LlamaForCausalLM(config, QuantConfig("FP8", exclude_modules=("model.embed_tokens",)))
    mixed = QuantConfig("FP8", exclude_modules=("lm_head", "*.k_proj"))
    with pytest.raises(QuantConfigError, match="leaves some of .*q_proj, .*k_proj, .*v_proj"):
        LlamaForCausalLM(config, mixed)


# -- dummy weights -------------------------------------------------------------------------------


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_dummy_quantized_weights(recipe: str) -> None:
    llm = engine("tiny", load_format="dummy", quantization=recipe)
    modules = quant_linears(llm)
    assert len(modules) == 4 * 8  # qkv, o, gate_up, down in each of the 8 layers
    assert all(m.quant.recipe == recipe for m in modules.values())
    out = llm.generate([[1, 2, 3, 4, 5]], SamplingParams(max_tokens=6, ignore_eos=True))[0]
    assert len(out.token_ids) == 6
    logits = engine_logits(llm, [[1, 2, 3, 4, 5]])[0]
    assert torch.isfinite(logits).all() and logits.std() > 0
