"""The `workbench` command: launch the TUI, generate, chat in the terminal, benchmark.

    workbench generate --prompt "Once upon a time" --max-tokens 32
    workbench chat --system "You are terse."
    workbench bench --num-requests 32 --input-len 128 --output-len 128 --compare hf
    workbench launch
    workbench launch --attach http://gpu-box:8000 --api-key KEY

Engine options map onto `EngineConfig` in `engine_config_from_args` and sampling options onto
`SamplingParams` in `sampling_params_from_args` (workbench/options.py, shared by every command
module), and nowhere else; an option left out keeps the
dataclass's default. Every user error (a model that is not there, a value out of range) ends as one
line `workbench: error: ...` on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from engine.config import SamplingParams
from workbench.options import (
    API_KEY_ENV,
    add_engine_args,
    add_sampling_args,
    engine_config_from_args,
    engine_flags_given,
    engine_kwargs,
    sampling_params_from_args,
)

PROG = "workbench"
EXIT_USAGE = 2  # bad arguments or values, unknown model: what argparse uses too
EXIT_INTERRUPTED = 130


class UsageError(Exception):
    """An argument the parser rejected; main() prints it as one line."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see '{self.prog} --help')")


# --- commands ---------------------------------------------------------------------------------


def cmd_generate(args: argparse.Namespace) -> int:
    params = sampling_params_from_args(args)  # bad values fail before the model loads
    config = engine_config_from_args(args)
    from engine.llm import LLM

    with LLM(**engine_kwargs(config)) as llm:  # exiting stops tensor-parallel workers
        if args.chat:
            outputs = llm.chat([[{"role": "user", "content": p}] for p in args.prompt], params)
        else:
            outputs = llm.generate(list(args.prompt), params)
    failed = False
    for prompt, out in zip(args.prompt, outputs, strict=True):
        if out.error is not None:
            failed = True
            print(f"{PROG}: error: {_one_line(out.error)}", file=sys.stderr)
        if args.json:
            ttft = out.metrics.ttft if out.metrics is not None else None
            record = {
                "prompt": prompt,
                "text": out.text,
                "token_ids": out.token_ids,
                "finish_reason": out.finish_reason,
                "ttft": ttft,
            }
            if out.error is not None:
                record["error"] = out.error
            print(json.dumps(record, ensure_ascii=False))
        elif out.error is None:
            print(out.text)
    sys.stdout.flush()
    return EXIT_USAGE if failed else 0


def cmd_chat(args: argparse.Namespace) -> int:
    params = sampling_params_from_args(args)
    config = engine_config_from_args(args)
    from workbench.chat_repl import ChatREPL

    return ChatREPL.from_config(config, params, system=args.system).run()


def cmd_launch(args: argparse.Namespace) -> int:
    if args.attach is not None:
        given = engine_flags_given(args)
        if given:
            raise UsageError(
                f"{', '.join(given)}: not with --attach (the server runs its own engine; "
                "'workbench serve' takes the engine options)"
            )
        from panels.remote_client import base_url

        args.attach = base_url(args.attach)  # a bad URL fails before the TUI starts
        args.api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    else:
        if args.api_key:
            raise UsageError("--api-key: only with --attach URL")
        args.engine_config = engine_config_from_args(args)  # validated before the TUI starts
    try:
        from workbench.app import run_app
    except ImportError as err:
        missing = getattr(err, "name", None)
        why = (
            "the TUI (workbench.app) is not installed in this build yet"
            if missing in ("workbench.app", None) or "run_app" in str(err)
            else f"the TUI cannot start: {_one_line(err)}"
        )
        print(
            f"{PROG}: {why}; use 'workbench chat' or 'workbench generate' meanwhile",
            file=sys.stderr,
        )
        return 1
    result = run_app(args)
    return result if isinstance(result, int) else 0


# --- the parser -------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG, description="A terminal workbench for serving LLMs with a paged-KV engine."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, func: Callable[[argparse.Namespace], int], help: str) -> Any:
        p = sub.add_parser(name, help=help, description=help)
        p.set_defaults(func=func)
        return p

    p = command("launch", cmd_launch, "start the TUI")
    add_engine_args(p, model_default=None)
    p.add_argument("--db", metavar="PATH", help="the sessions database (default: the store's)")
    g = p.add_argument_group("attach to a running server instead of loading an engine")
    g.add_argument(
        "--attach",
        metavar="URL",
        help="chat with and monitor the Workbench server at URL (workbench serve), local or remote",
    )
    g.add_argument("--api-key", help=f"the attached server's API key (default: ${API_KEY_ENV})")

    p = command("generate", cmd_generate, "complete prompts and print the outputs")
    p.add_argument("--prompt", action="append", required=True, metavar="TEXT", help="repeatable")
    p.add_argument("--chat", action="store_true", help="send each prompt as a user message")
    p.add_argument(
        "--json",
        action="store_true",
        help="one JSON object per output: text, token_ids, finish_reason, ttft (s)",
    )
    add_engine_args(p)
    add_sampling_args(p, max_tokens=SamplingParams.max_tokens)

    p = command("chat", cmd_chat, "chat with the model in the terminal (streaming)")
    p.add_argument("--system", metavar="TEXT", help="system message")
    add_engine_args(p)
    add_sampling_args(p, max_tokens=256)

    # `bench` (offline and online), `build` and `serve` live in their own modules.
    from workbench import bench_cmd, build_cmd, serve_cmd

    bench_cmd.add_parser(sub)
    build_cmd.add_parser(sub)
    serve_cmd.add_parser(sub)
    return parser


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(argv)
        args.command_line = shlex.join([PROG, *argv])
        return args.func(args)
    except (UsageError, ValueError) as err:  # ModelLoadError is a ValueError
        print(f"{PROG}: error: {_one_line(err)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
