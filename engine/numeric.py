"""Small numeric facts and helpers shared across the engine (one copy of each)."""

from __future__ import annotations

FP8_MAX = 448.0  # largest finite float8_e4m3fn
INT8_MAX = 127.0  # symmetric: -127..127, so that -x quantizes to -q


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for integers, b > 0 (blocks needed for a tokens, programs for a items)."""
    return -(-a // b)
