"""Bad input over real sockets to the real gateway (and feeds) processes.

Each bad message gets its reject code, the connection stays open and still works (the next, valid
order on it is acked and answered by the matcher), nothing reaches the orders stream, and the book
(a fresh l2 snapshot: levels and seq) is unchanged. Frames that must close the connection (too
large, binary, too many bad messages in a row) close it with the protocol's code and a reason, and
leave the gateway serving everyone else.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import orjson
import pytest
from cme_client import Connection, Message, gateway_session, is_type, subscribe

from tests.e2e.client import place
from tests.e2e.conftest import Stack, SymbolPool, current_book

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(60)]


@dataclass
class Book:
    stack: Stack
    symbol: str
    bid: str  # alice's resting orders (order ids)
    ask: str
    snapshot: Message

    def appended(self) -> int:
        return self.stack.counters(self.symbol)[0]


@pytest.fixture(scope="module")
def book(shared_stack: SymbolPool) -> Iterator[Book]:
    """A symbol with alice's bid at 29000.00 and ask at 31000.00, and its l2 snapshot."""
    stack, symbol = shared_stack.stack, shared_stack.take()

    async def setup() -> Book:
        alice = await gateway_session(stack.gateway_url, "alice")
        ids = []
        for side, price, cid in (("buy", "29000.00", "a-bid"), ("sell", "31000.00", "a-ask")):
            msg = {"op": "new", "symbol": symbol, "side": side, "type": "limit", "price": price,
                   "quantity": "1", "client_order_id": cid}  # fmt: skip
            ack = await place(alice, msg)
            await alice.wait_for(is_type("execution", order_id=ack["order_id"], status="new"))
            ids.append(ack["order_id"])
        await alice.close()
        snap = await current_book(stack, symbol)
        assert snap["seq"] == 2
        return Book(stack, symbol, ids[0], ids[1], snap)

    yield asyncio.run(setup())


async def probe(conn: Connection, symbol: str, **numbers: Any) -> None:
    """A valid order on this connection is acked and answered by the matcher: an IOC below the ask,
    so it cancels unfilled and leaves the book as it was. Numbers may be JSON numbers (exact ones)."""
    msg = {"op": "new", "symbol": symbol, "side": "buy", "type": "limit", "tif": "ioc", "price": "30000.00",
           "quantity": "0.001", "client_order_id": f"probe-{conn.mark()}", **numbers}  # fmt: skip
    ack = await place(conn, msg)
    assert ack["type"] == "ack", ack
    done = await conn.wait_for(is_type("execution", order_id=ack["order_id"], status="cancelled"))
    assert done["reason"] == "unfilled_ioc"


async def assert_book_unchanged(book: Book) -> None:
    assert await current_book(book.stack, book.symbol) == book.snapshot


def order_text(sym: str, **raw: str) -> str:
    """A new-order frame whose fields are raw JSON text (so NaN, 1e400 and 2**70 go out as written);
    an empty string leaves the field out."""
    fields = {"op": '"new"', "symbol": f'"{sym}"', "side": '"buy"', "type": '"limit"',
              "price": '"30000.00"', "quantity": '"1"', "client_order_id": '"bad-1"', **raw}  # fmt: skip
    return "{" + ",".join(f'"{k}":{v}' for k, v in fields.items() if v != "") + "}"


SYM = "<symbol>"  # replaced by the test's symbol

