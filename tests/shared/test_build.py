"""shared.build.select: the compiled modules only when every one is current and not overridden."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from shared.build import select


@pytest.fixture
def package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A package `buildpkg` with modules a (source) and b (importing a), on sys.path."""
    pkg = tmp_path / "buildpkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("WHO = 'a source'\n")
    (pkg / "b.py").write_text("from buildpkg.a import WHO\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv("CME_PURE_PYTHON", raising=False)
    yield pkg
    for name in ("buildpkg", "buildpkg.a", "buildpkg.b"):
        sys.modules.pop(name, None)


def _fake_compiled(pkg: Path, name: str, newer: bool) -> None:
    """A file where an extension module would be (never imported: select only compares times)."""
    so = pkg / (name + _extension_suffix())
    so.write_bytes(b"")
    source = pkg / (name + ".py")
    t = os.path.getmtime(source)
    os.utime(so, (t + 10, t + 10) if newer else (t - 10, t - 10))


def _extension_suffix() -> str:
    from importlib.machinery import EXTENSION_SUFFIXES

    return EXTENSION_SUFFIXES[0]


def test_without_a_compiled_build_the_sources_are_loaded_in_dependency_order(package: Path) -> None:
    assert select("buildpkg", str(package), ("a", "b")) == "pure"
    assert sys.modules["buildpkg.b"].WHO == "a source"
    assert sys.modules["buildpkg.a"].__file__ == str(package / "a.py")


def test_current_compiled_modules_are_chosen(package: Path) -> None:
    _fake_compiled(package, "a", newer=True)
    _fake_compiled(package, "b", newer=True)
    assert select("buildpkg", str(package), ("a", "b")) == "compiled"


def test_one_stale_module_means_the_sources_for_all(package: Path) -> None:
    _fake_compiled(package, "a", newer=True)
    _fake_compiled(package, "b", newer=False)  # b edited after the build
    assert select("buildpkg", str(package), ("a", "b")) == "pure"
    assert sys.modules["buildpkg.a"].__file__ == str(package / "a.py")


def test_cme_pure_python_forces_the_sources(package: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_compiled(package, "a", newer=True)
    _fake_compiled(package, "b", newer=True)
    monkeypatch.setenv("CME_PURE_PYTHON", "1")
    assert select("buildpkg", str(package), ("a", "b")) == "pure"


def test_a_lazy_source_runs_on_first_use_only(package: Path) -> None:
    (package / "a.py").write_text("import buildpkg\nbuildpkg.RAN = True\nWHO = 'a source'\n")
    import buildpkg

    assert select("buildpkg", str(package), ("a",), lazy=True) == "pure"
    assert not hasattr(buildpkg, "RAN")
    assert sys.modules["buildpkg.a"].WHO == "a source"
    assert getattr(buildpkg, "RAN", False)
