"""The KV cache: block counts, usage and prefix-hit-rate history, and the block map."""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import Static

from panels.format import human_bytes
from panels.widgets import QuietStatic
from panels.widgets.block_map import (
    CACHED_STYLE,
    FREE_STYLE,
    GLYPH_CACHED,
    GLYPH_FREE,
    GLYPH_OWNED,
    GLYPH_SHARED,
    BlockMap,
    BlockMapData,
    OwnerColors,
)
from panels.widgets.history import History
from panels.widgets.kv_tiers import tier_lines
from panels.widgets.plots import HistoryPlot
from panels.widgets.rank_lines import rank_lines

if TYPE_CHECKING:
    from engine.state import EngineState


class KvView(Vertical):
    def __init__(self, colors: OwnerColors, **kwargs: str) -> None:
        super().__init__(**kwargs)
        self.border_title = "KV cache"
        self.owner_colors = colors
        self.usage = History()
        self.hit_rate = History()
        self._statics = QuietStatic()

    def compose(self) -> ComposeResult:
        yield Static("waiting for the engine…", classes="kv-summary")
        yield HistoryPlot("usage and prefix-hit rate", "%", y_max=100, classes="kv-plot")
        yield Static("", classes="kv-map-title")
        yield BlockMap(self.owner_colors, classes="kv-map")
        yield Static("", classes="kv-legend")

    def add(self, state: EngineState) -> None:
        """Record a sample in the histories (always, shown or not)."""
        self.usage.add(100 * state.kv_usage)
        self.hit_rate.add(100 * state.prefix_cache_hit_rate)

    def show(self, state: EngineState, interval: float) -> None:
        """Show a sample (only while the panel is on screen: layout is not free)."""
        summary = Text()
        summary.append(f"{state.kv_blocks_total}", style="bold")
        summary.append(f" blocks × {state.block_size} tokens ({human_bytes(state.kv_cache_bytes)})")
        summary.append(f" · {state.dtype} on {state.device}\n")
        summary.append("used ", style="dim")
        summary.append(f"{state.kv_blocks_used}", style="bold")
        summary.append("  cached ", style="dim")
        summary.append(f"{state.kv_blocks_cached_free}", style=f"bold {CACHED_STYLE}")
        summary.append("  free ", style="dim")
        summary.append(f"{state.kv_blocks_free}", style="bold")
        summary.append(f"\nusage {100 * state.kv_usage:.1f}%")
        summary.append(f" · prefix-cache hits {100 * state.prefix_cache_hit_rate:.1f}%")
        summary.append_text(tier_lines(state.kv_tiers))
        summary.append_text(rank_lines(state.ranks))
        self._statics.update(self.query_one(".kv-summary", Static), summary)
        self.query_one(HistoryPlot).show(
            {"usage": self.usage.values, "prefix hits": self.hit_rate.values}, interval
        )
        refs = Counter(b for r in state.running for b in r.blocks)
        data = BlockMapData(
            block_map=state.block_map,
            owners=tuple(r.request_id for r in state.running),
            shared=frozenset(b for b, n in refs.items() if n > 1),
        )
        block_map = self.query_one(BlockMap)
        block_map.show(data)
        group = block_map.group_size()
        per_cell = "1 cell = 1 block" if group == 1 else f"1 cell = {group} blocks"
        title = Text(f"block map ({per_cell})", "dim")
        self._statics.update(self.query_one(".kv-map-title", Static), title)
        self._statics.update(self.query_one(".kv-legend", Static), self._legend(data))

    def _legend(self, data: BlockMapData) -> Text:
        legend = Text()
        for rid in data.owners:
            legend.append(f"{GLYPH_OWNED} ", style=self.owner_colors.color(rid))
            legend.append(f"{rid}  ")
        legend.append(f"{GLYPH_SHARED} shared  ")
        legend.append(f"{GLYPH_CACHED} ", style=CACHED_STYLE)
        legend.append("cached  ")
        legend.append(f"{GLYPH_FREE} ", style=FREE_STYLE)
        legend.append("free")
        return legend