# (frame text, expected code, op echoed, client_order_id echoed)
CASES: list[Any] = [
    pytest.param('{"op": "new", "symbol": ', "INVALID_MESSAGE", None, None, id="malformed-json"),
    pytest.param("hello", "INVALID_MESSAGE", None, None, id="not-json"),
    pytest.param("[1, 2, 3]", "INVALID_MESSAGE", None, None, id="json-array"),
    pytest.param('"new"', "INVALID_MESSAGE", None, None, id="json-string"),
    pytest.param("null", "INVALID_MESSAGE", None, None, id="json-null"),
    pytest.param('{"symbol": "x"}', "INVALID_MESSAGE", None, None, id="no-op"),
    pytest.param('{"op": 5}', "INVALID_MESSAGE", None, None, id="op-not-a-string"),
    pytest.param('{"op": "replace"}', "UNKNOWN_OP", "replace", None, id="unknown-op"),
    pytest.param(order_text(SYM, price="[30000]"), "INVALID_PRICE", "new", "bad-1", id="price-list"),
    pytest.param(order_text(SYM, price='{"v": 1}'), "INVALID_PRICE", "new", "bad-1", id="price-object"),
    pytest.param(order_text(SYM, quantity="true"), "INVALID_QUANTITY", "new", "bad-1", id="quantity-bool"),
    pytest.param(order_text(SYM, side="1"), "INVALID_SIDE", "new", "bad-1", id="side-number"),
    pytest.param(order_text(SYM, type='"stop"'), "INVALID_TYPE", "new", "bad-1", id="unknown-type"),
    pytest.param(
        order_text(SYM, post_only='"yes"'), "INVALID_MESSAGE", "new", "bad-1", id="post-only-string"
    ),
    pytest.param(order_text(SYM, price='"30000.005"'), "INVALID_PRICE", "new", "bad-1", id="off-tick"),
    pytest.param(order_text(SYM, price="30000.001"), "INVALID_PRICE", "new", "bad-1", id="off-tick-number"),
    pytest.param(order_text(SYM, price="NaN"), "INVALID_PRICE", "new", "bad-1", id="nan-literal"),
    pytest.param(order_text(SYM, price='"NaN"'), "INVALID_PRICE", "new", "bad-1", id="nan-string"),
    pytest.param(order_text(SYM, quantity="NaN"), "INVALID_QUANTITY", "new", "bad-1", id="nan-quantity"),
    pytest.param(order_text(SYM, price="Infinity"), "INVALID_PRICE", "new", "bad-1", id="infinity"),
    pytest.param(order_text(SYM, price="-Infinity"), "INVALID_PRICE", "new", "bad-1", id="minus-infinity"),
    pytest.param(order_text(SYM, price='"Infinity"'), "INVALID_PRICE", "new", "bad-1", id="infinity-string"),
    pytest.param(order_text(SYM, quantity="Infinity"), "INVALID_QUANTITY", "new", "bad-1", id="inf-quantity"),
    pytest.param(order_text(SYM, price="1e400"), "INVALID_PRICE", "new", "bad-1", id="1e400"),
    pytest.param(order_text(SYM, price='"1e400"'), "INVALID_PRICE", "new", "bad-1", id="1e400-string"),
    pytest.param(order_text(SYM, quantity="1e400"), "INVALID_QUANTITY", "new", "bad-1", id="1e400-quantity"),
    pytest.param(order_text(SYM, price="1e-400"), "INVALID_PRICE", "new", "bad-1", id="1e-400"),
    pytest.param(order_text(SYM, price=str(10**40)), "INVALID_PRICE", "new", "bad-1", id="huge-int"),
    pytest.param(
        order_text(SYM, price=str(2**64 + 1)), "INVALID_PRICE", "new", "bad-1", id="int-over-64-bits"
    ),
    pytest.param(
        order_text(SYM, quantity=str(10**40)), "INVALID_QUANTITY", "new", "bad-1", id="huge-int-qty"
    ),
    pytest.param(
        order_text(SYM, price='"1' + "0" * 60 + '"'), "INVALID_PRICE", "new", "bad-1", id="huge-string"
    ),
    pytest.param(
        order_text(SYM, price='"10000000.01"'), "INVALID_PRICE", "new", "bad-1", id="above-max-price"
    ),
    pytest.param(
        order_text(SYM, quantity='"10000.00001"'), "INVALID_QUANTITY", "new", "bad-1", id="above-max-qty"
    ),
    pytest.param(order_text(SYM, price='"-30000.00"'), "INVALID_PRICE", "new", "bad-1", id="negative-price"),
    pytest.param(order_text(SYM, quantity="-1"), "INVALID_QUANTITY", "new", "bad-1", id="negative-quantity"),
    pytest.param(order_text(SYM, price='"0"'), "INVALID_PRICE", "new", "bad-1", id="zero-price"),
    pytest.param(order_text(SYM, price="0"), "INVALID_PRICE", "new", "bad-1", id="zero-price-number"),
    pytest.param(
        order_text(SYM, quantity='"0.00000"'), "INVALID_QUANTITY", "new", "bad-1", id="zero-quantity"
    ),
    pytest.param(
        order_text(SYM, quantity='"0.000001"'), "INVALID_QUANTITY", "new", "bad-1", id="too-many-decimals-qty"
    ),
    pytest.param(
        order_text(SYM, price='"30000.001"'), "INVALID_PRICE", "new", "bad-1", id="too-many-decimals"
    ),
    # 0.1000000000000000055511151231257827 is the double nearest 0.1: read as a float it would be a
    # valid 0.1; read exactly (as the protocol says) it is off the lot grid.
    pytest.param(
        order_text(SYM, quantity="0.1000000000000000055511151231257827"),
        "INVALID_QUANTITY",
        "new",
        "bad-1",
        id="not-exact-as-double",
    ),
    pytest.param(
        order_text(SYM, price='"0.01"', quantity='"0.00001"'),
        "MIN_NOTIONAL",
        "new",
        "bad-1",
        id="min-notional",
    ),
    pytest.param(order_text(SYM, price='""'), "INVALID_PRICE", "new", "bad-1", id="empty-price"),
    pytest.param(order_text(SYM, price=""), "INVALID_PRICE", "new", "bad-1", id="limit-without-price"),
    pytest.param(order_text(SYM, quantity=""), "INVALID_QUANTITY", "new", "bad-1", id="no-quantity"),
    pytest.param(order_text("DOGE-USDT"), "UNKNOWN_SYMBOL", "new", "bad-1", id="unknown-symbol"),
    pytest.param(order_text(SYM, symbol="7"), "UNKNOWN_SYMBOL", "new", "bad-1", id="symbol-number"),
    pytest.param(order_text(SYM, type='"market"'), "INVALID_PRICE", "new", "bad-1", id="market-with-price"),
    pytest.param(
        order_text(SYM, type='"market"', price="", tif='"gtc"'),
        "INVALID_TIF",
        "new",
        "bad-1",
        id="market-gtc",
    ),
    pytest.param(order_text(SYM, tif='"day"'), "INVALID_TIF", "new", "bad-1", id="unknown-tif"),
    pytest.param(
        order_text(SYM, tif='"ioc"', post_only="true"), "INVALID_TIF", "new", "bad-1", id="post-only-ioc"
    ),
    pytest.param(order_text(SYM, stp='"cancel_nobody"'), "INVALID_STP", "new", "bad-1", id="unknown-stp"),
    pytest.param(
        order_text(SYM, client_order_id='"' + "x" * 37 + '"'),
        "INVALID_CLIENT_ORDER_ID",
        "new",
        None,
        id="client-order-id-too-long",
    ),
    pytest.param(
        order_text(SYM, client_order_id="12"),
        "INVALID_CLIENT_ORDER_ID",
        "new",
        None,
        id="client-order-id-number",
    ),
    pytest.param(
        f'{{"op": "cancel", "symbol": "{SYM}"}}', "INVALID_MESSAGE", "cancel", None, id="cancel-without-id"
    ),
    pytest.param(
        f'{{"op": "cancel", "symbol": "{SYM}", "order_id": "abc"}}',
        "UNKNOWN_ORDER",
        "cancel",
        None,
        id="cancel-garbage-id",
    ),
    pytest.param(
        f'{{"op": "amend", "symbol": "{SYM}", "client_order_id": "a-bid"}}',
        "INVALID_MESSAGE",
        "amend",
        "a-bid",
        id="amend-without-changes",
    ),
]


