"""A `workbench build` running in a child process, followed through its JSON events.

The Build panel runs builds out of process so that Cancel really stops ModelOpt (a thread cannot
be interrupted inside a forward pass): cancel sends SIGTERM, which the build turns into a clean
stop (temp dir removed, store row "cancelled"); a child that does not stop within
`KILL_AFTER_S` is killed, and then the panel marks the row itself. The child records the build in
the store and writes events to stdout (`--events-jsonl -`); everything else it prints arrives on
stderr and is shown as log lines. No Textual here: callbacks run on the reader threads.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

KILL_AFTER_S = 10.0


@dataclass(frozen=True)
class BuildOptions:
    """What the panel's form asks for; everything else keeps the CLI's defaults."""

    model: str
    quant: str
    kv_cache_dtype: str
    calib_size: int
    out: str
    force: bool = False
    extra: tuple[str, ...] = ()  # more CLI arguments (tests: a smaller calibration, --no-eval)

    def argv(self, db: Path | None) -> list[str]:
        args = [
            sys.executable, "-m", "workbench", "build",
            "--model", self.model,
            "--quant", self.quant,
            "--kv-cache-dtype", self.kv_cache_dtype,
            "--calib-size", str(self.calib_size),
            "--out", self.out,
            "--events-jsonl", "-",
            "--verbose",  # the libraries' log lines too, on stderr: the panel's log shows them
        ]  # fmt: skip
        if db is not None:
            args += ["--db", str(db)]
        if self.force:
            args.append("--force")
        return args + list(self.extra)

    def command_line(self) -> str:
        """The build as a person would type it (the panel's own pipes and logging left out)."""
        args = [
            "workbench", "build",
            "--model", self.model,
            "--quant", self.quant,
            "--kv-cache-dtype", self.kv_cache_dtype,
            "--calib-size", str(self.calib_size),
            "--out", self.out,
        ]  # fmt: skip
        if self.force:
            args.append("--force")
        return shlex.join(args + list(self.extra))


class BuildProcess:
    """One child build. `on_event(dict)` gets each JSON event, `on_log(str)` each other line,
    `on_exit(returncode)` is called once, after both streams are drained."""

    def __init__(
        self,
        options: BuildOptions,
        db: Path | None,
        on_event: Callable[[dict[str, Any]], None],
        on_log: Callable[[str], None],
        on_exit: Callable[[int], None],
        cwd: Path | None = None,
    ) -> None:
        self.options = options
        self.build_id: int | None = None
        self.cancelled = False
        self._on_event, self._on_log, self._on_exit = on_event, on_log, on_exit
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            options.argv(db),
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            encoding="utf-8",
            errors="replace",
        )
        self._stderr = threading.Thread(target=self._read_stderr, daemon=True)
        self._stdout = threading.Thread(target=self._read_stdout, daemon=True)
        self._stderr.start()
        self._stdout.start()

    @property
    def running(self) -> bool:
        return self.proc.poll() is None

    def cancel(self) -> None:
        """Ask the build to stop (SIGTERM); kill it if it has not after KILL_AFTER_S."""
        if not self.running:
            return
        self.cancelled = True
        self.proc.send_signal(signal.SIGTERM)
        threading.Thread(target=self._kill_later, daemon=True).start()

    def kill(self) -> None:
        if self.running:
            self.proc.kill()

    def _kill_later(self) -> None:
        try:
            self.proc.wait(timeout=KILL_AFTER_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()

    def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            line = line.rstrip("\n")
            try:
                event = json.loads(line)
            except ValueError:
                event = None
            if isinstance(event, dict) and "event" in event:
                if event["event"] == "build":
                    self.build_id = event.get("build_id")
                self._on_event(event)
            elif line.strip():
                self._on_log(line)
        self._stderr.join()
        self._on_exit(self.proc.wait())

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            if line.strip():
                self._on_log(line.rstrip("\n"))
