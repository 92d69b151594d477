"""Exec ids and the `executions` request through the real pipeline: what a reconnecting client gets back
is exactly what it was (or would have been) told live, each report once."""

from __future__ import annotations

import pytest
from cme_client import Connection, Message, gateway_session, is_type

from tests.e2e.client import place
from tests.e2e.conftest import SymbolPool, reports, settle

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(60)]


def limit(symbol: str, side: str, price: str, qty: str, cid: str) -> Message:
    return {"op": "new", "symbol": symbol, "side": side, "type": "limit", "price": price, "quantity": qty,
            "client_order_id": cid}  # fmt: skip


async def test_executions_replays_an_accounts_reports_in_order_and_pages(shared_stack: SymbolPool) -> None:
    stack, symbol = shared_stack.stack, shared_stack.take()
    alice = await gateway_session(stack.gateway_url, "alice")
    bob = await gateway_session(stack.gateway_url, "bob")
    for i in range(4):
        await place(alice, limit(symbol, "sell", f"{100 + i}.00", "1", f"a{i}"))
    await place(bob, limit(symbol, "buy", "102.00", "2.5", "b0"))  # two fills, then rests 0.5
    await place(bob, {"op": "cancel", "symbol": symbol, "client_order_id": "b0"})
    await place(alice, {"op": "cancel", "symbol": symbol, "client_order_id": "nope"})  # a matcher reject
    await settle(stack, symbol, accounts=[("alice", alice), ("bob", bob)])

    live = reports(alice, symbol)
    ids = [m["exec_id"] for m in live]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    every = sorted(ids + [m["exec_id"] for m in reports(bob, symbol)])
    assert every == list(range(1, len(every) + 1)), "exec ids rise by one per symbol over all accounts"

    later = await gateway_session(stack.gateway_url, "alice")  # a reconnect, as after a crash
    answer = await later.request(
        {"op": "executions", "symbol": symbol, "after": 0}, is_type("executions", symbol=symbol)
    )
    assert answer["reports"] == live and answer["more"] is False
    assert answer["next_after"] >= ids[-1]

    half = ids[len(ids) // 2]
    tail = await later.request(
        {"op": "executions", "symbol": symbol, "after": half}, is_type("executions", symbol=symbol)
    )
    assert tail["reports"] == [m for m in live if m["exec_id"] > half]

    pages: list[Message] = []
    after = 0
    while True:
        page = await later.request(
            {"op": "executions", "symbol": symbol, "after": after, "limit": 2},
            is_type("executions", symbol=symbol),
        )
        pages += page["reports"]
        after = page["next_after"]
        if not page["more"]:
            break
    assert pages == live, "paging with next_after yields every report once"

    other = await gateway_session(stack.gateway_url, "carol")
    nothing = await other.request(
        {"op": "executions", "symbol": symbol, "after": 0}, is_type("executions", symbol=symbol)
    )
    assert nothing["reports"] == [], "never another account's reports"
    for conn in (alice, bob, later, other):
        await conn.close()


async def test_executions_needs_a_session(shared_stack: SymbolPool) -> None:
    stack, symbol = shared_stack.stack, shared_stack.take()
    anon = await Connection.open(stack.gateway_url)
    answer = await anon.request(
        {"op": "executions", "symbol": symbol, "after": 0}, lambda m: m.get("type") == "reject"
    )
    assert answer["code"] == "UNAUTHENTICATED"
    await anon.close()
