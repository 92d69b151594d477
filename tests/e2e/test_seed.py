"""The seed system's own client against the real stack (separate processes, as `cme up` runs them):
its seven orders on the gateway with the `order-submission` subprotocol, sent exactly as it writes
them, and its silent listeners on the market-data and trade ports."""

from __future__ import annotations

import pytest
from cme_client import Connection, Message, Predicate, gateway_session, is_type, subscribe

from tests.e2e.conftest import Stack, settle
from tests.feeds.test_seed import EXPECTED_TRADES, FULL_BOOK, shown
from tests.gateway.test_seed import BOOK, TAKERS

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

BTC = "BTC-USDT"


def l2_update(bids: list[Message], asks: list[Message]) -> Predicate:
    return lambda m: m.get("type") == "L2_UPDATE" and (m["bids"], m["asks"]) == (bids, asks)


async def test_the_seed_client_scenario_over_the_wire(stack: Stack) -> None:
    # The listeners connect first and say nothing; trades before md, so that once md has its first
    # L2_UPDATE (after the same silence, in the same process) the trade listener is a seed client too.
    trades = await Connection.open(stack.trades_url)
    md = await Connection.open(stack.md_url)
    tape = await subscribe(stack.trades_url, BTC)  # a client of the protocol, on the same port
    first = await md.wait_for(is_type("L2_UPDATE"))
    assert (first["symbol"], first["bids"], first["asks"]) == (BTC, [], [])
    taker = await gateway_session(stack.gateway_url, "905")  # the market buyer's account, the normal way

    seed = await Connection.open(stack.gateway_url, subprotocols=["order-submission"])
    assert seed.ws.subprotocol == "order-submission"
    for text in BOOK:
        start = seed.mark()
        await seed.send_raw(text)
        assert (await seed.wait_for(lambda m: "status" in m, start=start))["status"] == "ACCEPTED"
    await md.wait_for(l2_update(FULL_BOOK["bids"], FULL_BOOK["asks"]))
    for text in TAKERS:
        start = seed.mark()
        await seed.send_raw(text)
        assert (await seed.wait_for(lambda m: "status" in m, start=start))["status"] == "ACCEPTED"

    reports = await trades.wait_count(is_type("TRADE_REPORT"), 3)
    assert [shown(r) for r in reports] == EXPECTED_TRADES
    for report in reports:
        lead, *rest = report["trades"]
        assert type(lead["engine_latency_ns"]) is int and lead["engine_latency_ns"] > 0
        assert all("engine_latency_ns" not in t for t in rest)
        for t in report["trades"]:
            line = f"{t['price']:.4f} {t['quantity']:.4f} {t['maker_fee']:.4f} {t['taker_fee']:.4f}"
            assert line and t["symbol"] == BTC and type(t["timestamp"]) is float
    await md.wait_for(l2_update([], []))  # the takers emptied the book
    for m in md.messages:
        assert m["type"] == "L2_UPDATE" and all(f"{lv['price']:.4f}" for lv in m["bids"] + m["asks"])
    assert [m["type"] for m in trades.messages] == ["TRADE_REPORT"] * 3

    # The protocol's clients get the protocol's messages; the book is the engine's replay.
    rep = await settle(stack, BTC, trades=tape)
    assert not tape.since(0, is_type("TRADE_REPORT"))
    assert reports[0]["trades"][0]["trade_id"] == rep.trades[0]["trade_id"]

    # A bad seed order: REJECTED with a reason; nothing the seed client sent got INVALID_MESSAGE.
    start = seed.mark()
    await seed.send_raw(
        '{"user_id": 901, "order_type": "LIMIT", "side": "BUY", "price": -1.0, "quantity": 1.0}'
    )
    rejected = await seed.wait_for(lambda m: "status" in m, start=start)
    assert rejected["status"] == "REJECTED" and rejected["reason"]
    # Execution reports went to the account's authenticated connection, not to the seed's.
    await taker.wait_for(is_type("execution", status="filled"))
    await seed.request({"op": "ping", "id": 1}, is_type("pong"))  # queued behind anything pushed before
    answers = [m.get("status") for m in seed.messages if m.get("type") != "pong"]
    assert answers == ["ACCEPTED"] * 7 + ["REJECTED"], seed.messages
    for c in (trades, md, tape, taker, seed):
        await c.close()
