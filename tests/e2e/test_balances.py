"""Balances, funding and order management over the wire, on a stack with --risk on (one matcher over
both symbols' streams, the gateway appending under the venue clock), through the project's client."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path

import orjson
import pytest
from cme_client import Client, Connection, Message, Rejected, is_type

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


def cme(*argv: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "services.cli", *argv], capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


async def test_operators_fund_and_inspect_accounts_with_an_admin_key(
    stack_factory: Callable[..., Stack], tmp_path: Path
) -> None:
    """With API keys there is no faucet: an admin funds the account (`cme deposit`), and `cme balances`
    and `cme orders` show what the account holds and has open."""
    api, admin = tmp_path / "api.json", tmp_path / "admin.json"
    api.write_bytes(orjson.dumps({"key-of-dora-0123456789abcdef": "dora"}))
    admin.write_bytes(orjson.dumps({"key-of-ops-0123456789abcdef": "ops"}))
    stack = stack_factory(risk=True, gateway_args=["--api-keys", str(api), "--admin-keys", str(admin)])
    as_admin = ("--gateway", stack.gateway_url, "--admin-key", "key-of-ops-0123456789abcdef")
    async with Client(stack.gateway_url, api_key="key-of-dora-0123456789abcdef") as dora:
        with pytest.raises(Rejected) as err:
            await dora.deposit("USDT", "10")  # only an admin funds accounts when there are API keys
        assert err.value.code == codes.UNAUTHENTICATED
        assert "queued" in await asyncio.to_thread(cme, "deposit", "dora", "USDT", "1000.25", *as_admin)
        await next_balance(dora, "USDT", lambda m: m["available"] == "1000.25")
        ack = await dora.place(BTC, "buy", "0.01", price="30000.00")
        await next_balance(dora, "USDT", lambda m: m["held"] == "300.6")
        balances = await asyncio.to_thread(cme, "balances", "dora", *as_admin)
        assert [line.split() for line in balances.splitlines()[1:]] == [["USDT", "699.65", "300.6"]]
        orders = await asyncio.to_thread(cme, "orders", "dora", "--symbol", BTC, *as_admin)
        assert ack["order_id"] in orders and "limit" in orders
        assert "queued" in await asyncio.to_thread(cme, "withdraw", "dora", "USDT", "0.25", *as_admin)
        await next_balance(dora, "USDT", lambda m: m["available"] == "699.4")


async def test_pipelined_queries_read_what_the_connection_was_told(
    stack_factory: Callable[..., Stack],
) -> None:
    """Requests sent back to back, without waiting for answers: a `balances` right after the login
    sees the faucet, an `order_status` right after a `new` sees the order (its ack came first)."""
    stack = stack_factory(risk=True)
    for attempt in range(5):  # every try a new account: its first login is the one with a grant
        conn = await Connection.open(stack.gateway_url)
        try:
            await conn.send({"op": "auth", "account": f"eager{attempt}"})
            await conn.send({"op": "balances"})
            await conn.send({"op": "new", "symbol": BTC, "side": "buy", "type": "limit", "price": "100.00",
                             "quantity": "0.1", "client_order_id": "p1"})  # fmt: skip
            await conn.send({"op": "order_status", "symbol": BTC, "client_order_id": "p1"})
            balances = await conn.wait_for(is_type("balances"))
            usdt = balances["balances"]["USDT"]  # the grant, maybe with the order's hold already (newer)
            assert Decimal(usdt["available"]) + Decimal(usdt["held"]) == 1000000, balances
            status = await conn.wait_for(is_type("order"))
            assert (status["client_order_id"], status["status"]) == ("p1", "new"), status
            kinds = [
                m["type"] for m in conn.messages if m["type"] in ("ack", "balances", "order", "authenticated")
            ]
            assert kinds == ["authenticated", "balances", "ack", "order"]  # each answer in request order
        finally:
            await conn.close()
