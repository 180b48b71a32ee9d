"""Every module of every package imports, no module-level import circle, dependencies one way.

Read from the source (ast), so the result does not depend on the order modules happen to be
imported in. Imports inside functions count for the package dependencies (a lazy import is
still a dependency) but not for module circles: a lazy import is how a circle is broken.
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


def _imports(name: str, path: Path, *, module_level: bool) -> set[str]:
    """The modules of ours that `name` imports (module level only, or anywhere)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    nodes = tree.body if module_level else list(ast.walk(tree))
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


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component: list[str] = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return circles


@pytest.mark.parametrize("module", sorted(MODULES))
def test_every_module_imports(module: str) -> None:
    assert importlib.import_module(module).__name__ == module


def test_no_module_level_import_circle() -> None:
    graph = {m: _imports(m, p, module_level=True) for m, p in MODULES.items()}
    assert sum(len(d) for d in graph.values()) > 100  # the graph was really read
    assert _circles(graph) == []


def test_the_circle_finder_finds_circles() -> None:
    assert _circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _circles({"a": {"b"}, "b": set()}) == []


def test_package_dependencies_point_one_way() -> None:
    wrong: set[tuple[str, str]] = set()
    for module, path in MODULES.items():
        source = module.split(".")[0]
        for target in _imports(module, path, module_level=False):
            package = target.split(".")[0]
            if package != source and package not in ALLOWED[source]:
                wrong.add((module, target))
    assert wrong == set()
