"""Every order type through the real pipeline: WebSocket client -> gateway process -> Redis stream ->
matcher process -> Redis pub/sub -> gateway (execution reports) and feeds processes (l2, trades).

One stack serves the module; each test takes a symbol of its own (same spec as the defaults: tick
0.01, lot 0.00001, maker 0.0010, taker 0.0020), so it starts from an empty book and trade id 1.
Expected trades, fees and reports are written out by hand, fees computed here with decimal.Decimal;
at the end of each test `settle` also checks everything every client saw against a fresh Engine
replaying the symbol's orders stream.
"""

from __future__ import annotations

import asyncio
import random
import zlib
from collections.abc import AsyncIterator
from decimal import Decimal
from typing import Any

import pytest
from cme_client import Connection, Message, gateway_session, is_type, subscribe

from tests.e2e.client import WireFlow, place
from tests.e2e.conftest import Stack, SymbolPool, current_book, settle, without_latency

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(60)]

MAKER_RATE, TAKER_RATE = Decimal("0.0010"), Decimal("0.0020")


def fee(price: str, qty: str, rate: Decimal) -> str:
    """price x quantity x rate, exact: every significant digit and at least the price's 2 decimals."""
    text = format((Decimal(price) * Decimal(qty) * rate).normalize(), "f")
    whole, _, frac = text.partition(".")
    return f"{whole}.{frac.ljust(2, '0')}"


def test_fee_helper() -> None:
    assert fee("30000.00", "0.50000", MAKER_RATE) == "15.00"
    assert fee("30001.00", "0.70000", TAKER_RATE) == "42.0014"
    assert fee("0.01", "0.00001", MAKER_RATE) == "0.0000000001"


def ms(order_id: str) -> int:
    return int(order_id.split("-")[0])


def limit(symbol: str, side: str, price: str, qty: str, cid: str, **extra: Any) -> Message:
    return {"op": "new", "symbol": symbol, "side": side, "type": "limit", "price": price, "quantity": qty,
            "client_order_id": cid, **extra}  # fmt: skip


def market(symbol: str, side: str, qty: str, cid: str, **extra: Any) -> Message:
    return {"op": "new", "symbol": symbol, "side": side, "type": "market", "quantity": qty,
            "client_order_id": cid, **extra}  # fmt: skip


def report(
    order_id: str,
    cid: str | None,
    symbol: str,
    side: str,
    status: str,
    exec_type: str,
    price: str | None,
    quantity: str,
    filled: str,
    remaining: str,
    ts: int,
    *,
    last: tuple[str, str] | None = None,
    fee: str = "0.00",
    liquidity: str | None = None,
    trade_id: int | None = None,
    reason: str | None = None,
) -> Message:
    """The execution report the protocol promises (docs/protocol.md), every field."""
    msg: Message = {
        "type": "execution", "order_id": order_id, "client_order_id": cid, "symbol": symbol, "side": side,
        "status": status, "exec_type": exec_type, "price": price, "quantity": quantity,
        "filled_quantity": filled, "remaining_quantity": remaining,
        "last_price": last[0] if last else None, "last_quantity": last[1] if last else None,
        "fee": fee, "liquidity": liquidity, "trade_id": trade_id, "ts": ts,
    }  # fmt: skip
    if reason is not None:
        msg["reason"] = reason
    return msg


def bare(msg: Message) -> Message:
    """A report without its exec_id (the order of every report of a symbol: `settle` checks those
    against the replay), after checking that it has one."""
    assert type(msg.get("exec_id")) is int and msg["exec_id"] > 0, msg
    return {k: v for k, v in msg.items() if k != "exec_id"}


async def rest(conn: Connection, msg: Message) -> str:
    """Place a limit order that must rest: its ack, then its "new" report. Returns the order id."""
    ack = await place(conn, msg)
    assert ack["type"] == "ack" and ack["op"] == "new", ack
    oid: str = ack["order_id"]
    new = await conn.wait_for(is_type("execution", order_id=oid, exec_type="new"))
    assert new["status"] == "new", new
    return oid


async def accepted(conn: Connection, msg: Message) -> str:
    ack = await place(conn, msg)
    assert ack["type"] == "ack" and ack["client_order_id"] == msg.get("client_order_id"), ack
    assert ack["symbol"] == msg["symbol"] and isinstance(ack["order_id"], str), ack
    oid: str = ack["order_id"]
    return oid


class Clients:
    """A test's connections: md and trades subscribed before its first order, and its traders."""

    def __init__(self, stack: Stack, symbol: str) -> None:
        self.stack, self.symbol = stack, symbol
        self.md: Connection
        self.trades: Connection
        self.traders: list[tuple[str, Connection]] = []

    async def open(self) -> Clients:
        self.md = await subscribe(self.stack.md_url, self.symbol)
        await self.md.wait_for(is_type("l2_snapshot", symbol=self.symbol))
        self.trades = await subscribe(self.stack.trades_url, self.symbol, channel="trades")
        return self

    async def trader(self, name: str) -> Connection:
        account = f"{name}-{self.symbol}"  # accounts of their own: no reports from other tests
        conn = await gateway_session(self.stack.gateway_url, account)
        self.traders.append((account, conn))
        return conn

    async def settle(self) -> None:
        await settle(self.stack, self.symbol, md=self.md, trades=self.trades, accounts=self.traders)

    async def close(self) -> None:
        for conn in [self.md, self.trades, *(c for _, c in self.traders)]:
            await conn.close()


