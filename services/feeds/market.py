"""One symbol's trade-built market data on a feed: candles, the 24 h ticker and the recent trades.

Every process builds the same state: on start (and after any loss of the pub/sub connection or a gap
in trade ids) it reads the matcher's durable events stream (shared.keys.events) from where it last
read, and takes live trades from the trades channel meanwhile only into a holding list; when the
stream is read to its end, the held trades follow. Each trade counts once: trade_id rises by one per
symbol, so a trade at or below the last one counted is already in.
"""

from __future__ import annotations

import logging
from collections import deque
from typing import Any, Final, cast

import redis.asyncio as aioredis

from services.feeds.candles import Candles
from services.feeds.ticker import Ticker
from shared import events as ev
from shared import keys
from shared.instruments import Instrument
from shared.stream import decode_events
from shared.wire import trade_message

log = logging.getLogger("cme.feeds.market")

KEEP_TRADES: Final = 1000  # recent trades per symbol, for /v1/trades
READ_CHUNK: Final = 500  # events stream entries (matcher batches) per XRANGE

Message = dict[str, Any]
Held = tuple[int, int, int, int, bytes]  # trade_id, ts, price ticks, qty lots, the wire line


class MarketData:
    def __init__(self, inst: Instrument, keep_trades: int = KEEP_TRADES) -> None:
        self.inst = inst
        self.symbol = inst.symbol
        self.candles = Candles(inst)
        self.ticker = Ticker(inst)
        # The wire line of a live trade, or the core event of one read from the stream (rendered
        # only when asked for: a rebuild may read millions of trades and keep only the last few).
        self.recent: deque[bytes | list[Any]] = deque(maxlen=keep_trades)
        self.last_trade_id = 0
        self.stream_pos = "-"  # where the next read of the events stream starts (XRANGE start)
        self.catching_up = True  # until the events stream has been read: live trades are held
        self._held: list[Held] = []

    def _add(self, trade_id: int, ts: int, price: int, qty: int, wire: bytes | list[Any]) -> None:
        if trade_id <= self.last_trade_id:
            return
        self.last_trade_id = trade_id
        self.candles.add(ts, price, qty)
        self.ticker.add(ts, price, qty)
        self.recent.append(wire)

    def live(self, msg: Message, line: bytes) -> bool:
        """A trade from the trades channel. True when it shows trades were missed: the caller then
        reads the events stream (catch_up) and the trade waits for it."""
        trade_id = msg["trade_id"]
        if trade_id <= self.last_trade_id:
            return False
        held: Held = (
            trade_id,
            int(msg["ts"]),
            self.inst.price_to_ticks(msg["price"]),
            self.inst.qty_to_lots(msg["quantity"]),
            line,
        )
        if self.catching_up:
            self._held.append(held)
            return False
        if self.last_trade_id and trade_id != self.last_trade_id + 1:
            log.warning("%s: trades %d..%d missed live; reading them from the events stream",
                        self.symbol, self.last_trade_id + 1, trade_id - 1)  # fmt: skip
            self.catching_up = True
            self._held.append(held)
            return True
        self._add(*held)
        return False

    def replay(self, entries: list[tuple[bytes, dict[bytes, bytes]]]) -> None:
        """Entries of the events stream, in order: count their trades, remember where we are."""
        for entry_id, fields in entries:
            for _cmd_id, events in decode_events(fields[b"d"]):
                for e in events:
                    if e[0] == ev.TRADE:
                        self._add(e[ev.T_TRADE_ID], e[ev.T_TS], e[ev.T_PRICE], e[ev.T_QTY], e)
            self.stream_pos = "(" + entry_id.decode()

    def caught_up(self, force: bool = False) -> bool:
        """The events stream was read to its end: the held trades not in it follow, unless the first
        of them does not follow on from the last one read (it was read before the missing trades
        were committed: read it again) and not `force`. True when done."""
        fresh = [t for t in self._held if t[0] > self.last_trade_id]
        if fresh and fresh[0][0] != self.last_trade_id + 1 and self.last_trade_id and not force:
            return False
        self._held = []
        for trade in fresh:
            self._add(*trade)
        self.catching_up = False
        return True

    def trades(self, limit: int) -> list[Message | bytes]:
        """The last `limit` trades, oldest first: wire lines as they are, stream events rendered."""
        picked = list(self.recent)[-limit:] if limit > 0 else []
        return [w if isinstance(w, bytes) else trade_message(tuple(w), self.inst) for w in picked]


async def catch_up(redis: aioredis.Redis, md: MarketData) -> None:
    """Read the symbol's events stream from md.stream_pos to its end, then release the held trades.
    Live trades are held meanwhile (md.catching_up); the caller then calls md.caught_up()."""
    stream = keys.events(md.symbol)
    while True:
        reply = await redis.xrange(stream, min=md.stream_pos, max="+", count=READ_CHUNK)
        entries = cast(list[tuple[bytes, dict[bytes, bytes]]], reply)
        md.replay(entries)
        if len(entries) < READ_CHUNK:
            return
