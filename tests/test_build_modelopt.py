"""The ModelOpt side of builds: recipe configs, and the export fix for string config dtypes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from build_support import one_thread
from safetensors import safe_open

from engine_build.build import export_checkpoint
from engine_build.recipes import RECIPES, get_recipe, import_mtq, modelopt_config, ppl_limit

BUNDLED = Path(__file__).resolve().parent.parent / "engine" / "bundled" / "tiny"
KV_ENTRY = {"quantizer_name": "*[kv]_bmm_quantizer", "cfg": {"num_bits": (4, 3), "axis": None}}


def test_each_recipe_is_modelopts_config_with_the_kv_cache_part_last() -> None:
    mtq = import_mtq()
    for recipe in RECIPES.values():
        for kv in ("auto", "int8"):
            config = modelopt_config(recipe, kv)
            if recipe.mtq_config is None:
                assert config is None
            else:
                assert config == getattr(mtq, recipe.mtq_config)
        config = modelopt_config(recipe, "fp8")
        assert config["quant_cfg"][-1] == KV_ENTRY
        if recipe.mtq_config is not None:
            base = getattr(mtq, recipe.mtq_config)
            assert config["quant_cfg"][:-1] == base["quant_cfg"]
            assert KV_ENTRY not in base["quant_cfg"]  # ModelOpt's own config is left alone
    assert modelopt_config(get_recipe("none"), "fp8")["quant_cfg"][0] == {
        "quantizer_name": "*",
        "enable": False,
    }


def test_group_size_replaces_the_int4_block_only() -> None:
    config = modelopt_config(get_recipe("w4a8_awq"), "auto", group_size=64)
    [weight] = [q for q in config["quant_cfg"] if q["quantizer_name"] == "*weight_quantizer"]
    int4, fp8 = weight["cfg"]
    assert int4["block_sizes"] == {-1: 64, "type": "static"} and "block_sizes" not in fp8
    assert import_mtq().W4A8_AWQ_BETA_CFG["quant_cfg"][1]["cfg"][0]["block_sizes"][-1] == 128
    with pytest.raises(ValueError, match="--group-size applies to int4_awq and w4a8_awq"):
        modelopt_config(get_recipe("int8_sq"), "auto", group_size=64)
    with pytest.raises(ValueError, match="unknown recipe 'int2'; choose one of none, fp8"):
        get_recipe("int2")
    with pytest.raises(ValueError, match="unknown KV cache dtype 'fp4'"):
        modelopt_config(get_recipe("fp8"), "fp4")


def test_budgets_are_the_issues() -> None:
    limits = {name: ppl_limit(recipe, "auto") for name, recipe in RECIPES.items()}
    assert limits == {
        "none": None,
        "fp8": 0.01,
        "fp8_per_channel": 0.01,
        "int8_sq": 0.03,
        "int4_awq": 0.06,
        "w4a8_awq": 0.06,
    }
    assert ppl_limit(get_recipe("none"), "fp8") == 0.01
    assert ppl_limit(get_recipe("int4_awq"), "fp8") == pytest.approx(0.07)
    assert ppl_limit(get_recipe("none"), "int8") is None


def calibrated_int4_with_string_dtype() -> torch.nn.Module:
    """A model whose config.dtype is the string "bfloat16", not a torch.dtype: what a config
    gets from `AutoConfig.from_pretrained(dir, dtype="bfloat16")` or from code that assigns
    `config.dtype = args.dtype` (transformers normalizes the string only in a config's
    constructor)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    assert AutoConfig.from_pretrained(BUNDLED, dtype="bfloat16").dtype == "bfloat16"
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(BUNDLED))
    model.config.dtype = "bfloat16"
    ids = torch.randint(4, 4096, (2, 32), generator=torch.Generator().manual_seed(0))
    mtq = import_mtq()
    mtq.quantize(model, modelopt_config(get_recipe("int4_awq"), "auto"), lambda m: m(ids))
    return model


def test_export_of_a_string_config_dtype(tmp_path: Path) -> None:
    """The cause of "Invalid device string: 'bfloat16'" (ModelOpt 0.47 passes the config's dtype
    to weight.to() unchecked) and the fix (export_checkpoint passes a torch.dtype)."""
    from modelopt.torch.export import export_hf_checkpoint

    with one_thread():
        broken = calibrated_int4_with_string_dtype()
        with pytest.raises(RuntimeError, match="Invalid device string: 'bfloat16'"):
            export_hf_checkpoint(broken, export_dir=tmp_path / "unfixed")

        model = calibrated_int4_with_string_dtype()
        export_checkpoint(model, tmp_path / "fixed", torch.bfloat16)
    quant = json.loads((tmp_path / "fixed" / "hf_quant_config.json").read_text())
    assert quant["quantization"]["quant_algo"] == "W4A16_AWQ"
    with safe_open(str(tmp_path / "fixed" / "model.safetensors"), "pt") as f:
        assert f.get_tensor("model.layers.0.mlp.up_proj.weight").dtype == torch.uint8
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.bfloat16
        assert f.get_tensor("model.norm.weight").dtype == torch.bfloat16