@pytest.mark.parametrize(("text", "code", "op", "cid"), CASES)
async def test_bad_message_gets_its_code_and_the_connection_and_book_stay(
    book: Book, text: str, code: str, op: str | None, cid: str | None
) -> None:
    conn = await gateway_session(book.stack.gateway_url, "mallory")
    try:
        appended = await asyncio.to_thread(book.appended)
        start = conn.mark()
        await conn.send_raw(text.replace(SYM, book.symbol))
        reply = await conn.wait_for(lambda m: m.get("type") in ("reject", "ack"), start=start)
        assert reply == {"type": "reject", "op": op, "client_order_id": cid, "code": code,
                         "reason": reply["reason"]}  # fmt: skip
        assert isinstance(reply["reason"], str) and reply["reason"]
        assert await asyncio.to_thread(book.appended) == appended, "nothing reached the orders stream"
        await probe(conn, book.symbol)
        assert not conn.closed.is_set()
        assert await asyncio.to_thread(book.appended) == appended + 1
        await assert_book_unchanged(book)
    finally:
        await conn.close()


async def test_exact_json_numbers_are_accepted(book: Book) -> None:
    """A JSON integer, and a JSON number whose shortest repr is exact, are read from their text."""
    conn = await gateway_session(book.stack.gateway_url, "mallory")
    try:
        await probe(conn, book.symbol, price=30000, quantity=1)
        await probe(conn, book.symbol, price=30000.5, quantity=0.1)
        await probe(conn, book.symbol, price=29999.99, quantity=1e-05)
        await assert_book_unchanged(book)
    finally:
        await conn.close()


