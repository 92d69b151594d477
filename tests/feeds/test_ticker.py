"""The 24 h ticker against a brute-force window over the same injected trades."""

from __future__ import annotations

import random
from decimal import Decimal

from services.feeds.ticker import WINDOW_MS, Ticker
from shared.instruments import Instrument

INST = Instrument("BTC-USDT")
TICK, LOT = Decimal("0.01"), Decimal("0.00001")


def test_rolling_window_matches_brute_force() -> None:
    rng = random.Random(5)
    ticker = Ticker(INST)
    trades: list[tuple[int, int, int]] = []
    ts = now = 1_700_000_000_000
    for step in range(3000):
        ts += rng.choice([0, 1, 1000, 600_000, 3_600_000, 30_000_000])
        t = (ts, rng.randint(2_990_000, 3_010_000), rng.randint(1, 90_000))
        ticker.add(*t)
        trades.append(t)
        if step % 7:
            continue
        now = max(now, ts + rng.choice([0, 1, WINDOW_MS // 2, WINDOW_MS]))  # the clock never goes back
        msg = ticker.message(now, "29999.99", None)
        window = [x for x in trades if x[0] > now - WINDOW_MS]
        assert Decimal(msg["last"]) == t[1] * TICK
        assert (msg["bid"], msg["ask"], msg["ts"]) == ("29999.99", None, now)
        assert Decimal(msg["volume_24h"]) == sum((q * LOT for _, _, q in window), Decimal(0))
        assert Decimal(msg["quote_volume_24h"]) == sum((p * TICK * q * LOT for _, p, q in window), Decimal(0))
        if not window:
            assert msg["open_24h"] is msg["high_24h"] is msg["low_24h"] is msg["change_24h"] is None
            continue
        prices = [p for _, p, _ in window]
        assert Decimal(msg["open_24h"]) == prices[0] * TICK
        assert Decimal(msg["high_24h"]) == max(prices) * TICK
        assert Decimal(msg["low_24h"]) == min(prices) * TICK
        assert Decimal(msg["change_24h"]) == (t[1] - prices[0]) * TICK
        trades = [x for x in trades if x[0] > now - WINDOW_MS]  # as the ticker forgot them


def test_empty_ticker() -> None:
    msg = Ticker(INST).message(1000, None, None)
    assert msg == {
        "type": "ticker", "symbol": "BTC-USDT", "last": None, "bid": None, "ask": None, "open_24h": None,
        "high_24h": None, "low_24h": None, "volume_24h": "0.00000", "quote_volume_24h": "0.00",
        "change_24h": None, "ts": 1000,
    }  # fmt: skip
