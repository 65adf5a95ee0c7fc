"""Byte sizes written with units ("512MiB", "4GB", "1.5 GiB", "2048"), for the KV tier budgets."""

from __future__ import annotations

import re

_UNITS = {
    "": 1,
    "b": 1,
    "k": 10**3,
    "kb": 10**3,
    "m": 10**6,
    "mb": 10**6,
    "g": 10**9,
    "gb": 10**9,
    "t": 10**12,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*")


def parse_size(value: int | str, name: str = "size") -> int:
    """Bytes from an int or a string with a unit: k/M/G/T(B) are powers of 10, KiB/MiB/GiB/TiB
    powers of 2. Raises ValueError naming `name` on anything else."""
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a byte size such as 512MiB or 4GB, got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
        return value
    match = _SIZE.fullmatch(value) if isinstance(value, str) else None
    unit = _UNITS.get(match.group(2).lower()) if match else None
    if unit is None:
        raise ValueError(f"{name} must be a byte size such as 512MiB or 4GB, got {value!r}")
    return int(float(match.group(1)) * unit)
