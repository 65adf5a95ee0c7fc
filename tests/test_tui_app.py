"""The app frame: config file and paths, keymap, F1 help, command palette, the Build panel."""
# ruff: noqa: F811  (pytest fixtures imported from test_tui_support are arguments here)

from __future__ import annotations

import types
from pathlib import Path

import pytest
from test_tui_support import (  # noqa: F401  (fixtures)
    _isolated_home,
    app_for,
    engine_client,
    run,
    store,
    tui_model,
)
from textual.widgets import Markdown

from panels.chat import ChatPanel
from panels.widgets.help_screen import HelpScreen
from store import default_db_path
from workbench.app import WorkbenchApp
from workbench.settings import (
    SettingsError,
    config_path,
    load_settings,
    settings_from_args,
)

CONFIG = """\
theme = "nord"
model = "my-model"

[chat]
system_prompt = "Be brief."
temperature = 0.2
max_tokens = 99

[engine]
block_size = 8

[monitor]
interval = 0.25

[keymap]
"chat.new" = "ctrl+t"
"""


def test_config_file_lives_under_workbench_home(tmp_path: Path, monkeypatch) -> None:
    home = tmp_path / "home"
    assert config_path() == home / "config.toml"
    assert default_db_path() == home / "workbench.db"  # data dir follows WORKBENCH_HOME too
    monkeypatch.delenv("WORKBENCH_HOME")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    assert config_path() == tmp_path / "xdg" / "workbench" / "config.toml"
    monkeypatch.setenv("XDG_CONFIG_HOME", "relative/ignored")
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    assert config_path() == tmp_path / "user" / ".config" / "workbench" / "config.toml"


def test_config_file_and_command_line(tmp_path: Path) -> None:
    config_path().parent.mkdir(parents=True)
    config_path().write_text(CONFIG)
    settings = load_settings()
    assert settings.config_file == config_path()
    assert (settings.theme, settings.model, settings.system_prompt) == (
        "nord",
        "my-model",
        "Be brief.",
    )
    assert (settings.chat.temperature, settings.chat.max_tokens, settings.chat.top_p) == (
        0.2,
        99,
        0.95,
    )
    assert settings.engine == {"block_size": 8} and settings.monitor_interval == 0.25
    assert settings.keymap == {"chat.new": "ctrl+t"}
    args = types.SimpleNamespace(model="other", db=str(tmp_path / "x.db"), num_kv_blocks=32)
    settings = settings_from_args(args)
    assert settings.model == "other" and settings.db_path == tmp_path / "x.db"
    assert settings.engine == {"block_size": 8, "num_kv_blocks": 32}


@pytest.mark.parametrize(
    "text, message",
    [
        ("theme = ", "not valid TOML"),
        ("[chat]\ntemperature = -1", "temperature must be >= 0"),
        ("[chat]\ntempreature = 1", "unknown [chat] keys: tempreature"),
        ("[engine]\nblock_sise = 4", "unknown [engine] keys: block_sise"),
        ("[monitor]\ninterval = 2", "interval must be"),
    ],
)
def test_a_bad_config_file_is_named_and_explained(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "config.toml"
    path.write_text(text)
    with pytest.raises(SettingsError) as info:
        load_settings(path)
    assert message in str(info.value) and str(path) in str(info.value)


def test_keymap_theme_help_and_palette(tmp_path: Path, store, engine_client) -> None:
    app = app_for(tmp_path, store, engine_client)
    app.settings.keymap = {"chat.new": "ctrl+t"}
    app.settings.theme = "nord"

    async def main() -> None:
        async with app.run_test(size=(120, 40)) as pilot:
            assert app.theme == "nord"
            chat = app.query_one(ChatPanel)
            await pilot.press("ctrl+t")
            assert len(chat.views) == 2
            await pilot.press("f1")
            assert isinstance(app.screen, HelpScreen)
            text = app.screen.query_one(Markdown).source
            assert "## Chat" in text and "`Ctrl+T` | New chat" in text and "`chat.new`" in text
            assert "Copy code | a focused message" in text
            await pilot.press("escape")
            await pilot.press("f3", "f1")
            assert "## Monitor" in app.screen.query_one(Markdown).source
            await pilot.press("escape")
            titles = [c.title for c in app.get_system_commands(app.screen)]
            for title in ("Go to Sessions", "Chat: cancel reply", "Sessions: export JSON", "Theme"):
                assert title in titles

    run(main())


def test_run_app_reports_a_bad_config_without_a_traceback(tmp_path: Path, capsys) -> None:
    from workbench.app import run_app

    config_path().parent.mkdir(parents=True)
    config_path().write_text("[chat]\ntop_p = 7")
    assert run_app(types.SimpleNamespace(model=None, db=None)) == 2
    assert "top-p must be in (0, 1]" in capsys.readouterr().err
    assert WorkbenchApp.TITLE == "Workbench"


def test_a_theme_picked_in_the_app_is_saved_to_the_config(tmp_path: Path, store) -> None:
    app = app_for(tmp_path, store, model=str(tmp_path / "none"))
    config = tmp_path / "config.toml"
    config.write_text(CONFIG)

    async def main() -> None:
        async with app.run_test(size=(120, 40)) as pilot:
            app.theme = "gruvbox"  # what the palette's "Change theme" does
            await pilot.pause()

    run(main())
    saved = load_settings(config)
    assert saved.theme == "gruvbox" and saved.chat.max_tokens == 99  # the rest is kept
    assert config.read_text().replace('theme = "gruvbox"', 'theme = "nord"') == CONFIG


def test_the_palettes_screenshot_says_where_it_saved_or_why_not(tmp_path: Path, store) -> None:
    app = app_for(tmp_path, store, model=str(tmp_path / "none"))

    async def main() -> None:
        async with app.run_test(size=(120, 40)) as pilot:
            await pilot.press("ctrl+p")
            await pilot.press(*"Screenshot")
            await pilot.pause(0.3)
            await pilot.press("enter")
            await pilot.pause(0.5)
            [svg] = (tmp_path / "screenshots").glob("*.svg")
            notes = [str(n.message) for n in app._notifications]
            assert any(str(svg) in n for n in notes)
            (tmp_path / "blocked").write_text("a file, not a directory")
            assert app.deliver_screenshot(path=str(tmp_path / "blocked")) is None
            await pilot.pause()
            notes = [str(n.message) for n in app._notifications]
            assert any(n.startswith(f"Not saved in {tmp_path / 'blocked'}: ") for n in notes)

    run(main())
