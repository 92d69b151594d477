"""Cancel on disconnect and the dead man's switch survive the death of the gateway that holds them: the
gateway is killed with SIGKILL, and another gateway's sweeper cancels the account's open orders (stops
included) within the protocol's 10 s, as another connection of the account sees live."""

from __future__ import annotations

import asyncio
import time

import pytest
from cme_client import Connection, Message, gateway_session, is_type

from shared import codes, keys
from tests.e2e.client import place
from tests.e2e.conftest import Stack, SymbolPool

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

WITHIN = 10.0  # seconds: docs/protocol.md "Order management"


def resting(symbol: str, account_tag: str) -> list[Message]:
    """Two limits that cannot cross and a stop that cannot trigger (no trades on the symbol)."""
    return [
        {"op": "new", "symbol": symbol, "side": "buy", "type": "limit", "price": "100.00", "quantity": "1",
         "client_order_id": f"{account_tag}-bid"},
        {"op": "new", "symbol": symbol, "side": "sell", "type": "limit", "price": "200.00", "quantity": "1",
         "client_order_id": f"{account_tag}-ask"},
        {"op": "new", "symbol": symbol, "side": "buy", "type": "stop_limit", "stop_price": "300.00",
         "price": "301.00", "quantity": "1", "client_order_id": f"{account_tag}-stop"},
    ]  # fmt: skip


async def place_resting(conn: Connection, watcher: Connection, symbol: str, tag: str) -> set[str]:
    """Place them on `conn`; returns their order ids once the watcher (same account) saw them open."""
    orders = resting(symbol, tag)
    start = watcher.mark()
    for msg in orders:
        ack = await place(conn, msg)
        assert ack["type"] == "ack", ack
    opened = await watcher.wait_count(
        is_type("execution", symbol=symbol, exec_type="new"), len(orders), start=start
    )
    return {m["order_id"] for m in opened}


async def cancelled_within(watcher: Connection, symbol: str, reason: str, ids: set[str], start: int) -> None:
    killed = time.monotonic()
    got = await watcher.wait_count(
        is_type("execution", symbol=symbol, exec_type="cancelled"), len(ids), timeout=WITHIN, start=start
    )
    elapsed = time.monotonic() - killed
    assert {m["order_id"] for m in got} == ids and {m["reason"] for m in got} == {reason}, got
    print(f"{reason}: {len(ids)} orders cancelled {elapsed:.1f} s after the kill")


async def swept(stack: Stack) -> None:
    """Both sets empty: the sweeper removes a member once its cancels are appended, which may be just
    after the matcher has published their reports."""
    deadline = time.monotonic() + WITHIN
    while stack.r.zcard(keys.disconnect_leases()) or stack.r.zcard(keys.dead_man_deadlines()):
        assert time.monotonic() < deadline, "the swept member is still in Redis"
        await asyncio.sleep(0.05)


async def test_cancel_on_disconnect_fires_when_the_gateway_is_killed(shared_stack: SymbolPool) -> None:
    stack, symbol = shared_stack.stack, shared_stack.take()
    doomed, doomed_url = stack.start_extra_gateway()
    trader = await Connection.open(doomed_url)
    auth = {"op": "auth", "account": "cod-alice", "cancel_on_disconnect": True}
    login = await trader.request(auth, is_type("authenticated"))
    assert login == {"type": "authenticated", "account": "cod-alice", "cancel_on_disconnect": True}
    watcher = await gateway_session(stack.gateway_url, "cod-alice")  # the survivor's connection
    ids = await place_resting(trader, watcher, symbol, "cod")
    start = watcher.mark()
    doomed.kill()
    await cancelled_within(watcher, symbol, codes.REASON_DISCONNECT, ids, start)
    await swept(stack)
    for conn in (trader, watcher):
        await conn.close()


async def test_the_dead_mans_switch_fires_when_the_gateway_that_armed_it_is_killed(
    shared_stack: SymbolPool,
) -> None:
    stack, symbol = shared_stack.stack, shared_stack.take()
    doomed, doomed_url = stack.start_extra_gateway()
    trader = await gateway_session(doomed_url, "dms-alice")
    watcher = await gateway_session(stack.gateway_url, "dms-alice")
    ids = await place_resting(trader, watcher, symbol, "dms")
    start = watcher.mark()
    before = time.time_ns() // 1_000_000
    armed = await trader.request({"op": "cancel_all_after", "timeout_ms": 1000}, is_type("cancel_all_after"))
    doomed.kill()  # before its own sweeper could act: the deadline is a second away
    assert before + 1000 <= armed["deadline"] <= time.time_ns() // 1_000_000 + 1000
    await cancelled_within(watcher, symbol, codes.REASON_DEAD_MAN, ids, start)
    await swept(stack)  # it fired once and is off
    for conn in (trader, watcher):
        await conn.close()
