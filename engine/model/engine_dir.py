"""Engine directories: what `workbench build` writes and `LLM(dir)` serves.

An engine directory is a Hugging Face checkpoint (ModelOpt's export when quantized: safetensors,
config.json with `quantization_config`, hf_quant_config.json; tokenizer files) plus two files of
ours: `engine.json` (how it was built, and the serving defaults `LLM(dir)` starts with) and
`build_report.json` (perplexity, sizes, times).

Invariant: DIR either does not exist or is a complete engine. A build writes into
`.DIR.partial-<pid>` beside DIR and renames it to DIR as its very last step; a failed build removes
its temp dir, and a killed one's is removed by the next build into the same parent (its pid is no
longer alive). `--force` replaces an existing engine by swapping the two directories in one
`renameat2(RENAME_EXCHANGE)` where the kernel has it (two renames elsewhere: DIR is briefly absent,
never half-written).
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import hashlib
import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ENGINE_JSON = "engine.json"
BUILD_REPORT_JSON = "build_report.json"
FORMAT = "workbench-engine"
FORMAT_VERSION = 1
# What a build copies from the source (the tokenizer, its chat template, generation defaults).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "tokenizer.tiktoken",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)
# Any of these makes a directory have a tokenizer (as engine.model.loader.load_tokenizer sees it).
_TOKENIZER_DEFINING = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "tokenizer.tiktoken",
)
_PARTIAL = re.compile(r"^\.(?P<name>.+)\.(?:partial|replaced)-(?P<pid>\d+)$")


class EngineDirError(ValueError):
    """An output directory that cannot be written or an engine.json that cannot be read."""


# --- reading -----------------------------------------------------------------------------------


def is_engine_dir(path: str | os.PathLike[str]) -> bool:
    return (Path(path) / ENGINE_JSON).is_file()


def read_engine_json(path: str | os.PathLike[str]) -> dict[str, Any]:
    file = Path(path) / ENGINE_JSON
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise EngineDirError(f"cannot read {file}: {err}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise EngineDirError(f"{file} is not a Workbench engine description")
    return data


def without_tokenizer(path: str | os.PathLike[str]) -> bool:
    """An engine built from a preset's shapes (random weights) has no tokenizer: the engine
    serves it with token-id prompts, as it serves a dummy preset."""
    path = Path(path)
    return is_engine_dir(path) and not any((path / f).is_file() for f in _TOKENIZER_DEFINING)


def serving_defaults(model: str | os.PathLike[str]) -> dict[str, Any]:
    """The EngineConfig fields an engine directory's engine.json sets ({} for anything else:
    a bundled name, a plain checkpoint, a Hub id). Fields this version of EngineConfig lacks are
    left out."""
    try:
        is_dir = is_engine_dir(model)
    except (OSError, ValueError):  # a name no filesystem accepts: not an engine dir
        return {}
    if not is_dir:
        return {}
    from engine.config import EngineConfig

    known = {f.name for f in dataclasses.fields(EngineConfig)}
    serving = read_engine_json(model).get("serving") or {}
    return {k: v for k, v in serving.items() if k in known and k != "model"}


def with_serving_defaults(model: str | os.PathLike[str], options: dict[str, Any]) -> dict[str, Any]:
    """`options` (given explicitly, never None-valued) over the engine's stored defaults."""
    return {**serving_defaults(model), **options}


# --- writing -----------------------------------------------------------------------------------


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n", "utf-8")


def check_output_dir(out: Path, force: bool) -> None:
    """Refuse what a build must not write to, before anything is written."""
    if out.exists() or out.is_symlink():
        if not force:
            raise EngineDirError(f"{out} already exists; use --force to replace it")
        if not out.is_dir() or out.is_symlink():
            raise EngineDirError(f"{out} exists and is not a directory; not replacing it")
        if not is_engine_dir(out) and any(out.iterdir()):
            raise EngineDirError(
                f"{out} is a non-empty directory that is not an engine; not replacing it"
            )
    parent = out.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent  # the build creates the missing directories
    if not parent.is_dir():
        raise EngineDirError(f"{parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise EngineDirError(f"cannot write to {parent}")


def partial_dir(out: Path) -> Path:
    return out.parent / f".{out.name}.partial-{os.getpid()}"


def remove_stale_partials(out: Path) -> list[Path]:
    """Remove temp dirs of earlier builds of `out` whose process is gone; returns them."""
    removed = []
    if not out.parent.is_dir():
        return removed
    for entry in out.parent.iterdir():
        match = _PARTIAL.match(entry.name)
        if match and match["name"] == out.name and not _pid_alive(int(match["pid"])):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # our own pid on a leftover: a previous process that had it
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def atomic_engine_dir(out: Path, force: bool = False) -> Iterator[Path]:
    """Yield a temp dir to build in; on normal exit it becomes `out`, on any exception
    (KeyboardInterrupt included) it is removed and `out` is left as it was."""
    out = Path(out).absolute()
    check_output_dir(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(out)
    tmp = partial_dir(out)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        check_output_dir(out, force)  # something may have appeared there meanwhile
        _publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _publish(tmp: Path, out: Path) -> None:
    if not out.exists():
        os.rename(tmp, out)  # atomic; fails rather than merging if out appeared in between
        return
    if _exchange(tmp, out):  # tmp now holds the old engine
        shutil.rmtree(tmp, ignore_errors=True)
        return
    old = out.parent / f".{out.name}.replaced-{os.getpid()}"
    os.rename(out, old)
    os.rename(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2); False where that is not available."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p]
    renameat2.argtypes += [ctypes.c_uint]
    result = renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    return result == 0


# --- facts about checkpoints -------------------------------------------------------------------


def weight_files(model_dir: Path) -> list[Path]:
    return sorted(Path(model_dir).glob("*.safetensors"))


def weights_sha256(model_dir: Path, chunk: int = 1 << 24) -> str:
    """SHA-256 over the safetensors files, in name order (names included)."""
    digest = hashlib.sha256()
    for file in weight_files(model_dir):
        digest.update(file.name.encode() + b"\0")
        with file.open("rb") as f:
            while block := f.read(chunk):
                digest.update(block)
    return digest.hexdigest()


def dir_bytes(path: Path, only_weights: bool = False) -> int:
    files = weight_files(path) if only_weights else [p for p in Path(path).rglob("*")]
    return sum(p.stat().st_size for p in files if p.is_file())
