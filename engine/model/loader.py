"""Finding and reading checkpoints: model name -> directory -> config, tokenizer, tensors.

The loader knows nothing of our model's parameter names: `iter_safetensors` yields Hugging Face
names and tensors, and the model maps them in its own `load_weights`. Every failure a user can cause
(a typo in a name, no network, a .bin checkpoint, an unsupported architecture) raises a
`ModelLoadError` whose message is one line that names the model and says what was tried, fit to be
shown as is by the CLI and the TUI.
"""

from __future__ import annotations

import copy
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoTokenizer, PretrainedConfig, PreTrainedTokenizerBase

from .moe import MOE_ARCHITECTURES
from .presets import PRESETS, preset_config

BUNDLED_DIR = Path(__file__).resolve().parent.parent / "bundled"  # engine/bundled/<name>/
BUNDLED_MODELS = ("tiny", "tiny-draft", "tiny-eagle")  # tiny-eagle: an EAGLE-3 head

SUPPORTED_ARCHITECTURES = frozenset(
    {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"}
) | frozenset(MOE_ARCHITECTURES)
# For configs that name no architecture (some hand-written or converted ones).
_ARCHITECTURE_OF_MODEL_TYPE = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    **{model_type: arch for arch, model_type in MOE_ARCHITECTURES.items()},
}

# What a Hub download fetches: config, weights, tokenizer and chat template; never .bin/.pth
# weights, and never Mistral's `consolidated.safetensors`, which duplicates the HF-format shards.
HUB_ALLOW_PATTERNS = [
    "*.json",
    "*.safetensors",
    "*.jinja",
    "tokenizer.model",
    "*.tiktoken",
    "merges.txt",
    "vocab.txt",
]
HUB_IGNORE_PATTERNS = ["consolidated*.safetensors", "original/*"]

_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "tokenizer.tiktoken",
)
_INDEX_FILE = "model.safetensors.index.json"
_SINGLE_FILE = "model.safetensors"
# "org/name": what we accept as a Hub id (HF also accepts bare legacy names such as "gpt2", but
# a bare word here is far more often a typo of a bundled name or a local path).
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}", re.ASCII)


class ModelLoadError(ValueError):
    """A model cannot be found or read. The message is one line, meant for the user."""


class ModelNotFoundError(ModelLoadError):
    """The model name resolves to no directory: not local, not bundled, not on (or cached from)
    the Hub."""


class CheckpointError(ModelLoadError):
    """The directory exists but is not a checkpoint we can serve (no config, no safetensors, no
    tokenizer, an unsupported architecture, a broken shard index)."""


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def hub_offline() -> bool:
    """Whether Hub access is off. Read at call time, unlike huggingface_hub, which reads
    HF_HUB_OFFLINE once at import."""
    from huggingface_hub import constants

    return (
        bool(constants.HF_HUB_OFFLINE)
        or _env_true("HF_HUB_OFFLINE")
        or _env_true("TRANSFORMERS_OFFLINE")
    )


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def resolve_model_dir(
    model: str | os.PathLike[str], *, cache_dir: str | Path | None = None
) -> Path:
    """Return the directory that holds `model`.

    In order: a bundled name (BUNDLED_MODELS); an existing local directory (an HF checkpoint
    or an engine dir); a Hub id "org/name", fetched with `huggingface_hub.snapshot_download`
    (config, safetensors, tokenizer files only), which reuses the HF cache (`cache_dir`, default
    HF_HUB_CACHE) and honours HF_HUB_OFFLINE. Anything else raises `ModelNotFoundError`.
    """
    name = os.fspath(model)
    if not name.strip():
        raise ModelNotFoundError("model name is empty")
    if name in BUNDLED_MODELS:
        bundled = BUNDLED_DIR / name
        if not bundled.is_dir():
            raise ModelNotFoundError(f"bundled model '{name}' is missing: expected it at {bundled}")
        return bundled
    path = Path(name).expanduser()
    if path.is_dir():
        return path.resolve()
    if path.exists():
        raise ModelNotFoundError(f"model '{name}' is a file; expected a checkpoint directory")
    if not _HUB_ID.fullmatch(name) or "--" in name or ".." in name or name.endswith(".git"):
        raise ModelNotFoundError(
            f"model '{name}' is not a local directory, a bundled name "
            f"({', '.join(BUNDLED_MODELS)}) or a Hugging Face Hub id (org/name)"
        )
    return _snapshot(name, cache_dir)


