"""A MoE model's expert load as a heat map: one row per sparse layer (or group of layers), one cell
per expert (or group of experts), coloured by the expert's share of its layer's routed (token,
expert) pairs relative to an even share. It shows the pairs since the previous snapshot, or all
of them while the engine is idle. Hidden for a dense model."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widget import Widget
from textual.widgets import Static

from panels.widgets import QuietStatic

if TYPE_CHECKING:
    from engine.state import EngineState, ExpertLoad

# (upper bound of a cell's share over the even share, colour, legend label): cold to hot
SCALE = (
    (0.5, "#264f78", "<½"),
    (0.9, "#3a7fb8", "<0.9"),
    (1.1, "#56b6c2", "≈1"),
    (1.5, "#e5c07b", "<1.5"),
    (2.0, "#d19a66", "<2"),
    (math.inf, "#e06c75", "≥2"),
)
GLYPH_HEAT, GLYPH_NONE = "█", "·"
NONE_STYLE = "#4b5263"
LABEL_WIDTH = 4  # "L12 "


def heat_style(ratio: float) -> str:
    """The colour of a cell whose experts got `ratio` times an even share."""
    return next(color for bound, color, _ in SCALE if ratio < bound)


@dataclass(frozen=True)
class HeatGrid:
    ratios: tuple[tuple[float | None, ...], ...]  # per row of layers, per cell; None: no pairs
    labels: tuple[int, ...]  # the first layer of each row
    experts_per_cell: int
    layers_per_row: int


def heat_grid(
    layers: tuple[int, ...], counts: tuple[tuple[int, ...], ...], width: int, max_rows: int
) -> HeatGrid:
    """Group `counts` [layer][expert] into at most `max_rows` rows of at most `width` cells; each
    cell's ratio is its experts' mean share of their rows' pairs over the even share."""
    num_experts = len(counts[0]) if counts else 0
    per_cell = max(1, math.ceil(num_experts / max(width, 1)))
    per_row = max(1, math.ceil(len(counts) / max(max_rows, 1)))
    ratios = []
    for top in range(0, len(counts), per_row):
        rows = counts[top : top + per_row]
        routed = sum(map(sum, rows))
        cells: list[float | None] = []
        for start in range(0, num_experts, per_cell):
            got = sum(sum(row[start : start + per_cell]) for row in rows)
            experts = min(per_cell, num_experts - start)
            share = got / routed if routed else 0.0
            cells.append(share * num_experts / experts if got else None)
        ratios.append(tuple(cells))
    labels = tuple(layers[i] for i in range(0, len(layers), per_row))
    return HeatGrid(tuple(ratios), labels, per_cell, per_row)


class ExpertHeatMap(Widget):
    DEFAULT_CSS = "ExpertHeatMap { width: 1fr; height: auto; }"

    def __init__(self, max_rows: int = 12, **kwargs: str) -> None:
        super().__init__(**kwargs)
        self.max_rows = max_rows
        self.layer_ids: tuple[int, ...] = ()
        self.counts: tuple[tuple[int, ...], ...] = ()

    def show(self, layers: tuple[int, ...], counts: tuple[tuple[int, ...], ...]) -> None:
        if (layers, counts) == (self.layer_ids, self.counts):
            return
        relayout = len(layers) != len(self.layer_ids)
        self.layer_ids, self.counts = layers, counts
        self.refresh(layout=relayout)

    def grid(self) -> HeatGrid:
        width = max(self.size.width - LABEL_WIDTH, 1)
        return heat_grid(self.layer_ids, self.counts, width, self.max_rows)

    def render(self) -> Text:
        if not self.counts:
            return Text("no expert load yet", style="dim")
        grid = self.grid()
        text = Text()
        for n, (label, row) in enumerate(zip(grid.labels, grid.ratios, strict=True)):
            if n:
                text.append("\n")
            text.append(f"L{label:<{LABEL_WIDTH - 1}}", style="dim")
            for ratio in row:
                if ratio is None:
                    text.append(GLYPH_NONE, style=NONE_STYLE)
                else:
                    text.append(GLYPH_HEAT, style=heat_style(ratio))
        return text


class ExpertLoadView(Vertical):
    """The expert heat map with its title and legend; hidden until a state with an expert load
    comes (never, for a dense model)."""

    DEFAULT_CSS = """
    ExpertLoadView { height: auto; display: none; }
    ExpertLoadView .experts-title, ExpertLoadView .experts-legend { height: auto; }
    ExpertLoadView .experts-title { text-wrap: nowrap; text-overflow: ellipsis; }
    """

    def __init__(self, **kwargs: str) -> None:
        super().__init__(**kwargs)
        self.border_title = "Experts"
        self._statics = QuietStatic()

    def compose(self) -> ComposeResult:
        yield Static("", classes="experts-title")
        yield ExpertHeatMap(classes="experts-map")
        yield Static("", classes="experts-legend")

    def show(self, state: EngineState) -> None:
        load = state.expert_load
        self.display = load is not None
        if load is None:
            return
        recent = any(map(any, load.recent))
        counts = load.recent if recent else load.total
        heat_map = self.query_one(ExpertHeatMap)
        heat_map.show(load.layers, counts)
        grid = heat_map.grid()
        when = f"last {load.recent_steps} steps" if recent else "since start"
        title = Text(f"expert load, {when}", "dim")
        cell = f" · 1 cell = {grid.experts_per_cell} experts" if grid.experts_per_cell > 1 else ""
        rows = f" · 1 row = {grid.layers_per_row} layers" if grid.layers_per_row > 1 else ""
        title.append(cell + rows, "dim")
        self._statics.update(self.query_one(".experts-title", Static), title)
        self._statics.update(self.query_one(".experts-legend", Static), self._legend(load, counts))

    def _legend(self, load: ExpertLoad, counts: tuple[tuple[int, ...], ...]) -> Text:
        legend = Text()
        hot = hottest(load.layers, counts)
        if hot is not None:
            layer, expert, ratio = hot
            legend.append(f"hottest: layer {layer} expert {expert}, {ratio:.1f}× even  ")
        legend.append(f"{GLYPH_NONE} ", style=NONE_STYLE)
        legend.append("none ")
        for _, color, label in SCALE:
            legend.append(GLYPH_HEAT, style=color)
            legend.append(f"{label} ")
        legend.append("× even share")
        return legend


def hottest(
    layers: tuple[int, ...], counts: tuple[tuple[int, ...], ...]
) -> tuple[int, int, float] | None:
    """(layer, expert, share over the even share) of the expert with the largest share."""
    best = None
    for layer, row in zip(layers, counts, strict=True):
        routed = sum(row)
        if routed:
            expert = max(range(len(row)), key=row.__getitem__)
            ratio = row[expert] * len(row) / routed
            if best is None or ratio > best[2]:
                best = (layer, expert, ratio)
    return best