@pytest.fixture()
async def clients(shared_stack: SymbolPool) -> AsyncIterator[Clients]:
    c = await Clients(shared_stack.stack, shared_stack.take()).open()
    try:
        yield c
    finally:
        await c.close()


def last_update(md: Connection, symbol: str) -> Message:
    return md.since(0, is_type("l2_update", symbol=symbol))[-1]


# ---------------------------------------------------------------------------------------------
async def test_limit_gtc_rests_and_shows_in_l2(clients: Clients) -> None:
    sym, md = clients.symbol, clients.md
    alice = await clients.trader("alice")
    ack = await place(alice, limit(sym, "buy", "29999.50", "0.25", "b1"))
    assert ack == {"type": "ack", "op": "new", "client_order_id": "b1", "order_id": ack["order_id"],
                   "symbol": sym}  # fmt: skip
    oid = ack["order_id"]
    new = await alice.wait_for(is_type("execution", order_id=oid))
    assert bare(new) == report(oid, "b1", sym, "buy", "new", "new", "29999.50", "0.25000", "0.00000",
                               "0.25000", ms(oid))  # fmt: skip
    update = dict(await md.wait_for(is_type("l2_update", symbol=sym)))  # a copy: settle() reads the original
    # Kraken's book checksum: the one level, price and quantity without the point and leading zeros.
    assert update.pop("checksum") == zlib.crc32(b"2999950" + b"25000")
    assert update == {"type": "l2_update", "symbol": sym, "seq": 1,
                      "changes": [["buy", "29999.50", "0.25000"]],
                      "bbo": {"bid": ["29999.50", "0.25000"], "ask": None}}  # fmt: skip
    # A second order at the same price adds to the level; one at another price makes a new level.
    await rest(alice, limit(sym, "buy", "29999.50", "0.5", "b2"))
    await rest(alice, limit(sym, "sell", "30010.00", "1", "s1"))
    await md.wait_for(is_type("l2_update", symbol=sym, seq=3))
    assert last_update(md, sym)["changes"] == [["sell", "30010.00", "1.00000"]]
    snap = await current_book(clients.stack, sym)
    assert snap.pop("checksum") == zlib.crc32(b"3001000" + b"100000" + b"2999950" + b"75000")  # asks, bids
    assert snap == {"type": "l2_snapshot", "symbol": sym, "seq": 3, "bids": [["29999.50", "0.75000"]],
                    "asks": [["30010.00", "1.00000"]]}  # fmt: skip
    await clients.settle()


