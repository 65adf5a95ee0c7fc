"""`workbench serve`: the engine behind an OpenAI-compatible HTTP API.

    workbench serve --model tiny [--host 127.0.0.1] [--port 8000] [--api-key KEY]

Loopback only by default. A non-loopback address needs --api-key (or WORKBENCH_API_KEY), or the
explicit --allow-insecure-public. The bind rule and every option are checked before the model
loads. Engine options are the CLI's own (`workbench.add_engine_args`).
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from workbench.options import API_KEY_ENV, add_engine_args, engine_config_from_args, engine_kwargs

DEFAULT_MAX_QUEUE = 256
# engine.server's own values, not imported here: engine.server imports torch, slow for --help.
DEFAULT_MAX_REQUEST_BYTES = 32 * 2**20
TOOL_CALL_PARSERS = ("hermes", "llama3", "mistral")


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the `serve` command to the CLI's subparsers; it runs `run(args)` (`args.func`)."""
    help = "serve the model over an OpenAI-compatible HTTP API"
    p = subparsers.add_parser("serve", help=help, description=help)
    p.set_defaults(func=run)
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    g.add_argument("--port", type=int, default=8000, help="default: 8000")
    g.add_argument(
        "--api-key",
        default=os.environ.get(API_KEY_ENV),
        help=f"require 'Authorization: Bearer KEY' on every route but /health "
        f"(default: ${API_KEY_ENV})",
    )
    g.add_argument(
        "--allow-insecure-public",
        action="store_true",
        help="allow a non-loopback --host without --api-key (anyone who reaches it can use it)",
    )
    g.add_argument(
        "--max-queue",
        type=int,
        default=DEFAULT_MAX_QUEUE,
        help=f"requests allowed to wait beyond --max-num-seqs before answering 429; -1: no "
        f"limit (default: {DEFAULT_MAX_QUEUE})",
    )
    g.add_argument(
        "--max-request-bytes",
        type=int,
        default=DEFAULT_MAX_REQUEST_BYTES,
        help=f"larger request bodies are answered 413 (default: {DEFAULT_MAX_REQUEST_BYTES})",
    )
    g.add_argument(
        "--tool-call-parser",
        choices=TOOL_CALL_PARSERS,
        help='reads tool calls out of replies for tool_choice "auto" (default: none, so "auto" '
        'is refused; "required" and named functions work without one)',
    )
    g.add_argument("--served-model-name", help="the model id clients send (default: --model)")
    g.add_argument(
        "--log-level", default="info", choices=("critical", "error", "warning", "info", "debug")
    )
    add_engine_args(p)
    return p


def run(args: argparse.Namespace) -> int:
    from engine.server import check_bind

    check_bind(args.host, args.api_key, args.allow_insecure_public)  # before the model loads
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be in [0, 65535], got {args.port}")
    if args.max_queue < -1:
        raise ValueError(f"--max-queue must be >= 0, or -1 for no limit, got {args.max_queue}")
    if args.max_request_bytes < 1:
        raise ValueError(f"--max-request-bytes must be >= 1, got {args.max_request_bytes}")
    config = engine_config_from_args(args)

    from engine.llm import AsyncLLM
    from engine.server import ServerSettings, create_app, serve

    llm = AsyncLLM(**engine_kwargs(config))
    settings = ServerSettings(
        model_name=args.served_model_name or args.model,
        api_key=args.api_key or None,
        max_queue=None if args.max_queue == -1 else args.max_queue,
        max_request_bytes=args.max_request_bytes,
        tool_call_parser=args.tool_call_parser,
    )
    app = create_app(llm, settings, shutdown_engine=True)
    serve(app, args.host, args.port, log_level=args.log_level)
    return 0
