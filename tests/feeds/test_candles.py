"""Candles from injected trades, checked against bars computed here by brute force with Decimal."""

from __future__ import annotations

import random
from decimal import Decimal

import pytest

from services.feeds.candles import INTERVALS, KEEP, Candles, CandleSeries
from shared.instruments import Instrument

INST = Instrument("BTC-USDT")
TICK, LOT = Decimal("0.01"), Decimal("0.00001")
Trade = tuple[int, int, int]  # ts ms, price ticks, qty lots


def expected(trades: list[Trade], ms: int) -> list[dict[str, object]]:
    """Each bar's fields, independently: group by floor(ts / ms), in Decimal."""
    groups: dict[int, list[Trade]] = {}
    for t in trades:
        groups.setdefault(t[0] // ms * ms, []).append(t)
    out = []
    for open_time in sorted(groups):
        g = groups[open_time]
        prices = [Decimal(p) * TICK for _, p, _ in g]
        out.append(
            {
                "open_time": open_time,
                "close_time": open_time + ms - 1,
                "open": prices[0],
                "high": max(prices),
                "low": min(prices),
                "close": prices[-1],
                "volume": sum((Decimal(q) * LOT for _, _, q in g), Decimal(0)),
                "quote_volume": sum((Decimal(p) * TICK * Decimal(q) * LOT for _, p, q in g), Decimal(0)),
                "trades": len(g),
            }
        )
    return out


def as_numbers(bar: dict[str, object]) -> dict[str, object]:
    keys = ("open", "high", "low", "close", "volume", "quote_volume")
    return {k: Decimal(str(v)) if k in keys else v for k, v in bar.items() if k not in ("type", "symbol",
            "interval", "closed")}  # fmt: skip


def flow(seed: int, n: int, start: int) -> list[Trade]:
    rng = random.Random(seed)
    ts, out = start, []
    for _ in range(n):
        ts += rng.choice([0, 0, 1, 250, 7_000, 59_999, 60_000, 61_000, 3_600_000])
        out.append((ts, rng.randint(2_999_000, 3_001_000), rng.randint(1, 50_000)))
    return out


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_bars_match_brute_force_across_boundaries(seed: int) -> None:
    start = 1_700_000_000_000 - 1_700_000_000_000 % 86_400_000 - 3  # 3 ms before a UTC midnight
    trades = flow(seed, 400, start)
    candles = Candles(INST)
    for t in trades:
        candles.add(*t)
    now = trades[-1][0]
    for name, ms in INTERVALS.items():
        series = candles.series[name]
        snap = series.snapshot(now)
        assert snap["type"] == "candles_snapshot" and snap["interval"] == name
        want = expected(trades, ms)[-KEEP:]
        got = [as_numbers(b) for b in snap["candles"]]
        assert got == want, name
        assert len(want) > 1  # the flow crossed this interval's boundaries
        flags = [b["closed"] for b in snap["candles"]]
        assert flags == [True] * (len(flags) - 1) + [False]  # only the last bar is still open at `now`


def test_boundaries_are_exact_and_the_last_bar_closes_by_the_clock() -> None:
    series = CandleSeries(INST, "1m")
    series.add(119_999, 100, 1)  # the last ms of the bar [60000, 119999]
    series.add(120_000, 200, 2)  # the first ms of the next
    first, second = series.bars
    assert (first.open_time, first.trades, second.open_time, second.trades) == (60_000, 1, 120_000, 1)
    assert series.closed(first, 120_000)  # a later bar exists
    assert not series.closed(second, 179_999)
    assert series.closed(second, 180_000)  # its close_time passed
    bar = series.render(second, True)
    assert bar == {
        "type": "candle", "symbol": "BTC-USDT", "interval": "1m", "open_time": 120_000,
        "close_time": 179_999, "open": "2.00", "high": "2.00", "low": "2.00", "close": "2.00",
        "volume": "0.00002", "quote_volume": "0.00004", "trades": 1, "closed": True,
    }  # fmt: skip


def test_only_the_last_bars_are_kept_and_late_trades_count_where_they_belong() -> None:
    series = CandleSeries(INST, "1m")
    for i in range(KEEP + 5):
        series.add(i * 60_000, 100 + i, 1)
    assert len(series.bars) == KEEP and series.bars[0].open_time == 5 * 60_000
    series.add(6 * 60_000 + 1, 1, 7)  # an older ts (never on one stream, but never a later bar's)
    assert series.bars[1].volume == 8 and series.bars[1].low == 1
    series.add(0, 1, 1)  # older than every bar kept: nowhere to count it
    assert sum(b.volume for b in series.bars) == KEEP + 7
    assert series.snapshot(0, 3)["candles"][0]["open_time"] == (KEEP + 2) * 60_000
