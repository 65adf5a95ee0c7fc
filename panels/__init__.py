"""Textual panels: chat, monitor (GPU, KV cache, batch), sessions, build, bench runs.

Panels reach the engine only through `panels.client` (a protocol) and the data through `store`.
"""

from pathlib import Path

_HERE = Path(__file__).parent
# Stylesheets of the panels and their widgets, for the app's CSS_PATH.
PANEL_CSS: list[Path] = [
    _HERE / f"{name}.tcss" for name in ("chat", "monitor", "sessions", "build", "bench", "dialogs")
]
