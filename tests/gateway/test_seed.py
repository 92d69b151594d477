"""The seed's dialect on the gateway: parsing (pure) and the answers over real sockets and Redis."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, cast

import orjson
import pytest
import redis.asyncio as aioredis
from websockets.asyncio.client import ClientConnection, connect
from websockets.typing import Subprotocol

from services.gateway import seed, validation
from services.gateway.server import Gateway
from services.gateway.sessions import Authenticator
from shared import codes, keys, stream
from shared.commands import NewOrder
from shared.instruments import default_instruments

pytestmark = pytest.mark.timeout(60)

INSTRUMENTS = default_instruments()
BTC = "BTC-USDT"
KEY = "seed-test-key-0123456789abcdef"
ORDER_SUBMISSION = [Subprotocol("order-submission")]
# The seed client's seven orders, as its json.dumps writes them.
BOOK = [
    '{"user_id": 901, "order_type": "LIMIT", "side": "BUY", "price": 98.0, "quantity": 10.0}',
    '{"user_id": 902, "order_type": "LIMIT", "side": "BUY", "price": 95.0, "quantity": 15.0}',
    '{"user_id": 903, "order_type": "LIMIT", "side": "SELL", "price": 104.0, "quantity": 20.0}',
    '{"user_id": 904, "order_type": "LIMIT", "side": "SELL", "price": 105.0, "quantity": 10.0}',
]
TAKERS = [
    '{"user_id": 905, "order_type": "MARKET", "side": "BUY", "price": 0.0, "quantity": 30.0}',
    '{"user_id": 906, "order_type": "FOK", "side": "SELL", "price": 90.0, "quantity": 15.0}',
    '{"user_id": 907, "order_type": "MARKET", "side": "SELL", "price": 0.0, "quantity": 10.0}',
]


def parsed(text: str, **kw: Any) -> NewOrder | dict[str, Any]:
    msg = validation.decode(text)
    assert msg is not None and seed.is_seed(msg)
    return seed.parse(msg, BTC, INSTRUMENTS, **kw)


def normal(account: str, **fields: Any) -> NewOrder:
    cmd = validation.parse_new({"op": "new", "symbol": BTC, **fields}, account, INSTRUMENTS)
    assert type(cmd) is NewOrder
    return cmd


# Parsing ----------------------------------------------------------------------------------------
def test_seed_orders_are_the_orders_the_normal_protocol_builds() -> None:
    assert parsed(BOOK[0]) == normal(account="901", side="buy", type="limit", price="98", quantity="10")
    assert parsed(BOOK[2]) == normal(account="903", side="sell", type="limit", price="104.0", quantity="20")
    # MARKET is a market IOC (its price is ignored: it fills); IOC and FOK are limits with that tif.
    assert parsed(TAKERS[0]) == normal(account="905", side="buy", type="market", tif="ioc", quantity="30")
    assert parsed(TAKERS[1]) == normal(account="906", side="sell", type="fok", price="90", quantity="15")
    ioc = '{"user_id": 9, "order_type": "IOC", "side": "BUY", "price": 0.1, "quantity": 0.3}'
    assert parsed(ioc) == normal(
        account="9", side="buy", type="limit", tif="ioc", price="0.10", quantity="0.3"
    )
    cmd = parsed(BOOK[0])
    assert type(cmd) is NewOrder and (cmd.tif, cmd.price, cmd.quantity) == ("gtc", 9800, 1_000_000)
    assert type(cmd.account) is str  # not the decoder's JsonNumber


def test_numbers_are_read_exactly_and_refused_off_grid() -> None:
    near = '{"user_id": 1, "order_type": "LIMIT", "side": "BUY", "price": 98.0000000000000001, "quantity": 1}'
    assert (reply := parsed(near)) and type(reply) is dict and reply["code"] == codes.INVALID_PRICE
    tiny = '{"user_id": 1, "order_type": "LIMIT", "side": "BUY", "price": 98, "quantity": 0.000001}'
    assert (reply := parsed(tiny)) and type(reply) is dict and reply["code"] == codes.INVALID_QUANTITY


@pytest.mark.parametrize(
    ("changes", "code"),
    [
        ({"user_id": True}, codes.INVALID_ACCOUNT),
        ({"user_id": 1.5}, codes.INVALID_ACCOUNT),
        ({"user_id": "a b"}, codes.INVALID_ACCOUNT),
        ({"user_id": None}, codes.INVALID_ACCOUNT),
        ({"order_type": "STOP"}, codes.INVALID_TYPE),
        ({"order_type": "limit"}, codes.INVALID_TYPE),
        ({"side": "buy"}, codes.INVALID_SIDE),
        ({"side": None}, codes.INVALID_SIDE),
        ({"price": -1}, codes.INVALID_PRICE),
        ({"price": None}, codes.INVALID_PRICE),
        ({"quantity": 0}, codes.INVALID_QUANTITY),
        ({"quantity": "ten"}, codes.INVALID_QUANTITY),
    ],
)
def test_bad_seed_orders_get_the_normal_codes(changes: dict[str, Any], code: str) -> None:
    msg = {"user_id": 901, "order_type": "LIMIT", "side": "BUY", "price": 98, "quantity": 10, **changes}
    reply = parsed(orjson.dumps(msg).decode())
    assert type(reply) is dict and reply["code"] == code
    answer = orjson.loads(seed.rejected(reply))
    assert answer["status"] == "REJECTED" and answer["code"] == code and answer["reason"]


def test_string_user_ids_and_the_seed_symbol() -> None:
    text = '{"user_id": "alice", "order_type": "LIMIT", "side": "SELL", "price": 1, "quantity": 1}'
    cmd = parsed(text)
    assert type(cmd) is NewOrder and cmd.account == "alice"
    msg = validation.decode(text)
    assert msg is not None
    unknown = seed.parse(msg, "NOPE-USDT", INSTRUMENTS)
    assert type(unknown) is dict and unknown["code"] == codes.UNKNOWN_SYMBOL
    eth = seed.parse(msg, "ETH-USDT", INSTRUMENTS)
    assert type(eth) is NewOrder and eth.symbol == "ETH-USDT"


def test_with_api_keys_only_the_authenticated_account_may_use_the_dialect() -> None:
    refused = parsed(BOOK[0], open_mode=False, session_account=None)
    assert type(refused) is dict and refused["code"] == codes.UNAUTHENTICATED
    other = parsed(BOOK[0], open_mode=False, session_account="902")
    assert type(other) is dict and other["code"] == codes.UNAUTHENTICATED
    assert type(parsed(BOOK[0], open_mode=False, session_account="901")) is NewOrder


def test_what_is_a_seed_message_and_the_answers() -> None:
    assert seed.is_seed({"order_type": "LIMIT"})
    assert not seed.is_seed({"op": "new", "order_type": "LIMIT"})  # the normal protocol's, with junk
    assert not seed.is_seed({"user_id": 1})
    assert orjson.loads(seed.accepted("1-0")) == {"status": "ACCEPTED", "order_id": "1-0"}
    side = orjson.loads(seed.rejected(validation.reject(codes.INVALID_SIDE, "new")))
    assert side == {"status": "REJECTED", "code": codes.INVALID_SIDE, "reason": "side must be BUY or SELL"}
    assert seed.select_subprotocol(None, ORDER_SUBMISSION) == "order-submission"
    assert seed.select_subprotocol(None, []) is None
    assert seed.select_subprotocol(None, [Subprotocol("chat")]) is None


# Over the wire ----------------------------------------------------------------------------------
Start = Callable[..., Awaitable[tuple[Gateway, str]]]


@pytest.fixture()
async def start_gateway(redis_url: str) -> AsyncIterator[Start]:
    started: list[Gateway] = []

    async def start(**kw: Any) -> tuple[Gateway, str]:
        gateway = Gateway(INSTRUMENTS, redis_url, **kw)
        port = await gateway.start("127.0.0.1", 0)
        started.append(gateway)
        await asyncio.wait_for(gateway.exec_subscribed.wait(), 5)
        return gateway, f"ws://127.0.0.1:{port}"

    yield start
    for gateway in started:
        await gateway.stop()


async def recv(ws: ClientConnection) -> dict[str, Any]:
    msg: dict[str, Any] = orjson.loads(await asyncio.wait_for(ws.recv(), 5))
    return msg


async def test_seed_client_orders_are_appended_and_answered(start_gateway: Start, redis_url: str) -> None:
    _gateway, url = await start_gateway()
    rds: aioredis.Redis = aioredis.Redis.from_url(redis_url)
    async with connect(url, subprotocols=ORDER_SUBMISSION, compression=None) as ws:
        assert ws.subprotocol == "order-submission"
        ids = []
        for text in BOOK + TAKERS:
            await ws.send(text)
            answer = await recv(ws)
            assert answer["status"] == "ACCEPTED", (text, answer)
            assert set(answer) == {"status", "order_id"}
            ids.append(answer["order_id"])
        entries = cast(list[tuple[bytes, dict[bytes, bytes]]], await rds.xrange(keys.orders(BTC)))
        assert [e[0].decode() for e in entries] == ids  # answered once durably on the stream, in order
        appended = [stream.decode(fields)[0] for _, fields in entries]
        assert appended == [parsed(text) for text in BOOK + TAKERS]
        # Bad seed orders: REJECTED with a reason, never INVALID_MESSAGE, and the connection stays.
        await ws.send(
            '{"user_id": 901, "order_type": "LIMIT", "side": "BUY", "price": 98.001, "quantity": 1.0}'
        )
        assert (await recv(ws)) == {
            "status": "REJECTED",
            "code": codes.INVALID_PRICE,
            "reason": codes.reason_for(codes.INVALID_PRICE),
        }
        await ws.send('{"user_id": 901, "order_type": "STOP", "side": "BUY", "price": 98.0, "quantity": 1.0}')
        assert (await recv(ws))["reason"] == "order_type must be LIMIT, MARKET, IOC or FOK"
        await ws.send('{"op": "ping", "id": 1}')  # the normal protocol still works on the same connection
        assert await recv(ws) == {"type": "pong", "id": 1}
    await rds.aclose()


async def test_a_client_offering_no_subprotocol_still_works(start_gateway: Start) -> None:
    _gateway, url = await start_gateway()
    async with connect(url, compression=None) as ws:
        assert ws.subprotocol is None
        await ws.send('{"op": "auth", "account": "alice"}')
        assert (await recv(ws))["type"] == "authenticated"
        await ws.send(BOOK[0])
        assert (await recv(ws))["status"] == "ACCEPTED"
    async with connect(url, subprotocols=[Subprotocol("chat")], compression=None) as ws:
        assert ws.subprotocol is None


async def test_the_auth_deadline_spares_seed_connections(start_gateway: Start) -> None:
    _gateway, url = await start_gateway(auth_timeout=0.5)
    async with (
        connect(url, subprotocols=ORDER_SUBMISSION, compression=None) as seeded,
        connect(url, compression=None) as silent,
        connect(url, compression=None) as rejected,
    ):
        await seeded.send(BOOK[0])
        assert (await recv(seeded))["status"] == "ACCEPTED"
        # A rejected seed order identifies nobody: that connection is held to the deadline.
        await rejected.send(
            '{"user_id": true, "order_type": "LIMIT", "side": "BUY", "price": 1, "quantity": 1}'
        )
        assert (await recv(rejected))["status"] == "REJECTED"
        for ws in (silent, rejected):
            await asyncio.wait_for(ws.wait_closed(), 5)
            assert (ws.close_code, ws.close_reason) == (1008, "authentication timeout")
        await seeded.send(BOOK[1])  # opened with the others, past their deadline, still served
        assert (await recv(seeded))["status"] == "ACCEPTED"


async def test_api_key_mode_refuses_self_declared_seed_accounts(start_gateway: Start) -> None:
    _gateway, url = await start_gateway(auth=Authenticator({KEY: "901"}))
    async with connect(url, subprotocols=ORDER_SUBMISSION, compression=None) as ws:
        await ws.send(BOOK[0])
        answer = await recv(ws)
        assert (answer["status"], answer["code"]) == ("REJECTED", codes.UNAUTHENTICATED)
        await ws.send(orjson.dumps({"op": "auth", "api_key": KEY}).decode())
        assert (await recv(ws))["type"] == "authenticated"
        await ws.send(BOOK[0])
        assert (await recv(ws))["status"] == "ACCEPTED"
        await ws.send(BOOK[1])  # user 902: not this connection's account
        assert (await recv(ws))["code"] == codes.UNAUTHENTICATED


async def test_seed_orders_are_rate_limited_and_overloaded_like_others(start_gateway: Start) -> None:
    _gateway, url = await start_gateway(rate_limit=1.0)
    async with connect(url, compression=None) as ws:
        await ws.send(BOOK[0])
        assert (await recv(ws))["status"] == "ACCEPTED"
        await ws.send(BOOK[1])
        assert (await recv(ws))["code"] == codes.RATE_LIMITED
    _gateway, url = await start_gateway(max_lag=-1)  # every new order is over the bound
    async with connect(url, compression=None) as ws:
        await ws.send(BOOK[0])
        assert (await recv(ws))["code"] == codes.OVERLOADED