async def test_market_order_sweeps_two_levels_with_exact_trades_fees_and_reports(clients: Clients) -> None:
    sym, md, trades = clients.symbol, clients.md, clients.trades
    alice, bob = await clients.trader("alice"), await clients.trader("bob")
    s1 = await rest(alice, limit(sym, "sell", "30000.00", "0.5", "s1"))
    s2 = await rest(alice, limit(sym, "sell", "30001.00", "1", "s2"))
    await rest(alice, limit(sym, "sell", "30002.00", "2", "s3"))
    m1 = await accepted(bob, market(sym, "buy", "1.2", "m1"))
    t = m1_ms = ms(m1)

    got = await trades.wait_count(is_type("trade", symbol=sym), 2)
    assert [without_latency(x) for x in got] == [
        {"type": "trade", "symbol": sym, "trade_id": 1, "price": "30000.00", "quantity": "0.50000",
         "aggressor_side": "buy", "maker_order_id": s1, "taker_order_id": m1,
         "maker_fee": "15.00", "taker_fee": "30.00", "ts": m1_ms},
        {"type": "trade", "symbol": sym, "trade_id": 2, "price": "30001.00", "quantity": "0.70000",
         "aggressor_side": "buy", "maker_order_id": s2, "taker_order_id": m1,
         "maker_fee": "21.0007", "taker_fee": "42.0014", "ts": m1_ms},
    ]  # fmt: skip
    for x in got:  # the fees, computed independently
        assert x["maker_fee"] == fee(x["price"], x["quantity"], MAKER_RATE)
        assert x["taker_fee"] == fee(x["price"], x["quantity"], TAKER_RATE)

    taker = await bob.wait_count(is_type("execution", order_id=m1), 3)
    assert [bare(x) for x in taker] == [
        report(m1, "m1", sym, "buy", "new", "new", None, "1.20000", "0.00000", "1.20000", t),
        report(m1, "m1", sym, "buy", "partially_filled", "trade", None, "1.20000", "0.50000", "0.70000", t,
               last=("30000.00", "0.50000"), fee="30.00", liquidity="taker", trade_id=1),
        report(m1, "m1", sym, "buy", "filled", "trade", None, "1.20000", "1.20000", "0.00000", t,
               last=("30001.00", "0.70000"), fee="42.0014", liquidity="taker", trade_id=2),
    ]  # fmt: skip
    maker1 = await alice.wait_for(is_type("execution", order_id=s1, exec_type="trade"))
    assert bare(maker1) == report(s1, "s1", sym, "sell", "filled", "trade", "30000.00", "0.50000", "0.50000",
                            "0.00000", t, last=("30000.00", "0.50000"), fee="15.00", liquidity="maker",
                            trade_id=1)  # fmt: skip
    maker2 = await alice.wait_for(is_type("execution", order_id=s2, exec_type="trade"))
    assert bare(maker2) == report(s2, "s2", sym, "sell", "partially_filled", "trade", "30001.00", "1.00000",
                            "0.70000", "0.30000", t, last=("30001.00", "0.70000"), fee="21.0007",
                            liquidity="maker", trade_id=2)  # fmt: skip
    # One l2_update holds both levels the sweep changed, and the BBO after it.
    sweep = await md.wait_for(is_type("l2_update", symbol=sym, seq=4))
    assert sweep["changes"] == [["sell", "30000.00", "0.00000"], ["sell", "30001.00", "0.30000"]]
    assert sweep["bbo"] == {"bid": None, "ask": ["30001.00", "0.30000"]}

    # A market order larger than the book: it takes everything and its remainder is cancelled.
    m2 = await accepted(bob, market(sym, "buy", "3", "m2"))
    end = await bob.wait_for(is_type("execution", order_id=m2, status="cancelled"))
    assert bare(end) == report(m2, "m2", sym, "buy", "cancelled", "cancelled", None, "3.00000", "2.30000",
                         "0.00000", ms(m2), reason="unfilled_market")  # fmt: skip
    more = await trades.wait_count(is_type("trade", symbol=sym), 4)
    assert [(x["trade_id"], x["price"], x["quantity"]) for x in more[2:]] == [
        (3, "30001.00", "0.30000"), (4, "30002.00", "2.00000")]  # fmt: skip
    assert more[3]["taker_fee"] == fee("30002.00", "2.00000", TAKER_RATE) == "120.008"
    # A market order on an empty side: accepted, then cancelled with nothing filled.
    m3 = await accepted(bob, market(sym, "buy", "1", "m3"))
    end = await bob.wait_for(is_type("execution", order_id=m3, status="cancelled"))
    assert (end["filled_quantity"], end["reason"]) == ("0.00000", "unfilled_market")
    await clients.settle()


async def test_ioc_partial_fill_cancels_the_remainder(clients: Clients) -> None:
    sym, md = clients.symbol, clients.md
    alice, bob = await clients.trader("alice"), await clients.trader("bob")
    s1 = await rest(alice, limit(sym, "sell", "30000.00", "1", "s1"))
    await rest(alice, limit(sym, "sell", "30000.05", "1", "s2"))  # beyond the IOC's limit
    i1 = await accepted(bob, limit(sym, "buy", "30000.00", "1.5", "i1", tif="ioc"))
    reps = await bob.wait_count(is_type("execution", order_id=i1), 3)
    t = ms(i1)
    assert [bare(x) for x in reps] == [
        report(i1, "i1", sym, "buy", "new", "new", "30000.00", "1.50000", "0.00000", "1.50000", t),
        report(i1, "i1", sym, "buy", "partially_filled", "trade", "30000.00", "1.50000", "1.00000", "0.50000",
               t, last=("30000.00", "1.00000"), fee="60.00", liquidity="taker", trade_id=1),
        report(i1, "i1", sym, "buy", "cancelled", "cancelled", "30000.00", "1.50000", "1.00000", "0.00000", t,
               reason="unfilled_ioc"),
    ]  # fmt: skip
    maker = await alice.wait_for(is_type("execution", order_id=s1, exec_type="trade"))
    assert (maker["status"], maker["fee"], maker["liquidity"]) == ("filled", "30.00", "maker")
    # The IOC never rests: the bid side stays empty.
    update = await md.wait_for(is_type("l2_update", symbol=sym, seq=3))
    assert update["changes"] == [["sell", "30000.00", "0.00000"]]
    assert update["bbo"] == {"bid": None, "ask": ["30000.05", "1.00000"]}
    # The shorthand "type": "ioc" is a limit IOC; with nothing in reach it is cancelled unfilled.
    i2 = await accepted(bob, {**limit(sym, "buy", "30000.00", "1", "i2"), "type": "ioc"})
    end = await bob.wait_for(is_type("execution", order_id=i2, status="cancelled"))
    assert (end["filled_quantity"], end["reason"], end["price"]) == ("0.00000", "unfilled_ioc", "30000.00")
    await clients.settle()


