"""The link core stays sans-I/O: no network, storage, clock or randomness imports (STYLE §2.1)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

LINK_DIR = Path(__file__).resolve().parents[2] / "shared" / "link"

FORBIDDEN = frozenset(
    {"asyncio", "aiohttp", "websockets", "socket", "sqlite3", "time", "random", "secrets"}
)


def forbidden_imports(source: str) -> list[str]:
    """Top-level modules named by absolute imports in ``source`` that are forbidden."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found += [name for name in names if name.split(".")[0] in FORBIDDEN]
    return found


def test_link_package_has_modules() -> None:
    """The walk below sees the link modules (it would pass vacuously otherwise)."""
    names = {path.name for path in LINK_DIR.glob("*.py")}
    assert {"__init__.py", "frames.py", "window.py", "session.py"} <= names


@pytest.mark.parametrize("path", sorted(LINK_DIR.glob("*.py")), ids=lambda p: p.name)
def test_link_module_imports_no_io(path: Path) -> None:
    """No module of shared/link imports asyncio, sockets, SQLite, time or randomness."""
    assert forbidden_imports(path.read_text(encoding="utf-8")) == []


@pytest.mark.parametrize(
    "source",
    [
        "import time",
        "import os, asyncio",
        "import websockets.asyncio.client",
        "from time import monotonic",
        "from random import random",
        "from aiohttp import web",
        "def f():\n    import secrets\n",
        "import sqlite3 as db",
    ],
)
def test_checker_catches_forbidden_imports(source: str) -> None:
    """The checker flags direct, aliased, dotted and nested forbidden imports."""
    assert forbidden_imports(source)


@pytest.mark.parametrize(
    "source", ["from .. import crypto", "from ..errors import LocalProtocolError", "import json"]
)
def test_checker_allows_relative_and_pure_imports(source: str) -> None:
    """Relative imports of shared modules and pure stdlib modules are fine."""
    assert forbidden_imports(source) == []
