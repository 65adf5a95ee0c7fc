"""Speculative decoding: propose k tokens cheaply, verify them in one target forward pass, keep
the longest prefix that rejection sampling accepts (lossless: the output distribution is the
target's, and greedy output is the target's greedy output)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

METHODS = ("ngram", "draft", "eagle")
# The model a method uses when `model` is not given.
DEFAULT_MODELS = {"draft": "tiny-draft", "eagle": "tiny-eagle"}


@dataclass(frozen=True)
class SpeculativeConfig:
    method: str
    num_tokens: int = 4  # k: draft tokens proposed per step
    model: str | None = None  # draft model ("draft") or EAGLE-3 head ("eagle"): DEFAULT_MODELS
    prompt_lookup_min: int = 1  # n-gram sizes tried, longest first, for method "ngram"
    prompt_lookup_max: int = 4

    @classmethod
    def from_dict(cls, spec: dict[str, Any]) -> SpeculativeConfig:
        unknown = set(spec) - {
            "method",
            "num_tokens",
            "model",
            "prompt_lookup_min",
            "prompt_lookup_max",
        }
        if unknown:
            raise ValueError(f"unknown speculative option(s): {', '.join(sorted(unknown))}")
        config = cls(**spec)
        if config.method not in METHODS:
            raise ValueError(f"speculative method must be one of {METHODS}, got {config.method!r}")
        if config.model is None and config.method in DEFAULT_MODELS:
            config = replace(config, model=DEFAULT_MODELS[config.method])
        if not 1 <= config.num_tokens <= 16:
            raise ValueError(f"speculative num_tokens must be in [1, 16], got {config.num_tokens}")
        if not 1 <= config.prompt_lookup_min <= config.prompt_lookup_max:
            raise ValueError("need 1 <= prompt_lookup_min <= prompt_lookup_max")
        return config


@dataclass
class SpecStats:
    """Counters since start-up; `EngineState` reports the rates."""

    num_proposed: int = 0  # draft tokens sent to verification
    num_accepted: int = 0  # of which the target accepted
    num_verifications: int = 0  # request-steps that verified at least one draft token
    num_emitted: int = 0  # tokens those steps produced (accepted + one corrected or bonus)
    draft_time_s: float = 0.0
    verify_time_s: float = 0.0

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted / self.num_proposed if self.num_proposed else 0.0

    @property
    def mean_accepted(self) -> float:
        """Mean tokens per verifying step (accepted drafts plus the bonus/corrected token)."""
        return self.num_emitted / self.num_verifications if self.num_verifications else 0.0
