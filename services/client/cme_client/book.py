"""`L2Book`: one symbol's price levels, kept from an l2_snapshot and the l2_updates after it.

Prices and quantities stay the exact strings the feed sent; levels are keyed by their Decimal price
so that sorting is numeric. Every update must carry the next seq (the feed's promise: seq rises by
exactly one per update per symbol, continuing from the snapshot's), must not remove a level that is
not there, must end at the BBO it announces, and must match the book checksum it carries (Kraken's
v2 CRC32 over the top 10 asks then bids); anything else raises, and the book refuses more updates
until a new snapshot arrives (`synced` is False): the caller resubscribes.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable
from decimal import Decimal
from typing import Any

from .errors import ProtocolError, SequenceGap

Message = dict[str, Any]
Level = list[str]  # [price, quantity], as on the wire
Levels = list[Level]


class L2Book:
    """A local L2 book. `apply` takes any message and ignores what is not this symbol's l2."""

    def __init__(self, symbol_or_snapshot: str | Message) -> None:
        snapshot = symbol_or_snapshot if isinstance(symbol_or_snapshot, dict) else None
        self.symbol: str = snapshot["symbol"] if snapshot is not None else str(symbol_or_snapshot)
        self.seq: int | None = None  # of the last snapshot or update applied
        self.synced = False  # a snapshot was applied and every update since followed on
        self.bids: dict[Decimal, Level] = {}
        self.asks: dict[Decimal, Level] = {}
        if snapshot is not None:
            self.reset(snapshot)

    def reset(self, snapshot: Message) -> None:
        """Replace the book with an l2_snapshot of this symbol."""
        if snapshot.get("type") != "l2_snapshot" or snapshot.get("symbol") != self.symbol:
            raise ProtocolError(f"not an l2_snapshot of {self.symbol}: {snapshot}")
        self.seq = int(snapshot["seq"])
        self.bids = {Decimal(p): [p, q] for p, q in snapshot["bids"]}
        self.asks = {Decimal(p): [p, q] for p, q in snapshot["asks"]}
        self.synced = True
        self._check(snapshot)

    def apply(self, msg: Message) -> bool:
        """Apply an l2_snapshot or l2_update of this symbol; True if the book changed. Raises
        SequenceGap or ProtocolError (and stops being `synced`) on an update that does not fit."""
        if msg.get("symbol") != self.symbol:
            return False
        kind = msg.get("type")
        if kind == "l2_snapshot":
            self.reset(msg)
            return True
        if kind != "l2_update":
            return False
        if not self.synced or self.seq is None:
            raise SequenceGap(f"{self.symbol}: an l2_update while the book waits for a snapshot")
        seq = int(msg["seq"])
        if seq != self.seq + 1:
            self.synced = False
            raise SequenceGap(f"{self.symbol}: l2 seq {self.seq} -> {seq}")
        for side, price, qty in msg["changes"]:
            levels = self.bids if side == "buy" else self.asks
            key = Decimal(price)
            if Decimal(qty) == 0:
                if levels.pop(key, None) is None:
                    self.synced = False
                    raise ProtocolError(f"{self.symbol} seq {seq}: removes {side} {price}, not in the book")
            else:
                levels[key] = [price, qty]
        self.seq = seq
        bbo = msg.get("bbo")
        if bbo is not None and (bbo.get("bid") != self.best("buy") or bbo.get("ask") != self.best("sell")):
            self.synced = False
            raise ProtocolError(f"{self.symbol} seq {seq}: bbo {bbo} but the book has {self.bbo()}")
        self._check(msg)
        return True

    def checksum(self) -> int:
        """Kraken's WebSocket v2 book checksum of this book: CRC32 over the top 10 asks then the top 10
        bids, each level as its price then its quantity, decimal point and leading zeros removed."""
        bids, asks = self.levels(10)
        text = "".join(_digits(p) + _digits(q) for p, q in (*asks, *bids))
        return zlib.crc32(text.encode())

    def _check(self, msg: Message) -> None:
        expected = msg.get("checksum")
        if expected is not None and expected != self.checksum():
            self.synced = False
            raise ProtocolError(
                f"{self.symbol} seq {msg.get('seq')}: checksum {expected}, book {self.checksum()}"
            )

    def apply_all(self, messages: Iterable[Message]) -> None:
        for m in messages:
            self.apply(m)

    def best(self, side: str) -> Level | None:
        """The best bid ("buy") or ask ("sell") as [price, quantity], or None for an empty side."""
        levels = self.bids if side == "buy" else self.asks
        if not levels:
            return None
        return levels[max(levels) if side == "buy" else min(levels)]

    def bbo(self) -> dict[str, Level | None]:
        return {"bid": self.best("buy"), "ask": self.best("sell")}

    def levels(self, depth: int | None = None) -> tuple[Levels, Levels]:
        """(bids best first, asks best first), each level [price, quantity] as on the wire."""
        bids = [self.bids[p] for p in sorted(self.bids, reverse=True)[:depth]]
        asks = [self.asks[p] for p in sorted(self.asks)[:depth]]
        return bids, asks

    def __repr__(self) -> str:
        bids, asks = self.levels(3)
        return f"L2Book({self.symbol} seq {self.seq}: bids {bids} asks {asks})"


def _digits(value: str) -> str:
    return value.replace(".", "").lstrip("0")
