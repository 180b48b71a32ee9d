"""The packages' imports point one way: no module imports itself back through others, the
cloud's access and ingest packages never import its api package, and the cloud's shared
modules import none of its subpackages.

Every import counts, including those inside functions (a lazy import still makes a circle)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("agent", "common", "connectors", "oee", "buffer", "sync", "cloud_api")
CLOUD_SHARED = ("config", "db", "problems", "metrics", "tracing")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for package in PACKAGES for p in (ROOT / package).rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                targets.add(base)
                targets.update(f"{base}.{alias.name}" for alias in node.names)
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    done: set[str] = set()
    path: list[str] = []
    on_path: set[str] = set()

    def visit(node: str) -> list[str] | None:
        path.append(node)
        on_path.add(node)
        for target in sorted(graph[node]):
            if target in on_path:
                return [*path[path.index(target) :], target]
            if target not in done:
                found = visit(target)
                if found:
                    return found
        on_path.discard(path.pop())
        done.add(node)
        return None

    for start in sorted(graph):
        if start not in done:
            found = visit(start)
            if found:
                return found
    return None


def test_no_import_circle() -> None:
    graph = _graph()
    assert len(graph) > 50, "the walk found the packages' modules"
    assert _cycle(graph) is None, " -> ".join(_cycle(graph) or [])


def test_cloud_imports_point_one_way() -> None:
    graph = _graph()
    wrong = [
        (module, target)
        for module, targets in graph.items()
        for target in targets
        if (
            module.startswith(("cloud_api.access", "cloud_api.ingest"))
            and target.startswith("cloud_api.api")
        )
        or (
            module in {f"cloud_api.{m}" for m in CLOUD_SHARED}
            and target.startswith(("cloud_api.api", "cloud_api.access", "cloud_api.ingest"))
        )
    ]
    assert not wrong, wrong
