"""The matcher: the pure core (engine, book, balances, snapshot; its commands and events are the
contract in shared/) and the service around it.

The core's rules live in one source, engine.py and book.py. An install that finds a C compiler also
builds them with mypyc (setup.py); the compiled modules sit next to the sources under the same names,
and Python's import system prefers them. ``CME_PURE_PYTHON=1`` in the environment forces the pure
sources anyway, and so does a compiled module older than its source (an edit not rebuilt yet), so
what runs is never stale. ``BUILD`` says which one this process got.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from typing import Final

_COMPILED_CORE: Final = ("book", "balances", "engine")  # in dependency order


def _compiled_is_current(here: str) -> bool:
    for name in _COMPILED_CORE:
        source = os.path.join(here, name + ".py")
        spec = importlib.util.find_spec(f"{__name__}.{name}")
        origin = spec.origin if spec is not None else None
        if origin is None or origin.endswith(".py"):
            return False  # not compiled
        if os.path.getmtime(origin) < os.path.getmtime(source):
            return False  # built from an older source
    return True


def _select_core() -> str:
    here = os.path.dirname(os.path.abspath(__file__))
    if os.environ.get("CME_PURE_PYTHON") != "1" and _compiled_is_current(here):
        return "compiled"
    # Load the .py sources under the modules' own names before anything imports them, so every
    # later import (engine -> book included) gets the pure modules.
    for name in _COMPILED_CORE:
        full = f"{__name__}.{name}"
        spec = importlib.util.spec_from_file_location(full, os.path.join(here, name + ".py"))
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[full] = module
        spec.loader.exec_module(module)
    return "pure"


BUILD: Final = _select_core()
