"""`cme bench e2e` on its own stack reports every process's CPU per command (no timing is asserted:
see README), and checks the issue's targets its settings speak to."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson

from services.bench.e2e import build_plan, targets
from services.cli import main


def test_bench_e2e_reports_cpu_per_command_of_every_process(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    argv = ["bench", "e2e", "--rate", "1000", "--duration", "1", "--clients", "2", "--quiet"]
    assert main([*argv, "--json", str(out)]) == 0
    report = orjson.loads(out.read_bytes())
    assert report["lost_reports"] == 0 and report["commands_sent"] > 0
    cpu = report["cpu_us_per_command"]
    names = set(cpu)
    assert {"redis", "load generator"} <= names
    for kind in ("matcher", "gateway", "feeds"):
        assert any(n.startswith(kind) for n in names), (kind, names)
    assert cpu["load generator"] > 0 and all(us >= 0 for us in cpu.values())
    # Balances are on in the stack the bench starts: their lines are counted apart, not as reports.
    assert report["balance_lines"] > 0 and report["reports"] >= report["acks"] > 0


def test_all_order_types_go_over_the_wire_and_every_order_gets_its_ack_and_reports(tmp_path: Path) -> None:
    """--order-types all runs the plain flow, then one with stops, GTD, icebergs and quote quantities,
    on one stack: every new order of both is acked and gets a report, and none is refused as malformed."""
    out = tmp_path / "bench.json"
    argv = ["bench", "e2e", "--order-types", "all", "--rate", "1000", "--duration", "1", "--clients", "2"]
    assert main([*argv, "--quiet", "--json", str(out)]) == 0
    plain = orjson.loads(out.read_bytes())
    more = plain["all_types"]
    assert (plain["order_types"], more["order_types"]) == ("plain", "all")
    for rep in (plain, more):
        assert rep["new_orders_sent"] > 500
        assert rep["acks"] == rep["new_orders_sent"] and rep["report_latency"]["count"] == rep["acks"]
        assert rep["lost_reports"] == rep["missing_acks"] == 0 and not rep["errors"]
        assert set(rep["rejects"]) <= {"UNKNOWN_ORDER"}  # a cancel racing a fill; nothing malformed
    assert more["reports"] > more["new_orders_sent"]
    assert set(plain["all_vs_plain"]["cpu_us_per_command"]) == set(plain["cpu_us_per_command"])


def test_the_all_types_plan_carries_every_order_type() -> None:
    plan = build_plan(3000, 42, 2, "t", True, "all", duration=1.0)
    msgs = [orjson.loads(m) for client in plan.messages for m in client]
    seen = {m.get("type") for m in msgs} | {m.get("tif") for m in msgs}
    assert {"stop_limit", "stop_market", "gtd"} <= seen
    assert all(type(m["expire_time"]) is int for m in msgs if m.get("tif") == "gtd")
    assert any("display_quantity" in m for m in msgs) and any("quote_quantity" in m for m in msgs)
    assert all("stop_price" in m for m in msgs if str(m.get("type")).startswith("stop_"))
    plain = [m for client in build_plan(3000, 42, 2, "t", True).messages for m in client]
    assert not any(b"stop" in m or b"gtd" in m or b"display" in m or b"quote" in m for m in plain)


def _report(rate: float, cpu: dict[str, float], p99: float) -> dict[str, Any]:
    return {
        "offered_rate": rate,
        "sustained_per_s": rate,
        "lost_reports": 0,
        "missing_acks": 0,
        "report_latency": {"p99_ms": p99, "p999_ms": p99 * 2},
        "cpu_us_per_command": cpu,
    }


def test_targets_at_10000_per_s_check_latency_and_each_process_budget() -> None:
    cpu = {"redis": 20.0, "matcher": 11.0, "gateway-1": 16.0, "feeds-1": 5.0, "load generator": 14.0}
    met = {t["target"]: t["met"] for t in targets(_report(10_000, cpu, 1.5))}
    assert met == {
        "10,000/s offered: order -> report p99 <= 2 ms, p99.9 <= 5 ms, nothing lost": True,
        "10,000/s offered: CPU of gateway-1 <= 15 us per command": False,
        "10,000/s offered: CPU of matcher <= 12 us per command": True,
        "10,000/s offered: CPU of feeds-1 <= 6 us per command": True,
        "10,000/s offered: CPU of load generator <= 15 us per command": True,
    }
    assert not targets(_report(10_000, cpu, 2.5))[0]["met"]
    assert [t["met"] for t in targets(_report(20_000, cpu, 2.5))] == [True]
