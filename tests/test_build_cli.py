"""`workbench build` from the command line: bad input fails in one line and writes nothing, an
interrupted build (SIGTERM, SIGKILL, an exception) leaves no engine, --force replaces atomically,
and every build that starts is recorded in the store."""

# ruff: noqa: F811  (pytest fixtures imported from build_support are arguments here)

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from build_support import FAST, eval_text, one_thread  # noqa: F401  (fixtures)

from engine.model import engine_dir
from store import open_store
from workbench.cli import main

ROOT = Path(__file__).resolve().parent.parent


def fast_args(eval_file: Path | None = None) -> list[str]:
    args = [
        "--calib-size", str(FAST["calib_size"]),
        "--calib-seq-len", str(FAST["calib_seq_len"]),
        "--calib-batch-size", str(FAST["calib_batch_size"]),
        "--eval-window", str(FAST["eval_window"]),
    ]  # fmt: skip
    return args + (["--eval-text", str(eval_file)] if eval_file else ["--no-eval"])


def build(*args: str) -> int:
    with one_thread():
        return main(["build", *args])


def leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.glob(f".{out.name}.*"))


def builds_in(db: Path) -> list:
    if not db.exists():
        return []
    with open_store(db) as store:
        return store.list_builds()


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path]:
    return tmp_path / "engines" / "e", tmp_path / "store.db"


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


BAD = [
    (["--quant", "int3"], "argument --quant: invalid choice: 'int3'"),
    (["--quant", "fp8", "--model", "no-such-model"], "model 'no-such-model' is not a local"),
    (["--quant", "fp8", "--calib", "/no/such/calib.txt"], "'/no/such/calib.txt' does not exist"),
    (["--quant", "fp8", "--calib", "EMPTY"], "has no text"),
    (["--quant", "fp8", "--calib", "LATIN1"], "is not UTF-8 text"),
    (["--quant", "fp8", "--calib", "SHORT"], "fewer than one sample of --calib-seq-len 256"),
    (["--quant", "fp8", "--calib-size", "0"], "--calib-size must be >= 1, got 0"),
    (["--quant", "fp8", "--group-size", "64"], "--group-size applies to int4_awq and w4a8_awq"),
    (["--quant", "int4_awq", "--group-size", "0"], "--group-size must be >= 1, got 0"),
    (["--quant", "fp8", "--device", "cuda"], "no CUDA GPU is available"),
    (["--quant", "fp8", "--max-batch-size", "0"], "--max-batch-size must be an integer >= 1"),
    (["--quant", "fp8", "--eval-text", "/no/such/eval.txt"], "'/no/such/eval.txt' does not exist"),
    (["--quant", "fp8", "--model", "llama-3.1-8b"], "is a preset (shapes, no weights): add --load"),
    (["--quant", "fp8", "--model", "BUILT"], "is already a built engine; build from its source"),
]


@pytest.mark.parametrize(("args", "message"), BAD, ids=[m[:28] for _, m in BAD])
def test_bad_input_is_one_line_and_writes_nothing(
    tmp_path: Path, dirs, capsys, args: list[str], message: str
) -> None:
    out, db = dirs
    files = {
        "EMPTY": write(tmp_path / "empty.txt", b"\n<|endoftext|>\n  \n"),
        "LATIN1": write(tmp_path / "latin1.txt", "caf\xe9 au lait".encode("latin-1")),
        "SHORT": write(tmp_path / "short.txt", b"Once upon a time."),
        "BUILT": tmp_path / "built",
    }
    (files["BUILT"]).mkdir()
    (files["BUILT"] / engine_dir.ENGINE_JSON).write_text("{}")
    args = [str(files.get(a, a)) for a in args]
    assert build(*args, "--out", str(out), "--db", str(db)) == 2
    err = capsys.readouterr().err
    assert err.startswith("workbench: error: ") and err.count("\n") == 1, err
    assert message in err
    assert not out.parent.exists() and not db.exists()


def test_existing_output_needs_force_and_is_replaced_whole(
    tmp_path: Path, dirs, capsys, eval_text
) -> None:
    out, db = dirs
    assert build("--quant", "none", "--out", str(out), "--db", str(db), "--no-eval") == 0
    first = json.loads((out / "engine.json").read_text())
    assert build("--quant", "fp8", "--out", str(out), "--db", str(db), "--no-eval") == 2
    assert "already exists; use --force to replace it" in capsys.readouterr().err
    assert json.loads((out / "engine.json").read_text()) == first

    args = ["--quant", "fp8", "--out", str(out), "--db", str(db), "--force", *fast_args()]
    assert build(*args) == 0
    assert json.loads((out / "engine.json").read_text())["recipe"] == "fp8"
    assert (out / "hf_quant_config.json").is_file()
    assert leftovers(out) == []  # the old engine went with the swap

    other = tmp_path / "notes"
    other.mkdir()
    (other / "todo.txt").write_text("keep me")
    assert build("--quant", "none", "--out", str(other), "--force", "--no-eval") == 2
    assert "non-empty directory that is not an engine" in capsys.readouterr().err
    assert [p.name for p in other.iterdir()] == ["todo.txt"]


