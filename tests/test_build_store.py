"""The store's side of builds: schema v2 (stage, error, options, pid), and builds whose process
died."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from store import MIGRATIONS, open_store
from store.db import migrate


def test_a_build_row_records_its_progress_and_outcome(tmp_path: Path) -> None:
    with open_store(tmp_path / "w.db") as store:
        build_id = store.record_build(
            "tiny", "int4_awq", "fp8", tmp_path / "e", options={"calib_size": 8}
        )
        build = store.get_build(build_id)
        assert (build.status, build.stage, build.error) == ("running", None, None)
        assert build.options == {"calib_size": 8} and build.pid == os.getpid()
        store.update_build(build_id, stage="calibrate")
        store.update_build(build_id, status="failed", error="RuntimeError: boom")
        build = store.get_build(build_id)
        assert (build.status, build.stage, build.error) == (
            "failed",
            "calibrate",
            "RuntimeError: boom",
        )
        with pytest.raises(ValueError, match="status must be one of"):
            store.update_build(build_id, status="exploded")  # type: ignore[arg-type]


def test_builds_of_dead_processes_are_marked_failed(tmp_path: Path) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    with open_store(tmp_path / "w.db") as store:
        gone = store.record_build("tiny", "fp8", "auto", "/e/1", pid=int(dead.stdout))
        alive = store.record_build("tiny", "fp8", "auto", "/e/2")  # this process
        done = store.record_build("tiny", "fp8", "auto", "/e/3", status="complete")
        assert store.fail_dead_builds() == [gone]
        assert store.get_build(gone).status == "failed"
        assert "ended without finishing" in store.get_build(gone).error
        assert store.get_build(alive).status == "running"
        assert store.get_build(done).status == "complete"
        assert store.fail_dead_builds() == []


def test_v1_builds_survive_the_migration(tmp_path: Path) -> None:
    """A database of schema version 1 with a build in it opens as version 2, the build intact
    and its new fields empty."""
    path = tmp_path / "old.db"
    from sqlite_utils import Database

    db = Database(sqlite3.connect(path))
    migrate(db, str(path), MIGRATIONS[:1])
    db.table("builds").insert(
        {"model": "tiny", "recipe": "fp8", "kv_dtype": "auto", "out_dir": "/e", "status":
         "complete", "report": "{}", "timings": "{}", "created_at": "x", "updated_at": "x"}
    )  # fmt: skip
    db.conn.close()
    with open_store(path) as store:
        assert store.schema_version == len(MIGRATIONS)
        [build] = store.list_builds()
        assert (build.recipe, build.status, build.stage, build.options, build.pid) == (
            "fp8", "complete", None, {}, None,
        )  # fmt: skip
        assert store.fail_dead_builds() == []  # no pid: never guessed dead
