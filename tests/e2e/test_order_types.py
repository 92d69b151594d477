"""The other order types over the wire (docs/protocol.md "More order types"): stops, GTD, icebergs and
quote quantity through gateway, stream, matcher and feeds. settle() checks every report, trade and
trade against a replay of the orders stream (engine and reference model alike); the tests read the
l2_updates' changes themselves (settle(md=...) compares whole messages, which the feeds are extending)."""

from __future__ import annotations

import time

import pytest
from cme_client import Connection, Message, gateway_session, is_type, subscribe

from tests.e2e.client import place
from tests.e2e.conftest import SymbolPool, reports, settle

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(60)]


def new(symbol: str, side: str, cid: str, **fields: object) -> Message:
    return {"op": "new", "symbol": symbol, "side": side, "client_order_id": cid, **fields}


def execs(conn: Connection, symbol: str, cid: str) -> list[Message]:
    """The execution reports of one order (not the rejects of a cancel or amend naming it)."""
    return [m for m in reports(conn, symbol) if m.get("client_order_id") == cid and m["type"] == "execution"]


async def test_a_stop_waits_off_the_book_then_triggers_on_a_trade(shared_stack: SymbolPool) -> None:
    stack, symbol = shared_stack.stack, shared_stack.take()
    md = await subscribe(stack.md_url, symbol)
    trades = await subscribe(stack.trades_url, symbol, channel="trades")
    alice = await gateway_session(stack.gateway_url, "alice")
    bob = await gateway_session(stack.gateway_url, "bob")
    await place(alice, new(symbol, "sell", "a1", type="limit", price="100.00", quantity="1"))
    await place(bob, new(symbol, "buy", "b1", type="limit", price="100.00", quantity="1"))  # last 100.00
    stop = new(symbol, "buy", "s1", type="stop_limit", price="101.00", stop_price="100.50", quantity="0.3")
    assert (await place(bob, stop))["type"] == "ack"
    cancelled = new(symbol, "sell", "s2", type="stop_market", stop_price="90.00", quantity="0.2")
    await place(bob, cancelled)
    await place(bob, {"op": "cancel", "symbol": symbol, "client_order_id": "s2"})
    await place(bob, {"op": "amend", "symbol": symbol, "client_order_id": "s1", "price": "102.00"})
    await place(alice, new(symbol, "sell", "a2", type="limit", price="100.50", quantity="1"))
    await place(bob, new(symbol, "buy", "b2", type="limit", price="100.50", quantity="0.1"))  # triggers s1
    await settle(stack, symbol, trades=trades, accounts=[("alice", alice), ("bob", bob)])

    assert [(m["exec_type"], m["status"]) for m in execs(bob, symbol, "s1")] == [
        ("new", "new"),
        ("triggered", "new"),
        ("trade", "filled"),
    ]
    assert execs(bob, symbol, "s1")[1]["stop_price"] == "100.50"
    assert [m["exec_type"] for m in execs(bob, symbol, "s2")] == ["new", "cancelled"]
    amend = [m for m in reports(bob, symbol) if m.get("type") == "reject" and m.get("op") == "amend"]
    assert [m["code"] for m in amend] == ["NOT_AMENDABLE"]
    levels = [c[1] for m in md.messages if m.get("type") == "l2_update" for c in m["changes"]]
    assert "101.00" not in levels and "90.00" not in levels  # a stop never showed in L2


async def test_a_gtd_order_expires_within_a_second_with_no_other_traffic(shared_stack: SymbolPool) -> None:
    stack, symbol = shared_stack.stack, shared_stack.take()
    alice = await gateway_session(stack.gateway_url, "alice")
    expire = time.time_ns() // 1_000_000 + 1_500
    order = new(symbol, "buy", "g1", type="limit", tif="gtd", expire_time=expire, price="99.00", quantity="1")
    assert (await place(alice, order))["type"] == "ack"
    past = new(symbol, "buy", "g2", type="limit", tif="gtd", expire_time=expire - 10_000, price="99.00",
               quantity="1")  # fmt: skip
    await place(alice, past)  # the gateway checks the form only; the matcher rejects the time
    report = await alice.wait_for(is_type("execution", client_order_id="g1", reason="expired"), timeout=10)
    assert expire <= report["ts"] <= expire + 1_000 + 500  # the Tick's entry time (plus clock slack)
    await settle(stack, symbol, accounts=[("alice", alice)])
    rejected = execs(alice, symbol, "g2")
    assert [m.get("code") for m in rejected] == ["INVALID_EXPIRE_TIME"]


async def test_an_iceberg_shows_its_display_quantity_and_refills(shared_stack: SymbolPool) -> None:
    stack, symbol = shared_stack.stack, shared_stack.take()
    md = await subscribe(stack.md_url, symbol)
    trades = await subscribe(stack.trades_url, symbol, channel="trades")
    alice = await gateway_session(stack.gateway_url, "alice")
    bob = await gateway_session(stack.gateway_url, "bob")
    iceberg = new(symbol, "sell", "i1", type="limit", price="100.00", quantity="1", display_quantity="0.3")
    await place(alice, iceberg)
    await place(bob, new(symbol, "buy", "b1", type="limit", price="100.00", quantity="0.5"))
    bad = new(symbol, "sell", "i2", type="limit", price="100.00", quantity="1", display_quantity="1")
    assert (await place(alice, bad))["code"] == "INVALID_DISPLAY_QUANTITY"
    rep = await settle(stack, symbol, trades=trades, accounts=[("alice", alice), ("bob", bob)])
    assert rep.book() == ([], [["100.00", "0.10000"]])  # 0.5 left: 0.1 shown, 0.4 in reserve
    fills = [(m["last_quantity"], m["remaining_quantity"]) for m in execs(alice, symbol, "i1")[1:]]
    assert fills == [("0.30000", "0.70000"), ("0.20000", "0.50000")]  # real fills, the whole remainder
    shown = [c for m in md.messages if m.get("type") == "l2_update" for c in m["changes"]]
    assert shown == [["sell", "100.00", "0.30000"], ["sell", "100.00", "0.10000"]]


async def test_a_quote_quantity_market_buy_fills_whole_lots_within_its_budget(
    shared_stack: SymbolPool,
) -> None:
    stack, symbol = shared_stack.stack, shared_stack.take()
    trades = await subscribe(stack.trades_url, symbol, channel="trades")
    alice = await gateway_session(stack.gateway_url, "alice")
    bob = await gateway_session(stack.gateway_url, "bob")
    await place(alice, new(symbol, "sell", "a1", type="limit", price="100.00", quantity="1"))
    # 0.1 at 100.00 costs 10.00 + 0.02 taker fee: 10.02 buys 0.1, 10.0199 one lot less
    await place(bob, new(symbol, "buy", "q1", type="market", quote_quantity="10.02"))
    await place(bob, new(symbol, "buy", "q2", type="market", quote_quantity="10.0199"))
    tiny = new(symbol, "buy", "q3", type="market", quote_quantity="0.001")
    assert (await place(bob, tiny))["code"] == "MIN_NOTIONAL"
    both = new(symbol, "buy", "q4", type="market", quote_quantity="10", quantity="0.1")
    assert (await place(bob, both))["code"] == "INVALID_QUANTITY"
    await settle(stack, symbol, trades=trades, accounts=[("alice", alice), ("bob", bob)])
    assert [m["quantity"] for m in execs(bob, symbol, "q1")][:1] == ["0.10000"]
    assert [m["quantity"] for m in execs(bob, symbol, "q2")][:1] == ["0.09999"]
    assert [m["status"] for m in execs(bob, symbol, "q2")][-1] == "filled"
