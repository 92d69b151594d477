"""Whole-engine snapshots: plain data (ints, strings, lists) that pickles and hashes the same everywhere.

A snapshot holds what decides future events: every resting order in time priority per level, the
per-symbol trade and book sequence numbers, and the last applied seq. Derived structures (heaps,
id and client-id indexes, dead queue entries) are rebuilt on restore, so they are not part of it.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from services.matcher.book import O_ACCOUNT, O_CID, O_ID, O_LEAVES, O_QTY, BookSide, OrderBook
from services.matcher.engine import Engine

FORMAT_VERSION = 1


def _dump_side(side: BookSide) -> list[Any]:
    return [
        [level.price, [[o[O_ID], o[O_ACCOUNT], o[O_CID], o[O_QTY], o[O_LEAVES]] for o in level.live_orders()]]
        for level in side.iter_levels()
    ]


def snapshot(engine: Engine) -> dict[str, Any]:
    return {
        "version": FORMAT_VERSION,
        "last_seq": engine.last_seq,
        "books": {
            symbol: {
                "trade_seq": book.trade_seq,
                "book_seq": book.book_seq,
                "bids": _dump_side(book.bids),
                "asks": _dump_side(book.asks),
            }
            for symbol, book in engine.books.items()
        },
    }


def _count(value: Any, what: str) -> int:
    if type(value) is not int or value < 0:
        raise ValueError(f"snapshot {what} is {value!r}")
    return value


def restore(engine: Engine, snap: dict[str, Any]) -> None:
    """Replace the engine's state with a snapshot (instruments stay the engine's own).

    Raises ValueError (or KeyError, TypeError on a malformed one) for a snapshot this engine cannot use,
    including the inconsistencies that cost no more than the restore itself: a resting order twice, one
    with nothing left or newer than the last applied seq, a crossed book. The engine is then left half
    restored: restore into a fresh one."""
    if snap.get("version") != FORMAT_VERSION:
        raise ValueError(f"unsupported snapshot version {snap.get('version')!r}")
    unknown = set(snap["books"]) - set(engine.books)
    if unknown:
        raise ValueError(f"snapshot has symbols this engine does not know: {sorted(unknown)}")
    last_seq = _count(snap["last_seq"], "last_seq")
    for symbol, old in list(engine.books.items()):
        book = OrderBook(old.inst)
        data = snap["books"].get(symbol)
        if data is not None:
            book.trade_seq = _count(data["trade_seq"], f"{symbol} trade_seq")
            book.book_seq = _count(data["book_seq"], f"{symbol} book_seq")
            for side, levels in ((book.bids, data["bids"]), (book.asks, data["asks"])):
                for price, orders in levels:
                    if type(price) is not int or price <= 0:
                        raise ValueError(f"snapshot {symbol} has a level at {price!r}")
                    for oid, account, cid, qty, leaves in orders:
                        if (
                            type(oid) is not int
                            or not 0 < oid <= last_seq
                            or oid in book.orders
                            or type(qty) is not int
                            or type(leaves) is not int
                            or not 0 < leaves <= qty
                        ):
                            raise ValueError(f"snapshot {symbol} has an impossible resting order {oid!r}")
                        order = [oid, account, cid, side.side, price, qty, leaves]
                        side.add(order)
                        book.index(order)
        bid, _, ask, _ = book.refresh_bbo()
        if bid is not None and ask is not None and bid >= ask:
            raise ValueError(f"snapshot {symbol} has a crossed book (bid {bid} >= ask {ask})")
        engine.books[symbol] = book
    engine.last_seq = last_seq


def to_bytes(snap: dict[str, Any]) -> bytes:
    """Canonical JSON. The stdlib encoder, not orjson: orjson imports datetime, which imports time,
    and the core must not even import a clock."""
    return json.dumps(snap, sort_keys=True, separators=(",", ":")).encode()


def state_hash(engine: Engine) -> str:
    """SHA-256 of the canonical snapshot: equal hashes mean equal future behaviour."""
    return hashlib.sha256(to_bytes(snapshot(engine))).hexdigest()
