"""The seed's dialect on the feeds (docs/protocol.md, "The seed's dialect").

The seed system's client connects to the market-data and trade ports and never subscribes. So a
connection that sends nothing for SILENCE seconds is taken for it and gets, for the seed symbol:

- on the market-data port, `{"type":"L2_UPDATE","timestamp","symbol","bids":[{"price","quantity"},..],
  "asks":[..]}`, the top DEPTH levels per side, at once and then after book changes, at most one per
  INTERVAL (conflated like the depth channel, on its own timer);
- on the trade port, one `{"type":"TRADE_REPORT","trades":[..]}` per command that traded: the trades of
  one published batch that share a taker order id, in order (a command's trades are always published
  together); the first carries "engine_latency_ns" (the matcher's gateway-receive-to-publish time).

A connection that sends anything first is a client of this protocol and never gets these; one that
speaks after its seed messages began stops getting them. Prices, quantities and fees are JSON numbers
written from the exact decimal strings the matcher rendered (`104.00`, `4.16`): never through a float.
The rendering functions are pure; SeedFeed does the timing on the feed's event loop.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Final

import orjson

from services.feeds.fanout import SEED_L2, SEED_TRADES, Client, Fanout
from services.feeds.views import BookView
from shared.wsserver import frames, text_frame

log = logging.getLogger("cme.feeds.seed")

DEFAULT_SYMBOL: Final = "BTC-USDT"  # as the gateway's seed path (services.gateway.seed); cme passes both
SILENCE: Final = 0.5  # seconds without a client message that make a connection a seed client
INTERVAL: Final = 0.1  # at most one L2_UPDATE per this many seconds
DEPTH: Final = 10  # levels per side in an L2_UPDATE
_DECIMAL: Final = re.compile(r"-?[0-9]+(?:\.[0-9]+)?")  # a decimal string is also a JSON number's text


def number(text: object) -> orjson.Fragment:
    """A decimal string as the JSON number with exactly its digits (ValueError if it is none)."""
    if type(text) is not str or _DECIMAL.fullmatch(text) is None:
        raise ValueError(f"not a decimal string: {text!r}")
    return orjson.Fragment(text)


def render_l2(view: BookView, timestamp: float) -> bytes:
    """The view's top DEPTH levels as one L2_UPDATE; timestamp in seconds since the epoch."""
    book = view.depth(DEPTH)

    def levels(rows: list[list[str]]) -> list[dict[str, orjson.Fragment]]:
        return [{"price": number(price), "quantity": number(qty)} for price, qty in rows]

    return orjson.dumps(
        {
            "type": "L2_UPDATE",
            "timestamp": timestamp,
            "symbol": view.symbol,
            "bids": levels(book["bids"]),
            "asks": levels(book["asks"]),
        }
    )


def _seed_trade(t: Mapping[str, Any], first: bool) -> dict[str, Any]:
    out: dict[str, Any] = {
        "timestamp": t["ts"] / 1000,  # the command's time (ms): seconds, as the seed wrote them
        "symbol": t["symbol"],
        "trade_id": t["trade_id"],
        "price": number(t["price"]),
        "quantity": number(t["quantity"]),
        "aggressor_side": t["aggressor_side"].upper(),
        "maker_order_id": t["maker_order_id"],
        "taker_order_id": t["taker_order_id"],
        "maker_fee": number(t["maker_fee"]),
        "taker_fee": number(t["taker_fee"]),
    }
    if first:
        latency_us = t.get("latency_us")
        out["engine_latency_ns"] = latency_us * 1000 if type(latency_us) is int else 0
    return out


def trade_reports(lines: Iterable[bytes]) -> list[bytes]:
    """The TRADE_REPORT messages of one published batch of trade lines (the protocol's "trade"
    messages), one per run of consecutive trades with the same taker order id. An unreadable line
    is logged and left out."""
    groups: list[list[dict[str, Any]]] = []
    taker: object = None
    for line in lines:
        try:
            trade = orjson.loads(line)
            item = _seed_trade(trade, first=not groups or trade["taker_order_id"] != taker)
        except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError, ValueError) as exc:
            log.error("trade line not rendered for the seed (%s): %r", exc, line[:200])
            continue
        if "engine_latency_ns" in item:
            groups.append([item])
            taker = trade["taker_order_id"]
        else:
            groups[-1].append(item)
    return [orjson.dumps({"type": "TRADE_REPORT", "trades": group}) for group in groups]


