"""The tensor-parallel ranks' lines under the KV cache summary: per rank its device, pid, its
shard of the weights, its share of every KV page and the memory in use on its device (the
engine's `EngineState.ranks`; nothing with one process)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from rich.text import Text

from panels.format import human_bytes

if TYPE_CHECKING:
    from engine.state import RankState


def rank_lines(ranks: Sequence[RankState]) -> Text:
    text = Text()
    if len(ranks) < 2:
        return text
    text.append(f"\ntensor parallel ×{len(ranks)}", style="bold")
    for r in ranks:
        text.append(f"\nrank {r.rank} ", style="dim")
        text.append(f"{r.device} pid {r.pid}")
        text.append("  weights ", style="dim")
        text.append(human_bytes(r.weight_bytes))
        text.append("  KV ", style="dim")
        text.append(human_bytes(r.kv_cache_bytes))
        text.append("  memory ", style="dim")
        text.append(f"{human_bytes(r.memory_used)} / {human_bytes(r.memory_total)}")
    return text
