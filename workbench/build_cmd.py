"""`workbench build`: quantize a model with ModelOpt into an engine directory, and measure it.

    workbench build --model tiny --quant int4_awq --out engines/tiny-int4
    workbench build --model tiny --quant fp8 --kv-cache-dtype fp8 --calib my.txt --out e/fp8
    workbench build --model llama-3.1-8b --load-format dummy --quant fp8 --no-eval --out e/8b

One line per stage (updated in place on a terminal), then the report: perplexity of the source
and of the build, sizes, times. `--events-jsonl FILE` (or `-`: stdout, with every other output
moved to stderr) writes one JSON object per event, which is how the Build panel follows a build it
runs in a subprocess. Each build is recorded in the store (`--db`); Ctrl-C or SIGTERM cancels it,
and an interrupted build leaves no engine directory behind.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from engine_build.recipes import KV_CACHE_DTYPES, RECIPES

EXIT_CANCELLED = 130


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    help = "quantize a model into an engine directory (ModelOpt) and measure it"
    p = subparsers.add_parser("build", help=help, description=help)
    p.set_defaults(func=run)
    g = p.add_argument_group("what to build")
    g.add_argument(
        "--model", default="tiny", help="bundled name, checkpoint dir, Hub id or preset (tiny)"
    )
    g.add_argument("--quant", required=True, choices=tuple(RECIPES), help="the recipe")
    g.add_argument("--kv-cache-dtype", default="auto", choices=KV_CACHE_DTYPES, help="(auto)")
    g.add_argument("--out", required=True, metavar="DIR", help="the engine directory to write")
    g.add_argument("--force", action="store_true", help="replace DIR if it is an engine")
    g.add_argument(
        "--load-format",
        default="auto",
        choices=("auto", "dummy"),
        help="dummy: random weights at the model's (or preset's) shape",
    )
    g.add_argument("--device", default="auto", help="where to calibrate: auto, cpu, cuda[:N]")
    g.add_argument(
        "--dtype",
        default="auto",
        choices=("auto", "float16", "bfloat16", "float32"),
        help="of the tensors left unquantized (auto: the source's)",
    )
    g.add_argument("--group-size", type=int, help="int4 recipes: channels per scale (128)")
    g = p.add_argument_group("calibration")
    g.add_argument("--calib", default="builtin", metavar="builtin|FILE", help="(builtin)")
    g.add_argument("--calib-size", type=int, default=32, help="samples (32)")
    g.add_argument("--calib-seq-len", type=int, default=256, help="tokens per sample (256)")
    g.add_argument("--calib-batch-size", type=int, default=8, help="samples per forward (8)")
    g.add_argument("--seed", type=int, default=0, help="of the samples and dummy weights (0)")
    g = p.add_argument_group("evaluation")
    g.add_argument(
        "--eval-text",
        action="append",
        metavar="FILE",
        help="held-out text to measure perplexity on (repeatable; default: the built-in one)",
    )
    g.add_argument("--eval-window", type=int, default=1024, help="context tokens (1024)")
    g.add_argument("--no-eval", action="store_true", help="skip the perplexity measurement")
    g = p.add_argument_group("serving defaults stored in the engine")
    g.add_argument("--max-batch-size", type=int, help="requests running at once")
    g.add_argument("--max-seq-len", type=int, help="longest prompt + output")
    g.add_argument("--max-num-tokens", type=int, help="token budget of one engine step")
    g.add_argument("--block-size", type=int, help="tokens per KV page")
    g = p.add_argument_group("output")
    g.add_argument("--events-jsonl", metavar="FILE", help="JSON events to FILE ('-': stdout)")
    g.add_argument("--db", metavar="PATH", help="the store to record the build in")
    g.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    g.add_argument("-v", "--verbose", action="store_true", help="also print the libraries' log")
    return p


def spec_from_args(args: argparse.Namespace) -> Any:
    from engine_build.build import BuildSpec

    return BuildSpec(
        model=args.model,
        out=Path(args.out),
        quant=args.quant,
        kv_cache_dtype=args.kv_cache_dtype,
        calib=args.calib,
        calib_size=args.calib_size,
        calib_seq_len=args.calib_seq_len,
        calib_batch_size=args.calib_batch_size,
        group_size=args.group_size,
        load_format=args.load_format,
        device=args.device,
        dtype=args.dtype,
        eval_texts=tuple(args.eval_text or ("heldout",)),
        eval_window=args.eval_window,
        evaluate=not args.no_eval,
        force=args.force,
        seed=args.seed,
        max_batch_size=args.max_batch_size,
        max_seq_len=args.max_seq_len,
        max_num_tokens=args.max_num_tokens,
        block_size=args.block_size,
        command=getattr(args, "command_line", None),
    )


class _Cancelled(KeyboardInterrupt):
    """SIGTERM, raised where the build is, so its temp dir is cleaned up as for Ctrl-C."""


def _on_sigterm(signum: int, frame: Any) -> None:
    raise _Cancelled


def run(args: argparse.Namespace) -> int:
    import torch

    from engine_build.build import execute, plan_build

    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    with _event_stream(args.events_jsonl) as events:
        plan = plan_build(spec_from_args(args))  # BuildError (a ValueError): nothing written
        printer = _Printer(events is not None and args.events_jsonl == "-")
        record = _Record(args.db, plan)
        emit = _emitter(events, printer, record, args.verbose)
        emit_raw(events, {"event": "build", "build_id": record.build_id, "out": str(plan.out)})
        printer.line(
            f"building {plan.spec.model} -> {plan.out} ({plan.spec.quant}, KV cache "
            f"{plan.spec.kv_cache_dtype})"
            + (f", build #{record.build_id}" if record.build_id else "")
        )
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
        try:
            result = execute(plan, emit)
        except KeyboardInterrupt:
            record.finish("cancelled", error="cancelled")
            emit_raw(events, {"event": "cancelled"})
            printer.line("cancelled: no engine written")
            return EXIT_CANCELLED
        except Exception as err:
            message = f"{type(err).__name__}: {_one_line(err)}"
            record.finish("failed", error=message)
            emit_raw(events, {"event": "error", "message": message})
            raise ValueError(f"the build failed ({message}); no engine written") from err
        finally:
            signal.signal(signal.SIGTERM, previous)
        record.finish("complete", report=result.report)
        emit_raw(events, {"event": "done", "out": str(result.out), "report": result.report})
        from engine_build.report import format_report

        for line in format_report(result.report):
            printer.line(line)
        printer.line(f"wrote {result.out}")
    return 0


# --- output ------------------------------------------------------------------------------------


@contextlib.contextmanager
def _event_stream(target: str | None):
    """The events' stream. For '-', stdout carries only events: anything else the libraries
    print there goes to stderr."""
    if target is None:
        yield None
    elif target == "-":
        events = sys.stdout
        with contextlib.redirect_stdout(sys.stderr):
            yield events
    else:
        try:
            file = open(target, "w", encoding="utf-8", buffering=1)  # noqa: SIM115
        except OSError as err:
            raise ValueError(f"cannot write {target}: {err.strerror or err}") from None
        with file:
            yield file


def emit_raw(events: TextIO | None, data: dict[str, Any]) -> None:
    if events is not None:
        events.write(json.dumps(data, default=str) + "\n")
        events.flush()


class _Printer:
    """Progress for people: a line per stage, redrawn in place on a terminal."""

    def __init__(self, to_stderr: bool) -> None:
        self.out = sys.stderr if to_stderr else sys.stdout
        self.tty = self.out.isatty()
        self._last_draw = 0.0
        self._drawn = False

    def line(self, text: str) -> None:
        self._clear()
        print(text, file=self.out, flush=True)

    def progress(self, text: str) -> None:
        now = time.monotonic()
        if not self.tty or now - self._last_draw < 0.2:
            return
        self._last_draw = now
        self.out.write("\r\x1b[K" + text[:200])
        self.out.flush()
        self._drawn = True

    def _clear(self) -> None:
        if self._drawn:
            self.out.write("\r\x1b[K")
            self._drawn = False


def _emitter(events: TextIO | None, printer: _Printer, record: _Record, verbose: bool):
    from engine_build.build import STAGES

    def emit(event: Any) -> None:
        emit_raw(events, {"event": event.kind, **event.to_dict()})
        label = (
            f"[{STAGES.index(event.stage) + 1}/{len(STAGES)}] {event.stage:<9}"
            if (event.stage in STAGES)
            else ""
        )
        if event.kind == "start":
            record.stage(event.stage)
            printer.progress(f"{label} {event.message}")
        elif event.kind == "progress":
            printer.progress(f"{label} {event.fraction:4.0%}  {event.message}")
        elif event.kind == "end":
            printer.line(f"{label} {event.elapsed_s:6.1f}s  {event.message}")
        elif event.kind == "log" and (verbose or event.stage is None):
            printer.line(event.message)

    return emit


class _Record:
    """The build's row in the store. A store that cannot be opened costs a warning, not the
    build."""

    def __init__(self, db: str | None, plan: Any) -> None:
        from store import StoreError, open_store

        self.store = None
        self.build_id: int | None = None
        self._errors = (StoreError,)
        try:
            self.store = open_store(db)
            self.build_id = self.store.record_build(
                plan.spec.model,
                plan.spec.quant,
                plan.spec.kv_cache_dtype,
                str(plan.out),
                status="running",
                options=plan.spec.to_dict(),
            )
        except StoreError as err:
            self._warn(err)

    def stage(self, stage: str | None) -> None:
        self._call(lambda s: s.update_build(self.build_id, stage=stage))

    def finish(self, status: str, report: dict | None = None, error: str | None = None) -> None:
        timings = (report or {}).get("timings_s")
        self._call(
            lambda s: s.update_build(
                self.build_id, status=status, report=report, timings=timings, error=error
            )
        )
        if self.store is not None:
            self.store.close()
            self.store = None

    def _call(self, fn: Any) -> None:
        if self.store is None or self.build_id is None:
            return
        try:
            fn(self.store)
        except self._errors as err:
            self._warn(err)

    def _warn(self, err: Exception) -> None:
        print(f"workbench: warning: the build is not recorded in the store: {err}", file=sys.stderr)


def _one_line(text: object) -> str:
    return " ".join(str(text).split())