def _snapshot(repo_id: str, cache_dir: str | Path | None) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        IncompleteSnapshotError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    offline = hub_offline()
    not_here = (
        f"model '{repo_id}' is not a local directory, a bundled name "
        f"({', '.join(BUNDLED_MODELS)}) or a cached Hugging Face model"
    )
    try:
        folder = snapshot_download(
            repo_id,
            allow_patterns=HUB_ALLOW_PATTERNS,
            ignore_patterns=HUB_IGNORE_PATTERNS,
            cache_dir=cache_dir,
            local_files_only=offline,
        )
    except HFValidationError as err:
        raise ModelNotFoundError(
            f"model '{repo_id}' is not a valid Hub id: {_one_line(err)}"
        ) from None
    except GatedRepoError:
        raise ModelNotFoundError(
            f"model '{repo_id}' is gated on the Hugging Face Hub: accept its license on the Hub, "
            "then log in (hf auth login) or set HF_TOKEN"
        ) from None
    except RepositoryNotFoundError:
        raise ModelNotFoundError(
            f"{not_here}, and the Hub has no such model (or it is private: set HF_TOKEN)"
        ) from None
    except IncompleteSnapshotError:
        raise ModelNotFoundError(
            f"model '{repo_id}' is only partly in the Hugging Face cache and the Hub cannot be "
            f"reached{' (HF_HUB_OFFLINE=1)' if offline else ''}: download it again with network"
        ) from None
    except LocalEntryNotFoundError:
        why = "HF_HUB_OFFLINE=1" if offline else "no network"
        raise ModelNotFoundError(f"{not_here}, and the Hub cannot be reached ({why})") from None
    except HfHubHTTPError as err:
        status = err.response.status_code if err.response is not None else "?"
        raise ModelNotFoundError(f"{not_here}, and the Hub answered HTTP {status} for it") from None
    except Exception as err:  # a proxy error, a full disk, a read-only cache: keep the cause
        raise ModelNotFoundError(
            f"model '{repo_id}' could not be fetched from the Hugging Face Hub: "
            f"{type(err).__name__}: {_one_line(err)}"
        ) from err
    return Path(folder)


def load_config(model_dir: Path) -> PretrainedConfig:
    """Read `config.json` of `model_dir` with AutoConfig and check that we serve its
    architecture."""
    model_dir = Path(model_dir)
    config_file = model_dir / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"no config.json in {model_dir}: not a Hugging Face checkpoint")
    try:
        raw = json.loads(config_file.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"cannot read {config_file}: {_one_line(err)}") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{config_file} does not hold a JSON object")
    architectures = raw.get("architectures") or []
    model_type = raw.get("model_type")
    if not architectures and model_type in _ARCHITECTURE_OF_MODEL_TYPE:
        architectures = [_ARCHITECTURE_OF_MODEL_TYPE[model_type]]
    _check_architecture(f"model at {model_dir}", architectures, model_type)
    try:
        config = AutoConfig.from_pretrained(str(model_dir))
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"cannot load the config of {model_dir}: {_one_line(err)}") from None
    config.architectures = list(architectures)
    return config


def _check_architecture(what: str, architectures: list[str], model_type: object) -> None:
    supported = ", ".join(sorted(SUPPORTED_ARCHITECTURES))
    if not architectures:
        raise CheckpointError(
            f"{what} names no architecture (model_type {model_type!r}); supported: {supported}"
        )
    unsupported = [a for a in architectures if a not in SUPPORTED_ARCHITECTURES]
    if unsupported:
        raise CheckpointError(
            f"{what} has architecture {', '.join(map(str, unsupported))}, "
            f"which the engine does not support; supported: {supported}"
        )


def safetensors_files(model_dir: Path) -> tuple[list[Path], dict[str, str] | None]:
    """The safetensors files of a checkpoint, in load order, and the shard index's weight map
    (tensor name -> file name) when the checkpoint is sharded."""
    model_dir = Path(model_dir)
    index_file = model_dir / _INDEX_FILE
    if index_file.is_file():
        try:
            weight_map = json.loads(index_file.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise CheckpointError(f"cannot read {index_file}: {_one_line(err)}") from None
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index_file} has an empty or malformed weight_map")
        names = sorted(set(weight_map.values()))
        missing = [n for n in names if not (model_dir / n).is_file()]
        if missing:
            raise CheckpointError(
                f"{model_dir} is missing {len(missing)} shard(s) listed in {_INDEX_FILE}: "
                f"{', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}"
            )
        return [model_dir / n for n in names], weight_map
    if (model_dir / _SINGLE_FILE).is_file():
        return [model_dir / _SINGLE_FILE], None
    files = sorted(
        p for p in model_dir.glob("*.safetensors") if not p.name.startswith("consolidated")
    )
    if files:
        return files, None
    bins = sorted(p.name for pattern in ("*.bin", "*.pt", "*.pth") for p in model_dir.glob(pattern))
    found = f" (found {', '.join(bins[:2])})" if bins else ""
    raise CheckpointError(
        f"no safetensors weights in {model_dir}{found}: .bin/.pt checkpoints are not supported, "
        "convert them to safetensors"
    )


