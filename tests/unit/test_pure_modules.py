"""Decision code stays pure: no trio, no sockets, no compiled I/O core.

Checked two ways: the modules' own import statements (libraries they use may
import socket internally, which is not I/O on our part), and the modules that
actually load when a pure package is imported. Compiled decision code (PURE_CORES)
is allowed: it is as pure as the Python around it, only faster.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import proxy

PURE_PACKAGES = ["config", "cluster", "policy", "route", "telemetry"]
PURE_FILES = ["errors.py"]
PURE_CORES = ["h2conn", "h2msg", "hpack", "lb", "tally"]
IO_MODULES = ("trio", "socket", "select", "selectors", "asyncio")


def _pure_sources() -> list[Path]:
    root = Path(proxy.__file__).parent
    files = [root / name for name in PURE_FILES]
    for package in PURE_PACKAGES:
        files.extend(sorted((root / package).glob("*.py")))
    return files


def _imports(path: Path) -> set[str]:
    """Every name imported, as written: "trio", "..config.Cluster", ".._core.lb"."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            module = "." * node.level + (node.module or "")
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


def _forbidden(name: str) -> bool:
    parts = name.lstrip(".").split(".")
    if "_core" in parts:
        inside = parts[parts.index("_core") + 1 :]
        return not (inside and inside[0] in PURE_CORES)
    return parts[0] in IO_MODULES


def test_the_import_check_tells_pure_from_io():
    assert [_forbidden(n) for n in ["trio.lowlevel", "socket", ".._core.splice", "proxy._core"]] == [True] * 4
    assert [_forbidden(n) for n in [".._core.lb", "proxy._core.lb.Maglev", "..config.Cluster"]] == [False] * 3


@pytest.mark.parametrize("path", _pure_sources(), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_pure_source_imports_no_io(path):
    bad = {name for name in _imports(path) if _forbidden(name)}
    assert not bad, f"{path.name} imports {sorted(bad)}"


@pytest.mark.parametrize(
    "module", ["proxy.config", "proxy.cluster", "proxy.policy", "proxy.route", "proxy.telemetry", "proxy.errors"]
)
def test_importing_a_pure_module_loads_no_trio(module):
    allowed = ["proxy._core"] + [f"proxy._core.{name}" for name in PURE_CORES]
    code = (
        f"import sys, {module}; print(sorted(m for m in sys.modules"
        f" if m == 'trio' or m.startswith('proxy._core') and m not in {allowed!r}))"
    )
    result = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
