"""KV-cache quantization a checkpoint asks for, and its scales.

ModelOpt (`mtq.quantize` with `FP8_KV_CFG`, then `export_hf_checkpoint`) writes, per layer,
`model.layers.{i}.self_attn.k_proj.k_scale` and `...v_proj.v_scale`: float32 scalars equal to the
calibrated amax of K (after RoPE) and V divided by 448, and names the format in
`hf_quant_config.json` (`quantization.kv_cache_quant_algo: "FP8"`) and in config.json's
`quantization_config` (`kv_cache_scheme: {"type": "float", "num_bits": 8}`, or
`kv_cache_quant_algo` in older exports). ModelOpt 0.47 exports no INT8 KV scales (its export
asserts FP8/NVFP4 for them), so an int8 cache always uses per-token dynamic scales.

`resolve_kv_quant` turns the engine's `kv_cache_dtype` and the checkpoint into what the cache
is built with:
- auto: fp8 with the checkpoint's scales when it says FP8 KV, else the model's dtype;
- fp8: the checkpoint's scales when it has them, else 1.0 (vLLM's default as well);
- int8: per token and KV head scales computed as tokens are written (engine/kv/quant.py).
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, NamedTuple

from engine.quant.checkpoint import quant_section

_SCALE_NAME = re.compile(r"model\.layers\.(\d+)\.self_attn\.(k_proj\.k_scale|v_proj\.v_scale)")


class KVQuant(NamedTuple):
    kv_cache_dtype: str  # auto (the model's dtype) | fp8 | int8
    fp8_scales: list[tuple[float, float]] | None  # per layer (k_scale, v_scale) for fp8
    scales_source: str  # where the scales come from, for logs and reports


def checkpoint_kv_algo(model_dir: Path) -> str | None:
    """The KV-cache quantization a ModelOpt checkpoint was built with ("FP8", ...), or None."""
    found = quant_section(model_dir)
    if found is None:
        return None
    section = found[0]
    if section.get("kv_cache_quant_algo"):
        return str(section["kv_cache_quant_algo"]).upper()
    scheme = section.get("kv_cache_scheme")  # compressed-tensors' spelling
    if isinstance(scheme, dict) and scheme.get("type") == "float" and scheme.get("num_bits") == 8:
        return "FP8"
    return str(scheme).upper() if isinstance(scheme, str) else None


def read_fp8_kv_scales(model_dir: Path, num_layers: int) -> list[tuple[float, float]] | None:
    """Per layer (k_scale, v_scale) from the checkpoint's safetensors; None when it has none.
    A checkpoint with scales for some layers only, or a scale that is not a positive finite
    number, is an error."""
    from safetensors import safe_open

    from engine.model.loader import CheckpointError, safetensors_files

    files, weight_map = safetensors_files(model_dir)
    if weight_map is not None:  # open only the shards that hold scales
        wanted = {model_dir / f for name, f in weight_map.items() if _SCALE_NAME.fullmatch(name)}
        files = [f for f in files if f in wanted]
    found: dict[tuple[int, str], float] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():
                match = _SCALE_NAME.fullmatch(name)
                if match:
                    tensor = handle.get_tensor(name)
                    if tensor.numel() != 1:
                        raise CheckpointError(
                            f"{name} in {file} has shape {tuple(tensor.shape)}; expected one "
                            "per-tensor KV scale"
                        )
                    found[(int(match[1]), match[2][0])] = float(tensor.float().item())
    if not found:
        return None
    missing = [
        f"layer {i} {which}_scale"
        for i in range(num_layers)
        for which in "kv"
        if (i, which) not in found
    ]
    if missing:
        raise CheckpointError(
            f"{model_dir} has KV scales for some layers but not {', '.join(missing[:3])}"
            f"{' ...' if len(missing) > 3 else ''}"
        )
    bad = [(key, s) for key, s in found.items() if not (math.isfinite(s) and s > 0)]
    if bad:
        (layer, which), value = bad[0]
        raise CheckpointError(f"{model_dir}: layer {layer} {which}_scale is {value}, not > 0")
    return [(found[(i, "k")], found[(i, "v")]) for i in range(num_layers)]


def resolve_kv_quant(kv_cache_dtype: str, model_dir: Path | None, num_layers: int) -> KVQuant:
    """`model_dir` None (dummy weights): no checkpoint scales."""
    algo = checkpoint_kv_algo(model_dir) if model_dir is not None else None
    if kv_cache_dtype == "int8":
        return KVQuant("int8", None, "dynamic per token and KV head")
    if kv_cache_dtype == "auto" and algo != "FP8":
        return KVQuant("auto", None, "unquantized")
    scales = read_fp8_kv_scales(model_dir, num_layers) if model_dir is not None else None
    if scales is None:
        if algo == "FP8":
            from engine.model.loader import CheckpointError

            raise CheckpointError(f"{model_dir} says its KV cache is FP8 but holds no KV scales")
        return KVQuant("fp8", [(1.0, 1.0)] * num_layers, "default 1.0")
    return KVQuant("fp8", scales, "checkpoint")


def kv_quant_for(config: Any, loaded: Any) -> KVQuant:
    """For an EngineConfig and the LoadedModel it gave; dummy weights take no checkpoint scales."""
    model_dir = loaded.model_dir if config.load_format != "dummy" else None
    return resolve_kv_quant(config.kv_cache_dtype, model_dir, loaded.hf_config.num_hidden_layers)
