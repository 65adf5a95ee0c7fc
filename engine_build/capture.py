"""Library chatter during a build as log lines: ModelOpt's prints ("Inserted 206 quantizers"),
warnings, the log records of modelopt and transformers, and no tqdm bars.

Without this, a build's output is interleaved with whatever the libraries write to stdout and
stderr, which breaks `--events-jsonl -` and buries the stage lines.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Callable, Iterator

Log = Callable[[str], None]
LIBRARY_LOGGERS = ("modelopt", "transformers")


class _Lines(io.TextIOBase):
    """A text stream that hands each complete, non-blank line to `log`."""

    def __init__(self, log: Log) -> None:
        self.log = log
        self.pending = ""

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self.pending += text
        *lines, self.pending = self.pending.split("\n")
        for line in lines:
            if line.strip():
                self.log(line.rstrip())
        return len(text)

    def flush(self) -> None:
        if self.pending.strip():
            self.log(self.pending.rstrip())
        self.pending = ""


class _Records(logging.Handler):
    def __init__(self, log: Log) -> None:
        super().__init__(logging.INFO)
        self.log = log

    def emit(self, record: logging.LogRecord) -> None:
        self.log(f"{record.levelname.lower()}: {record.getMessage()}")


@contextlib.contextmanager
def library_output_as_log(log: Log) -> Iterator[None]:
    lines = _Lines(log)
    handler = _Records(log)
    saved = []
    for name in LIBRARY_LOGGERS:
        logger = logging.getLogger(name)
        saved.append((logger, logger.handlers[:], logger.propagate))
        logger.handlers, logger.propagate = [handler], False
    bars = _disable_progress_bars()

    def show(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ANN001
        log(f"{category.__name__}: {message}")

    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(lines):
            warnings.simplefilter("default")
            warnings.showwarning = show
            yield
    finally:
        lines.flush()
        for logger, handlers, propagate in saved:
            logger.handlers, logger.propagate = handlers, propagate
        bars()


def _disable_progress_bars() -> Callable[[], None]:
    """Turn off transformers' tqdm bars; returns what turns them back on."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        return lambda: None
    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    return hf_logging.enable_progress_bar if enabled else (lambda: None)