def iter_safetensors(
    model_dir: Path, device: str | torch.device = "cpu"
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (Hugging Face name, tensor) for every tensor of the checkpoint, each name once.

    Lazy: files are opened with `safe_open` (memory-mapped) and one tensor is read per step, so
    peak memory is about one tensor plus what the consumer keeps. With a shard index, a tensor is
    taken only from the shard the index names for it, and a name the index lists but no shard
    holds is an error.
    """
    from safetensors import SafetensorError, safe_open

    model_dir = Path(model_dir)
    files, weight_map = safetensors_files(model_dir)
    seen: set[str] = set()
    for file in files:
        try:
            handle = safe_open(str(file), framework="pt", device=str(device))
        except (OSError, SafetensorError) as err:
            raise CheckpointError(f"cannot open {file}: {_one_line(err)}") from None
        relative = file.relative_to(model_dir).as_posix()  # how the index names this file
        with handle:
            for name in handle.keys():
                if name in seen or (weight_map is not None and weight_map.get(name) != relative):
                    continue
                seen.add(name)
                yield name, handle.get_tensor(name)
    if weight_map is not None:
        absent = sorted(set(weight_map) - seen)
        if absent:
            raise CheckpointError(
                f"{_INDEX_FILE} of {model_dir} lists {len(absent)} tensor(s) that no shard holds: "
                f"{', '.join(absent[:3])}{' ...' if len(absent) > 3 else ''}"
            )


def load_tokenizer(model: str | Path, **kwargs: Any) -> PreTrainedTokenizerBase:
    """AutoTokenizer of a checkpoint directory, or of any name `resolve_model_dir` accepts (a
    tokenizer override); never trusts remote code."""
    model_dir = Path(model) if Path(model).is_dir() else resolve_model_dir(model)
    if not any((model_dir / f).is_file() for f in _TOKENIZER_FILES):
        raise CheckpointError(
            f"no tokenizer in {model_dir} (expected tokenizer.json or tokenizer_config.json)"
        )
    try:
        return AutoTokenizer.from_pretrained(str(model_dir), **kwargs)
    except (OSError, ValueError, KeyError, TypeError, ImportError) as err:
        raise CheckpointError(
            f"cannot load the tokenizer of {model_dir}: {_one_line(err)}"
        ) from None


def dummy_config(name_or_config: str | dict[str, Any] | PretrainedConfig) -> PretrainedConfig:
    """The config for `load_format="dummy"` (random weights at real shapes).

    A preset name (see `presets.PRESETS`), a config dict (config.json keys; `model_type`
    defaults to "llama"), a `PretrainedConfig` (copied), or any model name `resolve_model_dir`
    accepts, whose config.json is then read (no weights are needed).
    """
    if isinstance(name_or_config, PretrainedConfig):
        config = copy.deepcopy(name_or_config)
    elif isinstance(name_or_config, dict):
        values = dict(name_or_config)
        model_type = values.pop("model_type", "llama")
        if model_type not in _ARCHITECTURE_OF_MODEL_TYPE:
            raise CheckpointError(
                f"dummy config has model_type {model_type!r}; supported: "
                f"{', '.join(sorted(_ARCHITECTURE_OF_MODEL_TYPE))}"
            )
        values.setdefault("architectures", [_ARCHITECTURE_OF_MODEL_TYPE[model_type]])
        config = AutoConfig.for_model(model_type, **values)
    elif name_or_config in PRESETS:
        return preset_config(name_or_config)
    else:
        try:
            model_dir = resolve_model_dir(name_or_config)
        except ModelNotFoundError as err:
            raise ModelNotFoundError(f"{err}; nor is it a preset ({', '.join(PRESETS)})") from None
        return load_config(model_dir)
    architectures = list(config.architectures or [])
    if not architectures and config.model_type in _ARCHITECTURE_OF_MODEL_TYPE:
        architectures = [_ARCHITECTURE_OF_MODEL_TYPE[config.model_type]]
    _check_architecture("dummy config", architectures, config.model_type)
    config.architectures = architectures
    return config
