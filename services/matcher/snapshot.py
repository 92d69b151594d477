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


def restore(engine: Engine, snap: dict[str, Any]) -> None:
    """Replace the engine's state with a snapshot (instruments stay the engine's own)."""
    if snap.get("version") != FORMAT_VERSION:
        raise ValueError(f"unsupported snapshot version {snap.get('version')!r}")
    unknown = set(snap["books"]) - set(engine.books)
    if unknown:
        raise ValueError(f"snapshot has symbols this engine does not know: {sorted(unknown)}")
    for symbol, old in list(engine.books.items()):
        book = OrderBook(old.inst)
        data = snap["books"].get(symbol)
        if data is not None:
            book.trade_seq = data["trade_seq"]
            book.book_seq = data["book_seq"]
            for side, levels in ((book.bids, data["bids"]), (book.asks, data["asks"])):
                for price, orders in levels:
                    for oid, account, cid, qty, leaves in orders:
                        order = [oid, account, cid, side.side, price, qty, leaves]
                        side.add(order)
                        book.index(order)
        book.refresh_bbo()
        engine.books[symbol] = book
    engine.last_seq = snap["last_seq"]


def to_bytes(snap: dict[str, Any]) -> bytes:
    """Canonical JSON. The stdlib encoder, not orjson: orjson imports datetime, which imports time,
    and the core must not even import a clock."""
    return json.dumps(snap, sort_keys=True, separators=(",", ":")).encode()


def state_hash(engine: Engine) -> str:
    """SHA-256 of the canonical snapshot: equal hashes mean equal future behaviour."""
    return hashlib.sha256(to_bytes(snapshot(engine))).hexdigest()
