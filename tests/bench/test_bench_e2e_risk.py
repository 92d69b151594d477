"""`cme bench e2e --stack-risk both`: two stacks, one without balances and one with, driven in turn
with the same plan; the report pairs them per round (no timing is asserted: see README)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson

from services.bench.e2e import Load
from services.bench.e2e_risk import summarise
from services.cli import main


def test_both_stacks_run_the_same_plan_in_alternating_order_and_only_one_has_balances(tmp_path: Path) -> None:
    out = tmp_path / "pairs.json"
    argv = ["bench", "e2e", "--stack-risk", "both", "--rounds", "2", "--rate", "1000", "--duration", "1"]
    assert main([*argv, "--clients", "2", "--quiet", "--json", str(out)]) == 0
    report = orjson.loads(out.read_bytes())
    assert [r["first"] for r in report["rounds"]] == ["off", "on"]
    for got in report["legs"]:
        off, on = got["off"], got["on"]
        assert off["balance_lines"] == 0 < on["balance_lines"]
        for leg in (off, on):
            assert leg["new_orders_sent"] > 500 and leg["acks"] == leg["new_orders_sent"]
            assert leg["lost_reports"] == leg["missing_acks"] == 0 and not leg["errors"]
    assert report["lost_reports"] == 0
    assert "target" not in report  # at an offered rate both keep up: the rate ratio says nothing
    for risk in ("off", "on"):
        names = set(report["cpu_us_per_command"][risk])
        assert {"redis", "matcher", "load generator"} <= names, names


def _leg(sustained: int, cpu: dict[str, float]) -> dict[str, Any]:
    return {"sustained_per_s": sustained, "cpu_us_per_command": cpu, "lost_reports": 0}


def test_the_figure_is_the_median_of_the_rounds_on_off_ratios() -> None:
    load = Load(clients=8, procs=1, rate=0.0, duration=8.0, window=16, commands=1000, seed=42)
    legs = [
        {
            "off": _leg(10_000, {"matcher": 30.0, "redis": 30.0}),
            "on": _leg(9_500, {"matcher": 36.0, "redis": 30.0}),
        },
        {
            "on": _leg(8_000, {"matcher": 40.0, "redis": 30.0}),
            "off": _leg(10_000, {"matcher": 30.0, "redis": 30.0}),
        },
        {
            "off": _leg(9_000, {"matcher": 30.0, "redis": 30.0}),
            "on": _leg(8_100, {"matcher": 30.0, "redis": 33.0}),
        },
    ]
    rep = summarise(legs, load)
    assert [r["first"] for r in rep["rounds"]] == ["off", "on", "off"]
    assert [r["ratio"] for r in rep["rounds"]] == [0.95, 0.8, 0.9]
    assert [r["cpu_ratio"] for r in rep["rounds"]] == [1.1, 1.167, 1.05]
    assert rep["median_ratio"] == 0.9 and rep["target"]["met"]
    assert rep["cpu_us_per_command"]["on"] == {"matcher": 35.3, "redis": 31.0}
    legs[2]["on"]["sustained_per_s"] = 8_000
    assert summarise(legs, load)["median_ratio"] == 0.889 and not summarise(legs, load)["target"]["met"]
