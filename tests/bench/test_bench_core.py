"""`cme bench core` runs end to end and reports every figure (no timing is asserted: see README)."""

from __future__ import annotations

from pathlib import Path

import orjson

from services.bench.flow import FlowConfig, generate
from services.cli import main


def test_bench_core_writes_its_figures(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    code = main(
        ["bench", "core", "-n", "3000", "--memory-orders", "2000", "--metrics", "--quiet", "--json", str(out)]
    )
    assert code == 0
    report = orjson.loads(out.read_bytes())
    default, risk, deep = report["variants"]
    assert (default["variant"], risk["variant"], deep["variant"]) == ("default", "risk on", "deep book")
    assert deep["preloaded_orders"] == 20_000
    # Balances change no outcome of the flow (its accounts are funded beyond what they trade).
    assert (risk["trades"], risk["commands"]) == (default["trades"], default["commands"])
    assert risk["events"] > default["events"]  # the balance events
    for r in (default, risk, deep):
        assert r["commands"] == 3000 and r["trades"] > 0 and r["commands_per_s"] > 0
        assert 0 < r["p50_us"] <= r["p99_us"] <= r["p999_us"] <= r["max_us"]
    assert default["metrics"]["with_metrics_per_s"] > 0
    cost = report["risk_cost"]
    assert cost["slices"] == 2 and cost["off_per_s"] > 0 and cost["on_per_s"] > 0 and cost["ratio"] > 0
    assert report["memory"]["resting_orders"] == 2000 and report["memory"]["bytes_per_resting_order"] > 0


def test_flow_is_deterministic_and_has_the_documented_mix() -> None:
    a = generate(FlowConfig(20_000, 7))[1]
    b = generate(FlowConfig(20_000, 7))[1]
    assert a == b
    kinds = [type(cmd).__name__ for cmd, _ in a]
    cancels = kinds.count("Cancel") / len(kinds)
    assert 0.17 < cancels < 0.23
