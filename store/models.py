"""Typed rows the store returns (plain frozen dataclasses: easy to render, compare and test)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from .base import loads

Role = Literal["system", "user", "assistant", "tool"]
MessageStatus = Literal["complete", "streaming", "cancelled", "error"]
BuildStatus = Literal["queued", "running", "complete", "failed", "cancelled"]
BenchKind = Literal["offline", "online"]

ROLES: tuple[str, ...] = get_args(Role)
MESSAGE_STATUSES: tuple[str, ...] = get_args(MessageStatus)
BUILD_STATUSES: tuple[str, ...] = get_args(BuildStatus)
BENCH_KINDS: tuple[str, ...] = get_args(BenchKind)


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    """Reject values outside a Literal at the door: the schema has no CHECKs to catch them later."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}, not {value!r}")


@dataclass(frozen=True)
class Session:
    """One chat: the model and settings it was run with, kept so it can be resumed as it was."""

    id: int
    title: str
    model: str
    engine_config: dict[str, Any]
    sampling: dict[str, Any]
    system_prompt: str | None
    created_at: str
    updated_at: str

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Session:
        return cls(
            id=row["id"],
            title=row["title"],
            model=row["model"],
            engine_config=loads(row["engine_config"]),
            sampling=loads(row["sampling"]),
            system_prompt=row["system_prompt"],
            created_at=row["created_at"],
            updated_at=row["updated_at"],
        )


@dataclass(frozen=True)
class SessionSummary:
    """A line of the sessions list: enough to show and sort it without loading messages."""

    id: int
    title: str
    model: str
    created_at: str
    last_activity: str
    message_count: int

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> SessionSummary:
        return cls(
            id=row["id"],
            title=row["title"],
            model=row["model"],
            created_at=row["created_at"],
            last_activity=row["last_activity"],
            message_count=row["message_count"],
        )


@dataclass(frozen=True)
class Message:
    """A node of a session's message tree; ``parent_id`` is the turn it follows (None: first)."""

    id: int
    session_id: int
    parent_id: int | None
    role: Role
    content: str
    status: MessageStatus
    stats: dict[str, Any]
    created_at: str
    updated_at: str

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Message:
        return cls(
            id=row["id"],
            session_id=row["session_id"],
            parent_id=row["parent_id"],
            role=row["role"],
            content=row["content"],
            status=row["status"],
            stats=loads(row["stats"]),
            created_at=row["created_at"],
            updated_at=row["updated_at"],
        )


@dataclass(frozen=True)
class OpenChat:
    """A chat the TUI has open as a tab: its session, the message its shown branch ends with
    (None: the session has none yet), and whether it is the tab on screen."""

    session_id: int
    leaf_id: int | None
    active: bool = False


@dataclass(frozen=True)
class SearchHit:
    """A message that matched a full-text search, with where it lives and a highlighted excerpt."""

    message_id: int
    session_id: int
    session_title: str
    role: Role
    snippet: str
    created_at: str


@dataclass(frozen=True)
class Build:
    """An engine build (quantization / packaging run) and what it produced."""

    id: int
    model: str
    recipe: str
    kv_dtype: str
    out_dir: str
    status: BuildStatus
    report: dict[str, Any]
    timings: dict[str, Any]
    created_at: str
    updated_at: str
    stage: str | None = None  # the stage a running build is in (load, calibrate, ...)
    error: str | None = None  # why it failed
    options: dict[str, Any] = field(default_factory=dict)  # what it was started with
    pid: int | None = None  # the process that runs it

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Build:
        return cls(
            id=row["id"],
            model=row["model"],
            recipe=row["recipe"],
            kv_dtype=row["kv_dtype"],
            out_dir=row["out_dir"],
            status=row["status"],
            report=loads(row["report"]),
            timings=loads(row["timings"]),
            created_at=row["created_at"],
            updated_at=row["updated_at"],
            stage=row.get("stage"),
            error=row.get("error"),
            options=loads(row.get("options")),
            pid=row.get("pid"),
        )


@dataclass(frozen=True)
class BenchRun:
    """One ``workbench bench`` run: its configuration and the numbers it printed."""

    id: int
    kind: BenchKind
    model: str
    config: dict[str, Any]
    results: dict[str, Any]
    created_at: str

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> BenchRun:
        return cls(
            id=row["id"],
            kind=row["kind"],
            model=row["model"],
            config=loads(row["config"]),
            results=loads(row["results"]),
            created_at=row["created_at"],
        )
