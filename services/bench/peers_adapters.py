"""One adapter per engine of `cme bench peers`: the neutral ops of services.bench.peers_flow in, fills out.

An adapter's handle(op) does everything a client of that engine does for one op: build the engine's
request, call it, and read the fills it reports (counted: trades and traded lots, the volume check of
the bench). All of it is timed. An order type an engine lacks is emulated the way its user would, and
that cost is timed too:
  IOC     a GTC limit, then a cancel of whatever rested
  FOK     fillable volume checked first from the engine's own book, then submitted or skipped
  MARKET  the engine's market order; a remainder it lets rest is cancelled

Peers are imported inside their factories: a worker process only loads the engine it measures.
Their quirks (why an adapter looks the way it does) are in docs/core.md, "Comparing with other engines".
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from services.bench.peers_flow import CANCEL, LIMIT_GTC, LIMIT_IOC, MARKET, Op
from services.bench.peers_ref import BUY, SELL, SeedBook, TightBook


@dataclass(slots=True)  # slots: its counters are bumped on the timed path
class Counts:
    trades: int = 0
    volume: int = 0  # lots
    errors: int = 0  # cancels of an unknown order, rejects: none on this flow for a correct engine


@dataclass
class Adapter:
    handle: Callable[[Op], None]
    counts: Counts
    close: Callable[[], None] = lambda: None
    keep: list[Any] = field(default_factory=list)  # objects a C++ engine points at without a reference


def seed() -> Adapter:
    return _reference(SeedBook(), lambda trades: int(sum(t.quantity for t in trades)))


def tight() -> Adapter:
    return _reference(TightBook(), lambda trades: sum(t[3] for t in trades))


def _reference(book: SeedBook | TightBook, volume: Callable[[Any], int]) -> Adapter:
    """One of the two reference books (services.bench.peers_ref); they report trades differently,
    so `volume` sums a result's lots."""
    limit, market, cancel = book.limit, book.market, book.cancel
    c = Counts()

    def handle(op: Op) -> None:
        k = op[0]
        if k == CANCEL:
            if not cancel(op[1]):
                c.errors += 1
            return
        trades = market(op[1], op[2], op[4]) if k == MARKET else limit(op[1], op[2], op[3], op[4], k)
        if trades:
            c.trades += len(trades)
            c.volume += volume(trades)

    return Adapter(handle, c)


def cme_core() -> Adapter:
    """The project's Engine.apply, driven as the matcher drives it: one command per op, a rising seq,
    every event read. Buys come from two accounts and sells from two others, so self-trade prevention
    never fires and the trades must equal the references'. Every order has a client order id, as real
    clients send. Which build runs (compiled or pure) is the worker's environment's choice."""
    from services.matcher.engine import Engine
    from shared.commands import BUY as C_BUY
    from shared.commands import FOK, GTC, IOC, LIMIT, Cancel, NewOrder
    from shared.commands import MARKET as C_MARKET
    from shared.commands import SELL as C_SELL
    from shared.events import REJECTED, TRADE
    from shared.instruments import Instrument

    symbol = "BTC-USDT"
    # The flow's orders are ~10,000 ticks x 1..100 lots, below the default minimum notional: lower it so
    # no order is rejected; the rest is the default instrument.
    engine = Engine([Instrument(symbol, min_notional=Decimal("0.0000001"))])
    apply = engine.apply
    sides = (C_BUY, C_SELL)
    type_tif = ((LIMIT, GTC), (LIMIT, IOC), (LIMIT, FOK), (C_MARKET, IOC))  # by kind
    accounts = ("acct000", "acct001", "acct002", "acct003")
    ids: dict[int, int] = {}  # flow oid -> engine order id (the seq of its NewOrder)
    c = Counts()
    seq = 0

    def handle(op: Op) -> None:
        nonlocal seq
        seq += 1
        k, oid = op[0], op[1]
        account = accounts[(op[2] << 1) | (oid & 1)]
        if k == CANCEL:
            events = apply(Cancel(symbol, account, ids.pop(oid, None)), seq, seq)
        else:
            otype, tif = type_tif[k]
            price = None if k == MARKET else op[3]
            events = apply(
                NewOrder(symbol, account, sides[op[2]], otype, tif, price, op[4], f"c{oid}"), seq, seq
            )
            if k == LIMIT_GTC:
                ids[oid] = seq
        for ev in events:
            kind = ev[0]
            if kind is TRADE:
                c.trades += 1
                c.volume += ev[4]
            elif kind is REJECTED:
                c.errors += 1

    return Adapter(handle, c)


