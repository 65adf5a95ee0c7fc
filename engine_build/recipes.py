"""Build recipes: `workbench build --quant NAME --kv-cache-dtype KV` -> a ModelOpt quantization
config, and the perplexity budget each recipe is held to.

Every recipe is one of ModelOpt's own configs (`mtq.<NAME>_CFG`), copied, never edited in place;
the KV-cache part is ModelOpt's `FP8_KV_CFG` appended to its `quant_cfg` list (later entries win,
so the K/V quantizers it enables stay on). ModelOpt 0.47 exports no INT8 KV-cache scales (its HF
export asserts FP8/NVFP4 for them), so `--kv-cache-dtype int8` quantizes nothing at build time:
it is recorded as the engine's serving default, and the engine computes per-token scales as it
writes the cache (engine/kv/quant.py).
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from typing import Any

KV_CACHE_DTYPES = ("auto", "fp8", "int8")


@dataclass(frozen=True)
class Recipe:
    name: str
    mtq_config: str | None  # attribute of modelopt.torch.quantization; None: no quantization
    summary: str
    ppl_limit: float | None  # largest relative perplexity increase allowed (issue 4)
    grouped: bool = False  # int4 weights with one scale per group of input channels


RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in (
        Recipe("none", None, "weights as they are (only the KV cache may be quantized)", None),
        Recipe("fp8", "FP8_DEFAULT_CFG", "fp8 e4m3 weights and activations, per tensor", 0.01),
        Recipe(
            "fp8_per_channel",
            "FP8_PER_CHANNEL_PER_TOKEN_CFG",
            "fp8 weights per output channel, activations per token (dynamic)",
            0.01,
        ),
        Recipe(
            "int8_sq",
            "INT8_SMOOTHQUANT_CFG",
            "SmoothQuant: int8 weights per channel, int8 activations per tensor",
            0.03,
        ),
        Recipe(
            "int4_awq",
            "INT4_AWQ_CFG",
            "AWQ: int4 weights in groups, activations in the compute dtype",
            0.06,
            grouped=True,
        ),
        Recipe(
            "w4a8_awq",
            "W4A8_AWQ_BETA_CFG",
            "AWQ: int4 weights in groups, fp8 activations",
            0.06,
            grouped=True,
        ),
    )
}
FP8_KV_PPL_LIMIT = 0.01  # an fp8 KV cache alone may cost at most this much perplexity


def get_recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; choose one of {', '.join(RECIPES)}")
    return RECIPES[name]


def check_kv_cache_dtype(kv_cache_dtype: str) -> None:
    if kv_cache_dtype not in KV_CACHE_DTYPES:
        raise ValueError(
            f"unknown KV cache dtype {kv_cache_dtype!r}; choose one of {', '.join(KV_CACHE_DTYPES)}"
        )


def ppl_limit(recipe: Recipe, kv_cache_dtype: str) -> float | None:
    """The budget of a build: the recipe's, plus the fp8 KV cache's when both quantize."""
    limits = [recipe.ppl_limit, FP8_KV_PPL_LIMIT if kv_cache_dtype == "fp8" else None]
    given = [x for x in limits if x is not None]
    return sum(given) if given else None


def modelopt_config(
    recipe: Recipe, kv_cache_dtype: str, group_size: int | None = None
) -> dict[str, Any] | None:
    """The `mtq.quantize` config of a build, or None when ModelOpt has nothing to do (recipe
    none with a KV cache that is not fp8). `group_size` replaces the int4 block size (128)."""
    mtq = import_mtq()
    check_kv_cache_dtype(kv_cache_dtype)
    if group_size is not None and not recipe.grouped:
        raise ValueError(f"--group-size applies to int4_awq and w4a8_awq, not {recipe.name}")
    if recipe.mtq_config is None:
        if kv_cache_dtype != "fp8":
            return None
        config: dict[str, Any] = {"quant_cfg": [{"quantizer_name": "*", "enable": False}]}
        config["algorithm"] = "max"
    else:
        config = copy.deepcopy(getattr(mtq, recipe.mtq_config))
        config["quant_cfg"] = list(config["quant_cfg"])
    if group_size is not None:
        _set_group_size(config, group_size)
    if kv_cache_dtype == "fp8":
        config["quant_cfg"] += copy.deepcopy(mtq.FP8_KV_CFG["quant_cfg"])
    return config


def import_mtq() -> Any:
    """modelopt.torch.quantization, without its warning that it was not tested with this
    transformers version (the recipes here are checked against it by tests/test_build.py)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*not tested with current version of modelopt")
        import modelopt.torch.quantization as mtq
    return mtq


def _set_group_size(config: dict[str, Any], group_size: int) -> None:
    if group_size < 1:
        raise ValueError(f"--group-size must be >= 1, got {group_size}")
    found = False
    for entry in config["quant_cfg"]:
        if entry.get("quantizer_name") != "*weight_quantizer":
            continue
        cfgs = entry["cfg"] if isinstance(entry["cfg"], list) else [entry["cfg"]]
        for cfg in cfgs:
            if cfg.get("num_bits") == 4 and "block_sizes" in cfg:
                cfg["block_sizes"] = {**cfg["block_sizes"], -1: group_size}
                found = True
    if not found:
        raise ValueError("this recipe has no int4 weight groups to resize")


def describe_config(config: dict[str, Any] | None) -> dict[str, Any] | None:
    """A JSON-able copy of a ModelOpt config (tuples as lists, int keys as strings)."""

    def plain(value: Any) -> Any:
        if isinstance(value, dict):
            return {str(k): plain(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return value

    return None if config is None else plain(config)
