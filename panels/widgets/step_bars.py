"""The composition of the engine's last steps: one column per step, prefill-chunk tokens stacked
under decode tokens, the newest step at the right."""

from __future__ import annotations

from dataclasses import dataclass

from rich.text import Text
from textual.widget import Widget

PREFILL_STYLE = "#61afef"
DECODE_STYLE = "#98c379"
_EIGHTHS = " ▁▂▃▄▅▆▇█"


@dataclass(frozen=True)
class StepColumn:
    prefill_tokens: int
    decode_tokens: int


class StepBars(Widget):
    """A stacked bar chart `rows` high, scaled to the largest step shown."""

    DEFAULT_CSS = "StepBars { height: 6; }"

    def __init__(self, **kwargs: str) -> None:
        super().__init__(**kwargs)
        self.steps: list[StepColumn] = []

    def show(self, steps: list[StepColumn]) -> None:
        if steps != self.steps:
            self.steps = steps
            self.refresh()

    def render(self) -> Text:
        width, rows = max(self.size.width, 1), max(self.size.height, 1)
        label_width = 6
        cols = self.steps[-max(width - label_width, 1) :]
        top = max((s.prefill_tokens + s.decode_tokens for s in cols), default=0)
        text = Text()
        for row in range(rows):
            level = rows - row  # 1-based from the bottom
            label = f"{top:>5} " if row == 0 else ("    0 " if row == rows - 1 else " " * 6)
            text.append(label, style="dim")
            text.append(" " * (width - label_width - len(cols)))
            for step in cols:
                text.append(*self._cell(step, level, rows, top))
            if row < rows - 1:
                text.append("\n")
        return text

    @staticmethod
    def _cell(step: StepColumn, level: int, rows: int, top: int) -> tuple[str, str]:
        """The character of a column at `level`: prefill fills from the bottom, decode on top;
        the top of the column uses eighth blocks so that a 1-token step still shows."""
        if top <= 0:
            return " ", ""
        eighths = rows * 8 / top
        prefill = step.prefill_tokens * eighths
        total = (step.prefill_tokens + step.decode_tokens) * eighths
        if step.decode_tokens and total - prefill < 1:
            total = prefill + 1
        lo, hi = (level - 1) * 8, level * 8
        if total <= lo:
            return " ", ""
        style = PREFILL_STYLE if prefill > lo + 4 or (prefill >= hi) else DECODE_STYLE
        fill = min(total, hi) - lo
        return _EIGHTHS[max(1, min(8, round(fill)))], style
