"""Builds the compiled modules through mypyc, when it can: the core (services/matcher/book.py,
balances.py, engine.py) and the matcher's renderer (shared/wire.py, with the decimal formatting it calls,
shared/decimals.py); shared.build picks them at import.

Everything else is declared in pyproject.toml. The compiled modules are an optional speed-up of the
same source, never a requirement: with CME_PURE_PYTHON=1 at build time, without mypyc, or when the
C build fails (no compiler), the install goes on with the pure-Python modules alone.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from setuptools import setup
from setuptools.command.build_ext import build_ext

# Two groups, so that shared/ needs nothing of services/, compiled or not. Compiling the stream
# decoder and the read model too bought nothing measurable in `cme bench matcher`.
GROUPS = {
    "services.matcher._core": [f"services/matcher/{name}.py" for name in ("book", "balances", "engine")],
    "shared._wire": ["shared/decimals.py", "shared/wire.py"],
}


class OptionalBuildExt(build_ext):
    """A failed C build is a warning: the pure modules are complete on their own."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:  # compiler missing or failing: any error means "no compiled core"
            print(f"warning: compiled core not built, using pure Python ({exc})", file=sys.stderr)

    def build_extension(self, ext: Any) -> None:
        try:
            super().build_extension(ext)
        except Exception as exc:
            print(f"warning: {ext.name} not compiled, using pure Python ({exc})", file=sys.stderr)


def _ext_modules() -> list[Any]:
    if os.environ.get("CME_PURE_PYTHON") == "1":
        return []
    try:
        from mypyc.build import mypycify

        built = (mypycify(paths, opt_level="3", group_name=group) for group, paths in GROUPS.items())
        return [ext for exts in built for ext in exts]
    except Exception as exc:  # mypyc missing, or the sources do not type-check
        print(f"warning: mypyc unavailable, using pure Python ({exc})", file=sys.stderr)
        return []


setup(ext_modules=_ext_modules(), cmdclass={"build_ext": OptionalBuildExt})
