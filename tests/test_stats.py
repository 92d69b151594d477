"""services/stats.py: quantiles from Prometheus buckets, summed over processes, and the table."""

from __future__ import annotations

import pytest

from services import stats

TEXT = """# HELP cme_stream_wait_seconds w
# TYPE cme_stream_wait_seconds histogram
cme_stream_wait_seconds_bucket{{symbol="A",le="0.001"}} {a}
cme_stream_wait_seconds_bucket{{symbol="A",le="0.002"}} {b}
cme_stream_wait_seconds_bucket{{symbol="A",le="+Inf"}} {c}
cme_stream_wait_seconds_sum{{symbol="A"}} 0.1
cme_stream_wait_seconds_count{{symbol="A"}} {c}
# HELP cme_trades_total t
# TYPE cme_trades_total counter
cme_trades_total{{symbol="A"}} {t}
"""


def sample(at: float, a: int, b: int, c: int, t: int, processes: int = 1) -> stats.Sample:
    histograms, counters = stats.parse([TEXT.format(a=a, b=b, c=c, t=t)] * processes)
    return stats.Sample(at, histograms, counters, processes)


def test_quantiles_interpolate_within_the_bucket_as_promql_does() -> None:
    h = stats.Histogram({0.001: 50.0, 0.002: 100.0, float("inf"): 100.0})
    assert h.quantile(0.5) == pytest.approx(0.001)
    assert h.quantile(0.75) == pytest.approx(0.0015)
    assert stats.Histogram({0.001: 0.0, float("inf"): 0.0}).quantile(0.5) is None
    assert stats.Histogram({0.001: 1.0, float("inf"): 10.0}).quantile(0.99) == 0.001  # past the last bound


def test_processes_are_summed_and_the_interval_is_what_changed() -> None:
    old = sample(10.0, 10, 10, 10, 5, processes=2)
    new = sample(12.0, 10, 30, 30, 25, processes=2)
    assert old.histograms["cme_stream_wait_seconds"].count == 20
    latency, rates = stats.rows(new, old)
    wait = next(r for r in latency if r[0] == "gateway append -> matcher read")
    assert wait[1] == "40" and wait[-1] == "interval"  # 20 new observations per process, all in (1, 2] ms
    assert wait[2] == "1.50 ms"
    assert ["trades", "20.0/s"] in rates  # 2 processes x 20 trades over 2 s
    unseen = next(r for r in latency if r[0] == "matcher core, per command")
    assert unseen[1:] == ["0", "-", "-", "-", "-"]


def test_an_idle_interval_shows_the_numbers_since_start() -> None:
    old = sample(1.0, 4, 8, 8, 0)
    latency, _ = stats.rows(old, old)
    wait = next(r for r in latency if r[0] == "gateway append -> matcher read")
    assert wait[1] == "8" and wait[-1] == "all"


def test_no_stack_is_a_clear_error(tmp_path: object, capsys: pytest.CaptureFixture[str]) -> None:
    from services.cli import main

    assert main(["stats", "--data-dir", str(tmp_path), "--once"]) == 2
    assert "no running `cme up`" in capsys.readouterr().err