async def test_fok_unfillable_leaves_the_book_untouched_and_a_fillable_one_fills(clients: Clients) -> None:
    sym, md, trades = clients.symbol, clients.md, clients.trades
    alice, bob = await clients.trader("alice"), await clients.trader("bob")
    s1 = await rest(alice, limit(sym, "sell", "30000.00", "1", "s1"))
    s2 = await rest(alice, limit(sym, "sell", "30000.50", "1", "s2"))
    await md.wait_for(is_type("l2_update", symbol=sym, seq=2))
    before = await current_book(clients.stack, sym)

    for cid, price, qty in (("f1", "30000.50", "2.5"), ("f2", "30000.00", "1.5")):
        oid = await accepted(bob, limit(sym, "buy", price, qty, cid, tif="fok"))
        reps = await bob.wait_count(is_type("execution", order_id=oid), 2)
        q = f"{Decimal(qty):.5f}"
        assert [bare(x) for x in reps] == [
            report(oid, cid, sym, "buy", "new", "new", price, q, "0.00000", q, ms(oid)),
            report(oid, cid, sym, "buy", "cancelled", "cancelled", price, q, "0.00000", "0.00000", ms(oid),
                   reason="fok_unfillable"),
        ]  # fmt: skip
    after = await current_book(clients.stack, sym)
    assert after == before  # same levels and the same seq: not a single l2_update
    assert not md.since(0, is_type("l2_update", symbol=sym, seq=3))
    assert not trades.since(0, is_type("trade"))

    # The shorthand "type": "fok" that can fill: both levels, in one go.
    f3 = await accepted(bob, {**limit(sym, "buy", "30000.50", "2", "f3"), "type": "fok"})
    reps = await bob.wait_count(is_type("execution", order_id=f3), 3)
    assert [(r["status"], r["filled_quantity"], r["trade_id"], r["fee"]) for r in reps] == [
        ("new", "0.00000", None, "0.00"),
        ("partially_filled", "1.00000", 1, "60.00"),
        ("filled", "2.00000", 2, fee("30000.50", "1", TAKER_RATE)),
    ]
    got = await trades.wait_count(is_type("trade", symbol=sym), 2)
    assert [(x["maker_order_id"], x["price"], x["maker_fee"]) for x in got] == [
        (s1, "30000.00", "30.00"), (s2, "30000.50", "30.0005")]  # fmt: skip
    assert (await current_book(clients.stack, sym))["asks"] == []
    await clients.settle()


async def test_post_only_that_would_take_is_rejected_by_the_matcher(clients: Clients) -> None:
    sym = clients.symbol
    alice, bob = await clients.trader("alice"), await clients.trader("bob")
    await rest(alice, limit(sym, "sell", "30000.00", "1", "s1"))
    p1 = await accepted(bob, limit(sym, "buy", "30000.00", "1", "p1", post_only=True))
    rejected = await bob.wait_for(is_type("execution", order_id=p1))
    assert bare(rejected) == {"type": "execution", "order_id": p1, "client_order_id": "p1", "symbol": sym,
                        "status": "rejected", "exec_type": "rejected", "code": "WOULD_TAKE",
                        "reason": rejected["reason"], "ts": ms(p1)}  # fmt: skip
    assert rejected["reason"]
    # One tick below the ask it rests as a maker.
    p2 = await rest(bob, limit(sym, "buy", "29999.99", "1", "p2", post_only=True))
    snap = await current_book(clients.stack, sym)
    assert (snap["bids"], snap["asks"]) == ([["29999.99", "1.00000"]], [["30000.00", "1.00000"]])
    assert not clients.trades.since(0, is_type("trade"))
    assert len(bob.since(0, is_type("execution", order_id=p2))) == 1
    await clients.settle()


async def test_self_trade_prevention_cancels_the_taker_by_default(clients: Clients) -> None:
    sym, trades = clients.symbol, clients.trades
    alice, bob = await clients.trader("alice"), await clients.trader("bob")
    s1 = await rest(alice, limit(sym, "sell", "30000.00", "1", "s1"))
    b1 = await accepted(alice, limit(sym, "buy", "30000.00", "0.5", "b1"))
    reps = await alice.wait_count(is_type("execution", order_id=b1), 2)
    assert bare(reps[1]) == report(b1, "b1", sym, "buy", "cancelled", "cancelled", "30000.00", "0.50000",
                                   "0.00000", "0.00000", ms(b1), reason="self_trade_prevention")  # fmt: skip
    assert not alice.since(0, is_type("execution", order_id=s1, exec_type="cancelled"))
    # Another account's better offer is taken first; then the taker meets its own order and stops.
    o1 = await rest(bob, limit(sym, "sell", "29999.00", "0.2", "o1"))
    b2 = await accepted(alice, limit(sym, "buy", "30000.00", "1", "b2"))
    reps = await alice.wait_count(is_type("execution", order_id=b2), 3)
    assert [(r["status"], r["filled_quantity"], r.get("reason")) for r in reps] == [
        ("new", "0.00000", None),
        ("partially_filled", "0.20000", None),
        ("cancelled", "0.20000", "self_trade_prevention"),
    ]
    got = await trades.wait_for(is_type("trade", symbol=sym))
    assert (got["trade_id"], got["maker_order_id"], got["taker_order_id"]) == (1, o1, b2)
    snap = await current_book(clients.stack, sym)
    assert (snap["bids"], snap["asks"]) == ([], [["30000.00", "1.00000"]])  # alice's maker untouched
    await clients.settle()


