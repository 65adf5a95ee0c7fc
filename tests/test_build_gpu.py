"""`workbench build` on a CUDA GPU: calibration in bfloat16 on the device, every recipe of the
bundled model within its budget through the GPU engine, and a real-shape preset with random
weights (what the GPU speed runs build). Run with `python -m pytest -m gpu`."""

from __future__ import annotations

import json

import pytest
import torch

from engine import LLM, SamplingParams
from engine_build.build import BuildSpec, run_build
from engine_build.recipes import RECIPES, ppl_limit

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.mark.parametrize(
    ("recipe", "kv"), [(r, "auto") for r in RECIPES if r != "none"] + [("none", "fp8")]
)
def test_bundled_model_builds_on_the_gpu_within_budget(tmp_path, recipe: str, kv: str) -> None:
    spec = BuildSpec(
        model="tiny", out=tmp_path / "e", quant=recipe, kv_cache_dtype=kv, device="cuda",
        calib_size=16, calib_seq_len=256,
    )  # fmt: skip
    result = run_build(spec)
    ppl = result.report["perplexity"]
    assert ppl["device"].startswith("cuda") and ppl["dtype"] == "bfloat16"
    assert result.engine["calibration"]["samples"] == 16
    delta = ppl["texts"]["heldout"]["delta_rel"]
    assert delta <= ppl_limit(RECIPES[recipe], kv), json.dumps(ppl["texts"])


@pytest.mark.parametrize("recipe", ["fp8", "int4_awq"])
def test_real_shape_preset_with_random_weights(tmp_path, recipe: str) -> None:
    spec = BuildSpec(
        model="llama-3.2-1b", out=tmp_path / recipe, quant=recipe, load_format="dummy",
        device="cuda", calib_size=4, calib_seq_len=128, calib_batch_size=4,
    )  # fmt: skip
    result = run_build(spec)
    assert result.engine["dtype"] == "bfloat16"
    assert result.report["size"]["ratio"] < (0.65 if recipe == "fp8" else 0.45)
    llm = LLM(str(result.out), num_kv_blocks=64, block_size=16)
    prompt = list(range(100, 164))  # no tokenizer: prompts are token ids
    out = llm.generate(prompt, SamplingParams(max_tokens=8, ignore_eos=True))[0]
    assert out.error is None and len(out.token_ids) == 8
