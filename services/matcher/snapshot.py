"""Whole-engine snapshots: plain data (ints, strings, lists) that pickles and hashes the same everywhere.

A snapshot holds what decides future events: every resting order in time priority per level, the
per-symbol trade and book sequence numbers, and the last applied seq; and since version 2 what the
other order types add: the last trade price (stops trigger on it), the untriggered stops in the order
they were placed, every iceberg's display quantity and hidden reserve, and every resting GTD order's
expire_time; and since version 3, with balances on, every account's available and held amount per
asset; and since version 4 the places of those amounts' units (`asset_scales`: they follow the
instruments, so a snapshot restored under other instruments is rescaled, exactly or not at all;
version 3 amounts have the legacy scales, shared.instruments.LEGACY_FEE_PLACES). Derived structures
(heaps, id and client-id indexes, dead queue entries, stale expiry entries) are rebuilt on restore,
so they are not part of it. Version 1 snapshots still restore.
"""

from __future__ import annotations

import hashlib
import json
from heapq import heapify
from typing import Any

from services.matcher.book import O_ACCOUNT, O_CID, O_ID, O_LEAVES, O_QTY, BookSide, OrderBook
from services.matcher.engine import NEVER, Engine
from shared.commands import BUY, SELL, STOP_LIMIT, STOP_MARKET
from shared.instruments import LEGACY_FEE_PLACES, asset_scales, rescale

FORMAT_VERSION = 4
_READABLE = (1, 2, 3, 4)


def _dump_side(side: BookSide) -> list[Any]:
    return [
        [level.price, [[o[O_ID], o[O_ACCOUNT], o[O_CID], o[O_QTY], o[O_LEAVES]] for o in level.live_orders()]]
        for level in side.iter_levels()
    ]


def snapshot(engine: Engine) -> dict[str, Any]:
    snap = _books(engine)
    if engine.ledger is not None:
        snap["balances"] = engine.ledger.balances()
        snap["asset_scales"] = dict(engine.ledger.scales)
        snap["granted"] = sorted(engine.ledger.granted)
    return snap


