"""A line plot of a few histories (textual-plotext), x in seconds before now."""

from __future__ import annotations

from textual_plotext import PlotextPlot


class HistoryPlot(PlotextPlot):
    """Plots named series sampled every `interval` seconds, the newest at x = 0."""

    def __init__(self, title: str, y_label: str, y_max: float | None = None, **kwargs: str) -> None:
        super().__init__(**kwargs)
        self._title = title
        self._y_label = y_label
        self._y_max = y_max
        self._series: dict[str, list[float]] = {}
        self._interval = 0.5

    def on_mount(self) -> None:
        super().on_mount()
        self._replot()

    def show(self, series: dict[str, list[float]], interval: float) -> None:
        self._series, self._interval = series, interval
        self._replot()

    def _replot(self) -> None:
        plt = self.plt
        plt.clear_data()
        plt.clear_figure()
        plt.title(self._title)
        plt.ylabel(self._y_label)
        top = self._y_max
        longest = max((len(v) for v in self._series.values()), default=0)
        for name, values in self._series.items():
            if not values:
                continue
            n = len(values)
            xs = [-(n - 1 - i) * self._interval for i in range(n)]
            plt.plot(xs, values, label=name, marker="braille")
        if top is None:
            peak = max((max(v) for v in self._series.values() if v), default=0.0)
            top = peak * 1.15 if peak > 0 else 1.0
        plt.ylim(0, top)
        plt.xlim(-max(longest - 1, 1) * self._interval, 0)
        plt.xlabel("seconds ago")
        self.refresh()
