"""`cme bench feeds`: both feeds replay the whole flow and keep their book; the report has the figures
for both and the cost next to the 5 % target (no timing is asserted: see README)."""

from __future__ import annotations

from pathlib import Path

import orjson

from services.bench.feeds import TARGET_PCT, build
from services.cli import main


def test_bench_feeds_reports_both_modes_and_the_cost(tmp_path: Path) -> None:
    """In-process and over Redis (two feed processes, real subscribers): both feeds replay the whole
    flow and keep their book and every subscriber (the bench fails otherwise), figures for both."""
    out = tmp_path / "feeds.json"
    argv = ["bench", "feeds", "-n", "3000", "--repeats", "2", "--subscribers", "3", "--quiet"]
    assert main([*argv, "--order-types", "all", "--json", str(out)]) == 0
    rep = orjson.loads(out.read_bytes())
    assert rep["order_types"] == "all"
    for part in ("in_process", "over_redis"):
        figures = rep[part]
        assert figures["l2_updates"] > 1000 and figures["trades"] > 0
        for mode in ("with_checksum", "without_checksum"):
            assert figures[mode]["cpu_us_per_message"] > 0
        assert len(figures["checksum_cost_pct_each"]) == 2
        assert figures["met"] == (figures["checksum_cost_pct"] <= TARGET_PCT)
    assert rep["in_process"]["with_checksum"]["messages_per_s"] > 0
    assert rep["over_redis"]["commands"] == 3000
    assert rep["checksum_cost_pct"] == rep["over_redis"]["checksum_cost_pct"]  # the figure
    assert rep["target_pct"] == TARGET_PCT and rep["met"] == rep["over_redis"]["met"]


def test_payloads_are_the_matchers_with_a_few_commands_each() -> None:
    payloads = build(400, 7, "plain", 4, 100)
    assert payloads.snapshot.startswith(b"#") and b'"type":"l2_snapshot"' in payloads.snapshot
    md = [p for is_md, p in payloads.messages if is_md]
    assert len(md) <= 100 and sum(p.count(b'"type":"l2_update"') for p in md) == payloads.l2_updates
    assert payloads.last_seq > 0