async def test_cancel_by_order_id_and_by_client_order_id(clients: Clients) -> None:
    sym = clients.symbol
    alice, bob = await clients.trader("alice"), await clients.trader("bob")
    x = await rest(alice, limit(sym, "buy", "29990.00", "1", "x"))
    y = await rest(alice, limit(sym, "buy", "29991.00", "1", "y"))
    z = await rest(alice, limit(sym, "sell", "30010.00", "1", "z"))

    ack = await place(alice, {"op": "cancel", "symbol": sym, "order_id": x})
    assert (ack["type"], ack["op"], ack["order_id"]) == ("ack", "cancel", x)
    done = await alice.wait_for(is_type("execution", order_id=x, status="cancelled"))
    assert bare(done) == report(x, "x", sym, "buy", "cancelled", "cancelled", "29990.00", "1.00000",
                                "0.00000", "0.00000", done["ts"], reason="user")  # fmt: skip
    assert done["ts"] >= ms(x)

    ack = await place(alice, {"op": "cancel", "symbol": sym, "client_order_id": "y"})
    assert (ack["type"], ack["op"], ack["client_order_id"], ack["order_id"]) == ("ack", "cancel", "y", None)
    done = await alice.wait_for(is_type("execution", order_id=y, status="cancelled"))
    assert (done["client_order_id"], done["reason"], done["remaining_quantity"]) == ("y", "user", "0.00000")

    # A partly filled order: the cancel report keeps what was filled.
    await accepted(bob, market(sym, "buy", "0.25", "m1"))
    await alice.wait_for(is_type("execution", order_id=z, exec_type="trade"))
    await place(alice, {"op": "cancel", "symbol": sym, "client_order_id": "z"})
    done = await alice.wait_for(is_type("execution", order_id=z, status="cancelled"))
    assert (done["filled_quantity"], done["remaining_quantity"], done["quantity"]) == (
        "0.25000", "0.00000", "1.00000")  # fmt: skip

    # Cancelling it again: acked (it is on the stream), then UNKNOWN_ORDER from the matcher.
    start = alice.mark()
    ack = await place(alice, {"op": "cancel", "symbol": sym, "order_id": x})
    assert ack["type"] == "ack"
    rej = await alice.wait_for(is_type("reject", op="cancel", order_id=x), start=start)
    assert (rej["code"], rej["symbol"]) == ("UNKNOWN_ORDER", sym)
    snap = await current_book(clients.stack, sym)
    assert (snap["bids"], snap["asks"]) == ([], [])
    await clients.settle()


async def test_amend_quantity_down_keeps_priority_and_a_price_change_loses_it(clients: Clients) -> None:
    sym, trades = clients.symbol, clients.trades
    alice, bob, carol = [await clients.trader(n) for n in ("alice", "bob", "carol")]
    a = await rest(alice, limit(sym, "sell", "30000.00", "1", "a"))
    b = await rest(bob, limit(sym, "sell", "30000.00", "1", "b"))

    ack = await place(alice, {"op": "amend", "symbol": sym, "order_id": a, "quantity": "0.5"})
    assert (ack["type"], ack["op"], ack["order_id"]) == ("ack", "amend", a)
    amended = await alice.wait_for(is_type("execution", order_id=a, exec_type="amended"))
    assert bare(amended) == report(a, "a", sym, "sell", "new", "amended", "30000.00", "0.50000", "0.00000",
                             "0.50000", amended["ts"])  # fmt: skip
    await accepted(carol, market(sym, "buy", "0.5", "m1"))
    t1 = await trades.wait_for(is_type("trade", symbol=sym, trade_id=1))
    assert (t1["maker_order_id"], t1["quantity"]) == (a, "0.50000"), "quantity down kept a's priority"

    # b is at the front now; d queues behind it. b moves away and back: it is behind d.
    d = await rest(alice, limit(sym, "sell", "30000.00", "1", "d"))
    for price in ("30000.01", "30000.00"):
        await place(bob, {"op": "amend", "symbol": sym, "order_id": b, "price": price})
        moved = await bob.wait_for(is_type("execution", order_id=b, exec_type="amended", price=price))
        assert (moved["status"], moved["remaining_quantity"]) == ("new", "1.00000")
    await accepted(carol, market(sym, "buy", "0.5", "m2"))
    t2 = await trades.wait_for(is_type("trade", symbol=sym, trade_id=2))
    assert t2["maker_order_id"] == d, "a price change sends the order to the back of its level"

    # Quantity up (the new total, filled part included) also loses priority: b trades next.
    await place(alice, {"op": "amend", "symbol": sym, "client_order_id": "d", "quantity": "2"})
    up = await alice.wait_for(is_type("execution", order_id=d, exec_type="amended"))
    assert (up["status"], up["quantity"], up["filled_quantity"], up["remaining_quantity"]) == (
        "partially_filled", "2.00000", "0.50000", "1.50000")  # fmt: skip
    await accepted(carol, market(sym, "buy", "0.2", "m3"))
    t3 = await trades.wait_for(is_type("trade", symbol=sym, trade_id=3))
    assert t3["maker_order_id"] == b

    # An amend that would cross is refused (WOULD_TAKE) and the order stays as it was.
    await rest(carol, limit(sym, "buy", "29999.00", "0.1", "c1"))
    start = bob.mark()
    await place(bob, {"op": "amend", "symbol": sym, "order_id": b, "price": "29999.00"})
    rej = await bob.wait_for(is_type("reject", op="amend"), start=start)
    assert (rej["code"], rej["order_id"]) == ("WOULD_TAKE", b)
    snap = await current_book(clients.stack, sym)
    assert (snap["bids"], snap["asks"]) == ([["29999.00", "0.10000"]], [["30000.00", "2.30000"]])
    await clients.settle()


