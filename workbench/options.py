"""The options several commands share: the engine's and sampling's, and the server's API key.

Engine options map onto `EngineConfig` in `engine_config_from_args` and sampling options onto
`SamplingParams` in `sampling_params_from_args`, and nowhere else; an option left out keeps the
dataclass's default. The command modules (cli, bench_cmd, serve_cmd, chat_repl) import this module,
never each other's options, so the CLI has no import cycle.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from engine.config import KV_CACHE_DTYPES, EngineConfig, SamplingParams
from engine.quant.checkpoint import RECIPE_ALGOS

API_KEY_ENV = "WORKBENCH_API_KEY"  # the server's key: `serve --api-key`, `bench --url`, `--attach`


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
        "--tensor-parallel-size",
        type=int,
        help="split the model over this many ranks, one process each (CUDA: one GPU each)",
    )
    g.add_argument(
        "--kv-cache-dtype",
        choices=KV_CACHE_DTYPES,
        help="KV pages: auto (the checkpoint's KV quantization, else --dtype), fp8 or int8",
    )
    g.add_argument("--kv-host-bytes", help="host RAM for evicted prefix blocks, e.g. 4GiB (off)")
    g.add_argument("--kv-disk-dir", help="directory for prefix blocks evicted from host RAM")
    g.add_argument("--kv-disk-bytes", help="disk budget of --kv-disk-dir, e.g. 100GB (16GiB)")
    g.add_argument(
        "--quantization",
        choices=RECIPE_ALGOS,
        help="weights: a recipe the checkpoint must match, or with --load-format dummy the "
        "recipe random weights are quantized with (ModelOpt's arithmetic)",
    )
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
        "--skip-tokenizer-init",
        action="store_true",
        default=None,
        help="load no tokenizer: prompts must be token ids (a text prompt is an error)",
    )
    g.add_argument(
        "--load-format",
        choices=("auto", "dummy"),
        help="auto: the checkpoint's weights; dummy: random weights at its shapes",
    )
    g.add_argument(
        "--speculative",
        choices=("ngram", "draft", "eagle"),
        help="speculative decoding: prompt-lookup n-grams, a draft model or an EAGLE-3 head",
    )
    g.add_argument("--spec-tokens", type=int, default=4, help="draft tokens per step (4)")
    g.add_argument(
        "--draft-model",
        help="for --speculative draft (default tiny-draft) or eagle (an EAGLE-3 head, tiny-eagle)",
    )


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
    "kv_host_bytes",
    "kv_disk_dir",
    "kv_disk_bytes",
    "quantization",
    "skip_tokenizer_init",
    "enable_prefix_caching",
    "load_format",
    "async_scheduling",
    "tensor_parallel_size",
)


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    """The one place engine options become an EngineConfig (which validates them)."""
    values = {name: getattr(args, name, None) for name in _ENGINE_FIELDS}
    method = getattr(args, "speculative", None)
    if method is not None:
        values["speculative"] = {"method": method, "num_tokens": args.spec_tokens}
        if method in ("draft", "eagle") and args.draft_model is not None:
            values["speculative"]["model"] = args.draft_model
    given = {k: v for k, v in values.items() if v is not None}
    if given.get("model") is not None:  # an engine directory's stored serving defaults
        from engine.model.engine_dir import with_serving_defaults

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


def engine_flags_given(args: argparse.Namespace, skip: tuple[str, ...] = ()) -> list[str]:
    """The engine options on the command line (for commands where the engine is a server's)."""
    flags = {name: "--" + name.replace("_", "-") for name in (*_ENGINE_FIELDS, "speculative")}
    flags["enable_prefix_caching"] = "--no-prefix-caching"
    return [
        flag
        for name, flag in flags.items()
        if name not in skip and getattr(args, name, None) is not None
    ]
