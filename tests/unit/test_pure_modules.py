"""Decision code stays pure: no trio, no sockets, no compiled I/O core.

Checked two ways: the modules' own import statements (libraries they use may
import socket internally, which is not I/O on our part), and the modules that
actually load when a pure package is imported.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import proxy

PURE_PACKAGES = ["config", "cluster"]
PURE_FILES = ["errors.py"]
FORBIDDEN = ("trio", "socket", "select", "selectors", "asyncio", "proxy._core", "._core", ".._core")


def _pure_sources() -> list[Path]:
    root = Path(proxy.__file__).parent
    files = [root / name for name in PURE_FILES]
    for package in PURE_PACKAGES:
        files.extend(sorted((root / package).glob("*.py")))
    return files


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            names.add("." * node.level + (node.module or ""))
    return names


@pytest.mark.parametrize("path", _pure_sources(), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_pure_source_imports_no_io(path):
    bad = {name for name in _imports(path) if name.split(".")[0] in FORBIDDEN or name.startswith(FORBIDDEN)}
    assert not bad, f"{path.name} imports {sorted(bad)}"


@pytest.mark.parametrize("module", ["proxy.config", "proxy.cluster", "proxy.errors"])
def test_importing_a_pure_module_loads_no_trio(module):
    code = f"import sys, {module}; print(sorted(m for m in sys.modules if m == 'trio' or m.startswith('proxy._core')))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
