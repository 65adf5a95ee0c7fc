"""The import rules of the house, checked by `make lint` and `make test` (an AST walk: imports
inside functions count too, since a lazy import is still a dependency).

    python scripts/check_imports.py        # prints each broken rule; exit status 1 if any

Imports under `if TYPE_CHECKING:` are left out: they exist for annotations only.

Rules:
- the serving engine (`engine`) imports nothing of the CLI, the TUI, the store, the benchmarks
  or the build pipeline (workbench, panels, store, bench, engine_build): they sit on top of it;
- the quantized layers (`engine.quant.linear`, the base) import none of the schemes: the scheme
  table is in `engine.quant`'s __init__;
- no import cycles among the modules of any package (a module importing its own package's
  __init__ for a name is no cycle unless the __init__ imports it back).
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGES = ("engine", "bench", "engine_build", "workbench", "panels", "store")
ABOVE_ENGINE = ("workbench", "panels", "store", "bench", "engine_build")
FORBIDDEN = [  # (importer prefix, imported prefixes, why)
    ("engine", ABOVE_ENGINE, "the serving engine must not depend on the layers above it"),
    (
        "engine.quant.linear",
        ("engine.quant.fp8", "engine.quant.int4", "engine.quant.int8"),
        "the base of the quantized layers must not import the schemes",
    ),
]


def module_files(root: Path) -> dict[str, Path]:
    mods: dict[str, Path] = {}
    for pkg in PACKAGES:
        for path in sorted((root / pkg).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            mods[".".join(parts)] = path
    return mods


def _is_type_checking(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")
    )


def _runtime_nodes(tree: ast.AST) -> list[ast.AST]:
    """Every node but those under `if TYPE_CHECKING:` (annotations only, never imported)."""
    nodes, stack = [], [tree]
    while stack:
        node = stack.pop()
        nodes.append(node)
        children = node.orelse if _is_type_checking(node) else ast.iter_child_nodes(node)
        stack.extend(children)
    return nodes


def imports_of(name: str, path: Path, mods: dict[str, Path]) -> dict[str, int]:
    """Modules of ours that `name` imports -> the first line importing each."""
    found: dict[str, int] = {}
    is_package = path.name == "__init__.py"
    for node in _runtime_nodes(ast.parse(path.read_text(), str(path))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = name.split(".")[: None if is_package else -1]
                parent = parent[: len(parent) - node.level + 1]
                base = ".".join([*parent, *([node.module] if node.module else [])])
            # `from pkg import mod` imports the module pkg.mod; `from mod import name` only mod.
            targets = [
                f"{base}.{alias.name}" if f"{base}.{alias.name}" in mods else base
                for alias in node.names
            ]
        for target in targets:
            while target and target not in mods:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.setdefault(target, node.lineno)
    return found


def cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(graph[start]))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(graph[child])))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))
    return found


def within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def main(root: Path) -> int:
    mods = module_files(root)
    graph = {name: imports_of(name, path, mods) for name, path in mods.items()}
    problems = []
    for importer, imported, why in FORBIDDEN:
        for name, deps in graph.items():
            if not within(name, importer):
                continue
            for dep, line in deps.items():
                if any(within(dep, p) for p in imported):
                    problems.append(f"{mods[name]}:{line}: {name} imports {dep}: {why}")
    for component in cycles(graph):
        problems.append("import cycle: " + " <-> ".join(component))
    for problem in problems:
        print(problem)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(Path(__file__).resolve().parent.parent))
