"""Small text helpers shared by the panels: numbers for humans, safe text for the terminal."""

from __future__ import annotations

import re
from typing import Any

# C0/C1 control characters other than newline and tab: a random-weight model emits them, and a
# terminal would act on them instead of showing them.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_FENCE = re.compile(r"^(?P<fence>`{3,}|~{3,})[^\n]*\n(?P<code>.*?)^(?P=fence)[ \t]*$", re.M | re.S)


def clean_text(text: str) -> str:
    """Text safe to render: control characters become U+FFFD."""
    return _CONTROL.sub("\ufffd", text)


def code_blocks(markdown: str) -> list[str]:
    """The contents of the fenced code blocks of a Markdown text, in order."""
    return [m.group("code").rstrip("\n") for m in _FENCE.finditer(markdown)]


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def seconds(s: float) -> str:
    return f"{s * 1000:.0f} ms" if s < 1 else f"{s:.2f} s"


def stats_line(stats: dict[str, Any]) -> str:
    """A reply's stats as one short line: tokens, TTFT, tokens/s, why it stopped."""
    parts = []
    if "tokens" in stats:
        parts.append(f"{stats['tokens']} tok")
    if stats.get("ttft_s") is not None:
        parts.append(f"TTFT {seconds(stats['ttft_s'])}")
    if stats.get("tokens_per_s") is not None:
        parts.append(f"{stats['tokens_per_s']:.1f} tok/s")
    if stats.get("prompt_tokens"):
        cached = stats.get("cached_tokens") or 0
        parts.append(f"prompt {stats['prompt_tokens']}" + (f" ({cached} cached)" if cached else ""))
    if stats.get("finish_reason"):
        reason = str(stats["finish_reason"])
        context = stats.get("context")
        used = (stats.get("prompt_tokens") or 0) + (stats.get("tokens") or 0)
        if reason == "length" and context and used >= context:
            reason = f"length: the context ({context:,} tokens) is full"
        parts.append(reason)
    if stats.get("dropped_messages"):
        parts.append(f"{stats['dropped_messages']} oldest messages left out")
    return " · ".join(parts)


def short_model_name(name: str) -> str:
    """A model path shows as its last component; Hub ids and bundled names as they are."""
    if "/" in name and (name.startswith(("/", ".", "~")) or name.count("/") > 1):
        return name.rstrip("/").rsplit("/", 1)[-1]
    return name