async def test_all_bad_messages_in_a_row_on_one_connection(book: Book) -> None:
    """Every bad message of the table on one connection, a valid order after each: fewer than 20
    protocol errors in a row, so the connection stays; the book and the stream see none of them."""
    conn = await gateway_session(book.stack.gateway_url, "mallory")
    try:
        appended = await asyncio.to_thread(book.appended)
        for case in CASES:
            text, code = case.values[0], case.values[1]
            start = conn.mark()
            await conn.send_raw(text.replace(SYM, book.symbol))
            reply = await conn.wait_for(lambda m: m.get("type") in ("reject", "ack"), start=start)
            assert (reply["type"], reply["code"]) == ("reject", code), (case.id, reply)
            await probe(conn, book.symbol)
        assert await asyncio.to_thread(book.appended) == appended + len(CASES)
        await assert_book_unchanged(book)
    finally:
        await conn.close()


async def test_unauthenticated_orders_are_refused_until_auth(book: Book) -> None:
    conn = await Connection.open(book.stack.gateway_url)
    try:
        appended = await asyncio.to_thread(book.appended)
        for msg in (
            {"op": "new", "symbol": book.symbol, "side": "sell", "type": "limit", "price": "29000.00",
             "quantity": "1", "client_order_id": "u1"},
            {"op": "cancel", "symbol": book.symbol, "order_id": book.bid, "client_order_id": "a-bid"},
            {"op": "cancel", "symbol": book.symbol, "client_order_id": "a-ask"},
            {"op": "amend", "symbol": book.symbol, "order_id": book.ask, "quantity": "0.5"},
        ):  # fmt: skip
            reply = await place(conn, msg)
            assert (reply["type"], reply["code"]) == ("reject", "UNAUTHENTICATED"), reply
        # a failed auth is refused too, and the connection stays
        reply = await conn.request({"op": "auth"}, is_type("reject"))
        assert reply["code"] == "UNAUTHENTICATED"
        reply = await conn.request({"op": "auth", "account": "bad account!"}, is_type("reject"))
        assert reply["code"] == "INVALID_ACCOUNT"
        assert await asyncio.to_thread(book.appended) == appended
        await assert_book_unchanged(book)
        reply = await conn.request({"op": "auth", "account": "latecomer"}, is_type("authenticated"))
        assert reply == {"type": "authenticated", "account": "latecomer"}
        await probe(conn, book.symbol)
    finally:
        await conn.close()


