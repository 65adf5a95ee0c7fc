"""Builds as text: a row of the builds table, and several builds side by side.

Everything reads the store's `Build` rows (the report is build_report.json as recorded), and
copes with rows from older or failed builds that lack parts of it.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from rich.text import Text

from panels.format import human_bytes, short_model_name
from store import Build

BUILD_COLUMNS = ("", "#", "when", "model", "recipe", "KV", "status", "ppl", "Δ ppl", "size", "time")
STATUS_STYLE = {"complete": "green", "failed": "red", "cancelled": "yellow", "running": "bold"}


def when(iso: str, fmt: str = "%m-%d %H:%M") -> str:
    try:
        return datetime.fromisoformat(iso).astimezone().strftime(fmt)
    except ValueError:
        return iso


def perplexity(build: Build) -> dict[str, Any] | None:
    """The first evaluation text's numbers: source, build, delta_rel."""
    texts = (build.report.get("perplexity") or {}).get("texts") or {}
    return next(iter(texts.values()), None)


def delta_text(build: Build) -> str:
    ppl = perplexity(build)
    if ppl is None:
        return "-"
    mark = ""
    if build.report.get("within_limit") is True:
        mark = " ✓"
    elif build.report.get("within_limit") is False:
        mark = " ✗"
    return f"{ppl['delta_rel']:+.2%}{mark}"


def status_text(build: Build) -> Text:
    text = build.status
    if build.status == "running" and build.stage:
        text = f"{build.stage}…"
    return Text(text, style=STATUS_STYLE.get(build.status, ""))


def build_row(build: Build, marked: bool) -> tuple[Text, ...]:
    """A row of the builds table (Text, never markup: paths and names may hold brackets)."""
    ppl = perplexity(build)
    size = (build.report.get("size") or {}).get("build_weights_bytes")
    total = build.timings.get("total")
    cells = (
        "●" if marked else " ",
        str(build.id),
        when(build.created_at),
        short_model_name(build.model),
        build.recipe,
        build.kv_dtype,
        status_text(build),
        f"{ppl['build']['perplexity']:.3f}" if ppl else "-",
        delta_text(build),
        human_bytes(size) if size is not None else "-",
        f"{total:.1f} s" if total is not None else "-",
    )
    return tuple(c if isinstance(c, Text) else Text(c) for c in cells)


def compare_rows(builds: list[Build]) -> tuple[list[str], list[tuple[Text, ...]]]:
    """Columns (one per build) and rows (one per metric) to show builds side by side."""
    columns = ["", *(f"#{b.id} {b.recipe}" for b in builds)]
    metrics: list[tuple[str, Any]] = [
        ("model", lambda b: short_model_name(b.model)),
        ("KV cache", lambda b: b.kv_dtype),
        ("status", lambda b: status_text(b).plain + (f" ({b.error})" if b.error else "")),
        ("ppl source", lambda b: _ppl(b, "source")),
        ("ppl build", lambda b: _ppl(b, "build")),
        ("Δ ppl", delta_text),
        ("limit", lambda b: _limit(b)),
        ("ModelOpt sim.", lambda b: _ppl(b, "simulated")),
        ("weights", lambda b: _size(b, "build_weights_bytes")),
        ("vs source", lambda b: _ratio(b)),
        ("calibration", _calibration),
    ]
    stages = ("load", "calibrate", "quantize", "export", "evaluate", "total")
    metrics += [(f"{s} (s)", lambda b, s=s: _seconds(b.timings.get(s))) for s in stages]
    metrics.append(("output", lambda b: b.out_dir))
    rows = [
        (Text(label, style="bold"), *(Text(str(fn(b))) for b in builds)) for label, fn in metrics
    ]
    return columns, rows


def _ppl(build: Build, which: str) -> str:
    ppl = perplexity(build)
    value = (ppl or {}).get(which)
    return f"{value['perplexity']:.3f}" if isinstance(value, dict) else "-"


def _limit(build: Build) -> str:
    limit = build.report.get("limit_rel")
    return f"{limit:.0%}" if isinstance(limit, int | float) else "-"


def _size(build: Build, key: str) -> str:
    value = (build.report.get("size") or {}).get(key)
    return human_bytes(value) if isinstance(value, int) else "-"


def _ratio(build: Build) -> str:
    ratio = (build.report.get("size") or {}).get("ratio")
    return f"{ratio:.2f}x" if isinstance(ratio, int | float) else "-"


def _calibration(build: Build) -> str:
    calib = build.report.get("calibration") or {}
    if calib.get("skipped"):
        return "none"
    if "samples" not in calib:
        return "-"
    return f"{calib['samples']}×{calib['seq_len']} {calib.get('algorithm') or ''}".strip()


def _seconds(value: Any) -> str:
    return f"{value:.1f}" if isinstance(value, int | float) else "-"
