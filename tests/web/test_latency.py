"""The latency panel's numbers: parsing real exposition text, histogram_quantile, the recent window."""

from __future__ import annotations

import math

import pytest
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from services.web.latency import STAGES, LatencyReport, delta, parse, quantile

BOUNDS = (0.001, 0.002, 0.005, 0.01)


def exposition(observations: dict[tuple[str, str], list[float]]) -> str:
    """What a service's /metrics says after these observations: (metric, label value) -> seconds."""
    registry = CollectorRegistry()
    families: dict[str, Histogram] = {}
    for (name, value), seconds in observations.items():
        label = {"cme_gateway_ack_latency_seconds": "op", "cme_feed_publish_to_send_seconds": "channel"}.get(
            name, "symbol"
        )
        if name not in families:
            families[name] = Histogram(
                name[: -len("_seconds")], "t", (label,), registry=registry, unit="seconds", buckets=BOUNDS
            )
        for s in seconds:
            families[name].labels(value).observe(s)
    return generate_latest(registry).decode()


def test_quantile_interpolates_inside_the_bucket_like_prometheus() -> None:
    hist = {0.001: 0.0, 0.002: 50.0, 0.005: 100.0, math.inf: 100.0}
    assert quantile(0.5, hist) == pytest.approx(0.002)
    assert quantile(0.25, hist) == pytest.approx(0.0015)  # halfway through the (1 ms, 2 ms] bucket
    assert quantile(0.99, hist) == pytest.approx(0.002 + 0.003 * 49 / 50)
    assert quantile(0.5, {0.001: 0.0, math.inf: 0.0}) is None
    assert quantile(0.5, {0.001: 0.0, 0.002: 0.0, math.inf: 4.0}) == 0.002  # past the last bound


def test_parse_sums_processes_and_label_sets_and_keeps_to_the_stage_labels() -> None:
    one = exposition(
        {
            ("cme_stream_wait_seconds", "BTC-USDT"): [0.0015] * 3,
            ("cme_stream_wait_seconds", "ETH-USDT"): [0.004],
            ("cme_gateway_ack_latency_seconds", "new"): [0.0015],
            ("cme_gateway_ack_latency_seconds", "cancel"): [0.009] * 5,  # not the order stage
            ("cme_feed_publish_to_send_seconds", "l2"): [0.003],
            ("cme_feed_publish_to_send_seconds", "trades"): [0.0005, 0.0005],
        }
    )
    got = parse(one)
    assert got["stream_wait"][0.002] == 3 and got["stream_wait"][math.inf] == 4
    assert got["gateway_ack"][math.inf] == 1
    assert got["feed_l2"][math.inf] == 1 and got["feed_trades"][0.001] == 2
    assert "matcher_core" not in got  # no such histogram on this process


def test_report_merges_sources_windows_recent_observations_and_names_a_dead_source() -> None:
    now = [1000.0]
    pages = {
        "http://a/metrics": exposition({("cme_matcher_command_seconds", "BTC-USDT"): [0.0015] * 10}),
        "http://b/metrics": exposition({("cme_matcher_command_seconds", "ETH-USDT"): [0.0015] * 10}),
    }

    def fetch(url: str) -> str:
        if url not in pages:
            raise OSError("connection refused")
        return pages[url]

    report = LatencyReport([*pages, "http://dead/metrics"], fetcher=fetch, clock=lambda: now[0])
    first = report.report()
    core = next(s for s in first["stages"] if s["stage"] == "matcher_core")
    assert core["count"] == 20 and core["scope"] == "since_start" and first["window_seconds"] is None
    assert 1000 < core["p50_us"] < 2000
    assert [s["ok"] for s in first["sources"]] == [True, True, False]
    assert "refused" in first["sources"][2]["error"]

    # Ten slow commands later, the recent window holds only those.
    pages["http://a/metrics"] = exposition(
        {("cme_matcher_command_seconds", "BTC-USDT"): [0.0015] * 10 + [0.008] * 10}
    )
    assert report.report() is first  # within the cache second: the same scrape
    now[0] += 10
    second = report.report()
    core = next(s for s in second["stages"] if s["stage"] == "matcher_core")
    assert core["scope"] == "recent" and core["count"] == 10 and core["p50_us"] > 5000
    assert second["window_seconds"] == 10.0

    # A minute with nothing new: the window is empty, so the numbers since start stand.
    now[0] += 55
    third = report.report()
    core = next(s for s in third["stages"] if s["stage"] == "matcher_core")
    assert third["window_seconds"] == 55.0
    assert core["scope"] == "since_start" and core["count"] == 30


def test_a_restarted_process_counts_from_its_restart() -> None:
    old = {0.001: 5.0, math.inf: 9.0}
    assert delta({0.001: 6.0, math.inf: 12.0}, old) == {0.001: 1.0, math.inf: 3.0}
    assert delta({0.001: 1.0, math.inf: 2.0}, old) == {0.001: 1.0, math.inf: 2.0}


def test_every_stage_names_a_histogram_the_services_define() -> None:
    from shared import metrics

    defined = {c.name for c in vars(metrics).values() if isinstance(c, metrics.FastHistogram)}
    assert {st.metric for st in STAGES} <= defined
