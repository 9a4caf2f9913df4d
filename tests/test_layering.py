"""Imports point down only: core is pure, only net imports libp2p, learners know no network."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "p2pfl"

FORBIDDEN = {
    "core": {"trio", "libp2p", "socket", "time", "p2pfl.net", "p2pfl.node", "p2pfl.learners", "p2pfl.cli"},
    "learners": {"trio", "libp2p", "socket", "p2pfl.net", "p2pfl.node", "p2pfl.cli"},
    "net": {"torch", "p2pfl.node", "p2pfl.learners", "p2pfl.cli"},
}


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def violations(package: str) -> list[str]:
    found = []
    for path in sorted((PACKAGE / package).rglob("*.py")):
        for name in imported_modules(path):
            for banned in FORBIDDEN[package]:
                if name == banned or name.startswith(banned + "."):
                    found.append(f"{path.relative_to(PACKAGE)} imports {name}")
    return found


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_imports_point_down(package: str) -> None:
    assert violations(package) == []


def test_only_net_imports_libp2p() -> None:
    offenders = [
        str(path.relative_to(PACKAGE))
        for path in PACKAGE.rglob("*.py")
        if "net" not in path.relative_to(PACKAGE).parts[:1]
        and any(n == "libp2p" or n.startswith("libp2p.") for n in imported_modules(path))
    ]
    assert offenders == []
