"""Which build of a package's compiled modules this process runs: the mypyc one or the sources.

setup.py compiles the matching core (services/matcher: book, balances, engine) and the matcher's
renderer (shared/wire.py) with mypyc when it can; the compiled modules sit next to the sources under
the same names, and Python's import system prefers them. ``CME_PURE_PYTHON=1`` in the environment
forces the pure sources anyway, and so does a compiled module older than its source (an edit not
rebuilt yet), so what runs is never stale. Each package calls ``select`` from its __init__, before
anything imports the modules.
"""

from __future__ import annotations

import importlib.util
import os
import sys


def select(package: str, here: str, names: tuple[str, ...], lazy: bool = False) -> str:
    """Which build: compiled when every module of `names` (in dependency order) in the package at
    `here` has a current compiled build and the pure one is not forced; else pure, with the sources
    put under the modules' own names now, so every later import (engine -> book included) gets them.
    `lazy`: run each source on its first use, not now (for a package whose importers may not need it)."""
    if os.environ.get("CME_PURE_PYTHON") != "1" and _compiled_is_current(package, here, names):
        return "compiled"
    for name in names:
        full = f"{package}.{name}"
        spec = importlib.util.spec_from_file_location(full, os.path.join(here, name + ".py"))
        assert spec is not None and spec.loader is not None
        if lazy:
            spec.loader = importlib.util.LazyLoader(spec.loader)
        module = importlib.util.module_from_spec(spec)
        sys.modules[full] = module
        spec.loader.exec_module(module)
    return "pure"


def _compiled_is_current(package: str, here: str, names: tuple[str, ...]) -> bool:
    for name in names:
        source = os.path.join(here, name + ".py")
        spec = importlib.util.find_spec(f"{package}.{name}")
        origin = spec.origin if spec is not None else None
        if origin is None or origin.endswith(".py"):
            return False  # not compiled
        if os.path.getmtime(origin) < os.path.getmtime(source):
            return False  # built from an older source
    return True
