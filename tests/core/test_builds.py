"""The compiled and the pure-Python build of the core behave identically, and share checkpoints.

Each build runs in its own interpreter (the build is chosen when services.matcher and shared are
imported): CME_PURE_PYTHON=1 gives the pure modules, no variable the compiled ones when they are
installed. Both replay the same random command stream (the differential tests' generator: every order
type, self-trade prevention, amends, garbage) and must produce the same events (compared by repr, so
even a list where a tuple belongs would differ), the same rendered reports and market data (the
matcher's renderer, shared.wire, is compiled too) and state hashes; a snapshot taken half-way by one
build is restored by the other, which must then continue exactly as the first did.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.core.reference import Reference
from tests.core.test_differential import instruments, random_stream

ROOT = Path(__file__).resolve().parents[2]

_PROBE = """
import hashlib, json, pickle, sys
import services.matcher, shared
from services.matcher.engine import Engine
from services.matcher.snapshot import restore, snapshot, state_hash
from shared.instruments import default_instruments
from shared.wire import Rendered, render

commands, half, snap_out, snap_in = pickle.load(open(sys.argv[1], "rb"))
instruments = default_instruments()
engine = Engine(instruments.values())
start = 0
if snap_in:
    restore(engine, pickle.load(open(snap_in, "rb")))
    start = half

def run(lo, hi):
    h = hashlib.sha256()
    for i in range(lo, hi):
        events = engine.apply(commands[i], i + 1, 1000 + i)
        h.update(repr(events).encode())
        symbol = getattr(commands[i], "symbol", None)
        inst = instruments.get(symbol) if type(symbol) is str else None
        if inst is not None:
            out = Rendered(i)
            render(events, inst, 1000 + i, out, 7, 9)
            h.update(repr(out.payloads(11)).encode())
    return h.hexdigest()

first = run(start, half) if not snap_in else None
if snap_out:
    pickle.dump(snapshot(engine), open(snap_out, "wb"))
middle = state_hash(engine)
second = run(half, len(commands))
print(json.dumps({"build": services.matcher.BUILD, "wire": shared.BUILD, "first": first, "middle": middle,
                  "second": second, "final": state_hash(engine)}))
"""


def _compiled_available() -> bool:
    env = {k: v for k, v in os.environ.items() if k != "CME_PURE_PYTHON"}
    proc = subprocess.run(
        [sys.executable, "-c", "import services.matcher as m; print(m.BUILD)"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    return proc.stdout.strip() == "compiled"


pytestmark = pytest.mark.skipif(not _compiled_available(), reason="no compiled core installed")


def _run(build: str, job: Path, args: tuple[Any, ...]) -> dict[str, Any]:
    with open(job, "wb") as f:
        pickle.dump(args, f)
    env = {k: v for k, v in os.environ.items() if k != "CME_PURE_PYTHON"}
    if build == "pure":
        env["CME_PURE_PYTHON"] = "1"
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE, str(job)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["build"] == result["wire"] == build
    return result


@pytest.fixture(scope="module")
def commands() -> list[Any]:
    rng = random.Random(9)
    ref = Reference(instruments())
    out = []
    for seq, cmd in enumerate(random_stream(rng, 4000, ref), start=1):
        ref.apply(cmd, seq, 1000 + seq - 1)
        out.append(cmd)
    return out


def test_both_builds_give_the_same_events_and_state(commands: list[Any], tmp_path: Path) -> None:
    half = len(commands) // 2
    pure = _run("pure", tmp_path / "job", (commands, half, None, None))
    compiled = _run("compiled", tmp_path / "job", (commands, half, None, None))
    assert pure["first"] == compiled["first"] and pure["second"] == compiled["second"]
    assert pure["middle"] == compiled["middle"] and pure["final"] == compiled["final"]


@pytest.mark.parametrize(("writer", "reader"), [("compiled", "pure"), ("pure", "compiled")])
def test_a_checkpoint_of_one_build_restores_in_the_other(
    commands: list[Any], tmp_path: Path, writer: str, reader: str
) -> None:
    half = len(commands) // 2
    snap = tmp_path / "snap.pickle"
    written = _run(writer, tmp_path / "job", (commands, half, str(snap), None))
    restored = _run(reader, tmp_path / "job", (commands, half, None, str(snap)))
    assert restored["middle"] == written["middle"]
    assert restored["second"] == written["second"] and restored["final"] == written["final"]
