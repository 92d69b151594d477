"""cme_client.Client against a real stack: orders of every type, rejects, the report iterator, the
local L2 book and its resync, the trade stream, and reconnect with resume after kill -9."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from decimal import Decimal
from typing import Any

import pytest
from cme_client import Client, L2Book, Message, Rejected

from shared.redis_server import free_port
from tests.e2e.client import book_of
from tests.e2e.conftest import Stack, SymbolPool, current_book

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(90)]


def client(stack: Stack, account: str, **kw: Any) -> Client:
    return Client(stack.gateway_url, stack.md_url, stack.trades_url, account=account, **kw)


async def take(reports: AsyncIterator[Message], n: int, timeout: float = 15.0) -> list[Message]:
    out: list[Message] = []

    async def read() -> None:
        async for m in reports:
            out.append(m)
            if len(out) == n:
                return

    try:
        await asyncio.wait_for(read(), timeout)
    except TimeoutError:
        raise AssertionError(f"{len(out)} of {n} reports within {timeout:.0f} s: {out}") from None
    return out


async def test_place_amend_cancel_and_their_reports(shared_stack: SymbolPool) -> None:
    stack, symbol = shared_stack.stack, shared_stack.take()
    async with client(stack, "lib-alice") as alice:
        assert alice.account == "lib-alice"
        ack = await alice.place(symbol, "buy", "1.5", price="100.00", client_order_id="a1")
        assert ack["type"] == "ack" and ack["client_order_id"] == "a1" and ack["symbol"] == symbol
        oid = ack["order_id"]
        reports = alice.execution_reports()
        [new] = await take(reports, 1)
        assert (new["status"], new["order_id"], new["quantity"]) == ("new", oid, "1.50000")

        amend = await alice.amend(symbol, oid, price=Decimal("99.50"), quantity="2")
        assert amend["op"] == "amend"
        [amended] = await take(reports, 1)
        assert (amended["exec_type"], amended["price"], amended["quantity"]) == (
            "amended",
            "99.50",
            "2.00000",
        )

        cancel = await alice.cancel(symbol, client_order_id="a1")
        assert cancel["op"] == "cancel"
        [cancelled] = await take(reports, 1)
        assert (cancelled["status"], cancelled["reason"]) == ("cancelled", "user")

        # The matcher's reject of a cancel of an order that is not open comes after its ack.
        await alice.cancel(symbol, client_order_id="a1")
        [unknown] = await take(reports, 1)
        assert (unknown["type"], unknown["code"]) == ("reject", "UNKNOWN_ORDER")
        assert alice.last_exec_ids[symbol] == unknown["exec_id"]


async def test_gateway_rejects_raise_with_their_code(shared_stack: SymbolPool) -> None:
    stack, symbol = shared_stack.stack, shared_stack.take()
    async with client(stack, "lib-rej") as c:
        cases: list[tuple[dict[str, Any], str]] = [
            ({"price": "100.001"}, "INVALID_PRICE"),
            ({"type": "market", "tif": "gtc"}, "INVALID_TIF"),
            ({"price": "100", "stp": "sometimes"}, "INVALID_STP"),
        ]
        for fields, code in cases:
            with pytest.raises(Rejected) as err:
                await c.place(symbol, "buy", "1", **fields)
            assert err.value.code == code and err.value.op == "new"
        with pytest.raises(Rejected) as err:
            await c.place("NOPE-USDT", "buy", "1", price="1")
        assert err.value.code == "UNKNOWN_SYMBOL"
        with pytest.raises(TypeError, match="float"):
            await c.place(symbol, "buy", 0.1, price="100")  # type: ignore[arg-type]
        assert await c.ping() > 0  # the connection is fine after the rejects
    with pytest.raises(ValueError):
        client(stack, "x", api_key="k")


async def test_every_order_type_trades_as_the_protocol_says(shared_stack: SymbolPool) -> None:
    stack, symbol = shared_stack.stack, shared_stack.take()
    async with client(stack, "lib-maker") as maker, client(stack, "lib-taker") as taker:
        mr, tr = maker.execution_reports(), taker.execution_reports()
        for price in ("101.00", "102.00"):
            await maker.place(symbol, "sell", "1", price=price)
        await take(mr, 2)

        await taker.place(symbol, "buy", "0.5", type="market")  # no price: market ioc
        _, fill = await take(tr, 2)
        assert (fill["last_price"], fill["liquidity"], fill["status"]) == ("101.00", "taker", "filled")
        assert fill["fee"] == "0.101"  # 0.20 % of 50.50, exact

        await taker.place(symbol, "buy", "5", price="101.00", type="ioc")
        _, fill, rest = await take(tr, 3)
        assert fill["last_quantity"] == "0.50000" and (rest["status"], rest["reason"]) == (
            "cancelled",
            "unfilled_ioc",
        )

        await taker.place(symbol, "buy", "5", price="102.00", tif="fok")
        _, fok = await take(tr, 2)
        assert (fok["status"], fok["reason"]) == ("cancelled", "fok_unfillable")

        await taker.place(symbol, "buy", "1", price="102.00", post_only=True)
        [refused] = await take(tr, 1)
        assert (refused["status"], refused["code"]) == ("rejected", "WOULD_TAKE")

        # Self-trade prevention: the maker's own buy meets its resting sell at 102.00.
        await maker.place(symbol, "buy", "1", price="102.00", stp="cancel_maker")
        got = await take(mr, 4)  # the two earlier maker fills, then the buy rests, its own ask cancelled
        assert [m["status"] for m in got[2:]] == ["new", "cancelled"]
        assert got[3]["reason"] == "self_trade_prevention" and got[3]["price"] == "102.00"


async def test_the_local_book_equals_a_fresh_snapshot_and_trades_stream_in_order(
    shared_stack: SymbolPool,
) -> None:
    stack, symbol = shared_stack.stack, shared_stack.take()
    async with client(stack, "lib-b1") as a, client(stack, "lib-b2") as b:
        l2, trades = a.l2(symbol), await a.trades(symbol).start()  # subscribed before the flow
        book = await asyncio.wait_for(anext(l2), 15)  # the snapshot: subscribed before the flow
        assert isinstance(book, L2Book) and book.synced
        seen: list[Message] = []

        async def read_trades() -> None:
            async for t in trades:
                seen.append(t)

        reader = asyncio.create_task(read_trades())
        for i in range(10):
            await a.place(symbol, "sell", "0.3", price=f"{110 + i}.00")
            await a.place(symbol, "buy", "0.2", price=f"{100 - i}.00")
        await b.place(symbol, "buy", "1", type="market")  # takes 110, 111, 112 (and part of 113)
        await b.place(symbol, "sell", "0.5", type="market")
        fresh = await current_book(stack, symbol)
        while book.seq != fresh["seq"]:
            book = await asyncio.wait_for(anext(l2), 15)
        assert book.levels() == book_of(fresh) and l2.resyncs == 0
        while len(seen) < 7:
            await asyncio.sleep(0.02)
        reader.cancel()
        ids = [t["trade_id"] for t in seen]
        assert ids == list(range(ids[0], ids[0] + 7))
        assert [t["price"] for t in seen[:4]] == ["110.00", "111.00", "112.00", "113.00"]


async def test_a_gap_resubscribes_and_the_book_comes_back_right(shared_stack: SymbolPool) -> None:
    stack, symbol = shared_stack.stack, shared_stack.take()
    async with client(stack, "lib-gap") as c:
        l2 = c.l2(symbol)
        book = await asyncio.wait_for(anext(l2), 15)
        handle, dropped = l2._handle, list[Message]()

        def drop_one(msg: Message) -> L2Book | None:
            if msg.get("type") == "l2_update" and not dropped:
                dropped.append(msg)  # lost in transit, as far as the book can tell
                return None
            return handle(msg)

        l2._handle = drop_one  # type: ignore[method-assign]
        for i in range(3):
            await c.place(symbol, "buy", "1", price=f"{50 + i}.00")
        fresh = await current_book(stack, symbol)
        while not (book.synced and book.seq == fresh["seq"]):
            book = await asyncio.wait_for(anext(l2), 15)
        assert dropped and l2.resyncs == 1
        assert book.levels() == book_of(fresh) == ([["52.00", "1.00000"], ["51.00", "1.00000"],
                                                    ["50.00", "1.00000"]], [])  # fmt: skip


async def test_reconnect_resumes_every_report_exactly_once_after_kill_9(shared_stack: SymbolPool) -> None:
    stack, symbol = shared_stack.stack, shared_stack.take()
    _, extra_url = stack.start_extra_gateway()
    alice = await client(stack, "lib-resume", max_backoff=0.5).connect()
    bob = await Client(extra_url, account="lib-resume-bob").connect()
    try:
        reports = alice.execution_reports()
        for i in range(6):
            await alice.place(symbol, "sell", "1", price=f"{200 + i}.00", client_order_id=f"s{i}")
        got = await take(reports, 6)

        stack.gateway.kill()  # kill -9: alice's connection drops without a close frame
        await bob.place(symbol, "buy", "2.5", type="market")  # fills alice's 200, 201 and half of 202
        await bob.place(symbol, "buy", "1", price="203.00")  # the rest of 202, half of 203
        await asyncio.to_thread(stack.gateway.start)
        await asyncio.to_thread(stack.wait_gateway)
        await alice.place(
            symbol, "sell", "1", price="300.00", client_order_id="after"
        )  # waits for the reconnect
        await bob.place(symbol, "buy", "0.5", type="market")  # the rest of 203, live

        async with Client(extra_url, account="lib-resume") as other:
            expected = await other.executions(symbol)
        got += await take(reports, len(expected) - len(got))
        await asyncio.sleep(0.2)  # a duplicate would arrive with the rest
        assert alice.reconnects == 1
        assert [m["exec_id"] for m in got] == [m["exec_id"] for m in expected]
        assert got == expected
        assert sum(1 for m in got if m.get("liquidity") == "maker") == 6  # 200, 201, 202 x2, 203 x2
    finally:
        await alice.close()
        await bob.close()


async def test_a_feed_stream_raises_a_refusal_or_a_failed_first_connection(shared_stack: SymbolPool) -> None:
    stack = shared_stack.stack
    async with client(stack, "lib-feeds") as c:
        with pytest.raises(Rejected) as err:
            await c.trades("NOPE-USDT").start()
        assert err.value.code == "UNKNOWN_SYMBOL"
        with pytest.raises(Rejected):
            await anext(c.l2("NOPE-USDT"))
    nowhere = Client(
        stack.gateway_url, md_url=f"ws://127.0.0.1:{free_port('127.0.0.1')}", account="lib-feeds"
    )
    async with nowhere:
        with pytest.raises(OSError):
            await anext(nowhere.l2("BTC-USDT"))
        with pytest.raises(ValueError, match="trades_url"):
            nowhere.trades("BTC-USDT")


async def test_resume_from_saved_exec_ids_after_the_clients_own_restart(shared_stack: SymbolPool) -> None:
    stack, symbol = shared_stack.stack, shared_stack.take()
    async with client(stack, "lib-saved") as first:
        for i in range(3):
            await first.place(symbol, "sell", "1", price=f"{300 + i}.00")
        await take(first.execution_reports(), 3)
        saved = first.last_exec_ids
    async with client(stack, "lib-saved-bob") as bob:
        await bob.place(symbol, "buy", "2", type="market")  # fills 300 and 301 while nobody listens
    async with client(stack, "lib-saved", resume_from=saved) as again:
        reports = again.execution_reports()
        missed = await take(reports, 2)
        assert [(m["price"], m["status"]) for m in missed] == [("300.00", "filled"), ("301.00", "filled")]
        assert missed[0]["exec_id"] > saved[symbol]
        await again.place(symbol, "sell", "1", price="400.00", client_order_id="live")
        [live] = await take(reports, 1)  # next comes the live report: nothing missed twice
        assert (live["client_order_id"], live["status"]) == ("live", "new")


async def test_candles_stream_the_snapshot_then_the_bar_a_trade_makes(shared_stack: SymbolPool) -> None:
    stack, symbol = shared_stack.stack, shared_stack.take()
    async with Client(stack.gateway_url, account="maker", md_url=stack.md_url) as maker:
        candles = await maker.candles(symbol, "1m").start()
        await maker.place(symbol, "sell", "0.5", price="30000.00")
        async with Client(stack.gateway_url, account="taker") as taker:
            await taker.place(symbol, "buy", "0.2", type="market")
            bar = await asyncio.wait_for(anext(candles), 15)
            while bar["trades"] < 1:  # an empty snapshot gives nothing; the trade's bar comes live
                bar = await asyncio.wait_for(anext(candles), 15)
        assert (bar["type"], bar["interval"], bar["symbol"]) == ("candle", "1m", symbol)
        assert (bar["open"], bar["close"], bar["volume"], bar["trades"]) == (
            "30000.00",
            "30000.00",
            "0.20000",
            1,
        )
        assert bar["close_time"] == bar["open_time"] + 60_000 - 1
        await candles.aclose()


async def test_the_newer_order_types_through_place(shared_stack: SymbolPool) -> None:
    stack, symbol = shared_stack.stack, shared_stack.take()
    async with Client(stack.gateway_url, account="carol") as carol:
        stop = await carol.place(symbol, "buy", "0.1", "31010.00", type="stop_limit", stop_price="31000.00")
        iceberg = await carol.place(symbol, "sell", "1", "30500.00", display_quantity="0.2")
        seen = {}
        async for report in carol.execution_reports():
            seen[report["order_id"]] = report
            if len(seen) == 2:
                break
        assert seen[stop["order_id"]]["status"] == "new" and seen[iceberg["order_id"]]["status"] == "new"
        book = await current_book(stack, symbol)
        assert book["asks"] == [["30500.00", "0.20000"]] and book["bids"] == [], "stop waits, reserve hidden"
        async with Client(stack.gateway_url, account="dave") as dave:
            ack = await dave.place(symbol, "buy", None, type="market", quote_quantity="3060.00")
            async for report in dave.execution_reports():
                if report["order_id"] == ack["order_id"] and report["status"] in ("filled", "cancelled"):
                    break
        # Whole lots (0.00001) while notional plus the 0.2 % taker fee stays within 3060.00.
        filled = Decimal(report["filled_quantity"])
        assert filled * Decimal("30500.00") * Decimal("1.002") <= Decimal("3060.00"), report
        assert (filled + Decimal("0.00001")) * Decimal("30500.00") * Decimal("1.002") > Decimal("3060.00")
        assert report["filled_quantity"] == "0.10012"
