"""Imports point down one ordered list of layers, with no cycle; core is pure.

Layers, lowest first (a module may import its own layer and the ones below)::

    errors < config < core < learners < net < node < attacks < assembly < sim < cli

Top-level modules are placed on a layer by :data:`TOP_LEVEL`; ``p2pfl/__init__.py`` is
the public facade above them all. Every import counts: at module level, inside
functions, and under ``if TYPE_CHECKING:`` -- a type-only import still couples a lower
layer to a higher one, and a type-only cycle is still a cycle for a reader.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "p2pfl"

LAYERS = ("errors", "config", "core", "learners", "net", "node", "attacks", "assembly", "sim", "cli")
TOP_LEVEL = {
    "errors": "errors",
    "term": "errors",  # leaf: formatting only, no p2pfl imports (sim and cli render with it)
    "config": "config",
    "keyfile": "config",  # the key file's bytes; Identity (core) parses them
    "aggregation": "core",  # public alias of p2pfl.core.aggregation
}
FACADE = "p2pfl"  # p2pfl/__init__.py re-exports the public API from every layer

KNOWN_CYCLES: set[frozenset[str]] = set()

MAX_LINES = 450
KNOWN_LONG: set[str] = set()

THIRD_PARTY_BANS = {
    "core": {"trio", "libp2p", "socket", "time", "tempfile", "shutil", "pathlib", "io"},
    "config": {"socket", "trio", "libp2p"},
    "learners": {"trio", "libp2p", "socket"},
    "net": {"torch"},
}
FILE_IO_CALLS = {"open", "fdopen", "fsync", "replace", "rename", "unlink", "remove", "mkdir",
                 "makedirs", "stat", "fstat", "listdir", "scandir", "read_text", "read_bytes",
                 "write_text", "write_bytes"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def layer_of(module: str) -> str:
    """Return the layer of a p2pfl module, or FACADE for the package root."""
    parts = module.split(".")
    if len(parts) == 1:
        return FACADE
    if parts[1] in LAYERS and (PACKAGE / parts[1]).is_dir():
        return parts[1]
    return TOP_LEVEL[parts[1]]


def rank(layer: str) -> int:
    return len(LAYERS) if layer == FACADE else LAYERS.index(layer)


def imports(module: str) -> Iterator[tuple[str, int]]:
    """Yield (imported module, line) for every import in ``module``, nested ones included."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:  # `from p2pfl.net import patches` imports a module
                sub = f"{base}.{alias.name}"
                yield (sub if sub in MODULES else base), node.lineno


def resolve(name: str) -> str | None:
    """Return the p2pfl module ``name`` loads (its longest existing prefix), else None."""
    while name.startswith("p2pfl"):
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


def p2pfl_imports(module: str) -> set[str]:
    targets = {resolve(name) for name, _ in imports(module)}
    return {t for t in targets if t is not None and t != module}


def test_every_module_has_a_layer() -> None:
    unplaced = []
    for module in MODULES:
        try:
            layer_of(module)
        except KeyError:
            unplaced.append(module)
    assert unplaced == [], "add these to LAYERS or TOP_LEVEL"


def test_imports_point_down() -> None:
    upward = [
        f"{module} ({layer_of(module)}) imports {target} ({layer_of(target)})"
        for module in MODULES
        for target in p2pfl_imports(module)
        if rank(layer_of(target)) > rank(layer_of(module))
    ]
    assert upward == []


def strongly_connected(graph: dict[str, set[str]]) -> list[set[str]]:
    """Tarjan's algorithm: the strongly connected components with more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[set[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(component)

    for node in graph:
        if node not in index:
            visit(node)
    return found


def test_no_import_cycles() -> None:
    # A package's __init__ importing its own modules is how a package exports; only
    # edges between modules (and into other packages' __init__) can close a cycle.
    graph = {
        m: {t for t in p2pfl_imports(m) if not m.startswith(t + ".")} for m in MODULES
    }
    cycles = [c for c in strongly_connected(graph) if frozenset(c) not in KNOWN_CYCLES]
    assert cycles == []


def test_the_cycle_detector_sees_a_cycle() -> None:
    assert strongly_connected({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [{"a", "b", "c"}]


@pytest.mark.parametrize("layer", sorted(THIRD_PARTY_BANS))
def test_banned_third_party_imports(layer: str) -> None:
    banned = THIRD_PARTY_BANS[layer]
    found = [
        f"{module}:{line} imports {name}"
        for module in MODULES
        if layer_of(module) == layer
        for name, line in imports(module)
        if name.split(".")[0] in banned
    ]
    assert found == []


def test_only_net_imports_libp2p() -> None:
    found = [
        f"{module}:{line}"
        for module in MODULES
        if layer_of(module) != "net"
        for name, line in imports(module)
        if name.split(".")[0] == "libp2p"
    ]
    assert found == []


def test_core_does_no_file_io() -> None:
    found = []
    for module, path in MODULES.items():
        if layer_of(module) != "core":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            if isinstance(func, ast.Name) and func.id == "open":
                found.append(f"{module}:{node.lineno} open()")
            elif (isinstance(func, ast.Attribute) and func.attr in FILE_IO_CALLS
                  and isinstance(func.value, ast.Name) and func.value.id in {"os", "Path", "path"}):
                found.append(f"{module}:{node.lineno} {func.value.id}.{func.attr}()")
    assert found == []


def test_no_module_over_450_lines() -> None:
    long = {m: n for m, p in MODULES.items() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert set(long) <= KNOWN_LONG, long
