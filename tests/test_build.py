"""`workbench build` on the bundled model, on CPU: every recipe builds, the engine directory has
what it promises, the engine serves it, and its perplexity stays within the recipe's budget."""

# ruff: noqa: F811  (pytest fixtures imported from build_support are arguments here)

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest
import torch
from build_support import builds, eval_text, one_thread  # noqa: F401  (fixtures)
from safetensors import safe_open

from engine import LLM, SamplingParams
from engine.model import engine_dir
from engine_build import texts
from engine_build.build import STAGES, BuildSpec, run_build
from engine_build.recipes import RECIPES, ppl_limit

BUNDLED = Path(__file__).resolve().parent.parent / "engine" / "bundled" / "tiny"
# What ModelOpt 0.47 writes as quant_algo for each recipe, and the dtype of a quantized weight.
EXPECTED = {
    "none": (None, torch.float16),
    "fp8": ("FP8", torch.float8_e4m3fn),
    "fp8_per_channel": ("FP8_PER_CHANNEL_PER_TOKEN", torch.float8_e4m3fn),
    "int8_sq": ("W8A8_SQ_PER_CHANNEL", torch.int8),
    "int4_awq": ("W4A16_AWQ", torch.uint8),
    "w4a8_awq": ("W4A8_AWQ", torch.uint8),
}
CASES = [(r, "auto") for r in RECIPES] + [("none", "fp8"), ("fp8", "int8")]


def tensor_dtypes(out) -> dict[str, torch.dtype]:
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        return {k: f.get_slice(k).get_dtype() for k in f.keys()}


@pytest.mark.parametrize(("recipe", "kv"), CASES, ids=[f"{r}-kv_{k}" for r, k in CASES])
def test_recipe_builds_serves_and_stays_within_its_budget(builds, recipe: str, kv: str) -> None:
    result = builds.get(recipe, kv)
    out = result.out
    assert not list(out.parent.glob(f".{out.name}.partial-*"))
    names = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "engine.json", "build_report.json"} <= names
    assert {"tokenizer.json", "tokenizer_config.json"} <= names

    algo, weight_dtype = EXPECTED[recipe]
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        q_proj = f.get_tensor("model.layers.0.self_attn.q_proj.weight")
        embed = f.get_tensor("model.embed_tokens.weight")
        keys = set(f.keys())
    assert q_proj.dtype == weight_dtype
    assert embed.dtype == torch.float16  # unquantized tensors keep the source's dtype
    if recipe in ("int4_awq", "w4a8_awq"):
        assert q_proj.shape == (128, 256)  # two int4 rows per byte: [out / 2, in]
    quant_file = out / "hf_quant_config.json"
    kv_algo = "FP8" if kv == "fp8" else None
    if algo is None and kv_algo is None:
        assert not quant_file.exists()
    else:
        quant = json.loads(quant_file.read_text())["quantization"]
        assert (quant["quant_algo"], quant["kv_cache_quant_algo"]) == (algo, kv_algo)
    assert ("model.layers.0.self_attn.k_proj.k_scale" in keys) == (kv == "fp8")

    engine = json.loads((out / "engine.json").read_text())
    assert engine["format"] == engine_dir.FORMAT
    assert (engine["recipe"], engine["kv_cache_dtype"]) == (recipe, kv)
    assert engine["quantization"]["quant_algo"] == algo
    tiny_weights = (BUNDLED / "model.safetensors").read_bytes()
    digest = hashlib.sha256(b"model.safetensors\0" + tiny_weights).hexdigest()
    assert engine["source"]["weights_sha256"] == digest
    assert engine["weights_sha256"] == engine_dir.weights_sha256(out)
    assert set(engine["versions"]) == {"torch", "transformers", "modelopt", "workbench"}
    assert engine["versions"]["modelopt"] and engine["versions"]["torch"] == torch.__version__
    assert engine["serving"] == ({"kv_cache_dtype": kv} if kv != "auto" else {})
    assert ("skipped" in engine["calibration"]) == (recipe == "none" and kv != "fp8")

    report = json.loads((out / "build_report.json").read_text())
    assert report == json.loads(json.dumps(result.report))
    assert set(report["timings_s"]) == {*STAGES, "total"}
    assert report["size"]["source_bytes"] == len(tiny_weights)
    assert report["size"]["build_weights_bytes"] == (out / "model.safetensors").stat().st_size
    measured = report["perplexity"]["texts"][str(builds.eval_text)]
    source, build = measured["source"]["perplexity"], measured["build"]["perplexity"]
    assert measured["delta_rel"] == pytest.approx(build / source - 1, abs=1e-5)
    limit = ppl_limit(RECIPES[recipe], kv)
    if limit is None:  # nothing quantized at all: the same fp16 weights, the same numbers
        assert build == source
    else:
        assert report["limit_rel"] == limit and report["within_limit"] is True
        assert measured["delta_rel"] <= limit
        assert measured["simulated"]["tokens"] == measured["source"]["tokens"]

    # The engine serves the directory (with the stored serving defaults).
    with one_thread():
        llm = LLM(str(out), block_size=4, num_kv_blocks=64)
        out_text = llm.generate("Once upon a time", SamplingParams(max_tokens=8))[0]
    assert out_text.error is None and len(out_text.token_ids) >= 1
    if kv != "auto":
        assert llm.config.kv_cache_dtype == kv


def test_int8_kv_cache_is_a_serving_default(builds) -> None:
    """ModelOpt exports no int8 KV scales: the build quantizes only the weights, the engine
    directory asks for an int8 cache, and the perplexity of the build is measured with one."""
    result = builds.get("fp8", "int8")
    assert result.engine["serving"]["kv_cache_dtype"] == "int8"
    assert result.engine["quantization"]["kv_cache_quant_algo"] is None
    assert result.report["perplexity"]["kv_cache_dtype"] == "int8"
    assert engine_dir.serving_defaults(result.out) == {"kv_cache_dtype": "int8"}