def _books(engine: Engine) -> dict[str, Any]:
    return {
        "version": FORMAT_VERSION,
        "last_seq": engine.last_seq,
        "books": {
            symbol: {
                "trade_seq": book.trade_seq,
                "book_seq": book.book_seq,
                "bids": _dump_side(book.bids),
                "asks": _dump_side(book.asks),
                "last_price": book.last_price,
                "stops": [list(stop) for stop in book.stops.values()],
                "icebergs": sorted([oid, *ice] for oid, ice in book.icebergs.items()),
                "gtd": sorted([oid, exp] for oid, exp in book.gtd.items() if oid in book.orders),
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
    if snap.get("version") not in _READABLE:
        raise ValueError(f"unsupported snapshot version {snap.get('version')!r}")
    unknown = set(snap["books"]) - set(engine.books)
    if unknown:
        raise ValueError(f"snapshot has symbols this engine does not know: {sorted(unknown)}")
    last_seq = _count(snap["last_seq"], "last_seq")
    _restore_balances(engine, snap)
    for symbol, old in list(engine.books.items()):
        book = OrderBook(old.inst, old.market)
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
                        if engine.ledger is None:
                            order = [oid, account, cid, side.side, price, qty, leaves]
                        else:  # O_FUNDS, found at the order's first fill
                            order = [oid, account, cid, side.side, price, qty, leaves, None]
                        side.add(order)
                        book.index(order)
            _restore_extras(book, data, last_seq)
        bid, _, ask, _ = book.refresh_bbo()
        if bid is not None and ask is not None and bid >= ask:
            raise ValueError(f"snapshot {symbol} has a crossed book (bid {bid} >= ask {ask})")
        engine.books[symbol] = book
    engine.last_seq = last_seq
    engine.n_stops = sum(len(b.stops) for b in engine.books.values())
    engine.soonest = min((b.expiries[0][0] for b in engine.books.values() if b.expiries), default=NEVER)


def _restore_balances(engine: Engine, snap: dict[str, Any]) -> None:
    """Balances come back exactly, and only into an engine that keeps them: an engine with balances
    restoring a snapshot without them (or the other way round) would hold the wrong amounts."""
    ledger = engine.ledger
    data = snap.get("balances")
    if (ledger is None) != (data is None):
        with_, without = ("the snapshot", "the engine") if ledger is None else ("the engine", "the snapshot")
        raise ValueError(f"{with_} keeps balances and {without} does not (risk on vs off)")
    if ledger is None or data is None:
        return
    written = snap.get("asset_scales")
    if written is None:  # version 3
        written = asset_scales((book.inst for book in engine.books.values()), LEGACY_FEE_PLACES)
    if not isinstance(written, dict) or not all(type(v) is int and v >= 0 for v in written.values()):
        raise ValueError(f"snapshot has impossible asset scales: {written!r}")
    accounts: dict[str, dict[str, list[int]]] = {}
    for account, assets in data.items():
        for asset, bal in assets.items():
            places = ledger.scales.get(asset)
            if places is None or len(bal) != 2 or not all(type(v) is int and v >= 0 for v in bal):
                raise ValueError(f"snapshot has an impossible balance {account!r} {asset!r}: {bal!r}")
            units = [rescale(v, written.get(asset, places), places) for v in bal]
            if None in units:
                raise ValueError(f"snapshot balance {account!r} {asset!r} is finer than {places} places")
            accounts.setdefault(account, {})[asset] = units  # type: ignore[assignment]
    granted = snap.get("granted", [])
    if not all(type(a) is str for a in granted):
        raise ValueError("snapshot has an impossible faucet record")
    ledger.set_balances(accounts)
    ledger.granted = set(granted)


def _restore_extras(book: OrderBook, data: dict[str, Any], last_seq: int) -> None:
    """Stops, icebergs and GTD expiries (absent from version 1 snapshots)."""
    symbol = book.symbol
    last_price = data.get("last_price")
    if last_price is not None and (type(last_price) is not int or last_price <= 0):
        raise ValueError(f"snapshot {symbol} has a last price of {last_price!r}")
    book.last_price = last_price
    for stop in data.get("stops", []):
        oid, account, cid, side, otype, _, _, qty, stop_price, _ = stop
        if (
            type(oid) is not int
            or not 0 < oid <= last_seq
            or oid in book.orders
            or oid in book.stops
            or side not in (BUY, SELL)
            or otype not in (STOP_LIMIT, STOP_MARKET)
            or type(qty) is not int
            or type(stop_price) is not int
        ):
            raise ValueError(f"snapshot {symbol} has an impossible stop order {oid!r}")
        record = list(stop)
        book.stops[oid] = record
        if cid is not None:
            book.cids.setdefault(account, {})[cid] = record
    if list(book.stops) != sorted(book.stops):
        raise ValueError(f"snapshot {symbol} has stops out of placement order")
    for oid, display, hidden in data.get("icebergs", []):
        if oid not in book.orders or type(display) is not int or type(hidden) is not int or hidden < 0:
            raise ValueError(f"snapshot {symbol} has an impossible iceberg {oid!r}")
        book.icebergs[oid] = [display, hidden]
    for oid, expire in data.get("gtd", []):
        if oid not in book.orders or type(expire) is not int:
            raise ValueError(f"snapshot {symbol} has an impossible expiry for {oid!r}")
        book.gtd[oid] = expire
    book.expiries = [(expire, oid) for oid, expire in book.gtd.items()]
    heapify(book.expiries)


def to_bytes(snap: dict[str, Any]) -> bytes:
    """Canonical JSON. The stdlib encoder, not orjson: orjson imports datetime, which imports time,
    and the core must not even import a clock."""
    return json.dumps(snap, sort_keys=True, separators=(",", ":")).encode()


def state_hash(engine: Engine) -> str:
    """SHA-256 of the canonical snapshot: equal hashes mean equal future behaviour."""
    return hashlib.sha256(to_bytes(snapshot(engine))).hexdigest()