async def test_cancel_or_amend_of_another_accounts_order_is_unknown_order(book: Book) -> None:
    """The gateway cannot know whose order it is: it acks, and the matcher answers UNKNOWN_ORDER
    exactly as for an order that does not exist. alice's orders stay, and she hears nothing."""
    bob = await gateway_session(book.stack.gateway_url, "bob")
    alice = await gateway_session(book.stack.gateway_url, "alice")
    try:
        attempts: list[Message] = [
            {"op": "cancel", "symbol": book.symbol, "order_id": book.bid},
            {"op": "cancel", "symbol": book.symbol, "client_order_id": "a-ask"},
            {"op": "amend", "symbol": book.symbol, "order_id": book.ask, "price": "31000.01"},
            {"op": "amend", "symbol": book.symbol, "client_order_id": "a-bid", "quantity": "0.5"},
        ]
        for msg in attempts:
            start = bob.mark()
            ack = await place(bob, msg)
            assert (ack["type"], ack["op"]) == ("ack", msg["op"]), ack
            rej = await bob.wait_for(is_type("reject", op=msg["op"], symbol=book.symbol), start=start)
            assert rej["code"] == "UNKNOWN_ORDER", rej
            assert rej.get("order_id") == msg.get("order_id")
        await probe(bob, book.symbol)
        await assert_book_unchanged(book)
        assert not alice.since(0, is_type("execution")), "alice's orders were not touched"
    finally:
        await bob.close()
        await alice.close()


async def test_oversized_frame_closes_with_1009_and_others_are_unaffected(book: Book) -> None:
    bystander = await gateway_session(book.stack.gateway_url, "bystander")
    conn = await gateway_session(book.stack.gateway_url, "mallory")
    try:
        # The limit is 16 KiB (16384 bytes): a frame of exactly that size is still answered ...
        base = '{"op":"ping","id":7,"pad":""}'
        at_limit = base.replace('""', '"' + "x" * (16_384 - len(base)) + '"')
        assert len(at_limit.encode()) == 16_384
        pong = await conn.request(orjson.loads(at_limit), is_type("pong"))
        assert pong == {"type": "pong", "id": 7}
        # ... one byte more closes the connection with 1009 and a reason.
        await conn.send_raw(at_limit.replace('"x', '"xx'))
        code, reason = await conn.wait_closed()
        assert code == 1009 and reason, (code, reason)
        await probe(bystander, book.symbol)
        await assert_book_unchanged(book)
    finally:
        await conn.close()
        await bystander.close()


async def test_binary_frame_closes_with_1003(book: Book) -> None:
    conn = await gateway_session(book.stack.gateway_url, "mallory")
    try:
        order = order_text(book.symbol)
        await conn.send_raw(order.encode())  # a valid order, but in a binary frame
        code, reason = await conn.wait_closed()
        assert code == 1003 and reason, (code, reason)
        assert not conn.since(0, is_type("ack")), "the binary order was not taken"
        await assert_book_unchanged(book)
    finally:
        await conn.close()
    again = await gateway_session(book.stack.gateway_url, "mallory")
    try:
        await probe(again, book.symbol)
    finally:
        await again.close()


async def test_twenty_bad_messages_in_a_row_close_with_1008(book: Book) -> None:
    conn = await gateway_session(book.stack.gateway_url, "mallory")
    try:
        for _ in range(20):
            await conn.send_raw("{not json")
        code, reason = await conn.wait_closed()
        assert code == 1008 and reason, (code, reason)
        assert len(conn.since(0, is_type("reject", code="INVALID_MESSAGE"))) == 20
    finally:
        await conn.close()
    await assert_book_unchanged(book)


