"""The 24 h ticker of one symbol, from its trades. Pure: no I/O; the caller passes the time.

The window holds the trades with ts in (now - 24 h, now]. Volumes are running integer sums; the high
and the low are kept by monotonic deques, so adding a trade and expiring old ones is O(1) amortised
and nothing is ever rescanned. `last` is the newest trade's price even when it is older than 24 h.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Final

from shared.instruments import Instrument

WINDOW_MS: Final = 86_400_000

Message = dict[str, Any]


class Ticker:
    def __init__(self, inst: Instrument) -> None:
        self.inst = inst
        self.last: int | None = None  # ticks
        self._n = 0  # trades ever added: each trade's index, for the monotonic deques
        self._window: deque[tuple[int, int, int, int]] = deque()  # (index, ts, price, qty)
        self._highs: deque[tuple[int, int]] = deque()  # (index, price), prices falling
        self._lows: deque[tuple[int, int]] = deque()  # (index, price), prices rising
        self.volume = 0  # lots in the window
        self.quote = 0  # ticks x lots in the window

    def add(self, ts: int, price: int, qty: int) -> None:
        i = self._n
        self._n += 1
        self.last = price
        self._window.append((i, ts, price, qty))
        self.volume += qty
        self.quote += price * qty
        highs, lows = self._highs, self._lows
        while highs and highs[-1][1] <= price:
            highs.pop()
        highs.append((i, price))
        while lows and lows[-1][1] >= price:
            lows.pop()
        lows.append((i, price))

    def expire(self, now_ms: int) -> None:
        """Drop the trades at or before now - 24 h."""
        window, cutoff = self._window, now_ms - WINDOW_MS
        while window and window[0][1] <= cutoff:
            i, _ts, price, qty = window.popleft()
            self.volume -= qty
            self.quote -= price * qty
            if self._highs[0][0] == i:
                self._highs.popleft()
            if self._lows[0][0] == i:
                self._lows.popleft()

    def message(self, now_ms: int, bid: str | None, ask: str | None) -> Message:
        """The ticker as of now_ms (which must not go back between calls)."""
        self.expire(now_ms)
        p, inst = self.inst.price_str, self.inst
        last = None if self.last is None else p(self.last)
        if self._window:
            first = self._window[0][2]
            stats: list[str | None] = [p(first), p(self._highs[0][1]), p(self._lows[0][1])]
            assert self.last is not None
            change: str | None = p(self.last - first)
        else:
            stats, change = [None, None, None], None
        return {
            "type": "ticker",
            "symbol": inst.symbol,
            "last": last,
            "bid": bid,
            "ask": ask,
            "open_24h": stats[0],
            "high_24h": stats[1],
            "low_24h": stats[2],
            "volume_24h": inst.qty_str(self.volume),
            "quote_volume_24h": inst.notional_str(self.quote, 1),
            "change_24h": change,
            "ts": now_ms,
        }
