"""Candles (OHLCV bars) built from one symbol's trades. Pure: no I/O, no clock.

A trade belongs to the bar of its own `ts` (the command's time, which the core takes from the stream
entry id), so every feed process, and one rebuilt from the durable events stream after a restart,
holds the same bars. Bars are UTC-aligned (open_time is a multiple of the interval since the epoch),
kept as integers (ticks, lots, ticks x lots) and rendered as decimal strings only on the way out. An
interval without trades has no bar.

A bar is closed once a later bar exists or the caller's clock has passed its close_time; what closing
changes is only the flag, never the numbers, so the flag's timing is the only thing that may differ
between processes.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Final

from shared.instruments import Instrument

INTERVALS: Final = {"1m": 60_000, "5m": 300_000, "15m": 900_000, "1h": 3_600_000, "1d": 86_400_000}
KEEP: Final = 500  # bars per interval and symbol: what a candles_snapshot and /v1/candles can give

Message = dict[str, Any]


class Candle:
    """One bar. close_time is inclusive (open_time + interval - 1), as Binance and Bybit give it."""

    __slots__ = ("close", "high", "low", "open", "open_time", "quote", "trades", "volume")

    def __init__(self, open_time: int, price: int) -> None:
        self.open_time = open_time
        self.open = self.high = self.low = self.close = price
        self.volume = 0  # lots
        self.quote = 0  # ticks x lots
        self.trades = 0

    def add(self, price: int, qty: int) -> None:
        if price > self.high:
            self.high = price
        if price < self.low:
            self.low = price
        self.close = price
        self.volume += qty
        self.quote += price * qty
        self.trades += 1


class CandleSeries:
    """The last KEEP bars of one symbol at one interval."""

    def __init__(self, inst: Instrument, interval: str) -> None:
        self.inst = inst
        self.interval = interval
        self.ms = INTERVALS[interval]
        self.bars: deque[Candle] = deque(maxlen=KEEP)

    def add(self, ts: int, price: int, qty: int) -> None:
        open_time = ts - ts % self.ms
        bars = self.bars
        if not bars or open_time > bars[-1].open_time:
            bar = Candle(open_time, price)
            bars.append(bar)
        elif open_time < bars[-1].open_time:
            # ts never goes back on one symbol's stream; if it did, the trade would still count in
            # its own bar (or in none, if that bar is older than the ones kept), never in a later one.
            found = next((b for b in reversed(bars) if b.open_time == open_time), None)
            if found is None:
                return
            bar = found
        else:
            bar = bars[-1]
        bar.add(price, qty)

    @property
    def last(self) -> Candle | None:
        return self.bars[-1] if self.bars else None

    def closed(self, bar: Candle, now_ms: int) -> bool:
        return bar is not self.bars[-1] or now_ms > bar.open_time + self.ms - 1

    def render(self, bar: Candle, closed: bool) -> Message:
        p, inst = self.inst.price_str, self.inst
        return {
            "type": "candle",
            "symbol": inst.symbol,
            "interval": self.interval,
            "open_time": bar.open_time,
            "close_time": bar.open_time + self.ms - 1,
            "open": p(bar.open),
            "high": p(bar.high),
            "low": p(bar.low),
            "close": p(bar.close),
            "volume": inst.qty_str(bar.volume),
            "quote_volume": inst.notional_str(bar.quote, 1),
            "trades": bar.trades,
            "closed": closed,
        }

    def snapshot(self, now_ms: int, limit: int = KEEP) -> Message:
        """The last `limit` bars, oldest first, as a candles_snapshot."""
        bars = list(self.bars)[-limit:] if limit > 0 else []
        return {
            "type": "candles_snapshot",
            "symbol": self.inst.symbol,
            "interval": self.interval,
            "candles": [self.render(b, self.closed(b, now_ms)) for b in bars],
        }


class Candles:
    """Every interval's series of one symbol."""

    def __init__(self, inst: Instrument) -> None:
        self.series = {name: CandleSeries(inst, name) for name in INTERVALS}

    def add(self, ts: int, price: int, qty: int) -> None:
        for series in self.series.values():
            series.add(ts, price, qty)
