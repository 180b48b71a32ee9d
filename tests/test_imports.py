"""Every module of every package imports, and dependencies between packages point one way.

Read from the source (ast), so the result does not depend on the order modules happen to be
imported in; imports inside functions count (a lazy import is still a dependency). Import
circles between modules: tests/test_import_layout.py.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("agent", "common", "connectors", "oee", "buffer", "sync", "cloud_api")
# Which package may import which (README, "Packages"); `common` imports none of ours.
ALLOWED: dict[str, frozenset[str]] = {
    "common": frozenset(),
    "oee": frozenset({"common"}),
    "sync": frozenset({"common"}),
    "buffer": frozenset({"common"}),
    "connectors": frozenset({"common"}),
    "agent": frozenset({"common", "connectors", "oee", "buffer", "sync"}),
    "cloud_api": frozenset({"common", "oee", "sync"}),
}


def _modules() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = path
    return found


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """The modules of ours that `name` imports, anywhere in it."""
    nodes = list(ast.walk(ast.parse(path.read_text(encoding="utf-8"))))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    named: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            named.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            named.add(module)
            named.update(f"{module}.{alias.name}" for alias in node.names)
    return {m for m in named if m in MODULES and m != name}


@pytest.mark.parametrize("module", sorted(MODULES))
def test_every_module_imports(module: str) -> None:
    assert importlib.import_module(module).__name__ == module


def test_package_dependencies_point_one_way() -> None:
    graph = {m: _imports(m, p) for m, p in MODULES.items()}
    assert sum(len(d) for d in graph.values()) > 100  # the graph was really read
    wrong: set[tuple[str, str]] = set()
    for module in MODULES:
        source = module.split(".")[0]
        for target in graph[module]:
            package = target.split(".")[0]
            if package != source and package not in ALLOWED[source]:
                wrong.add((module, target))
    assert wrong == set()
