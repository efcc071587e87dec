"""The import graph keeps its shape: no module-level import cycle, each package imports only
the layers below it, and test modules share helpers through tests/support.py only.

The layers, bottom up: the event contract (`streaming.events`) and the ranking contract
(`ranker.interface`); features/; streaming/ (bus, Kafka, Faust) and ranker/; simulator/;
studies/, experiments/, bench/ and sandbox/ (the closed loop and the `climber` app, which
gathers every area's commands). `sandbox.cli_options` is the command-line toolkit every
area's commands use, so any module may import it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("features", "streaming", "ranker", "simulator", "studies", "experiments", "bench", "sandbox")
CONTRACTS = ("streaming.events", "ranker.interface", "sandbox.cli_options")
# What each package must never import (at module level or inside a function), contracts aside.
FORBIDDEN = {
    "features": {"streaming", "ranker", "simulator", "studies", "experiments", "bench", "sandbox"},
    "streaming": {"ranker", "simulator", "studies", "experiments", "bench", "sandbox"},
    "ranker": {"streaming", "simulator", "studies", "experiments", "bench", "sandbox"},
    "simulator": {"features", "streaming", "ranker", "studies", "experiments", "bench", "sandbox"},
    "studies": {"streaming", "simulator", "experiments", "bench", "sandbox"},
    "experiments": {"studies", "bench"},
    "bench": {"studies", "experiments"},
}


def module_name(path: Path) -> str:
    name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
    return name.removesuffix(".__init__")


def imports(path: Path, module_level_only: bool = False) -> list[str]:
    """Absolute module names `path` imports (for `from a import b`, both `a` and `a.b`)."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if module_level_only else ast.walk(tree)
    names = []
    for node in nodes:
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names += [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
    return names


def layering_violations(package: str, imported: dict[str, list[str]]) -> list[str]:
    """'module imports name' for each import of `package`'s modules that its layer forbids."""
    return [f"{module} imports {name}" for module, names in imported.items() for name in names
            if name.split(".")[0] in FORBIDDEN[package]
            and not any(name == c or name.startswith(c + ".") for c in CONTRACTS)]


def source_files(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_each_package_imports_only_the_layers_below_it(package):
    imported = {module_name(path): imports(path) for path in source_files(package)}
    assert layering_violations(package, imported) == []


def test_a_forbidden_import_is_named():
    imported = {"ranker.models.astro": ["streaming.events", "streaming.events.EventBatch", "experiments.runner"],
                "ranker.serving.http": ["sandbox.cli_options", "streaming.bus"]}
    assert layering_violations("ranker", imported) == ["ranker.models.astro imports experiments.runner",
                                                       "ranker.serving.http imports streaming.bus"]


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while component[-1:] != [v]:
                component.append(stack.pop())
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_module_level_import_cycle():
    """Imports inside functions (a `main` that builds its command) may point back; the
    imports a module runs when it is loaded may not."""
    paths = [path for package in PACKAGES for path in source_files(package)]
    known = {module_name(path) for path in paths}
    graph = {}
    for path in paths:
        deps = set()
        for name in imports(path, module_level_only=True):
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name and name != module_name(path):
                deps.add(name)
        graph[module_name(path)] = deps
    assert cycles(graph) == []
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_test_modules_import_helpers_from_support_not_from_each_other():
    for path in sorted((ROOT / "tests").glob("*.py")):
        others = [name for name in imports(path) if name.startswith(("tests.test_", "test_", "tests.conftest"))]
        assert others == [], f"{path.name} imports {others}: move the helper to tests/support.py"
