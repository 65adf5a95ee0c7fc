"""`workbench bench`: offline through the engine in this process, or online against a server.

    workbench bench --num-requests 32 --input-len 128 --output-len 128 --compare hf
    workbench bench --url http://127.0.0.1:8000 --num-requests 64 --request-rate 8 \\
        --input-len 128 --output-len 128 --ignore-eos --goodput ttft:500 tpot:50

Both print a table (or the JSON report with --json) and save the run to the store (kind "offline"
or "online", with its configuration), where the TUI's Bench panel lists it. Options that belong to
the other mode are refused rather than ignored.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import sys
from typing import Any

from workbench import options

DESCRIPTION = """\
offline (default): the engine runs in this process, at a fixed concurrency; every request is
greedy and ignores EOS, so it emits exactly --output-len tokens.

online (--url URL): load on any OpenAI-compatible server (workbench serve, vLLM, ...) over HTTP:
streamed requests, Poisson arrivals at --request-rate and/or at most --max-concurrency in flight,
reporting request and token throughput, TTFT, TPOT, ITL, E2E (mean, p50, p90, p99) and, with
--goodput, the requests/s that meet every SLO.

Every run is saved to the store (see the TUI's Bench panel, F6)."""

# Options of one mode only: (dest, flag). Their defaults are None, so "given" is "not None".
OFFLINE_ONLY = (
    ("concurrency", "--concurrency"),
    ("warmup", "--warmup"),
    ("compare", "--compare"),
    ("threads", "--threads"),
)
ONLINE_ONLY = (
    ("endpoint", "--endpoint"),
    ("request_rate", "--request-rate"),
    ("max_concurrency", "--max-concurrency"),
    ("api_key", "--api-key"),
    ("goodput", "--goodput"),
    ("tokenizer", "--tokenizer"),
    ("timeout", "--timeout"),
)


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the `bench` command to the CLI's subparsers; it runs `run(args)`."""
    help = "benchmark: offline through the engine, or online against a server (--url)"
    p = subparsers.add_parser(
        "bench",
        help=help,
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.set_defaults(func=run)
    g = p.add_argument_group("requests (both modes)")
    g.add_argument("--num-requests", type=int, help="default: 32, or one per --prompts line")
    g.add_argument("--input-len", type=int, default=128, help="synthetic prompt tokens (128)")
    g.add_argument("--output-len", type=int, default=128, help="max tokens per request (128)")
    g.add_argument("--seed", type=int, default=0, help="seed of the prompts and arrivals (0)")
    g.add_argument("--prompts", metavar="FILE", help="prompts, one per line, instead of random")
    g.add_argument("--json", action="store_true", help="print the JSON report, not the table")
    g.add_argument(
        "--json-out",
        metavar="FILE",
        help="write the JSON report (offline default: bench-<timestamp>.json)",
    )
    g.add_argument("--db", metavar="PATH", help="the store to save the run in (default: yours)")

    g = p.add_argument_group("offline")
    g.add_argument("--concurrency", type=int, help="most requests in flight (default: all)")
    g.add_argument("--warmup", type=int, help="unmeasured requests first (0)")
    g.add_argument("--compare", choices=("hf",), help="also run transformers generate")
    g.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")

    g = p.add_argument_group("online (any OpenAI-compatible server)")
    g.add_argument("--url", help="the server, e.g. http://127.0.0.1:8000 (turns online mode on)")
    g.add_argument(
        "--endpoint", choices=("completions", "chat"), help="which API to load (completions)"
    )
    g.add_argument(
        "--request-rate",
        type=float,
        metavar="RPS",
        help="Poisson arrivals, requests/s (default: inf, all at once)",
    )
    g.add_argument("--max-concurrency", type=int, metavar="N", help="most requests in flight")
    g.add_argument(
        "--api-key",
        help=f"sent as 'Authorization: Bearer KEY' (default: ${options.API_KEY_ENV})",
    )
    g.add_argument(
        "--goodput",
        nargs="+",
        metavar="METRIC:MS",
        help="SLOs for goodput, e.g. ttft:500 tpot:50 e2e:5000 (milliseconds)",
    )
    g.add_argument(
        "--ignore-eos",
        action="store_true",
        help="ask for exactly --output-len tokens (the ignore_eos extension; always on offline)",
    )
    g.add_argument(
        "--tokenizer", help="for synthetic prompts (default: the served model's name, if local)"
    )
    g.add_argument("--timeout", type=float, help="seconds to wait for a response's next byte (600)")
    options.add_engine_args(
        p,
        model_default=None,
        model_help="offline: the model to load (default: tiny); online: the served model name "
        "(default: the first of GET /v1/models)",
    )
    return p


def run(args: argparse.Namespace) -> int:
    if args.url is None:
        _refuse(_given(args, ONLINE_ONLY), "only with --url (online)")
        report, model = _offline(args)
    else:
        given = _given(args, OFFLINE_ONLY) + options.engine_flags_given(args, skip=("model",))
        _refuse(given, "not with --url (the server has its engine)")
        report = _online(args)
        if report is None:
            return 1
        model = report["server"]["model"]
    out = sys.stderr if args.json else sys.stdout
    text = report.pop("text")
    print(json.dumps(report, indent=2) if args.json else text)
    path = args.json_out
    if path is None and args.url is None:
        from bench.offline import default_report_path

        path = default_report_path()
    if path is not None:
        from bench.offline import write_report

        try:
            written = write_report(report, path)
        except OSError as err:
            raise ValueError(f"cannot write {path}: {err.strerror or err}") from None
        print(f"\nwrote {written}", file=out)
    _save(args, report, model, out)
    if args.url is not None and report["results"]["completed"] == 0:
        print("workbench: error: every request failed (see the errors above)", file=sys.stderr)
        return 1
    return 0


def _given(args: argparse.Namespace, options: tuple[tuple[str, str], ...]) -> list[str]:
    return [flag for dest, flag in options if getattr(args, dest, None) is not None]


def _refuse(given: list[str], why: str) -> None:
    if given:
        hint = "; --max-concurrency limits requests in flight" if "--concurrency" in given else ""
        raise ValueError(f"{', '.join(given)}: {why}{hint}")


def _offline(args: argparse.Namespace) -> tuple[dict[str, Any], str]:
    from bench.offline import BenchConfig, format_report, run_benchmark

    if args.model is None:
        args.model = "tiny"
    bench_config = BenchConfig(
        num_requests=args.num_requests,
        input_len=args.input_len,
        output_len=args.output_len,
        concurrency=args.concurrency,
        warmup=args.warmup or 0,
        seed=args.seed,
        prompts_file=args.prompts,
        compare=args.compare,
        threads=args.threads,
    )
    config = options.engine_config_from_args(args)
    if config.speculative:
        # With speculation the same requests also run without it, for the speedup.
        from bench.speculative import format_speculative_report, run_speculative_benchmark

        report = run_speculative_benchmark(
            dataclasses.replace(config, speculative=None),
            bench_config,
            config.speculative,
            command=args.command_line,
        )
        text = format_speculative_report(report)
    else:
        report = run_benchmark(config, bench_config, command=args.command_line)
        text = format_report(report)
    report["kind"] = "offline"
    report["text"] = text
    return report, config.model


def _online(args: argparse.Namespace) -> dict[str, Any] | None:
    from bench.online import (
        OnlineBenchConfig,
        OnlineBenchError,
        format_online_report,
        parse_goodput,
        run_online_benchmark,
    )

    config = OnlineBenchConfig(
        url=args.url,
        model=args.model,
        endpoint=args.endpoint or "completions",
        num_requests=args.num_requests,
        request_rate=args.request_rate if args.request_rate is not None else float("inf"),
        max_concurrency=args.max_concurrency,
        input_len=args.input_len,
        output_len=args.output_len,
        prompts_file=args.prompts,
        tokenizer=args.tokenizer,
        seed=args.seed,
        ignore_eos=args.ignore_eos,
        goodput=parse_goodput(args.goodput or []),
        timeout_s=args.timeout if args.timeout is not None else 600.0,
    )
    try:
        api_key = args.api_key or os.environ.get(options.API_KEY_ENV) or None
        report = run_online_benchmark(config, api_key, command=_redact(args.command_line))
    except OnlineBenchError as err:
        print(f"workbench: error: {err}", file=sys.stderr)
        return None
    report["text"] = format_online_report(report)
    return report


def _redact(command_line: str) -> str:
    """The command line without the API key's value (reports and the store keep it)."""
    words = shlex.split(command_line)
    for i, word in enumerate(words):
        if word.startswith("--api-key="):
            words[i] = "--api-key=***"
        elif word == "--api-key" and i + 1 < len(words):
            words[i + 1] = "***"
    return shlex.join(words)


def _save(args: argparse.Namespace, report: dict[str, Any], model: str, out: Any) -> None:
    """The run into the store (without the per-request records); a store that cannot be opened
    costs the record, not the run."""
    from store import StoreError, open_store

    config = {k: v for k, v in report.items() if k not in ("results", "requests")}
    try:
        with open_store(args.db) as store:
            run_id = store.record_bench_run(report["kind"], model, config, report["results"])
            where = store.path or args.db
    except (StoreError, OSError) as err:
        print(f"workbench: warning: the run was not saved to the store: {err}", file=sys.stderr)
        return
    print(f"saved as bench run #{run_id} in {where}", file=out)
