"""Rendering a session as Markdown (to read or paste) and as JSON (lossless, to re-import)."""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Any

from .models import Message, Session

EXPORT_FORMAT = "workbench.session"
EXPORT_VERSION = 1


def _stats_line(stats: dict[str, Any]) -> str:
    """``key: value`` pairs on one line, floats rounded: what a reader wants under a reply."""
    parts = []
    for key, value in stats.items():
        if isinstance(value, float):
            value = f"{value:.4g}"
        elif isinstance(value, dict | list):
            value = json.dumps(value, ensure_ascii=False, default=str)
        parts.append(f"{key}: {value}")
    return " · ".join(parts)


def session_to_markdown(session: Session, branch: list[Message]) -> str:
    """One branch (root to leaf) of a session as Markdown, settings first so it can be rerun."""
    lines = [f"# {session.title}", ""]
    lines.append(f"- Model: `{session.model}`")
    lines.append(f"- Created: {session.created_at}")
    if session.sampling:
        lines.append(f"- Sampling: `{json.dumps(session.sampling, ensure_ascii=False)}`")
    if session.engine_config:
        lines.append(f"- Engine: `{json.dumps(session.engine_config, ensure_ascii=False)}`")
    lines.append("")
    if session.system_prompt:
        lines += ["## System", "", session.system_prompt, ""]
    for message in branch:
        lines += [f"## {message.role.capitalize()}", "", message.content, ""]
        notes = []
        if message.status != "complete":
            notes.append(f"({message.status})")
        if message.stats:
            notes.append(_stats_line(message.stats))
        if notes:
            lines += [f"*{' '.join(notes)}*", ""]
    return "\n".join(lines).rstrip("\n") + "\n"


def session_to_json(
    session: Session, messages: list[Message], current_leaf_id: int | None
) -> dict[str, Any]:
    """The whole session, every branch included (messages carry parent ids), as plain JSON data."""
    return {
        "format": EXPORT_FORMAT,
        "version": EXPORT_VERSION,
        "session": asdict(session),
        "current_leaf_id": current_leaf_id,
        "messages": [asdict(m) for m in messages],
    }
