"""`cme bench peers` end to end on tiny flows: figures, output format, the volume check, skipped peers.

No timing is asserted (see README): only that every figure is there and consistent, and that an engine
reporting different fills, a missing peer and a failing engine are each said loudly.
"""

from __future__ import annotations

import io
import tomllib
from importlib import metadata
from pathlib import Path

import orjson
import pytest

from services.bench.peers import ENGINES, EngineSpec, PeersConfig, run, select
from services.bench.peers_adapters import Adapter, Counts
from services.bench.peers_flow import CANCEL, CANCELS, MARKET, generate
from services.bench.peers_ref import SeedBook, TightBook
from services.cli import main

ROOT = Path(__file__).resolve().parents[2]
NO_EXTRA = ("cme-core", "cme-core-pure", "seed", "tight")
BY_NAME = {e.name: e for e in ENGINES}


def _installed(dist: str) -> bool:
    try:
        metadata.version(dist)
    except metadata.PackageNotFoundError:
        return False
    return True


def test_bench_peers_runs_every_engine_that_needs_no_extra(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "peers.json"
    engines = ",".join(NO_EXTRA)
    code = main(["bench", "peers", "-n", "2000", "--repeats", "2", "--engines", engines, "--json", str(out)])
    assert code == 0
    printed = capsys.readouterr()
    report = orjson.loads(out.read_bytes())
    rows = {r["engine"]: r for r in report["engines"]}
    assert list(rows) == list(NO_EXTRA)
    assert report["ops"] == 2000 and report["repeats"] == 2 and report["volume_check"]["ok"]
    assert sum(report["flow"].values()) == 2000
    for r in rows.values():
        assert r["runs"] == 2 and r["ops_per_s"] > 0 and r["ops_per_cpu_s"] > 0 and r["errors"] == 0
        assert 0 < r["p50_us"] <= r["p99_us"] <= r["p999_us"]
        assert set(r["by_category_us"]) == set(report["flow"])
        assert all(0 < c["p50"] <= c["p99"] for c in r["by_category_us"].values())
        assert (r["trades"], r["volume"]) == (rows["tight"]["trades"], rows["tight"]["volume"])
    assert rows["tight"]["trades"] > 0
    assert rows["cme-core-pure"]["build"] == "pure"
    assert rows["seed"]["version"] == "reference"

    lines = printed.out.splitlines()
    assert lines[0].startswith("cme bench peers  (CPython ") and "2,000 ops, seed 42, no prefill" in lines[0]
    head = lines[2].split()
    assert head[:3] == ["engine", "version", "ops/s"] and head[-6:] == [
        "p50",
        "us",
        "p99",
        "us",
        "trades",
        "volume",
    ]
    assert "x seed" in lines[2] and "x tight" in lines[2] and "x liquibook" not in lines[2]
    table = {line.split()[0]: line.split() for line in lines[3:7]}
    assert list(table) == list(NO_EXTRA)
    assert table["seed"][3] == "1.00" and table["tight"][4] == "1.00"  # x seed, x tight of themselves
    assert f"volume check: ok, every engine traded {rows['tight']['trades']:,} trades" in printed.out
    assert "targets (figures, not a gate):" in printed.out
    assert "cme-core ops/s >= 1.2 x liquibook" in printed.out and "n/a (liquibook not run)" in printed.out
    targets = {t["target"]: t for t in report["targets"]}
    assert targets["cme-core-pure ops/s >= 0.8 x tight"]["met"] in (True, False)
    assert targets["cme-core p99 <= 4 us"]["value"] == rows["cme-core"]["p99_us"]
    # progress on stderr, one line per engine and run
    assert sum(line.startswith("[2/2] ") for line in printed.err.splitlines()) == len(NO_EXTRA)


def tight_dropping_a_fill() -> Adapter:
    """The tight reference behind an adapter that loses the first fill it is told about."""
    book = TightBook()
    c = Counts()
    dropped = False

    def handle(op: tuple[int, int, int, int, int, int]) -> None:
        nonlocal dropped
        if op[0] == CANCEL:
            book.cancel(op[1])
            return
        trades = book.market(op[1], op[2], op[4]) if op[0] == MARKET else book.limit(*op[1:5], op[0])
        if trades and not dropped:
            dropped, trades = True, trades[1:]
        c.trades += len(trades)
        c.volume += sum(t[3] for t in trades)

    return Adapter(handle, c)


def test_the_volume_check_fails_an_engine_that_drops_a_fill(tmp_path: Path) -> None:
    lossy = EngineSpec("tight-lossy", "tests.bench.test_bench_peers:tight_dropping_a_fill", "drops a fill")
    out, path = io.StringIO(), tmp_path / "peers.json"
    code = run(
        PeersConfig(ops=2000, repeats=1, quiet=True, json_path=str(path)), [BY_NAME["tight"], lossy], out
    )
    assert code == 1
    text = out.getvalue()
    assert "FAIL volume check: tight traded" in text
    assert "FAIL   tight-lossy traded" in text
    report = orjson.loads(path.read_bytes())
    assert report["volume_check"]["ok"] is False
    rows = {r["engine"]: r for r in report["engines"]}
    assert rows["tight-lossy"]["trades"] == rows["tight"]["trades"] - 1


def test_a_missing_peer_is_skipped_loudly_another_version_noted_and_a_failing_engine_fails() -> None:
    missing = EngineSpec(
        "ghost", "services.bench.peers_adapters:tight", "not installed", "cme-no-such-dist", "1"
    )
    broken = EngineSpec("broken", "services.bench.peers_adapters:no_such_factory", "cannot start")
    other_pin = EngineSpec("tight-pinned", "services.bench.peers_adapters:tight", "pinned", "pytest", "0.1")
    out = io.StringIO()
    engines = [BY_NAME["tight"], missing, broken, other_pin]
    code = run(PeersConfig(ops=500, repeats=2, quiet=True), engines, out)
    assert code == 1
    text = out.getvalue()
    assert (
        f"WARNING tight-pinned {metadata.version('pytest')} is installed, not the 0.1 of the [peers]" in text
    )
    assert (
        "SKIPPED ghost: cme-no-such-dist is not installed; install the peers with: pip install -e '.[peers]'"
        in text
    )
    assert "FAIL broken: AttributeError" in text
    assert "volume check: ok" in text  # the engines that ran agree; the failure alone fails the run


@pytest.mark.parametrize("peer", [e.name for e in ENGINES if e.dist])
def test_an_installed_peer_trades_exactly_as_the_references(peer: str) -> None:
    spec = BY_NAME[peer]
    assert spec.dist is not None
    if not _installed(spec.dist):
        pytest.skip(f"{spec.dist} is not installed (pip install -e '.[peers]')")
    out = io.StringIO()
    assert run(PeersConfig(ops=3000, prefill=500, repeats=1, quiet=True), [BY_NAME["tight"], spec], out) == 0
    assert "volume check: ok" in out.getvalue()


def test_the_peers_extra_pins_the_versions_the_bench_names() -> None:
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["peers"]
    assert sorted(extra) == sorted(f"{e.dist}=={e.pin}" for e in ENGINES if e.dist)


def test_select_keeps_the_given_order_and_rejects_unknown_names() -> None:
    assert [e.name for e in select("tight,cme-core")] == ["tight", "cme-core"]
    assert [e.name for e in select(None)] == [e.name for e in ENGINES]
    with pytest.raises(SystemExit, match="unknown engine nope"):
        select("tight,nope")


def test_the_flow_has_the_documented_mix_and_the_references_agree_trade_for_trade() -> None:
    ops = generate(20_000, 7)
    assert ops == generate(20_000, 7)
    cancels = sum(op[5] == CANCELS for op in ops) / len(ops)
    assert 0.17 < cancels < 0.23
    deep = generate(6_000, 7, prefill=5_000)
    for flow in (ops, deep):
        seed, tight = SeedBook(), TightBook()
        for kind, oid, side, price, qty, _ in flow:
            if kind == CANCEL:
                assert seed.cancel(oid) and tight.cancel(oid)  # every cancel hits a live order
                continue
            if kind == MARKET:
                a, b = seed.market(oid, side, qty), tight.market(oid, side, qty)
            else:
                a, b = seed.limit(oid, side, price, qty, kind), tight.limit(oid, side, price, qty, kind)
            assert [(t.maker_order_id, t.price, t.quantity) for t in a] == [(t[1], t[2], t[3]) for t in b]
        assert sorted(seed.orders) == sorted(tight.orders)
