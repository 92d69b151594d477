"""Balances, funding and order management over the wire, on a stack with --risk on (one matcher over
both symbols' streams, the gateway appending under the venue clock), through the project's client."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from decimal import Decimal

import pytest
from cme_client import Client, Message, Rejected

from shared import codes
from tests.e2e.conftest import Stack

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

BTC, ETH = "BTC-USDT", "ETH-USDT"


async def next_balance(
    client: Client, asset: str, pred: Callable[[Message], bool] = lambda m: True
) -> Message:
    async def find() -> Message:
        async for m in client.balance_updates():
            if m["type"] == "balance" and m["asset"] == asset and pred(m):
                return m
        raise AssertionError("balance updates ended")

    return await asyncio.wait_for(find(), 15)


async def report(client: Client, pred: Callable[[Message], bool]) -> Message:
    async def find() -> Message:
        async for m in client.execution_reports():
            if pred(m):
                return m
        raise AssertionError("reports ended")

    return await asyncio.wait_for(find(), 15)


async def test_faucet_trade_settlement_and_order_queries(stack_factory: Callable[..., Stack]) -> None:
    stack = stack_factory(risk=True)
    async with (
        Client(stack.gateway_url, account="alice") as alice,
        Client(stack.gateway_url, account="bob") as bob,
    ):
        # The faucet funds each account at its first login (USDT=1000000, BTC=100, ETH=1000).
        await next_balance(alice, "USDT", lambda m: m["available"] == "1000000")
        await next_balance(bob, "BTC", lambda m: m["available"] == "100")
        assert (await alice.balances())["USDT"] == {"available": Decimal(1000000), "held": Decimal(0)}

        # A buy holds price x quantity x (1 + 0.2 %) of USDT.
        ack = await alice.place(BTC, "buy", "0.5", price="30000.00", client_order_id="a1")
        held = await next_balance(alice, "USDT", lambda m: m["held"] != "0")
        assert (held["available"], held["held"]) == ("984970", "15030")
        status = await alice.order_status(BTC, ack["order_id"])  # read your writes
        assert (status["status"], status["order_type"], status["remaining_quantity"]) == (
            "new",
            "limit",
            "0.50000",
        )
        assert [o["client_order_id"] for o in await alice.open_orders()] == ["a1"]

        # bob sells 0.2 into it: alice pays 6000 + 6 (maker 0.1 %) and gets back the rest of its hold
        # for those 0.2; bob delivers 0.2 BTC and gets 6000 - 12 (taker 0.2 %).
        await bob.place(BTC, "sell", "0.2", type="market")
        await report(alice, lambda m: m.get("exec_type") == "trade")
        btc = await next_balance(alice, "BTC", lambda m: m["available"] == "100.2")
        assert btc["held"] == "0"
        usdt = await alice.balances()
        assert usdt["USDT"] == {"available": Decimal("984970") + Decimal("6012") - Decimal("6006"),
                                "held": Decimal("9018")}  # fmt: skip
        bob_balances = await bob.balances()
        assert bob_balances["BTC"] == {"available": Decimal("99.8"), "held": Decimal(0)}
        assert bob_balances["USDT"]["available"] == Decimal("1000000") + Decimal("5988")

        # Insufficient funds: refused by the matcher, nothing changes.
        await alice.place(ETH, "buy", "1000", price="2000.00", client_order_id="too-big")
        refused = await report(alice, lambda m: m.get("client_order_id") == "too-big")
        assert (refused["status"], refused["code"]) == ("rejected", codes.INSUFFICIENT_FUNDS)

        # Withdraw beyond available: refused; within it: done.
        await alice.withdraw("USDT", "2000000", request_id="w1")
        async for m in alice.balance_updates():
            if m["type"] == "reject":
                assert (m["request_id"], m["code"]) == ("w1", codes.INSUFFICIENT_FUNDS)
                break
        await alice.withdraw("USDT", "1000.5")
        await next_balance(alice, "USDT", lambda m: m["available"] == "983975.5")

        # cancel_all frees the hold; the closed order stays queryable.
        await alice.cancel_all()
        cancelled = await report(alice, lambda m: m.get("status") == "cancelled")
        assert cancelled["reason"] == "user"
        freed = await alice.balances()
        assert freed["USDT"] == {"available": Decimal("992993.5"), "held": Decimal(0)}
        assert await alice.open_orders() == []
        closed = await alice.order_status(BTC, client_order_id="a1")
        assert (closed["status"], closed["filled_quantity"]) == ("cancelled", "0.20000")
        with pytest.raises(Rejected) as err:
            await bob.order_status(BTC, ack["order_id"])  # not bob's
        assert err.value.code == codes.UNKNOWN_ORDER


async def test_risk_off_refuses_funding(stack_factory: Callable[..., Stack]) -> None:
    stack = stack_factory()
    async with Client(stack.gateway_url, account="carol") as carol:
        with pytest.raises(Rejected) as err:
            await carol.deposit("USDT", "5")
        assert err.value.code == codes.BALANCES_DISABLED
        await carol.place(BTC, "buy", "1", price="100.00")  # no balances: any order rests
        assert len(await carol.open_orders(BTC)) == 1
