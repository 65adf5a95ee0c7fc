"""build_report.json and the one-line summaries the stages print.

The report is plain JSON: what the Build panel and the store keep, and what README numbers come
from. Layout (every size in bytes, every time in seconds):

    {"recipe", "kv_cache_dtype", "model", "out",
     "perplexity": {"texts": {NAME: {"source": {"perplexity", "nll", "tokens"}, "build": {...},
                                     "delta_rel", "simulated": {...}, "simulated_delta_rel"}},
                    "device", "dtype", "window", "chunk", "kv_cache_dtype"} | {"skipped": why},
     "limit_rel", "within_limit", "size": {"source_bytes", "build_bytes", "build_weights_bytes",
     "ratio"}, "timings_s": {stage: s, "total": s}, "calibration": {...}, "quantization": {...}}
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from engine.model import engine_dir
from engine_build.recipes import get_recipe, ppl_limit


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def versions() -> dict[str, str | None]:
    def version(dist: str) -> str | None:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return None

    return {
        "torch": torch.__version__,
        "transformers": version("transformers"),
        "modelopt": version("nvidia-modelopt"),
        "workbench": version("llm-workbench"),
    }


def quant_summary(checkpoint: Path) -> dict[str, Any]:
    """What the export says it did (hf_quant_config.json), or no quantization."""
    file = Path(checkpoint) / "hf_quant_config.json"
    if not file.is_file():
        return {"quant_algo": None, "kv_cache_quant_algo": None}
    quant = json.loads(file.read_text())["quantization"]
    keep = ("quant_algo", "kv_cache_quant_algo", "group_size", "exclude_modules")
    return {k: quant.get(k) for k in keep if k in quant}


def describe_quant(quant: dict[str, Any], dtype: str) -> str:
    weights = quant.get("quant_algo") or f"unquantized ({dtype})"
    group = f", group {quant['group_size']}" if quant.get("group_size") else ""
    kv = quant.get("kv_cache_quant_algo")
    excluded = quant.get("exclude_modules") or []
    kept = f"; kept in {dtype}: {', '.join(excluded)}" if excluded else ""
    return f"weights {weights}{group}{f', KV cache {kv} scales' if kv else ''}{kept}"


def describe_evaluation(evaluation: dict[str, Any]) -> str:
    parts = []
    for name, result in evaluation.get("texts", {}).items():
        parts.append(
            f"{name}: {result['source']['perplexity']:.3f} -> {result['build']['perplexity']:.3f}"
            f" ({result['delta_rel']:+.2%})"
        )
    return "; ".join(parts) or "nothing measured"


def build_report(
    engine: dict[str, Any],
    evaluation: dict[str, Any],
    source: dict[str, Any],
    build_dir: Path,
    timings: dict[str, float],
    total_s: float,
) -> dict[str, Any]:
    limit = ppl_limit(get_recipe(engine["recipe"]), engine["kv_cache_dtype"])
    deltas = [r["delta_rel"] for r in evaluation.get("texts", {}).values()]
    build_bytes = engine_dir.dir_bytes(build_dir)  # build_report.json itself aside
    weights_bytes = engine_dir.dir_bytes(build_dir, only_weights=True)
    return {
        "recipe": engine["recipe"],
        "kv_cache_dtype": engine["kv_cache_dtype"],
        "model": source["model"],
        "perplexity": evaluation,
        "limit_rel": limit,
        "within_limit": None if limit is None or not deltas else max(deltas) <= limit,
        "size": {
            "source_bytes": source["bytes"],
            "build_bytes": build_bytes,
            "build_weights_bytes": weights_bytes,
            "ratio": round(weights_bytes / source["bytes"], 4) if source["bytes"] else None,
        },
        "timings_s": {**timings, "total": round(total_s, 3)},
        "calibration": engine["calibration"],
        "quantization": engine["quantization"],
        "created_at": utc_now(),
    }


def format_report(report: dict[str, Any]) -> list[str]:
    """The lines `workbench build` prints at the end."""
    lines = []
    ppl = report["perplexity"]
    if "skipped" in ppl:
        lines.append(f"perplexity: skipped ({ppl['skipped']})")
    for name, r in ppl.get("texts", {}).items():
        sim = r.get("simulated")
        sim_text = f", ModelOpt simulation {sim['perplexity']:.3f}" if sim else ""
        lines.append(
            f"perplexity on {name} ({r['source']['tokens']} tokens): source "
            f"{r['source']['perplexity']:.3f}, build {r['build']['perplexity']:.3f} "
            f"({r['delta_rel']:+.2%}){sim_text}"
        )
    if report["limit_rel"] is not None and report["within_limit"] is not None:
        verdict = "within" if report["within_limit"] else "OVER"
        lines.append(f"limit: {report['limit_rel']:.0%} relative, {verdict}")
    size = report["size"]
    ratio = f" ({size['ratio']:.2f}x)" if size["ratio"] else ""
    lines.append(
        f"size: source {mib(size['source_bytes'])}, build weights "
        f"{mib(size['build_weights_bytes'])}{ratio}, engine dir {mib(size['build_bytes'])}"
    )
    times = ", ".join(f"{k} {v:.1f}s" for k, v in report["timings_s"].items())
    lines.append(f"time: {times}")
    return lines


def mib(num_bytes: int | None) -> str:
    return "?" if num_bytes is None else f"{num_bytes / 2**20:.1f} MiB"