def test_source_perplexity_equals_transformers(builds) -> None:
    """The evaluate stage's perplexity of the source through our engine (chunked teacher forcing
    over the paged cache) is exp of the mean NLL transformers gives on the same windows."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    result = builds.get("none")
    measured = result.report["perplexity"]["texts"][str(builds.eval_text)]["source"]
    tokenizer = AutoTokenizer.from_pretrained(BUNDLED)
    stream = texts.token_stream(tokenizer, texts.read_documents(builds.eval_text))
    model = AutoModelForCausalLM.from_pretrained(BUNDLED, dtype=torch.float32).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(stream) - 1, 255):  # 256-token windows sharing one token
            ids = torch.tensor([stream[start : start + 256]])
            logits = model(ids).logits[0, :-1]  # [len - 1, vocab]
            total += float(torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum"))
            count += ids.shape[1] - 1
    assert measured["tokens"] == count == len(stream) - 1
    assert measured["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-4)


def test_stages_report_progress_in_order(builds) -> None:
    builds.get("int4_awq")
    events = builds.events[("int4_awq", "auto")]
    stage_events = [e for e in events if e.kind in ("start", "end")]
    assert [(e.kind, e.stage) for e in stage_events] == [
        (kind, stage) for stage in STAGES for kind in ("start", "end")
    ]
    calibrate = [e for e in events if e.stage == "calibrate" and e.kind == "progress"]
    fractions = [e.fraction for e in calibrate]
    assert fractions == sorted(fractions) and 0 < fractions[0] and fractions[-1] < 1
    assert {"pass 1, batch 1/1", "pass 2, batch 1/1"} <= {e.message for e in calibrate}
    evaluate = [e for e in events if e.stage == "evaluate" and e.kind == "progress"]
    assert evaluate[-1].fraction == 1.0
    assert any("Inserted" in e.message for e in events if e.kind == "log")  # ModelOpt's print


def test_serving_defaults_apply_unless_overridden(tmp_path, builds) -> None:
    """`LLM(dir)` and `workbench launch --model dir` start from engine.json's serving defaults;
    an option given explicitly wins."""
    from workbench.cli import build_parser, engine_config_from_args

    spec = builds.spec(
        "none", max_batch_size=3, max_seq_len=200, max_num_tokens=96, block_size=8, evaluate=False
    )
    spec.out = tmp_path / "served"
    with one_thread():
        run_build(spec)
    assert engine_dir.serving_defaults(spec.out) == {
        "max_num_seqs": 3,
        "max_model_len": 200,
        "max_num_tokens": 96,
        "block_size": 8,
    }
    with one_thread():
        llm = LLM(str(spec.out), num_kv_blocks=64)
        assert (llm.config.max_num_seqs, llm.config.max_model_len) == (3, 200)
        assert (llm.config.max_num_tokens, llm.config.block_size) == (96, 8)
        assert llm.engine.max_model_len == 200
        assert LLM(str(spec.out), num_kv_blocks=64, block_size=4).config.block_size == 4
    args = build_parser().parse_args(["generate", "--prompt", "x", "--model", str(spec.out)])
    assert engine_config_from_args(args).block_size == 8
    args = build_parser().parse_args(["launch", "--model", str(spec.out), "--block-size", "2"])
    config = engine_config_from_args(args)
    assert (config.block_size, config.max_num_seqs) == (2, 3)
    assert engine_dir.serving_defaults("tiny") == {}
    assert engine_dir.serving_defaults(BUNDLED) == {}


def test_dummy_weights_at_a_models_shape(tmp_path) -> None:
    """--load-format dummy: random weights at the model's shape (how GPU speed runs build a
    real-shape model without its checkpoint); no perplexity, the tokenizer is kept."""
    spec = BuildSpec(
        model="tiny", out=tmp_path / "dummy", quant="int4_awq", load_format="dummy",
        calib_size=2, calib_seq_len=64, calib_batch_size=2,
    )  # fmt: skip
    with one_thread():
        result = run_build(spec)
        llm = LLM(str(result.out), block_size=4, num_kv_blocks=32)
        out = llm.generate("Once upon a time", SamplingParams(max_tokens=4, ignore_eos=True))[0]
    assert len(out.token_ids) == 4
    assert result.engine["source"]["weights"] == "random (seed 0)"
    assert "weights_sha256" not in result.engine["source"]
    assert "random weights" in result.report["perplexity"]["skipped"]
    assert result.report["within_limit"] is None
    assert (result.out / "tokenizer.json").is_file()


def test_an_engine_without_tokenizer_serves_token_ids(tmp_path) -> None:
    """What a build from a preset (no tokenizer anywhere) gives: the engine loads it and takes
    prompts as token ids, as it does for a dummy preset."""
    spec = BuildSpec(model="tiny", out=tmp_path / "e", quant="none", evaluate=False)
    result = run_build(spec)
    for name in engine_dir.TOKENIZER_FILES:
        (result.out / name).unlink(missing_ok=True)
    assert engine_dir.without_tokenizer(result.out)
    assert not engine_dir.without_tokenizer(BUNDLED)  # a checkpoint is not an engine
    with one_thread():
        llm = LLM(str(result.out), block_size=4, num_kv_blocks=32)
        out = llm.generate([0, 100, 200], SamplingParams(max_tokens=3, ignore_eos=True))[0]
    assert llm.tokenizer is None and len(out.token_ids) == 3
