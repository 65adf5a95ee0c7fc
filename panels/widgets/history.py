"""Fixed-length histories of sampled values, and a one-line sparkline of them."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

HISTORY_LEN = 120  # samples kept: 60 s at 2 Hz
_BARS = "▁▂▃▄▅▆▇█"


class History:
    """The last HISTORY_LEN values of one series, oldest first."""

    def __init__(self, maxlen: int = HISTORY_LEN) -> None:
        self._values: deque[float] = deque(maxlen=maxlen)

    def add(self, value: float) -> None:
        self._values.append(float(value))

    @property
    def values(self) -> list[float]:
        return list(self._values)

    @property
    def last(self) -> float:
        return self._values[-1] if self._values else 0.0

    def __len__(self) -> int:
        return len(self._values)


def spark(values: Iterable[float], width: int, top: float | None = None) -> str:
    """The last `width` values as a bar per character, scaled to `top` (default: their max);
    padded on the left so that the newest value is always at the right edge."""
    tail = list(values)[-width:] if width > 0 else []
    if not tail:
        return " " * max(width, 0)
    scale = top if top else max(max(tail), 1e-9)
    bars = "".join(
        _BARS[min(len(_BARS) - 1, max(0, int(v / scale * len(_BARS) - 1e-9)))] if v > 0 else " "
        for v in tail
    )
    return bars.rjust(width)