class SeedFeed:
    """Which connections are seed clients, and what they are sent. Hooks for the feed server:
    connected / heard / gone per connection, book_changed / trades per symbol, and run()."""

    def __init__(
        self,
        fanout: Fanout,
        views: Mapping[str, BookView],
        symbol: str | None,
        channels: Mapping[str, str],
        *,
        silence: float = SILENCE,
        interval: float = INTERVAL,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """symbol: None turns the seed's dialect off; channels: the seed channel of each server
        (md -> SEED_L2, trades -> SEED_TRADES)."""
        self.fanout, self.symbol, self.channels = fanout, symbol or "", channels
        self.view = views.get(symbol) if symbol is not None else None
        if symbol is not None and self.view is None:
            log.warning("seed symbol %s is not an instrument: the seed's feed messages are off", symbol)
        self.silence, self.interval, self.clock = silence, interval, clock
        self._timers: dict[Client, asyncio.TimerHandle] = {}
        self._owed: set[Client] = set()  # L2 seed clients still owed their first L2_UPDATE
        self._changed = False  # the book changed since the last L2_UPDATE
        self._pub_ns = 0  # publish clock of the newest md payload that changed it

    # Connections --------------------------------------------------------------------------------
    def connected(self, client: Client) -> None:
        if self.view is not None:
            loop = asyncio.get_running_loop()
            self._timers[client] = loop.call_later(self.silence, self._silent, client)

    def heard(self, client: Client) -> None:
        """The client sent a message: it speaks this protocol, so no (more) seed messages."""
        timer = self._timers.pop(client, None)
        if timer is not None:
            timer.cancel()
        channel = self.channels.get(client.server)
        if channel is not None and (channel, self.symbol) in client.subs:
            self.fanout.unsubscribe(client, channel, self.symbol)
            self._owed.discard(client)

    def gone(self, client: Client) -> None:
        timer = self._timers.pop(client, None)
        if timer is not None:
            timer.cancel()
        self._owed.discard(client)

    def _silent(self, client: Client) -> None:
        self._timers.pop(client, None)
        channel = self.channels.get(client.server)
        if client.dropped or client.subs or channel is None:
            return
        # A subscription like any other: the fanout's idle timer treats it so and stops.
        self.fanout.subscribe(client, channel, self.symbol)
        if channel == SEED_L2:
            self._owed.add(client)

    # Feed data ----------------------------------------------------------------------------------
    def book_changed(self, symbol: str, pub_ns: int) -> None:
        if symbol == self.symbol:
            self._changed = True
            self._pub_ns = pub_ns

    def trades(self, symbol: str, lines: list[bytes], pub_ns: int) -> None:
        """New trade lines of one published batch (duplicates already dropped)."""
        if symbol != self.symbol or not self.fanout.subscribers(SEED_TRADES, symbol):
            return
        reports = trade_reports(lines)
        if reports:
            self.fanout.publish(SEED_TRADES, symbol, frames(reports), len(reports), pub_ns)

    async def run(self) -> None:
        """The L2_UPDATE timer: a plain sleep between rounds, as the depth channel's (no bursts)."""
        while True:
            await asyncio.sleep(self.interval)
            self.send_l2()

    def send_l2(self) -> None:
        view = self.view
        if view is None:
            return
        subs = self.fanout.subscribers(SEED_L2, self.symbol)
        self._owed.intersection_update(subs)
        if not view.synced:
            return  # never a book the feed is unsure of: the owed wait for the resync
        if self._changed:
            targets: Iterable[Client] = list(subs)
        else:
            targets = list(self._owed)
        self._changed = False
        self._owed.clear()
        if not targets:
            return
        blob = text_frame(render_l2(view, self.clock()))
        for client in targets:
            self.fanout.send(client, blob, 1, SEED_L2, self._pub_ns)
