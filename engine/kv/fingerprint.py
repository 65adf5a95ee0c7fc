"""The fingerprint that names a disk tier's directory: a digest of everything that changes a KV
block's bytes, so blocks written by one model (or dtype, KV quantization, block size, layout)
are never read by another.

The weights are identified by their checkpoint's files (name, size, mtime) and config.json's
contents rather than by hashing gigabytes of weights at every start; dummy weights by their preset
config and seed. A changed file (a rebuilt or re-downloaded checkpoint) gets a new directory.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from engine.kv.cache import KVLayout

FINGERPRINT_VERSION = 1  # raise when the record layout (engine/kv/offload.py) changes
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".json")


def weights_identity(
    model_dir: Path | None, hf_config: Any, dummy: bool, seed: int
) -> dict[str, Any]:
    if dummy or model_dir is None:  # random weights: the config and the seed make them
        return {"dummy": True, "config": hf_config.to_json_string(), "seed": seed}
    files = []
    for path in sorted(Path(model_dir).iterdir()):
        if path.is_file() and path.suffix in _WEIGHT_SUFFIXES:
            stat = path.stat()
            files.append((path.name, stat.st_size, stat.st_mtime_ns))
    config_file = Path(model_dir) / "config.json"
    config_digest = hashlib.sha256(config_file.read_bytes()).hexdigest()
    return {"files": files, "config_sha256": config_digest}


def kv_fingerprint(
    weights: dict[str, Any],
    layout: KVLayout,
    device_type: str,
    fp8_scales: Sequence[tuple[float, float]] | None,
    quantization: str | None,
) -> str:
    """A short hex digest of the weights' identity and the KV layout."""
    described = {
        "version": FINGERPRINT_VERSION,
        "weights": weights,
        "quantization": quantization,
        "dtype": str(layout.dtype),
        "kv_cache_dtype": layout.kv_cache_dtype,
        "storage_dtype": str(layout.storage_dtype),
        "fp8_scales": [list(s) for s in fp8_scales] if fp8_scales else None,
        "block_size": layout.block_size,
        "num_layers": layout.num_layers,
        "num_kv_heads": layout.num_kv_heads,
        "head_dim": layout.head_dim,
        "device_type": device_type,
    }
    blob = json.dumps(described, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:24]
