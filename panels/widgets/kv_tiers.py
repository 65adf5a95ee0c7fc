"""The KV tiers' lines under the KV cache summary: per tier (host, disk) blocks used of its
capacity, blocks restored from it, and the bytes it moved per second lately."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from rich.text import Text

from panels.format import human_bytes

if TYPE_CHECKING:
    from engine.state import KVTierState


def tier_lines(tiers: Sequence[KVTierState]) -> Text:
    text = Text()
    for tier in tiers:
        text.append(f"\n{tier.name:<5}", style="dim")
        text.append(f"{tier.blocks_used}", style="bold")
        text.append(f"/{tier.blocks_capacity} blocks ({human_bytes(tier.capacity_bytes)})")
        text.append("  hits ", style="dim")
        text.append(f"{tier.hits}", style="bold")
        text.append(f"  {human_bytes(tier.bytes_per_s)}/s", style="dim")
    return text
