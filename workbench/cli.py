"""The `workbench` command: launch the TUI, generate, chat in the terminal, benchmark.

    workbench generate --prompt "Once upon a time" --max-tokens 32
    workbench chat --system "You are terse."
    workbench bench --num-requests 32 --input-len 128 --output-len 128 --compare hf
    workbench launch
    workbench launch --attach http://gpu-box:8000 --api-key KEY

Engine options map onto `EngineConfig` in `engine_config_from_args` and sampling options onto
`SamplingParams` in `sampling_params_from_args`, and nowhere else; an option left out keeps the
dataclass's default. Every user error (a model that is not there, a value out of range) ends as one
line `workbench: error: ...` on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from engine.config import KV_CACHE_DTYPES, EngineConfig, SamplingParams

PROG = "workbench"
API_KEY_ENV = "WORKBENCH_API_KEY"  # the server's key: `serve --api-key`, `bench --url`, `--attach`
EXIT_USAGE = 2  # bad arguments or values, unknown model: what argparse uses too
EXIT_INTERRUPTED = 130


class UsageError(Exception):
    """An argument the parser rejected; main() prints it as one line."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see '{self.prog} --help')")


# --- options shared by several commands -------------------------------------------------------


def add_engine_args(
    parser: argparse.ArgumentParser,
    model_default: str | None = "tiny",
    model_help: str | None = None,
) -> None:
    """The engine options; `model_default` None leaves --model unset unless given (for `launch`,
    where the settings file chooses the model); `model_help` replaces --model's help."""
    g = parser.add_argument_group("engine")
    g.add_argument(
        "--model",
        default=model_default,
        help=model_help
        or "bundled name (tiny), checkpoint directory or Hugging Face id (default: "
        + (model_default or "the settings file's, else tiny")
        + ")",
    )
    g.add_argument("--dtype", choices=("auto", "float32", "float16", "bfloat16"))
    g.add_argument("--device", help="auto, cpu, cuda or cuda:N (default: auto)")
    g.add_argument("--block-size", type=int, help="tokens per KV page")
    g.add_argument("--max-num-tokens", type=int, help="token budget of one engine step")
    g.add_argument("--max-num-seqs", type=int, help="most requests running at once")
    g.add_argument("--max-model-len", type=int, help="longest prompt + output, in tokens")
    g.add_argument("--num-kv-blocks", type=int, help="KV pages (default: sized from memory)")
    g.add_argument(
        "--kv-cache-dtype",
        choices=KV_CACHE_DTYPES,
        help="KV pages: auto (the checkpoint's KV quantization, else --dtype), fp8 or int8",
    )
    g.add_argument("--kv-host-bytes", help="host RAM for evicted prefix blocks, e.g. 4GiB (off)")
    g.add_argument("--kv-disk-dir", help="directory for prefix blocks evicted from host RAM")
    g.add_argument("--kv-disk-bytes", help="disk budget of --kv-disk-dir, e.g. 100GB (16GiB)")
    g.add_argument(
        "--no-prefix-caching",
        dest="enable_prefix_caching",
        action="store_false",
        default=None,
        help="do not reuse cached prompt prefixes",
    )
    g.add_argument(
        "--async-scheduling",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="overlap scheduling: queue the next step before the last one's tokens are read "
        "(default: on for CUDA, off on the CPU)",
    )
    g.add_argument(
        "--load-format",
        choices=("auto", "dummy"),
        help="auto: the checkpoint's weights; dummy: random weights at its shapes",
    )
    g.add_argument(
        "--speculative",
        choices=("ngram", "draft"),
        help="speculative decoding: prompt-lookup n-grams or a draft model",
    )
    g.add_argument("--spec-tokens", type=int, default=4, help="draft tokens per step (4)")
    g.add_argument("--draft-model", default="tiny-draft", help="for --speculative draft")


_ENGINE_FIELDS = (
    "model",
    "dtype",
    "device",
    "block_size",
    "max_num_tokens",
    "max_num_seqs",
    "max_model_len",
    "num_kv_blocks",
    "kv_cache_dtype",
    "enable_prefix_caching",
    "load_format",
    "async_scheduling",
    "kv_host_bytes",
    "kv_disk_dir",
    "kv_disk_bytes",
)


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    """The one place engine options become an EngineConfig (which validates them)."""
    values = {name: getattr(args, name, None) for name in _ENGINE_FIELDS}
    method = getattr(args, "speculative", None)
    if method is not None:
        values["speculative"] = {"method": method, "num_tokens": args.spec_tokens}
        if method == "draft":
            values["speculative"]["model"] = args.draft_model
    given = {k: v for k, v in values.items() if v is not None}
    if given.get("model") is not None:  # an engine directory's stored serving defaults
        from engine.quant.engine_dir import with_serving_defaults

        given = with_serving_defaults(given["model"], given)
    return EngineConfig(**given)


def engine_kwargs(config: EngineConfig) -> dict[str, Any]:
    """An EngineConfig as the keyword arguments of LLM(...) / AsyncLLM(...)."""
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}


def add_sampling_args(parser: argparse.ArgumentParser, max_tokens: int) -> None:
    g = parser.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=max_tokens, help=f"default: {max_tokens}")
    g.add_argument("--temperature", type=float, help="0 is greedy (default: 0)")
    g.add_argument("--top-p", type=float)
    g.add_argument("--top-k", type=int, help="0 or -1: off")
    g.add_argument("--min-p", type=float)
    g.add_argument("--repetition-penalty", type=float)
    g.add_argument("--seed", type=int, help="seed of this request's sampling")
    g.add_argument("--stop", action="append", metavar="TEXT", help="stop string (repeatable)")
    g.add_argument("--ignore-eos", action="store_true", default=None)


_SAMPLING_FIELDS = (
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "repetition_penalty",
    "seed",
    "stop",
    "ignore_eos",
)


def sampling_params_from_args(args: argparse.Namespace) -> SamplingParams:
    """The one place sampling options become SamplingParams (which validates them)."""
    values = {name: getattr(args, name, None) for name in _SAMPLING_FIELDS}
    return SamplingParams(**{k: v for k, v in values.items() if v is not None})


# --- commands ---------------------------------------------------------------------------------


def cmd_generate(args: argparse.Namespace) -> int:
    params = sampling_params_from_args(args)  # bad values fail before the model loads
    config = engine_config_from_args(args)
    from engine.llm import LLM

    llm = LLM(**engine_kwargs(config))
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


def engine_flags_given(args: argparse.Namespace, skip: tuple[str, ...] = ()) -> list[str]:
    """The engine options on the command line (for commands where the engine is a server's)."""
    flags = {name: "--" + name.replace("_", "-") for name in (*_ENGINE_FIELDS, "speculative")}
    flags["enable_prefix_caching"] = "--no-prefix-caching"
    return [
        flag
        for name, flag in flags.items()
        if name not in skip and getattr(args, name, None) is not None
    ]


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