async def test_duplicate_client_order_id_is_rejected_by_the_matcher(clients: Clients) -> None:
    sym = clients.symbol
    alice, bob = await clients.trader("alice"), await clients.trader("bob")
    first = await rest(alice, limit(sym, "buy", "29000.00", "1", "dup"))
    second = await accepted(alice, limit(sym, "buy", "29001.00", "1", "dup"))
    assert second != first
    rejected = await alice.wait_for(is_type("execution", order_id=second))
    assert (rejected["status"], rejected["exec_type"], rejected["code"], rejected["client_order_id"]) == (
        "rejected", "rejected", "DUPLICATE_CLIENT_ORDER_ID", "dup")  # fmt: skip
    # Client order ids are per account: bob may use the same one.
    await rest(bob, limit(sym, "buy", "29002.00", "1", "dup"))
    snap = await current_book(clients.stack, sym)
    assert snap["bids"] == [["29002.00", "1.00000"], ["29000.00", "1.00000"]]
    # Once the order is done its id may be used again.
    await place(alice, {"op": "cancel", "symbol": sym, "client_order_id": "dup"})
    await alice.wait_for(is_type("execution", order_id=first, status="cancelled"))
    await rest(alice, limit(sym, "buy", "29003.00", "1", "dup"))
    await clients.settle()


async def test_execution_reports_reach_every_connection_of_the_account_and_nobody_else(
    clients: Clients,
) -> None:
    sym = clients.symbol
    alice1 = await clients.trader("alice")
    alice2 = await clients.trader("alice")  # the same account, a second connection
    bob = await clients.trader("bob")
    s1 = await rest(alice1, limit(sym, "sell", "30000.00", "1", "s1"))
    b1 = await accepted(bob, limit(sym, "buy", "30000.00", "0.4", "b1"))
    await alice1.wait_for(is_type("execution", order_id=s1, exec_type="trade"))
    await place(alice1, {"op": "cancel", "symbol": sym, "order_id": s1})
    await alice1.wait_for(is_type("execution", order_id=s1, status="cancelled"))
    await bob.wait_for(is_type("execution", order_id=b1, status="filled"))
    # bob's last report was published after alice's: anything of alice's for bob would be here by now
    last = await accepted(bob, limit(sym, "buy", "29000.00", "0.1", "b2"))
    await bob.wait_for(is_type("execution", order_id=last))

    def execs(conn: Connection) -> list[Message]:
        return conn.since(0, is_type("execution", symbol=sym))

    assert [m["status"] for m in execs(alice1)] == ["new", "partially_filled", "cancelled"]
    assert execs(alice2) == execs(alice1), "every connection of the account gets every report"
    assert not alice2.since(0, is_type("ack")), "acks go only to the connection that sent the order"
    assert {m["order_id"] for m in execs(bob)} == {b1, last}, "bob sees only his own orders"
    await clients.settle()


