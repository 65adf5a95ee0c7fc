"""The evaluate stage: perplexity of the source and of the build on held-out text.

Both run through our engine (`engine.perplexity`: teacher forcing through the model runner, chunk
by chunk, so later chunks read K/V back from the paged, possibly quantized, cache). The text is one
token stream cut into windows (`texts.eval_windows`), every token but the first scored once. The
same windows through ModelOpt's fake-quantized Hugging Face model give the "simulated" number: how
much the recipe itself costs, apart from our kernels.
"""

from __future__ import annotations

import gc
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from engine.numeric import cdiv
from engine_build.texts import eval_windows

Progress = Callable[[float, str], None]


@torch.no_grad()
def hf_perplexity(model: torch.nn.Module, stream: list[int], window: int) -> dict[str, Any]:
    """Perplexity of a Hugging Face causal LM over the windows of `stream`."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for piece in eval_windows(stream, window):
        ids = torch.tensor([piece], device=device)  # [1, len(piece)]
        logits = model(input_ids=ids, use_cache=False).logits[0, :-1].float()  # [len - 1, vocab]
        total += float(F.cross_entropy(logits, ids[0, 1:], reduction="sum"))
        count += len(piece) - 1
    return _result(total, count)


def engine_perplexity(
    llm: Any, stream: list[int], window: int, chunk: int, progress: Progress | None = None
) -> dict[str, Any]:
    """Perplexity through our engine over the windows of `stream`."""
    from engine.perplexity import engine_perplexity as score

    pieces = eval_windows(stream, window)
    total, count = 0.0, 0
    for i, piece in enumerate(pieces):
        result = score(llm, [piece], chunk_size=chunk, window=window)
        total += result.nll * result.num_tokens
        count += result.num_tokens
        if progress is not None:
            progress((i + 1) / len(pieces), f"window {i + 1}/{len(pieces)}")
    return _result(total, count)


def _result(total_nll: float, count: int) -> dict[str, Any]:
    nll = total_nll / count
    return {"perplexity": round(math.exp(nll), 5), "nll": round(nll, 6), "tokens": count}


def eval_engine(model_dir: Path, device: torch.device, kv_cache_dtype: str, window: int) -> Any:
    """An engine just large enough to score one window at a time."""
    from engine.llm import LLM

    block_size = 16
    return LLM(
        str(model_dir),
        device=str(device),
        dtype="float32" if device.type == "cpu" else "auto",
        kv_cache_dtype=kv_cache_dtype,
        block_size=block_size,
        num_kv_blocks=cdiv(window, block_size) + 1,
        max_num_seqs=1,
        max_model_len=window,
        enable_prefix_caching=False,
        enforce_eager=True,
    )


def evaluate_build(
    source_dir: Path,
    build_dir: Path,
    streams: dict[str, list[int]],
    simulated: dict[str, dict[str, Any]],
    kv_cache_dtype: str,
    device: torch.device,
    window: int,
    chunk: int,
    progress: Progress,
) -> dict[str, Any]:
    """Per text: source, build and simulated perplexity and the relative increase."""
    results: dict[str, dict[str, Any]] = {name: {} for name in streams}
    runs = (("source", source_dir, "auto"), ("build", build_dir, kv_cache_dtype))
    for r, (role, model_dir, kv) in enumerate(runs):
        progress(r / len(runs), f"loading the {role} into the engine")
        llm = eval_engine(model_dir, device, kv, window)
        for t, (name, stream) in enumerate(streams.items()):

            def step(fraction: float, message: str, r=r, t=t, label=f"{role} on {name}"):
                progress((r + (t + fraction) / len(streams)) / len(runs), f"{label}: {message}")

            results[name][role] = engine_perplexity(llm, stream, window, chunk, step)
        del llm
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    for name, result in results.items():
        source, build = result["source"]["perplexity"], result["build"]["perplexity"]
        result["delta_rel"] = round(build / source - 1.0, 6)
        if name in simulated:
            result["simulated"] = simulated[name]
            result["simulated_delta_rel"] = round(simulated[name]["perplexity"] / source - 1.0, 6)
    return {
        "texts": results,
        "device": str(device),
        "dtype": "float32" if device.type == "cpu" else "bfloat16",
        "window": window,
        "chunk": chunk,
        "kv_cache_dtype": kv_cache_dtype,
    }
