"""The KV cache block map: one cell per block (or per group of blocks when there are many),
coloured by the request that owns it, so pages can be seen being allocated, shared, cached and
freed.

Cells: `█` a block of a running request (its colour), `▓` a block several requests share (a
prefix-cache hit), `▒` free but holding a cached prefix, `·` free.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

from rich.text import Text
from textual.widget import Widget

from panels.client import BLOCK_CACHED

PALETTE = (
    "#e06c75",
    "#61afef",
    "#98c379",
    "#e5c07b",
    "#c678dd",
    "#56b6c2",
    "#d19a66",
    "#ff79c6",
    "#8be9fd",
    "#50fa7b",
    "#bd93f9",
    "#f1fa8c",
)
CACHED_STYLE = "#7f8c9a"
FREE_STYLE = "#4b5263"
GLYPH_OWNED, GLYPH_SHARED, GLYPH_CACHED, GLYPH_FREE = "█", "▓", "▒", "·"


class OwnerColors:
    """A stable colour per request id while it runs (so a request keeps its colour when the
    requests before it finish); colours are reused once their request is gone."""

    def __init__(self) -> None:
        self._slots: dict[str, int] = {}

    def update(self, request_ids: list[str]) -> None:
        live = set(request_ids)
        self._slots = {rid: s for rid, s in self._slots.items() if rid in live}
        for rid in request_ids:
            if rid not in self._slots:
                taken = set(self._slots.values())
                self._slots[rid] = next(i for i in range(len(self._slots) + 1) if i not in taken)

    def color(self, request_id: str) -> str:
        return PALETTE[self._slots.get(request_id, 0) % len(PALETTE)]


@dataclass(frozen=True)
class BlockMapData:
    block_map: tuple[int, ...]  # per block: index into owners, BLOCK_FREE or BLOCK_CACHED
    owners: tuple[str, ...]  # request ids of the running requests, in block_map's order
    shared: frozenset[int]  # blocks in more than one running request's block table


class BlockMap(Widget):
    """Renders a BlockMapData in as many rows as it needs, up to `max_rows`."""

    DEFAULT_CSS = "BlockMap { width: 1fr; height: auto; }"

    def __init__(self, colors: OwnerColors, max_rows: int = 8, **kwargs: str) -> None:
        super().__init__(**kwargs)
        self.owner_colors = colors
        self.max_rows = max_rows
        self.data = BlockMapData((), (), frozenset())
        self._laid_rows = 0

    def show(self, data: BlockMapData) -> None:
        if data == self.data:
            return
        self.data = data
        rows = self._rows(len(data.block_map))
        self.refresh(layout=rows != self._laid_rows)  # a layout only when the height changes
        self._laid_rows = rows

    def _rows(self, blocks: int) -> int:
        width = max(self.size.width, 1)
        return math.ceil(math.ceil(blocks / self.group_size(width)) / width)

    def group_size(self, width: int | None = None) -> int:
        """Blocks per cell at this width: 1 unless the map would need more than max_rows."""
        width = max(width or self.size.width or 1, 1)
        return max(1, math.ceil(len(self.data.block_map) / (width * self.max_rows)))

    def render(self) -> Text:
        width = max(self.size.width, 1)
        blocks = self.data.block_map
        if not blocks:
            return Text("no KV cache yet", style="dim")
        group = self.group_size(width)
        text = Text()
        cells = [blocks[i : i + group] for i in range(0, len(blocks), group)]
        for n, start in enumerate(range(0, len(blocks), group)):
            if n and n % width == 0:
                text.append("\n")
            glyph, style = self._cell(cells[n], start)
            text.append(glyph, style=style)
        return text

    def _cell(self, cell: tuple[int, ...], start: int) -> tuple[str, str]:
        owners = [v for v in cell if v >= 0]
        if owners:
            index = Counter(owners).most_common(1)[0][0]
            rid = self.data.owners[index] if index < len(self.data.owners) else ""
            shared = any(b in self.data.shared for b in range(start, start + len(cell)))
            return (GLYPH_SHARED if shared else GLYPH_OWNED), self.owner_colors.color(rid)
        if any(v == BLOCK_CACHED for v in cell):
            return GLYPH_CACHED, CACHED_STYLE
        return GLYPH_FREE, FREE_STYLE