async def test_random_flow_l2_rebuilds_the_book_and_each_trade_is_delivered_once(clients: Clients) -> None:
    """A seeded flow of 360 messages from four clients sent concurrently. The md subscriber's
    snapshot plus updates (seq contiguous) rebuilds the book that a new subscription sees and that a
    fresh Engine replaying the orders stream holds; the trades feed has every trade id once."""
    sym, md, trades = clients.symbol, clients.md, clients.trades
    names = ("ann", "ben", "cat", "dan")
    conns = [await clients.trader(n) for n in names]
    depth = await subscribe(clients.stack.md_url, sym, channel="depth")
    await depth.send({"op": "subscribe", "symbol": sym, "channel": "depth", "depth": 3})  # a second N
    flow = WireFlow(seed=20240601, symbols=(sym,))
    rng = random.Random(7)
    plan: list[list[Message]] = [[] for _ in names]
    for _ in range(360):
        i = rng.randrange(len(names))
        plan[i].append(flow.next(f"{names[i]}-{sym}"))

    async def run(conn: Connection, msgs: list[Message]) -> None:
        for k, msg in enumerate(msgs):
            await conn.send(msg)
            if k % 10 == 9:
                await asyncio.sleep(0.005)

    await asyncio.gather(*(run(c, p) for c, p in zip(conns, plan, strict=True)))
    for conn, msgs in zip(conns, plan, strict=True):
        answers = await conn.wait_count(lambda m: m.get("type") == "ack", len(msgs), timeout=30)
        assert [(a["op"], a["client_order_id"]) for a in answers] == [
            (m["op"], m["client_order_id"]) for m in msgs
        ]
    rep = await settle(clients.stack, sym, md=md, trades=trades, accounts=clients.traders)
    assert rep.trade_seq >= 20 and rep.book_seq >= 150, "the flow should trade and move the book a lot"
    ids = [m["trade_id"] for m in trades.since(0, is_type("trade"))]
    assert ids == list(range(1, rep.trade_seq + 1))
    assert len(md.since(0, is_type("l2_snapshot"))) == 1, "no resync was needed"
    # The depth channel (conflated, top 3 after the resubscription) ends at the same book.
    bids, asks = rep.book()

    def final_depth(m: Message) -> bool:
        return m.get("type") == "depth" and m.get("seq") == rep.book_seq

    last = await depth.wait_for(final_depth)
    assert (last["bids"], last["asks"]) == (bids[:3], asks[:3])
    assert last["bbo"] == {"bid": bids[0] if bids else None, "ask": asks[0] if asks else None}
    n_depth = len(depth.since(0, is_type("depth")))
    assert n_depth < rep.book_seq / 2, f"depth is conflated: {n_depth} messages for {rep.book_seq} updates"
    await depth.close()
    # Every acked new order was accepted or rejected exactly once, as the replay says.
    outcomes = rep.new_order_outcomes()
    for conn in conns:
        firsts: dict[str, list[str]] = {}
        for m in conn.since(0, is_type("execution")):
            if m["exec_type"] in ("new", "rejected"):
                firsts.setdefault(m["order_id"], []).append(m["exec_type"])
        for ack in conn.since(0, is_type("ack", op="new")):
            want = "new" if outcomes[ack["order_id"]] == "accepted" else "rejected"
            assert firsts[ack["order_id"]] == [want], ack
        # and on its own connection an order's ack comes before any of its reports
        for k, m in enumerate(conn.messages):
            if m.get("type") == "execution":
                assert any(
                    a.get("order_id") == m["order_id"] and a["type"] == "ack" for a in conn.messages[:k]
                )


async def test_two_feed_processes_deliver_the_same_streams(shared_stack: SymbolPool) -> None:
    stack, sym = shared_stack.stack, shared_stack.take()
    second = stack.new_feeds()
    await asyncio.to_thread(stack.start_feeds, second)
    conns: list[Connection] = []
    try:
        mds = [await subscribe(url, sym, retry_for=5) for url in (stack.md_url, second.md_url)]
        trs = [await subscribe(url, sym, channel="trades") for url in (stack.trades_url, second.trades_url)]
        conns += [*mds, *trs]
        snaps = [await md.wait_for(is_type("l2_snapshot", symbol=sym)) for md in mds]
        assert snaps[0] == snaps[1]
        traders = [await gateway_session(stack.gateway_url, f"{n}-{sym}") for n in ("ann", "ben", "cat")]
        conns += traders
        flow = WireFlow(seed=99, symbols=(sym,))
        for k in range(150):
            i = k % len(traders)
            await traders[i].send(flow.next(f"{('ann', 'ben', 'cat')[i]}-{sym}"))
        for conn in traders:  # every message on the stream before settle waits for the matcher
            await conn.wait_count(is_type("ack"), 50)
        rep = await settle(stack, sym, md=mds[0], trades=trs[0])
        await settle(stack, sym, md=mds[1], trades=trs[1])
        assert rep.trade_seq > 5
        updates = [md.since(0, is_type("l2_update", symbol=sym)) for md in mds]
        assert updates[0] == updates[1] and len(updates[0]) == rep.book_seq
        trades = [tr.since(0, is_type("trade", symbol=sym)) for tr in trs]
        assert trades[0] == trades[1], "the same trade lines, latency_us included: both forward them raw"
    finally:
        for conn in conns:
            await conn.close()
        await asyncio.to_thread(second.service.stop)


async def test_execution_reports_reach_the_account_on_every_gateway_process(shared_stack: SymbolPool) -> None:
    """Two gateway processes: the account's connection on the other one gets its reports too."""
    stack, sym = shared_stack.stack, shared_stack.take()
    other, url = await asyncio.to_thread(stack.start_extra_gateway)
    conns: list[Connection] = []
    try:
        here = await gateway_session(stack.gateway_url, f"alice-{sym}")
        there = await gateway_session(url, f"alice-{sym}")
        bob = await gateway_session(url, f"bob-{sym}")
        conns += [here, there, bob]
        s1 = await rest(here, limit(sym, "sell", "30000.00", "1", "s1"))
        b1 = await accepted(bob, limit(sym, "buy", "30000.00", "1", "b1"))
        await bob.wait_for(is_type("execution", order_id=b1, status="filled"))
        await here.wait_for(is_type("execution", order_id=s1, status="filled"))
        mine = await there.wait_count(is_type("execution", order_id=s1), 2)
        assert mine == here.since(0, is_type("execution", order_id=s1))
        assert not bob.since(0, is_type("execution", order_id=s1))
        await settle(
            stack, sym, accounts=[(f"alice-{sym}", here), (f"alice-{sym}", there), (f"bob-{sym}", bob)]
        )
    finally:
        for conn in conns:
            await conn.close()
        await asyncio.to_thread(other.stop)