async def test_bad_subscriptions_on_the_feeds_keep_the_connection(book: Book) -> None:
    for url, good in ((book.stack.md_url, "l2_snapshot"), (book.stack.trades_url, None)):
        conn = await Connection.open(url)
        try:
            for text, code in (
                ("{oops", "INVALID_MESSAGE"),
                ("[]", "INVALID_MESSAGE"),
                ('{"op": "subscribe"}', "INVALID_MESSAGE"),
                ('{"op": "publish", "symbol": "BTC-USDT"}', "UNKNOWN_OP"),
                ('{"op": "subscribe", "symbol": "DOGE-USDT"}', "UNKNOWN_SYMBOL"),
                (f'{{"op": "subscribe", "symbol": "{book.symbol}", "channel": "l3"}}', "INVALID_MESSAGE"),
            ):
                start = conn.mark()
                await conn.send_raw(text)
                reply = await conn.wait_for(is_type("reject"), start=start)
                assert reply["code"] == code, (text, reply)
            start = conn.mark()
            await conn.send({"op": "subscribe", "symbol": book.symbol})
            await conn.wait_for(is_type("subscribed", symbol=book.symbol), start=start)
            if good:
                snap = await conn.wait_for(is_type(good, symbol=book.symbol), start=start)
                assert snap == book.snapshot
        finally:
            await conn.close()


async def test_subscriptions_still_work_after_bad_ones(book: Book) -> None:
    conn = await subscribe(book.stack.md_url, book.symbol, channel="depth")
    try:
        depth = await conn.wait_for(is_type("depth", symbol=book.symbol))
        assert (depth["bids"], depth["asks"]) == (book.snapshot["bids"], book.snapshot["asks"])
    finally:
        await conn.close()


@pytest.mark.parametrize("op", ["cancel", "amend"])
async def test_order_id_beyond_64_bits_is_rejected_and_the_connection_stays(book: Book, op: str) -> None:
    conn = await gateway_session(book.stack.gateway_url, "mallory")
    try:
        msg: Message = {"op": op, "symbol": book.symbol, "order_id": "99999999999999999999-0"}
        if op == "amend":
            msg["quantity"] = "0.5"
        start = conn.mark()
        await conn.send(msg)
        # Either the gateway refuses it at once, or it acks and the matcher answers UNKNOWN_ORDER.
        rej = await conn.wait_for(is_type("reject", op=op), timeout=5, start=start)
        assert rej["code"] == "UNKNOWN_ORDER", rej
        assert not conn.closed.is_set()
        await probe(conn, book.symbol)
        await assert_book_unchanged(book)
    finally:
        await conn.close()


async def test_feeds_close_oversized_binary_and_persistently_bad_clients(book: Book) -> None:
    for url in (book.stack.md_url, book.stack.trades_url):
        cases: list[tuple[str | bytes, int, int]] = [
            ('{"op":"subscribe","symbol":"' + book.symbol + '","pad":"' + "x" * 5000 + '"}', 1009, 0),
            (b"\x00\x01", 1003, 0),
            ("{", 1008, 21),  # 21 bad messages: each rejected, then the close
        ]
        for frame, code, rejects in cases:
            conn = await Connection.open(url)
            try:
                for _ in range(max(1, rejects)):
                    await conn.send_raw(frame)
                got, reason = await conn.wait_closed()
                assert got == code and reason, (url, frame[:20], got, reason)
                assert len(conn.since(0, is_type("reject", code="INVALID_MESSAGE"))) == rejects
            finally:
                await conn.close()
    # the feeds still serve everyone else
    assert await current_book(book.stack, book.symbol) == book.snapshot
