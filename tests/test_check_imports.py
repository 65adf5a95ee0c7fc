"""scripts/check_imports.py, the house's import rules: on the real tree (clean) and on small
trees that break each rule."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def load_checker():
    spec = importlib.util.spec_from_file_location(
        "check_imports", ROOT / "scripts/check_imports.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["check_imports"] = module
    spec.loader.exec_module(module)
    return module


def tree(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_the_repository_keeps_the_rules(capsys):
    assert load_checker().main(ROOT) == 0
    assert capsys.readouterr().out == ""


def test_the_engine_importing_the_cli_or_the_build_pipeline_is_reported(tmp_path, capsys):
    root = tree(
        tmp_path,
        {
            "engine/__init__.py": "",
            "engine/core.py": "def f():\n    from workbench import cli\n",
            "engine/quant/__init__.py": "",
            "engine/quant/linear.py": "from engine.quant import fp8\n",
            "engine/quant/fp8.py": "import engine_build.build\n",
            "engine_build/__init__.py": "",
            "engine_build/build.py": "from engine.quant.linear import x\n",
            "workbench/__init__.py": "",
            "workbench/cli.py": "from engine import core\n",
        },
    )
    assert load_checker().main(root) == 1
    out = capsys.readouterr().out
    assert "engine.core imports workbench.cli" in out  # a lazy import counts
    assert "engine.quant.fp8 imports engine_build.build" in out
    assert "engine.quant.linear imports engine.quant.fp8" in out
    assert "import cycle: engine.quant.fp8 <-> engine.quant.linear <-> engine_build.build" in out


def test_cycles_are_found_but_type_checking_imports_are_not_dependencies(tmp_path, capsys):
    root = tree(
        tmp_path,
        {
            "engine/__init__.py": "",
            "engine/a.py": "from engine.b import B\n",
            "engine/b.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
            "    from engine.a import A\n",
            "engine/c.py": "from engine import d\n",
            "engine/d.py": "import engine.c\n",
        },
    )
    assert load_checker().main(root) == 1
    out = capsys.readouterr().out.splitlines()
    assert out == ["import cycle: engine.c <-> engine.d"]