async def test_self_trade_prevention_cancel_maker_and_cancel_both(clients: Clients) -> None:
    sym = clients.symbol
    alice, bob = await clients.trader("alice"), await clients.trader("bob")
    own = await rest(alice, limit(sym, "sell", "30000.00", "1", "own"))
    theirs = await rest(bob, limit(sym, "sell", "30000.00", "1", "theirs"))
    # cancel_maker: alice's resting order is cancelled, and the taker goes on to trade with bob's.
    t1 = await accepted(alice, limit(sym, "buy", "30000.00", "0.5", "t1", stp="cancel_maker"))
    gone = await alice.wait_for(is_type("execution", order_id=own, status="cancelled"))
    assert (gone["reason"], gone["filled_quantity"]) == ("self_trade_prevention", "0.00000")
    fill = await alice.wait_for(is_type("execution", order_id=t1, exec_type="trade"))
    assert (fill["status"], fill["trade_id"], fill["liquidity"]) == ("filled", 1, "taker")
    trade = await clients.trades.wait_for(is_type("trade", symbol=sym))
    assert (trade["maker_order_id"], trade["taker_order_id"]) == (theirs, t1)
    # cancel_both: the resting order and the taker's remainder are both cancelled.
    own2 = await rest(alice, limit(sym, "sell", "29999.00", "1", "own2"))
    t2 = await accepted(alice, limit(sym, "buy", "30000.00", "1", "t2", stp="cancel_both"))
    gone = await alice.wait_for(is_type("execution", order_id=own2, status="cancelled"))
    assert gone["reason"] == "self_trade_prevention"
    end = await alice.wait_for(is_type("execution", order_id=t2, status="cancelled"))
    assert (end["reason"], end["filled_quantity"]) == ("self_trade_prevention", "0.00000")
    snap = await current_book(clients.stack, sym)
    assert (snap["bids"], snap["asks"]) == ([], [["30000.00", "0.50000"]])
    await clients.settle()


async def test_market_fok(clients: Clients) -> None:
    sym = clients.symbol
    alice, bob = await clients.trader("alice"), await clients.trader("bob")
    await rest(alice, limit(sym, "buy", "30000.00", "1", "b1"))
    await rest(alice, limit(sym, "buy", "29990.00", "1", "b2"))
    m1 = await accepted(bob, market(sym, "sell", "2.5", "m1", tif="fok"))
    end = await bob.wait_for(is_type("execution", order_id=m1, status="cancelled"))
    assert (end["reason"], end["filled_quantity"], end["price"]) == ("fok_unfillable", "0.00000", None)
    m2 = await accepted(bob, market(sym, "sell", "1.5", "m2", tif="fok"))
    reps = await bob.wait_count(is_type("execution", order_id=m2), 3)
    assert [(r["status"], r["last_price"], r["fee"]) for r in reps] == [
        ("new", None, "0.00"),
        ("partially_filled", "30000.00", fee("30000.00", "1", TAKER_RATE)),
        ("filled", "29990.00", fee("29990.00", "0.5", TAKER_RATE)),
    ]
    snap = await current_book(clients.stack, sym)
    assert (snap["bids"], snap["asks"]) == ([["29990.00", "0.50000"]], [])
    await clients.settle()


async def test_extreme_values_trade_with_exact_fees(clients: Clients) -> None:
    """The largest price and quantity of the spec, and the smallest lot: fees with more digits than a
    double holds (and fee units beyond 64 bits inside the matcher), all exact."""
    sym, trades = clients.symbol, clients.trades
    alice, bob = await clients.trader("alice"), await clients.trader("bob")
    top = await rest(alice, limit(sym, "sell", "10000000.00", "10000", "top"))
    near = await rest(alice, limit(sym, "sell", "9999999.99", "9999.99999", "near"))
    m1 = await accepted(bob, market(sym, "buy", "10000", "m1"))
    got = await trades.wait_count(is_type("trade", symbol=sym), 2)
    assert [
        (t["maker_order_id"], t["price"], t["quantity"], t["maker_fee"], t["taker_fee"]) for t in got
    ] == [
        (near, "9999999.99", "9999.99999", "99999999.8000000001", "199999999.6000000002"),
        (top, "10000000.00", "0.00001", "0.10", "0.20"),
    ]
    for t in got:
        assert t["maker_fee"] == fee(t["price"], t["quantity"], MAKER_RATE)
        assert t["taker_fee"] == fee(t["price"], t["quantity"], TAKER_RATE)
    done = await bob.wait_for(is_type("execution", order_id=m1, status="filled"))
    assert (done["filled_quantity"], done["fee"]) == ("10000.00000", "0.20")
    snap = await current_book(clients.stack, sym)
    assert snap["asks"] == [["10000000.00", "9999.99999"]]
    await clients.settle()
