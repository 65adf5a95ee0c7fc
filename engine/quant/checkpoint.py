"""What a ModelOpt checkpoint says about its weight quantization, as a typed `QuantConfig`.

ModelOpt's `export_hf_checkpoint` writes the recipe twice: in its own `hf_quant_config.json`
(`{"producer": ..., "quantization": {"quant_algo", "group_size", "exclude_modules",
"kv_cache_quant_algo", ...}}`) and in config.json as `quantization_config` with
`quant_method: "modelopt"` (`quant_algo`, the excluded modules under `ignore`; no group size).
Published nvidia/*-FP8 Hub checkpoints carry at least the config.json form. The first file wins
when both exist. A group size the config does not give is read off the weights at load time
(`weight_scale` is [out, in / group]).

Recipe names (what `workbench build --quant` and `EngineConfig.quantization` take) map to the
algorithm names ModelOpt writes: `RECIPE_ALGOS`.
"""

from __future__ import annotations

import fnmatch
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Recipe name -> ModelOpt quant_algo (modelopt/torch/export/quant_utils.py
# process_layer_quant_config).
RECIPE_ALGOS: dict[str, str] = {
    "fp8": "FP8",  # per-tensor weight scale, static per-tensor activation scale
    "fp8_per_channel": "FP8_PER_CHANNEL_PER_TOKEN",  # per-channel weight, dynamic per-token acts
    "int8_sq": "W8A8_SQ_PER_CHANNEL",  # SmoothQuant: per-channel int8 weight, static int8 acts
    "int4_awq": "W4A16_AWQ",  # int4 weight, group scales, activations in the compute dtype
    "w4a8_awq": "W4A8_AWQ",  # int4 weight, group scales + per-tensor fp8 scale, fp8 activations
}
SUPPORTED_ALGOS = tuple(RECIPE_ALGOS.values())
GROUPED_ALGOS = frozenset({"W4A16_AWQ", "W4A8_AWQ"})
DEFAULT_GROUP_SIZE = 128  # ModelOpt's INT4_AWQ_CFG / W4A8_AWQ_BETA_CFG block size
HF_QUANT_CONFIG = "hf_quant_config.json"


class QuantConfigError(ValueError):
    """A checkpoint's quantization cannot be served. One line, meant for the user."""


@dataclass(frozen=True)
class QuantConfig:
    algo: str  # one of SUPPORTED_ALGOS
    group_size: int | None = None  # int4 schemes: input channels per scale; None: read it off
    exclude_modules: tuple[str, ...] = ()  # Hugging Face module names or fnmatch patterns
    kv_cache_quant_algo: str | None = None  # "FP8", ...; served by engine/quant/kv_scales.py
    source: str = ""  # the file it was read from, or "dummy"

    def __post_init__(self) -> None:
        if self.algo not in SUPPORTED_ALGOS:
            raise QuantConfigError(
                f"quantization {self.algo!r}{_where(self.source)} is not supported; "
                f"supported ModelOpt algorithms: {', '.join(SUPPORTED_ALGOS)}"
            )
        if self.group_size is not None and (
            not isinstance(self.group_size, int) or self.group_size < 16 or self.group_size % 16
        ):
            raise QuantConfigError(
                f"group_size {self.group_size!r}{_where(self.source)} is not supported: "
                "it must be a multiple of 16"
            )

    @property
    def recipe(self) -> str:
        return next(name for name, algo in RECIPE_ALGOS.items() if algo == self.algo)

    def is_excluded(self, module: str) -> bool:
        """Whether the Hugging Face module `module` (e.g. "model.layers.0.self_attn.q_proj")
        stays in the compute dtype: an exact name, an fnmatch pattern ("*.mlp.gate*") or a
        parent module of it in exclude_modules."""
        return any(
            module == pattern
            or fnmatch.fnmatchcase(module, pattern)
            or module.startswith(pattern + ".")
            for pattern in self.exclude_modules
        )


def quant_section(model_dir: Path) -> tuple[dict[str, Any], Path] | None:
    """The checkpoint's quantization description and the file it is in: hf_quant_config.json's
    "quantization" object (ModelOpt's own export), else config.json's quantization_config (any
    tool's, as the Hub carries them); None when it has neither."""
    model_dir = Path(model_dir)
    hf_quant = model_dir / HF_QUANT_CONFIG
    if hf_quant.is_file():
        data = _read_json(hf_quant)
        section = data.get("quantization", data)
        if not isinstance(section, dict):
            raise QuantConfigError(f"{hf_quant} has no 'quantization' object")
        return section, hf_quant
    config_file = model_dir / "config.json"
    if not config_file.is_file():
        return None
    section = _read_json(config_file).get("quantization_config")
    if section is None:
        return None
    if not isinstance(section, dict):
        raise QuantConfigError(f"{config_file}: quantization_config is not a JSON object")
    return section, config_file


def read_quant_config(model_dir: Path) -> QuantConfig | None:
    """The weight quantization of the checkpoint in `model_dir`, or None when its weights are
    not quantized (a KV-cache-only ModelOpt export has quant_algo null). A quantization_config
    of another tool (GPTQ, AWQ, compressed-tensors, bitsandbytes, ...) is an error."""
    found = quant_section(model_dir)
    if found is None:
        return None
    section, source = found
    if source.name == HF_QUANT_CONFIG:
        return _parse(section, str(source), exclude_key="exclude_modules")
    method = str(section.get("quant_method", "")).lower()
    if method != "modelopt":
        raise QuantConfigError(
            f"{source} is quantized with quant_method {method or 'unknown'!r}; the engine "
            "serves ModelOpt checkpoints (quant_method 'modelopt' or hf_quant_config.json) only"
        )
    key = "ignore" if "ignore" in section else "exclude_modules"
    return _parse(section, str(source), exclude_key=key)


def _parse(section: dict[str, Any], source: str, exclude_key: str) -> QuantConfig | None:
    algo = section.get("quant_algo")
    if algo is None:
        return None
    algo = str(algo).upper()
    if algo == "MIXED_PRECISION":
        raise QuantConfigError(
            f"{source}: per-layer MIXED_PRECISION quantization is not supported; supported: "
            f"{', '.join(SUPPORTED_ALGOS)}"
        )
    exclude = section.get(exclude_key) or []
    if not isinstance(exclude, list) or not all(isinstance(p, str) for p in exclude):
        raise QuantConfigError(f"{source}: {exclude_key} must be a list of module names")
    group = section.get("group_size")
    kv_algo = section.get("kv_cache_quant_algo")
    return QuantConfig(
        algo=algo,
        group_size=int(group) if group is not None and algo in GROUPED_ALGOS else None,
        exclude_modules=tuple(exclude),
        kv_cache_quant_algo=str(kv_algo).upper() if kv_algo else None,
        source=source,
    )


def dummy_quant_config(recipe: str) -> QuantConfig:
    """What `load_format="dummy"` with `quantization=recipe` builds: ModelOpt's defaults (group
    size 128, lm_head and the embeddings excluded)."""
    return QuantConfig(
        algo=recipe_algo(recipe),
        group_size=DEFAULT_GROUP_SIZE if RECIPE_ALGOS[recipe] in GROUPED_ALGOS else None,
        exclude_modules=("lm_head", "model.embed_tokens"),
        source="dummy",
    )


def recipe_algo(recipe: str) -> str:
    if recipe not in RECIPE_ALGOS:
        raise QuantConfigError(
            f"unknown quantization {recipe!r}; supported: {', '.join(RECIPE_ALGOS)}"
        )
    return RECIPE_ALGOS[recipe]


def resolve_quant_config(
    requested: str | None, model_dir: Path | None, dummy: bool
) -> QuantConfig | None:
    """The engine's `quantization` option against the checkpoint: None serves whatever the
    checkpoint holds; a recipe name must match it. Dummy weights take the recipe as asked (or,
    without one, the scheme of the checkpoint whose config they follow)."""
    if dummy and requested is not None:
        return dummy_quant_config(requested)
    found = read_quant_config(model_dir) if model_dir is not None else None
    if requested is None:
        return found
    if found is None:
        raise QuantConfigError(
            f"quantization {requested!r} was asked for, but {model_dir} is not quantized; "
            "build a quantized engine first (workbench build --quant ...)"
        )
    if found.algo != recipe_algo(requested):
        raise QuantConfigError(
            f"quantization {requested!r} ({RECIPE_ALGOS[requested]}) was asked for, but "
            f"{found.source} says {found.algo} ({found.recipe})"
        )
    return found


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise QuantConfigError(f"cannot read {path}: {' '.join(str(err).split())}") from None
    if not isinstance(data, dict):
        raise QuantConfigError(f"{path} does not hold a JSON object")
    return data


def _where(source: str) -> str:
    return f" (in {source})" if source and source != "dummy" else ""
