"""Engine builds and benchmark runs: a history the build and bench panels can list and compare."""

from __future__ import annotations

import os
from typing import Any

from .base import StoreBase, dumps, locked, utc_now
from .models import (
    BENCH_KINDS,
    BUILD_STATUSES,
    BenchKind,
    BenchRun,
    Build,
    BuildStatus,
    check_choice,
)


class RunsMixin(StoreBase):
    """Build and benchmark-run methods of Store."""

    @locked
    def record_build(
        self,
        model: str,
        recipe: str,
        kv_dtype: str,
        out_dir: str,
        status: BuildStatus = "running",
        report: dict[str, Any] | None = None,
        timings: dict[str, Any] | None = None,
        options: dict[str, Any] | None = None,
        pid: int | None = None,
    ) -> int:
        """Record a build, usually when it starts (status "running"); finish it with update_build().

        Recording at the start means a build that crashes the process still shows up; `pid`
        (default: this process) lets `fail_dead_builds` tell such a build from a live one.
        """
        check_choice("status", status, BUILD_STATUSES)
        now = utc_now()
        table = self.table("builds").insert(
            {
                "model": model,
                "recipe": recipe,
                "kv_dtype": kv_dtype,
                "out_dir": str(out_dir),
                "status": status,
                "report": dumps(report),
                "timings": dumps(timings),
                "options": dumps(options),
                "pid": os.getpid() if pid is None else pid,
                "created_at": now,
                "updated_at": now,
            }
        )
        return int(table.last_pk)

    @locked
    def update_build(
        self,
        build_id: int,
        status: BuildStatus | None = None,
        report: dict[str, Any] | None = None,
        timings: dict[str, Any] | None = None,
        stage: str | None = None,
        error: str | None = None,
    ) -> None:
        """Set the given fields of a build (its outcome, report, per-stage timings, the stage it
        is in, why it failed)."""
        values: dict[str, Any] = {}
        if status is not None:
            check_choice("status", status, BUILD_STATUSES)
            values["status"] = status
        if report is not None:
            values["report"] = dumps(report)
        if timings is not None:
            values["timings"] = dumps(timings)
        if stage is not None:
            values["stage"] = stage
        if error is not None:
            values["error"] = error
        self._update("builds", build_id, values)

    @locked
    def fail_dead_builds(self) -> list[int]:
        """Mark "running" builds whose process is gone (killed, crashed) as failed; their ids.
        Only meaningful on the machine that ran them, where the store lives."""
        dead = [
            row["id"]
            for row in self.table("builds").rows_where("status = ?", ["running"])
            if row["pid"] is not None and not _pid_alive(row["pid"])
        ]
        for build_id in dead:
            self._update(
                "builds",
                build_id,
                {"status": "failed", "error": "the build process ended without finishing"},
            )
        return dead

    @locked
    def get_build(self, build_id: int) -> Build:
        """One build (raises NotFoundError)."""
        return Build.from_row(self._get("builds", build_id))

    @locked
    def list_builds(
        self, limit: int = 100, offset: int = 0, model: str | None = None
    ) -> list[Build]:
        """Builds, newest first, optionally only those of one model."""
        where, args = (None, []) if model is None else ("model = ?", [model])
        rows = self.table("builds").rows_where(
            where, args, order_by="id DESC", limit=limit, offset=offset
        )
        return [Build.from_row(row) for row in rows]

    @locked
    def record_bench_run(
        self,
        kind: BenchKind,
        model: str,
        config: dict[str, Any],
        results: dict[str, Any],
    ) -> int:
        """Record a finished benchmark run (``kind`` is "offline" or "online")."""
        check_choice("kind", kind, BENCH_KINDS)
        table = self.table("bench_runs").insert(
            {
                "kind": kind,
                "model": model,
                "config": dumps(config),
                "results": dumps(results),
                "created_at": utc_now(),
            }
        )
        return int(table.last_pk)

    @locked
    def get_bench_run(self, run_id: int) -> BenchRun:
        """One benchmark run (raises NotFoundError)."""
        return BenchRun.from_row(self._get("bench_runs", run_id, what="bench run"))

    @locked
    def list_bench_runs(
        self,
        limit: int = 100,
        offset: int = 0,
        kind: BenchKind | None = None,
        model: str | None = None,
    ) -> list[BenchRun]:
        """Benchmark runs, newest first, optionally filtered by kind and/or model."""
        wheres, args = [], []
        if kind is not None:
            check_choice("kind", kind, BENCH_KINDS)
            wheres.append("kind = ?")
            args.append(kind)
        if model is not None:
            wheres.append("model = ?")
            args.append(model)
        rows = self.table("bench_runs").rows_where(
            " AND ".join(wheres) or None, args, order_by="id DESC", limit=limit, offset=offset
        )
        return [BenchRun.from_row(row) for row in rows]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True
