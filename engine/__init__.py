"""Workbench's serving engine: paged KV cache, in-flight batching, exact against transformers.

Names are imported lazily, so `import engine.config` stays light (no model code, no tokenizers).
"""

from __future__ import annotations

from typing import Any

_EXPORTS = {
    "LLM": "engine.llm",
    "AsyncLLM": "engine.llm",
    "EngineConfig": "engine.config",
    "SamplingParams": "engine.config",
    "EngineState": "engine.state",
    "RequestOutput": "engine.outputs",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'engine' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_EXPORTS[name]), name)
