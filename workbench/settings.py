"""Where Workbench keeps its files and what the user's config file says.

Config: ``$WORKBENCH_HOME/config.toml``, else ``$XDG_CONFIG_HOME/workbench/config.toml``, else
``~/.config/workbench/config.toml`` (read with tomllib; a missing file means defaults).
Data (the SQLite store, exports): ``store.default_data_dir()`` (``$WORKBENCH_HOME`` wins there too).
Command-line options win over the file: ``--model``, ``--db`` and the engine options;
``--attach URL`` (with ``--api-key``) uses a running server instead of an engine of its own.

An example config.toml::

    theme = "textual-dark"
    model = "tiny"

    [chat]                    # defaults for new chats
    system_prompt = "You are a concise assistant."
    temperature = 0.7
    top_p = 0.95
    top_k = 0
    max_tokens = 512
    # seed = 1234
    drop_oldest = true        # past the context, leave the oldest turns out of the prompt

    [engine]                  # any EngineConfig field
    block_size = 16
    num_kv_blocks = 512

    [monitor]
    interval = 0.5            # seconds between samples (2 Hz)

    [keymap]                  # binding id = keys (F1 lists every id)
    "chat.new" = "ctrl+n"
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.config import EngineConfig
from panels.client import ChatParams
from store import default_data_dir, default_db_path

CONFIG_FILENAME = "config.toml"
DEFAULT_THEME = "textual-dark"
MIN_MONITOR_INTERVAL = 0.1
MAX_MONITOR_INTERVAL = 0.5  # the monitor is live at 2 Hz or faster

# Engine options a config file or the command line may set (EngineConfig's fields but the model).
ENGINE_OPTIONS: tuple[str, ...] = tuple(
    f.name for f in dataclasses.fields(EngineConfig) if f.name != "model"
)


class SettingsError(ValueError):
    """The config file cannot be used; the message is one line that names the file."""


def config_dir() -> Path:
    """``$WORKBENCH_HOME``, else ``$XDG_CONFIG_HOME/workbench``, else ``~/.config/workbench``."""
    if home := os.environ.get("WORKBENCH_HOME"):
        return Path(home).expanduser()
    xdg = os.environ.get("XDG_CONFIG_HOME")
    base = Path(xdg) if xdg and Path(xdg).is_absolute() else Path.home() / ".config"
    return base / "workbench"


def config_path() -> Path:
    return config_dir() / CONFIG_FILENAME


@dataclass
class Settings:
    model: str = "tiny"
    theme: str = DEFAULT_THEME
    chat: ChatParams = field(default_factory=ChatParams)  # defaults for a new chat
    system_prompt: str = ""
    engine: dict[str, Any] = field(default_factory=dict)  # EngineConfig options
    keymap: dict[str, str] = field(default_factory=dict)  # binding id -> keys
    monitor_interval: float = MAX_MONITOR_INTERVAL
    db_path: Path = field(default_factory=default_db_path)
    data_dir: Path = field(default_factory=default_data_dir)
    config_file: Path | None = None  # the file these came from, if any
    attach: str | None = None  # a server's URL: chat with and monitor it (`launch --attach`)
    api_key: str | None = None  # the attached server's key

    @property
    def exports_dir(self) -> Path:
        return self.data_dir / "exports"


def _table(data: dict[str, Any], name: str, where: Path) -> dict[str, Any]:
    value = data.get(name, {})
    if not isinstance(value, dict):
        raise SettingsError(f"{where}: [{name}] must be a table")
    return value


def load_settings(path: Path | None = None) -> Settings:
    """Read the config file (default: config_path()); a missing file gives the defaults."""
    path = path or config_path()
    settings = Settings()
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        return settings
    except tomllib.TOMLDecodeError as e:
        raise SettingsError(f"{path}: not valid TOML ({e})") from e
    except OSError as e:
        raise SettingsError(f"{path}: cannot read it ({e.strerror})") from e
    settings.config_file = path
    if "model" in data:
        settings.model = str(data["model"])
    if "theme" in data:
        settings.theme = str(data["theme"])
    chat = dict(_table(data, "chat", path))
    settings.system_prompt = str(chat.pop("system_prompt", ""))
    unknown = set(chat) - {f.name for f in dataclasses.fields(ChatParams)}
    if unknown:
        raise SettingsError(f"{path}: unknown [chat] keys: {', '.join(sorted(unknown))}")
    try:
        settings.chat = ChatParams.from_dict(chat)
    except (TypeError, ValueError) as e:
        raise SettingsError(f"{path}: [chat] {e}") from e
    engine = _table(data, "engine", path)
    unknown = set(engine) - set(ENGINE_OPTIONS)
    if unknown:
        raise SettingsError(f"{path}: unknown [engine] keys: {', '.join(sorted(unknown))}")
    settings.engine = dict(engine)
    keymap = _table(data, "keymap", path)
    if not all(isinstance(v, str) for v in keymap.values()):
        raise SettingsError(f"{path}: [keymap] values must be key strings such as 'ctrl+n'")
    settings.keymap = dict(keymap)
    interval = _table(data, "monitor", path).get("interval", MAX_MONITOR_INTERVAL)
    if not isinstance(interval, int | float) or not (
        MIN_MONITOR_INTERVAL <= interval <= MAX_MONITOR_INTERVAL
    ):
        raise SettingsError(
            f"{path}: [monitor] interval must be {MIN_MONITOR_INTERVAL}..{MAX_MONITOR_INTERVAL} s"
        )
    settings.monitor_interval = float(interval)
    return settings


def settings_from_args(args: Any) -> Settings:
    """The config file, then what the command line says (`--model`, `--db`, engine options)."""
    settings = load_settings()
    if model := getattr(args, "model", None):
        settings.model = str(model)
    if db := getattr(args, "db", None):
        settings.db_path = Path(db).expanduser()
    settings.attach = getattr(args, "attach", None)
    settings.api_key = getattr(args, "api_key", None)
    for name in ENGINE_OPTIONS:
        value = getattr(args, name, None)
        if value is not None:
            settings.engine[name] = value
    return settings


_THEME_LINE = re.compile(r"^theme\s*=.*$", re.M)


def save_theme(path: Path, theme: str) -> None:
    """Set the top-level `theme` of the config file, keeping everything else in it as written
    (comments too); the file is replaced whole, so a crash leaves the old one or the new one."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        text = ""
    line = f"theme = {json.dumps(theme)}"  # a JSON string is a TOML basic string
    first_table = re.search(r"^\s*\[", text, re.M)
    top = text[: first_table.start()] if first_table else text
    if _THEME_LINE.search(top):
        text = _THEME_LINE.sub(line, top, count=1) + text[len(top) :]
    else:
        text = f"{line}\n{text}"
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".tmp")
    partial.write_text(text, encoding="utf-8")
    os.replace(partial, path)