def liquibook() -> Adapter:
    """C++ LiquiBook through SWIG; fills arrive in a Python OrderListener. The C++ book holds raw
    pointers to the listener and to every resting order: both must stay referenced from Python (a
    collected listener segfaults at the next fill). A price-0 order is a market order; it is sent IOC
    because without it LiquiBook rests the remainder, which then lifts any later ask."""
    import liquibook as lb

    book = lb.DepthOrderBook()
    book.set_symbol("X")
    c = Counts()

    class Fills(lb.OrderListener):  # type: ignore[misc]
        def on_fill(self, order: Any, matched_order: Any, fill_qty: int, fill_cost: int) -> None:
            c.trades += 1
            c.volume += fill_qty

        def on_accept(self, order: Any) -> None:
            pass

        def on_reject(self, order: Any, reason: str) -> None:
            c.errors += 1

        def on_cancel(self, order: Any) -> None:
            pass

        def on_cancel_reject(self, order: Any, reason: str) -> None:
            c.errors += 1

        def on_replace(self, order: Any, size_delta: int, new_price: int) -> None:
            pass

        def on_replace_reject(self, order: Any, reason: str) -> None:
            pass

    listener = Fills()
    book.set_order_listener(listener)
    simple_order, add, cancel = lb.SimpleOrder, book.add, book.cancel
    ioc, fok = lb.oc_immediate_or_cancel, lb.oc_fill_or_kill
    resting: dict[int, Any] = {}

    def handle(op: Op) -> None:
        k = op[0]
        if k == LIMIT_GTC:
            o = simple_order(op[2] == BUY, op[3], op[4])
            resting[op[1]] = o
            add(o, 0)
        elif k == CANCEL:
            o = resting.pop(op[1], None)
            if o is None:
                c.errors += 1
            else:
                cancel(o)
        elif k == MARKET:
            add(simple_order(op[2] == BUY, 0, op[4], 0, ioc), ioc)
        elif k == LIMIT_IOC:
            add(simple_order(op[2] == BUY, op[3], op[4], 0, ioc), ioc)
        else:
            add(simple_order(op[2] == BUY, op[3], op[4], 0, fok), fok)

    return Adapter(handle, c, keep=[book, listener, resting])


def orderly_chaos() -> Adapter:
    """C++ core through ctypes, fills from its on_trade callback. No IOC limit (a limit, then a cancel
    of the rest) and no FOK (fillable volume from depth(), four levels at first and more if needed)."""
    from orderly_chaos import LimitOrderBook, Side
    from orderly_chaos.errors import UnknownOrderIdError

    c = Counts()

    def on_trade(t: Any) -> None:
        c.trades += 1
        c.volume += t.quantity

    book = LimitOrderBook(on_trade=on_trade)
    limit, market, cancel, depth = book.limit, book.market, book.cancel, book.depth
    sides = (Side.BUY, Side.SELL)

    def fillable(side: int, price: int, qty: int) -> bool:
        want = 4
        while True:
            avail, levels = 0, depth(sides[1 - side], want)
            for lv in levels:
                if (side == BUY and lv.price > price) or (side == SELL and lv.price < price):
                    return False
                avail += lv.volume
                if avail >= qty:
                    return True
            if len(levels) < want:
                return False
            want *= 4

    def handle(op: Op) -> None:
        k = op[0]
        if k == LIMIT_GTC:
            limit(sides[op[2]], op[1], op[4], op[3])
        elif k == CANCEL:
            try:
                cancel(op[1])
            except UnknownOrderIdError:
                c.errors += 1
        elif k == MARKET:
            market(sides[op[2]], op[1], op[4])
        elif k == LIMIT_IOC:
            if limit(sides[op[2]], op[1], op[4], op[3]) < op[4]:
                cancel(op[1])
        elif fillable(op[2], op[3], op[4]):
            limit(sides[op[2]], op[1], op[4], op[3])

    return Adapter(handle, c, close=book.close)


def lightmatchingengine() -> Adapter:
    """Pure Python, float prices, its own order ids. Each match reports one aggregated trade for the taker
    per level plus one per maker: the makers' are counted. A MARKET (price 0) or IOC remainder rests in
    this engine (a resting sell at 0 would then fill any buy at 0), so it is cancelled. No FOK: fillable
    volume is summed from the engine's book first."""
    from lightmatchingengine.lightmatchingengine import LightMatchingEngine, Side

    engine = LightMatchingEngine()
    add_order, cancel_order = engine.add_order, engine.cancel_order
    sides = (Side.BUY, Side.SELL)
    ids: dict[int, int] = {}  # flow oid -> engine order id
    c = Counts()
    inst = "X"

    def count(order: Any, trades: list[Any]) -> None:
        me = order.order_id
        for t in trades:
            if t.order_id != me:
                c.trades += 1
                c.volume += int(t.trade_qty)

    def fillable(side: int, price: float, qty: float) -> bool:
        book = engine.order_books.get(inst)
        if book is None:
            return False
        avail = 0.0
        if side == BUY:
            for p in sorted(book.asks):
                if p > price:
                    return False
                avail += sum(o.leaves_qty for o in book.asks[p])
                if avail >= qty:
                    return True
        else:
            for p in sorted(book.bids, reverse=True):
                if p < price:
                    return False
                avail += sum(o.leaves_qty for o in book.bids[p])
                if avail >= qty:
                    return True
        return False

    def handle(op: Op) -> None:
        k = op[0]
        if k == LIMIT_GTC:
            order, trades = add_order(inst, float(op[3]), float(op[4]), sides[op[2]])
            if trades:
                count(order, trades)
            if order.leaves_qty > 0:
                ids[op[1]] = order.order_id
        elif k == CANCEL:
            eid = ids.pop(op[1], None)
            try:
                if eid is None or cancel_order(eid, inst) is None:
                    c.errors += 1
            except AssertionError:  # what it raises for an order it has filled meanwhile
                c.errors += 1
        elif k in (MARKET, LIMIT_IOC):
            order, trades = add_order(inst, 0.0 if k == MARKET else float(op[3]), float(op[4]), sides[op[2]])
            if trades:
                count(order, trades)
            if order.leaves_qty > 0:
                cancel_order(order.order_id, inst)
        elif fillable(op[2], float(op[3]), float(op[4])):
            order, trades = add_order(inst, float(op[3]), float(op[4]), sides[op[2]])
            if trades:
                count(order, trades)

    return Adapter(handle, c)