def test_completed_build_is_recorded_with_its_report(dirs, capsys, eval_text) -> None:
    out, db = dirs
    events = out.parent.parent / "events.jsonl"
    args = ["--quant", "fp8", "--out", str(out), "--db", str(db), *fast_args(eval_text)]
    assert build(*args, "--events-jsonl", str(events)) == 0
    printed = capsys.readouterr().out
    for line in ("[1/5] load", "[2/5] calibrate", "[5/5] evaluate", "perplexity on", "wrote "):
        assert line in printed
    [record] = builds_in(db)
    assert (record.model, record.recipe, record.kv_dtype) == ("tiny", "fp8", "auto")
    assert (record.status, record.stage, record.error) == ("complete", "evaluate", None)
    assert record.out_dir == str(out)
    assert record.report == json.loads((out / "build_report.json").read_text())
    assert set(record.timings) == {"load", "calibrate", "quantize", "export", "evaluate", "total"}
    assert record.options["quant"] == "fp8" and record.options["calib_size"] == FAST["calib_size"]
    lines = [json.loads(line) for line in events.read_text().splitlines()]
    assert lines[0] == {"event": "build", "build_id": record.id, "out": str(out)}
    assert lines[-1]["event"] == "done" and lines[-1]["report"] == record.report


def test_failing_stage_records_failure_and_leaves_nothing(
    dirs, capsys, monkeypatch, eval_text
) -> None:
    """A stage that raises (here: evaluation, after the weights were written) removes the temp
    dir, records why, and exits with one line."""
    from engine_build import evaluate

    def broken(*args, **kwargs):
        raise RuntimeError("the engine could not load the build")

    monkeypatch.setattr(evaluate, "evaluate_build", broken)
    out, db = dirs
    args = ["--quant", "fp8", "--out", str(out), "--db", str(db), *fast_args(eval_text)]
    assert build(*args) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == (
        "workbench: error: the build failed (RuntimeError: the engine could not load the build);"
        " no engine written"
    )
    assert not out.exists() and leftovers(out) == []
    [record] = builds_in(db)
    assert (record.status, record.stage) == ("failed", "evaluate")
    assert record.error == "RuntimeError: the engine could not load the build"


def start_build(out: Path, db: Path) -> subprocess.Popen:
    """A build slow enough to interrupt: AWQ over 64 samples one at a time, events on stdout."""
    command = [
        sys.executable, "-m", "workbench", "build", "--quant", "int4_awq", "--out", str(out),
        "--db", str(db), "--calib-size", "64", "--calib-seq-len", "64", "--calib-batch-size", "1",
        "--no-eval", "--threads", "1", "--events-jsonl", "-",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def read_until_calibrating(proc: subprocess.Popen) -> list[dict]:
    """Events (every stdout line must be one) up to the third calibration batch."""
    events = []
    for line in proc.stdout:
        events.append(json.loads(line))
        if events[-1]["event"] == "progress" and events[-1]["message"] == "pass 1, batch 3/64":
            return events
    proc.wait()
    raise AssertionError(f"the build ended early: {proc.stderr.read()[-2000:]}")


def test_sigterm_cancels_cleanly(dirs) -> None:
    out, db = dirs
    proc = start_build(out, db)
    try:
        events = read_until_calibrating(proc)
        assert (out.parent / f".{out.name}.partial-{proc.pid}").is_dir()
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130
    events += [json.loads(line) for line in rest.splitlines()]
    assert events[0]["event"] == "build" and events[-1] == {"event": "cancelled"}
    assert not out.exists() and leftovers(out) == []
    [record] = builds_in(db)
    assert (record.id, record.status, record.stage) == (
        events[0]["build_id"],
        "cancelled",
        "calibrate",
    )


def test_killed_build_leaves_no_engine_and_is_cleaned_up_next_time(dirs, capsys) -> None:
    out, db = dirs
    proc = start_build(out, db)
    try:
        read_until_calibrating(proc)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        proc.kill()
    assert not out.exists()
    assert leftovers(out) == [f".{out.name}.partial-{proc.pid}"]  # what a hard kill leaves
    with open_store(db) as store:
        [record] = store.list_builds()
        assert record.status == "running"
        assert store.fail_dead_builds() == [record.id]
        record = store.get_build(record.id)
    assert record.status == "failed" and "ended without finishing" in record.error

    assert build("--quant", "none", "--out", str(out), "--db", str(db), "--no-eval") == 0
    assert engine_dir.is_engine_dir(out) and leftovers(out) == []
