"""Builds the compiled core: services/matcher/book.py, balances.py and engine.py through mypyc, when it can.

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

CORE = ["services/matcher/book.py", "services/matcher/balances.py", "services/matcher/engine.py"]


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

        return list(mypycify(CORE, opt_level="3", group_name="services.matcher._core"))
    except Exception as exc:  # mypyc missing, or the sources do not type-check
        print(f"warning: mypyc unavailable, using pure Python ({exc})", file=sys.stderr)
        return []


setup(ext_modules=_ext_modules(), cmdclass={"build_ext": OptionalBuildExt})
