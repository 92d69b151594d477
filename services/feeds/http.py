"""GET /v1/... on the market-data port: the feed's state as JSON, in the WebSocket messages' shapes.

- /v1/instruments                          {"type":"instruments","instruments":[{spec}, ...]}
- /v1/book?symbol=S&depth=N                an l2_snapshot cut to N levels per side (default 10), with
                                           the checksum of the whole book's top 10; 503 while unsynced
- /v1/trades?symbol=S&limit=N              {"type":"trades","symbol","trades":[trade, ...]} oldest first
- /v1/candles?symbol=S&interval=I&limit=N  a candles_snapshot (default and most: 500 bars)
- /v1/ticker?symbol=S                      a ticker message

A bad parameter gets 400 and an unknown symbol 404, each with {"type":"error","code","reason"}.
Pure apart from the clock the caller passes: the server calls answer() from shared.wsserver's
process_request hook, on the event loop, so it reads the state between two updates, never during one.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final
from urllib.parse import parse_qs, urlsplit

import orjson

from services.feeds.candles import INTERVALS, KEEP
from services.feeds.market import KEEP_TRADES, MarketData
from services.feeds.views import BookView
from shared import codes

PREFIX: Final = "/v1/"
DEFAULT_DEPTH, MAX_DEPTH = 10, 1000
DEFAULT_TRADES = 100
NOT_FOUND: Final = "NOT_FOUND"  # an HTTP path that names nothing (not a reject code of the protocol)

Message = dict[str, Any]
Answer = tuple[int, bytes]


class _BadRequest(Exception):
    def __init__(self, status: int, code: str, reason: str) -> None:
        super().__init__(reason)
        self.status, self.code, self.reason = status, code, reason


def bbo_prices(view: BookView) -> tuple[str | None, str | None]:
    """(best bid, best ask) prices, None for an empty side or a book the feed is unsure of."""
    if not view.synced:
        return None, None
    bbo = view.bbo()
    bid, ask = bbo["bid"], bbo["ask"]
    return (None if bid is None else bid[0]), (None if ask is None else ask[0])


def ticker(md: MarketData, view: BookView, now_ms: int) -> Message:
    bid, ask = bbo_prices(view)
    return md.ticker.message(now_ms, bid, ask)


def answer(
    target: str, views: Mapping[str, BookView], market: Mapping[str, MarketData], now_ms: int
) -> Answer | None:
    """(status, JSON body) for a /v1/ request target; None for any other path."""
    url = urlsplit(target)
    if not url.path.startswith(PREFIX):
        return None
    query = {k: v[-1] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
    try:
        return 200, orjson.dumps(_route(url.path[len(PREFIX) :], query, views, market, now_ms))
    except _BadRequest as exc:
        body = {"type": "error", "code": exc.code, "reason": exc.reason}
        return exc.status, orjson.dumps(body)


def _route(
    name: str,
    query: dict[str, str],
    views: Mapping[str, BookView],
    market: Mapping[str, MarketData],
    now: int,
) -> Message:
    if name == "instruments":
        return {"type": "instruments", "instruments": [v.inst.spec() for v in views.values()]}
    if name not in ("book", "trades", "candles", "ticker"):
        raise _BadRequest(404, NOT_FOUND, f"no such endpoint {PREFIX}{name[:40]}")
    symbol = query.get("symbol")
    if not symbol:
        raise _BadRequest(400, codes.INVALID_MESSAGE, "symbol is required")
    if symbol not in views:
        raise _BadRequest(404, codes.UNKNOWN_SYMBOL, f"unknown symbol {symbol[:40]!r}")
    view, md = views[symbol], market[symbol]
    if name == "book":
        depth = _int(query, "depth", DEFAULT_DEPTH, MAX_DEPTH)
        if not view.synced:
            raise _BadRequest(503, "UNAVAILABLE", "no book snapshot from the matcher yet")
        snap = view.snapshot()
        snap["bids"], snap["asks"] = snap["bids"][:depth], snap["asks"][:depth]
        return snap
    if name == "trades":
        limit = _int(query, "limit", DEFAULT_TRADES, KEEP_TRADES)
        trades = [orjson.Fragment(t) if isinstance(t, bytes) else t for t in md.trades(limit)]
        return {"type": "trades", "symbol": symbol, "trades": trades}
    if name == "candles":
        interval = query.get("interval", "")
        if interval not in INTERVALS:
            raise _BadRequest(400, codes.INVALID_MESSAGE, f"interval must be one of {', '.join(INTERVALS)}")
        return md.candles.series[interval].snapshot(now, _int(query, "limit", KEEP, KEEP))
    return ticker(md, view, now)


def _int(query: dict[str, str], name: str, default: int, most: int) -> int:
    text = query.get(name)
    if text is None:
        return default
    # ASCII digits only (no sign, spaces, "1e3" or other scripts' digits), and short enough to parse
    if not (text.isascii() and text.isdigit() and len(text) <= 9) or not 1 <= int(text) <= most:
        raise _BadRequest(400, codes.INVALID_MESSAGE, f"{name} must be an integer from 1 to {most}")
    return int(text)
