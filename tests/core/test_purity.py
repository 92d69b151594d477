"""The matching core is pure: importing it pulls in no I/O, clock, randomness or concurrency module.

Checked in a fresh interpreter. CPython itself imports `time` during start-up (zipimport), so the
forbidden names are first removed from sys.modules: a module that shows up again afterwards was
imported, directly or through a dependency, by the core.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CORE_MODULES = (
    "services.matcher.engine",
    "services.matcher.book",
    "services.matcher.balances",
    "services.matcher.snapshot",
    "shared.commands",
    "shared.events",
)
FORBIDDEN = ("asyncio", "redis", "websockets", "socket", "time", "random", "threading", "selectors")

_PROBE = """
import json, sys
forbidden = {forbidden!r}
for name in forbidden:
    sys.modules.pop(name, None)
for mod in {modules!r}:
    __import__(mod)
print(json.dumps(sorted(name for name in forbidden if name in sys.modules)))
"""


def _imported_by(modules: tuple[str, ...]) -> list[str]:
    code = _PROBE.format(forbidden=FORBIDDEN, modules=modules)
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0, proc.stderr
    found: list[str] = json.loads(proc.stdout.strip().splitlines()[-1])
    return found


@pytest.fixture(scope="module")
def pulled_in() -> list[str]:
    return _imported_by(CORE_MODULES)


@pytest.mark.parametrize("name", FORBIDDEN)
def test_core_imports_no_forbidden_module(pulled_in: list[str], name: str) -> None:
    assert name not in pulled_in


@pytest.mark.parametrize("module", [m for m in CORE_MODULES if m != "services.matcher.snapshot"])
def test_engine_modules_alone_pull_in_nothing_forbidden(module: str) -> None:
    assert _imported_by((module,)) == []


CORE_FILES = [m.replace(".", "/") + ".py" for m in CORE_MODULES] + [
    "shared/instruments.py",
    "shared/codes.py",
]


@pytest.mark.parametrize("relpath", CORE_FILES)
def test_core_sources_import_nothing_forbidden(relpath: str) -> None:
    """Static check of the core's own import statements, including imports inside functions."""
    file = ROOT / relpath
    tree = ast.parse(file.read_text(), str(file))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [node.module or ""]
        else:
            continue
        for name in names:
            assert name.split(".")[0] not in FORBIDDEN, f"{relpath}:{node.lineno} imports {name}"
