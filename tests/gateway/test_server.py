"""The gateway against a real redis-server and real WebSocket clients on 127.0.0.1."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from services.gateway.server import Gateway, _labels
from services.gateway.sessions import Authenticator
from shared import codes, keys, stream
from shared.commands import Cancel, CancelAll, Deposit, Grant, NewOrder, Withdraw
from shared.ids import entry_to_seq
from shared.instruments import asset_scales, default_instruments
from shared.metrics import APPEND_BATCH, REGISTRY
from shared.redis_server import RedisServer, free_port
from shared.wire import frame

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[2]
BTC = "BTC-USDT"
Start = Callable[..., Awaitable[tuple[Gateway, str]]]


def order(cid: str, **changes: Any) -> dict[str, Any]:
    return {
        "op": "new",
        "symbol": BTC,
        "side": "buy",
        "type": "limit",
        "price": "100.50",
        "quantity": "2",
        "client_order_id": cid,
        **changes,
    }


@pytest.fixture()
async def start_gateway(redis_url: str) -> AsyncIterator[Start]:
    """Start in-process gateways (port 0) on the test's Redis; all are stopped at the end."""
    started: list[Gateway] = []

    async def start(url: str = redis_url, **kw: Any) -> tuple[Gateway, str]:
        gateway = Gateway(default_instruments(), url, **kw)
        port = await gateway.start("127.0.0.1", 0)
        started.append(gateway)
        await asyncio.wait_for(gateway.exec_subscribed.wait(), 5)
        return gateway, f"ws://127.0.0.1:{port}"

    yield start
    for gateway in started:
        await gateway.stop(timeout=5)


@pytest.fixture()
async def rds(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url)
    yield client
    await client.aclose()


async def send(ws: ClientConnection, msg: dict[str, Any] | str | bytes) -> None:
    await ws.send(msg if isinstance(msg, str | bytes) else orjson.dumps(msg).decode())


async def recv(ws: ClientConnection, timeout: float = 5.0) -> dict[str, Any]:
    data = await asyncio.wait_for(ws.recv(), timeout)
    result: dict[str, Any] = orjson.loads(data)
    return result


async def login(url: str, account: str) -> ClientConnection:
    ws = await connect(url, compression=None)
    await send(ws, {"op": "auth", "account": account})
    assert await recv(ws) == {"type": "authenticated", "account": account}
    return ws


async def closed_with(ws: ClientConnection) -> tuple[int, str]:
    """Read until the server closes; the close code and reason it sent."""
    with pytest.raises(ConnectionClosed) as info:
        while True:
            await asyncio.wait_for(ws.recv(), 5)
    assert info.value.rcvd is not None
    return info.value.rcvd.code, info.value.rcvd.reason


# Acks and appends -------------------------------------------------------------------------------
async def test_ack_carries_entry_id_of_exact_stream_entry(start_gateway: Start, rds: aioredis.Redis) -> None:
    _, url = await start_gateway()
    ws = await login(url, "alice")
    before = time.time_ns()
    await send(ws, order("c-1"))
    ack = await recv(ws)
    after = time.time_ns()
    assert ack == {
        "type": "ack",
        "op": "new",
        "client_order_id": "c-1",
        "order_id": ack["order_id"],
        "symbol": BTC,
    }
    entries = await rds.xrange(keys.orders(BTC))
    assert [e[0].decode() for e in entries] == [ack["order_id"]]
    fields = entries[0][1]
    cmd, recv_ns = stream.decode(fields)
    assert cmd == NewOrder(BTC, "alice", "buy", "limit", "gtc", 10050, 200000, "c-1", False, "cancel_taker")
    assert before <= recv_ns <= after
    assert fields == {b"d": stream.encode(cmd, recv_ns)}
    assert int(await rds.get(keys.appended(BTC))) == 1

    await send(ws, {"op": "cancel", "symbol": BTC, "order_id": ack["order_id"]})
    assert await recv(ws) == {
        "type": "ack",
        "op": "cancel",
        "client_order_id": None,
        "order_id": ack["order_id"],
        "symbol": BTC,
    }
    await send(ws, {"op": "amend", "symbol": BTC, "client_order_id": "c-1", "quantity": "1"})
    assert await recv(ws) == {
        "type": "ack",
        "op": "amend",
        "client_order_id": "c-1",
        "order_id": None,
        "symbol": BTC,
    }
    entries = await rds.xrange(keys.orders(BTC))
    assert stream.decode(entries[1][1])[0] == Cancel(BTC, "alice", entry_to_seq(ack["order_id"]), None)
    assert len(entries) == 3 and int(await rds.get(keys.appended(BTC))) == 3
    await ws.close()


async def test_concurrent_orders_are_batched(start_gateway: Start, rds: aioredis.Redis) -> None:
    _, url = await start_gateway()
    batches = APPEND_BATCH.labels()
    batches_before, orders_before = sum(batches.counts), batches.total
    clients, per_client = 10, 200
    sockets = [await login(url, f"trader{i}") for i in range(clients)]

    async def flood(i: int, ws: ClientConnection) -> list[dict[str, Any]]:
        symbol = BTC if i % 2 else "ETH-USDT"
        for n in range(per_client):
            await send(ws, order(f"t{i}-{n}", symbol=symbol))
        return [await recv(ws) for _ in range(per_client)]

    results = await asyncio.gather(*(flood(i, ws) for i, ws in enumerate(sockets)))
    ids: set[tuple[str, str]] = set()  # entry ids are unique per stream, i.e. per symbol
    for i, acks in enumerate(results):
        assert [a["type"] for a in acks] == ["ack"] * per_client
        # in order on each connection, and the stream keeps that order
        assert [a["client_order_id"] for a in acks] == [f"t{i}-{n}" for n in range(per_client)]
        seqs = [entry_to_seq(a["order_id"]) for a in acks]
        assert seqs == sorted(seqs)
        ids.update((a["symbol"], a["order_id"]) for a in acks)
    total = clients * per_client
    assert len(ids) == total
    stored = {(s, e[0].decode()) for s in (BTC, "ETH-USDT") for e in await rds.xrange(keys.orders(s))}
    assert stored == ids
    assert int(await rds.get(keys.appended(BTC))) + int(await rds.get(keys.appended("ETH-USDT"))) == total
    round_trips = sum(batches.counts) - batches_before
    assert batches.total - orders_before == total
    assert round_trips < total / 4, f"{round_trips} round trips for {total} orders"
    for ws in sockets:
        await ws.close()


async def wait_for(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)


async def test_shutdown_acks_everything_accepted(start_gateway: Start, rds: aioredis.Redis) -> None:
    gateway, url = await start_gateway()
    ws = await login(url, "alice")
    await rds.execute_command("CLIENT", "PAUSE", "500", "WRITE")  # hold the appends in flight
    for n in range(300):
        await send(ws, order(f"s{n}"))
    await send(ws, {"op": "ping"})
    await wait_for(lambda: gateway.appender.backlog == 300)
    stopping = asyncio.create_task(gateway.stop(timeout=5))
    replies = [await recv(ws) for _ in range(301)]
    code, reason = await closed_with(ws)
    await stopping
    assert [r["type"] for r in replies] == ["ack"] * 300 + ["pong"]
    assert (code, reason) == (1001, "server shutting down")
    assert await rds.xlen(keys.orders(BTC)) == 300


async def test_replies_keep_their_order_behind_a_pending_ack(
    start_gateway: Start, rds: aioredis.Redis
) -> None:
    """On the connection that placed an order, its ack comes before anything sent after it."""
    gateway, url = await start_gateway()
    ws = await login(url, "alice")
    await rds.execute_command("CLIENT", "PAUSE", "300", "WRITE")
    await send(ws, order("c-7"))
    await wait_for(lambda: gateway.appender.backlog == 1)
    report = b'{"type":"execution","client_order_id":"c-7","status":"new"}'
    gateway.deliver(frame([b"alice " + report], time.time_ns()) or b"")
    first = await recv(ws)
    assert first["type"] == "ack" and first["client_order_id"] == "c-7"
    assert await asyncio.wait_for(ws.recv(), 5) == report.decode()
    await ws.close()


# Bad input ----------------------------------------------------------------------------------------
BAD_INPUTS: list[tuple[str, str]] = [
    ("not json", codes.INVALID_MESSAGE),
    ("[1, 2, 3]", codes.INVALID_MESSAGE),
    ('{"op": 1}', codes.INVALID_MESSAGE),
    ('{"no_op": true}', codes.INVALID_MESSAGE),
    ('{"op":"explode"}', codes.UNKNOWN_OP),
    ('{"op":"new","symbol":"NOPE-USDT","side":"buy","price":"1","quantity":"1"}', codes.UNKNOWN_SYMBOL),
    ('{"op":"new","symbol":"BTC-USDT","side":1,"price":"1","quantity":"1"}', codes.INVALID_SIDE),
    (
        '{"op":"new","symbol":"BTC-USDT","side":"buy","type":["limit"],"price":"1","quantity":"1"}',
        codes.INVALID_TYPE,
    ),
    (
        '{"op":"new","symbol":"BTC-USDT","side":"buy","type":"market","tif":"gtc","quantity":"1"}',
        codes.INVALID_TIF,
    ),
    ('{"op":"new","symbol":"BTC-USDT","side":"buy","price":"100.001","quantity":"1"}', codes.INVALID_PRICE),
    ('{"op":"new","symbol":"BTC-USDT","side":"buy","price":NaN,"quantity":"1"}', codes.INVALID_PRICE),
    ('{"op":"new","symbol":"BTC-USDT","side":"buy","price":"Infinity","quantity":"1"}', codes.INVALID_PRICE),
    ('{"op":"new","symbol":"BTC-USDT","side":"buy","price":1e400,"quantity":"1"}', codes.INVALID_PRICE),
    (
        '{"op":"new","symbol":"BTC-USDT","side":"buy","price":' + "9" * 400 + ',"quantity":"1"}',
        codes.INVALID_PRICE,
    ),
    ('{"op":"new","symbol":"BTC-USDT","side":"buy","price":true,"quantity":"1"}', codes.INVALID_PRICE),
    ('{"op":"new","symbol":"BTC-USDT","side":"buy","price":"-5","quantity":"1"}', codes.INVALID_PRICE),
    ('{"op":"new","symbol":"BTC-USDT","side":"buy","price":"1","quantity":"0"}', codes.INVALID_QUANTITY),
    ('{"op":"new","symbol":"BTC-USDT","side":"buy","price":"1","quantity":"1e-400"}', codes.INVALID_QUANTITY),
    (
        '{"op":"new","symbol":"BTC-USDT","side":"buy","price":"1","quantity":99999999999999999999}',
        codes.INVALID_QUANTITY,
    ),
    ('{"op":"new","symbol":"BTC-USDT","side":"buy","price":"0.01","quantity":"0.00001"}', codes.MIN_NOTIONAL),
    (
        '{"op":"new","symbol":"BTC-USDT","side":"buy","price":"1","quantity":"1","client_order_id":""}',
        codes.INVALID_CLIENT_ORDER_ID,
    ),
    (
        '{"op":"new","symbol":"BTC-USDT","side":"buy","price":"1","quantity":"1","stp":"none"}',
        codes.INVALID_STP,
    ),
    ('{"op":"cancel","symbol":"BTC-USDT","order_id":"bogus"}', codes.UNKNOWN_ORDER),
    ('{"op":"cancel","symbol":"BTC-USDT"}', codes.INVALID_MESSAGE),
    ('{"op":{"new":1},"symbol":"BTC-USDT"}', codes.INVALID_MESSAGE),
    ('{"op":["cancel"]}', codes.INVALID_MESSAGE),
    ('{"op":"auth","account":"bad name"}', codes.INVALID_ACCOUNT),
]


async def test_each_bad_input_gets_its_code_and_the_connection_stays(
    start_gateway: Start, rds: aioredis.Redis
) -> None:
    _, url = await start_gateway()
    async with connect(url, compression=None) as ws:
        await send(ws, order("early"))
        assert await recv(ws) == {
            "type": "reject",
            "op": "new",
            "client_order_id": "early",
            "code": codes.UNAUTHENTICATED,
            "reason": codes.reason_for(codes.UNAUTHENTICATED),
        }
        await send(ws, {"op": "cancel", "symbol": BTC, "order_id": "1-0"})
        assert (await recv(ws))["code"] == codes.UNAUTHENTICATED
        await send(ws, {"op": "auth", "account": "alice"})
        assert (await recv(ws))["type"] == "authenticated"
        for text, code in BAD_INPUTS:
            await send(ws, text)
            reply = await recv(ws)
            assert (reply["type"], reply["code"]) == ("reject", code), text
            assert reply["reason"]
        await send(ws, {"op": "ping"})
        assert await recv(ws) == {"type": "pong"}
    assert await rds.xlen(keys.orders(BTC)) == 0
    assert await rds.get(keys.appended(BTC)) is None


@pytest.mark.parametrize("op", [{"new": 1}, ["cancel"], None, 7, "nope"])
def test_a_reject_of_anything_but_an_order_op_has_no_order_labels(op: object) -> None:
    # An object or array as "op" once raised TypeError here (unhashable in the set of order ops).
    assert _labels({"op": op, "symbol": BTC}, default_instruments()) == (None, None)


def test_a_rejected_order_is_labelled_by_symbol_and_type() -> None:
    instruments = default_instruments()
    assert _labels({"op": "new", "symbol": BTC, "type": "market"}, instruments) == (BTC, "market")
    assert _labels({"op": "cancel", "symbol": {"x": 1}}, instruments) == ("unknown", "cancel")


async def test_oversized_frame_closes_with_1009(start_gateway: Start) -> None:
    _, url = await start_gateway(max_frame=1024)
    ws = await login(url, "alice")
    await send(ws, order("x" * 10, pad="y" * 800))  # under the limit: answered
    assert (await recv(ws))["type"] == "ack"
    await send(ws, order("big", pad="y" * 2000))
    code, reason = await closed_with(ws)
    assert code == 1009 and "exceeds limit" in reason


async def test_binary_frame_closes_with_1003(start_gateway: Start) -> None:
    _, url = await start_gateway()
    ws = await login(url, "alice")
    await send(ws, orjson.dumps(order("bin")))
    assert await closed_with(ws) == (1003, "text frames only")


async def test_repeated_bad_messages_close_with_1008(start_gateway: Start) -> None:
    _, url = await start_gateway(max_bad=5)
    ws = await login(url, "alice")
    for _ in range(5):
        await send(ws, "{{{")
    replies = []
    with pytest.raises(ConnectionClosed) as info:
        while True:
            replies.append(orjson.loads(await asyncio.wait_for(ws.recv(), 5)))
    assert [r["code"] for r in replies] == [codes.INVALID_MESSAGE] * 5  # each still answered
    assert info.value.rcvd is not None
    assert (info.value.rcvd.code, info.value.rcvd.reason) == (1008, "too many invalid messages")


async def test_fragmented_and_fast_path_messages_keep_their_order(start_gateway: Start) -> None:
    _, url = await start_gateway()
    ws = await login(url, "alice")
    text = orjson.dumps(order("frag")).decode()
    await ws.send([text[:20], text[20:60], text[60:]])  # one message in three frames: the recv() path
    await send(ws, order("whole"))  # a complete frame right behind it
    await send(ws, {"op": "ping"})
    replies = [await recv(ws) for _ in range(3)]
    assert [(r["type"], r.get("client_order_id")) for r in replies] == [
        ("ack", "frag"),
        ("ack", "whole"),
        ("pong", None),
    ]
    await ws.close()


async def test_invalid_utf8_text_frame_closes_with_1007(start_gateway: Start) -> None:
    _, url = await start_gateway()
    ws = await login(url, "alice")
    ws.protocol.send_text(b'{"op":"ping","x":"\xff"}')  # bypass the client's own encoding
    ws.send_data()
    code, reason = await closed_with(ws)
    assert code == 1007 and reason


async def test_metrics_and_health(start_gateway: Start, rds: aioredis.Redis) -> None:
    gateway, url = await start_gateway()

    def sample(name: str, **labels: str) -> float:
        return REGISTRY.get_sample_value(name, labels) or 0.0

    accepted = sample("cme_orders_total", symbol=BTC, type="market", result="accepted")
    rejected = sample("cme_orders_total", symbol=BTC, type="limit", result="rejected")
    min_notional = sample("cme_rejects_total", code=codes.MIN_NOTIONAL, stage="gateway")
    connections = sample("cme_ws_connections", server="gateway")
    ws = await login(url, "alice")
    assert sample("cme_ws_connections", server="gateway") == connections + 1
    await send(ws, order("m1", type="market", price=None))
    assert (await recv(ws))["type"] == "ack"
    await send(ws, order("m2", price="0.01", quantity="0.00001"))
    assert (await recv(ws))["code"] == codes.MIN_NOTIONAL
    gateway.publish_counts()
    assert sample("cme_orders_total", symbol=BTC, type="market", result="accepted") == accepted + 1
    assert sample("cme_orders_total", symbol=BTC, type="limit", result="rejected") == rejected + 1
    assert sample("cme_rejects_total", code=codes.MIN_NOTIONAL, stage="gateway") == min_notional + 1
    assert sample("cme_gateway_ack_latency_seconds_count", op="new") >= 1
    await ws.close()

    port = int(url.rsplit(":", 1)[1])

    async def healthz() -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = await asyncio.wait_for(reader.read(), 5)
        writer.close()
        return answer

    answer = await healthz()  # no matcher runs in this test: orders would never be matched
    assert answer.startswith(b"HTTP/1.1 503") and b"matcher unreachable" in answer, answer
    for symbol in gateway.instruments:  # a matcher takes every symbol's lease
        await rds.set(keys.matcher_lease(symbol), b"test-matcher")
    deadline = time.monotonic() + 10
    while not (answer := await healthz()).startswith(b"HTTP/1.1 200"):
        assert time.monotonic() < deadline, answer
        await asyncio.sleep(0.05)


# Backpressure -------------------------------------------------------------------------------------
async def test_rate_limit(start_gateway: Start, rds: aioredis.Redis) -> None:
    _, url = await start_gateway(rate_limit=5)
    async with connect(url, compression=None) as ws:
        await send(ws, {"op": "auth", "account": "alice"})  # uses one of the 5 tokens
        for n in range(20):
            await send(ws, order(f"r{n}"))
        replies = [await recv(ws) for _ in range(21)][1:]
    acked = [r for r in replies if r["type"] == "ack"]
    limited = [r for r in replies if r.get("code") == codes.RATE_LIMITED]
    assert 4 <= len(acked) <= 6 and len(acked) + len(limited) == 20
    assert limited[0]["client_order_id"].startswith("r")
    assert await rds.xlen(keys.orders(BTC)) == len(acked)


async def test_overloaded_when_matcher_lags(start_gateway: Start, rds: aioredis.Redis) -> None:
    gateway, url = await start_gateway(max_lag=100)
    await rds.set(keys.appended(BTC), 1000)
    await rds.hset(keys.progress(BTC), mapping={"applied": 10})
    for _ in range(100):
        if BTC in gateway.overloaded:
            break
        await asyncio.sleep(0.02)
    ws = await login(url, "alice")
    await send(ws, order("o1"))
    reply = await recv(ws)
    assert (reply["type"], reply["code"], reply["client_order_id"]) == ("reject", codes.OVERLOADED, "o1")
    await send(ws, {"op": "cancel", "symbol": BTC, "client_order_id": "o0"})  # cancels still pass
    assert (await recv(ws))["type"] == "ack"
    await send(ws, order("e1", symbol="ETH-USDT"))  # other symbols are not affected
    assert (await recv(ws))["type"] == "ack"
    assert await rds.xlen(keys.orders(BTC)) == 1  # only the cancel

    await rds.hset(keys.progress(BTC), mapping={"applied": 1001})  # the matcher caught up
    for _ in range(100):
        if BTC not in gateway.overloaded:
            break
        await asyncio.sleep(0.02)
    await send(ws, order("o2"))
    assert (await recv(ws))["type"] == "ack"
    await ws.close()


async def test_a_burst_meets_the_lag_bound_like_single_orders(
    start_gateway: Start, rds: aioredis.Redis
) -> None:
    """Admitted orders count against the bound at once, not when their batch comes back from Redis."""
    _, url = await start_gateway(max_lag=100)  # no matcher: nothing is ever applied
    ws = await login(url, "alice")
    for n in range(300):
        await send(ws, order(f"b{n}"))
    replies = [await recv(ws) for _ in range(300)]
    acked = [r for r in replies if r["type"] == "ack"]
    assert len(acked) == 101  # lag 0..100 admitted; beyond the bound refused
    assert all(r["code"] == codes.OVERLOADED for r in replies if r["type"] != "ack")
    assert await rds.xlen(keys.orders(BTC)) == 101
    await ws.close()


# Execution reports --------------------------------------------------------------------------------
async def test_exec_reports_reach_every_connection_of_the_account_only(
    start_gateway: Start, rds: aioredis.Redis
) -> None:
    _, url = await start_gateway()
    alice1, alice2, bob, carol = [await login(url, a) for a in ("alice", "alice", "bob", "carol")]
    body_a = b'{"type":"execution","order_id":"1-0","status":"new","n":1}'
    body_a2 = b'{"type":"execution","order_id":"1-0","status":"filled","n":2}'
    body_b = b'{"type":"execution","order_id":"2-0","status":"new"}'
    payload = frame(
        [b"alice " + body_a, b"bob " + body_b, b"dave " + body_b, b"alice " + body_a2], time.time_ns()
    )
    assert payload is not None
    assert await rds.publish(keys.exec_channel("ETH-USDT"), payload) == 1
    for ws in (alice1, alice2):
        assert await asyncio.wait_for(ws.recv(), 5) == body_a.decode()  # forwarded byte for byte
        assert await asyncio.wait_for(ws.recv(), 5) == body_a2.decode()
    assert await asyncio.wait_for(bob.recv(), 5) == body_b.decode()
    for ws in (alice1, alice2, bob, carol):  # nothing else was delivered
        await send(ws, {"op": "ping"})
        assert await recv(ws) == {"type": "pong"}
    await alice2.close()
    await asyncio.sleep(0.05)
    await rds.publish(keys.exec_channel(BTC), frame([b"alice " + body_a2], time.time_ns()) or b"")
    assert await asyncio.wait_for(alice1.recv(), 5) == body_a2.decode()
    for ws in (alice1, bob, carol):
        await ws.close()


# Modes and failures ---------------------------------------------------------------------------------
async def test_api_keys_mode(start_gateway: Start, rds: aioredis.Redis) -> None:
    _, url = await start_gateway(auth=Authenticator({"s3cret-0123456789abcdefghij": "alice"}))
    async with connect(url, compression=None) as ws:
        await send(ws, {"op": "auth", "account": "alice"})
        assert (await recv(ws))["code"] == codes.UNAUTHENTICATED
        await send(ws, {"op": "auth", "api_key": "guess"})
        assert (await recv(ws))["code"] == codes.UNAUTHENTICATED
        await send(ws, order("k1"))
        assert (await recv(ws))["code"] == codes.UNAUTHENTICATED
        await send(ws, {"op": "auth", "api_key": "s3cret-0123456789abcdefghij"})
        assert await recv(ws) == {"type": "authenticated", "account": "alice"}
        await send(ws, order("k1"))
        ack = await recv(ws)
        assert ack["type"] == "ack"
    entries = await rds.xrange(keys.orders(BTC))
    cmd = stream.decode(entries[0][1])[0]
    assert isinstance(cmd, NewOrder) and cmd.account == "alice"


async def test_redis_down_rejects_with_internal_error(start_gateway: Start, own_redis: RedisServer) -> None:
    gateway, url = await start_gateway(own_redis.url)
    ws = await login(url, "alice")
    await send(ws, order("before"))
    assert (await recv(ws))["type"] == "ack"
    await gateway.redis.execute_command("CLIENT", "PAUSE", "10000", "WRITE")
    await send(ws, order("in-flight"))
    await wait_for(lambda: gateway.appender.backlog == 1)
    await asyncio.sleep(0.05)  # the pipeline is written and waits for Redis
    own_redis.kill()
    reply = await recv(ws, timeout=10)
    assert (reply["type"], reply["code"], reply["client_order_id"]) == (
        "reject",
        codes.INTERNAL_ERROR,
        "in-flight",
    )
    assert "may or may not have been queued" in reply["reason"]  # the honest answer

    await send(ws, order("after"))
    reply = await recv(ws, timeout=10)
    assert (reply["type"], reply["code"], reply["client_order_id"]) == (
        "reject",
        codes.INTERNAL_ERROR,
        "after",
    )
    assert reply["reason"] == "Redis is unavailable; the order was not queued"
    await send(ws, {"op": "ping"})  # the connection survives
    assert await recv(ws) == {"type": "pong"}
    await ws.close()


def test_cli_process_serves_and_exits_0_on_sigterm(redis_url: str, tmp_path: Path) -> None:
    port = free_port()
    keys_file = tmp_path / "keys.json"
    keys_file.write_text('{"k-1-0123456789abcdefghijk": "alice"}')
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "services.gateway",
            "--redis-url",
            redis_url,
            "--port",
            str(port),
            "--metrics-port",
            "0",
            "--api-keys",
            str(keys_file),
            "--log-level",
            "WARNING",
        ],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:

        async def client() -> dict[str, Any]:
            for _ in range(100):
                try:
                    ws = await connect(f"ws://127.0.0.1:{port}", compression=None)
                    break
                except OSError:
                    await asyncio.sleep(0.1)
            async with ws:
                await send(ws, {"op": "auth", "api_key": "k-1-0123456789abcdefghijk"})
                assert (await recv(ws))["account"] == "alice"
                await send(ws, order("p1"))
                return await recv(ws)

        assert asyncio.run(client())["type"] == "ack"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# Balances, funding, faucet, cancel_all (the gateway side) ----------------------------------------
ETH = "ETH-USDT"
ADMIN_KEY = "admin-key-0123456789abcdefgh"
ALICE_KEY = "alice-key-0123456789abcdefgh"
FAUCET = [("USDT", 10**6 * 10**10), ("BTC", 100 * 10**5)]
USDT = 10**10  # units of one USDT (10 places with the default instruments)
SCALES = asset_scales(default_instruments().values())


async def stream_commands(rds: aioredis.Redis, symbol: str) -> list[tuple[str, Any]]:
    """(entry id, command) of every entry on the symbol's orders stream, oldest first."""
    entries = await rds.xrange(keys.orders(symbol))
    return [(eid.decode(), stream.decode(fields, SCALES)[0]) for eid, fields in entries]


async def test_deposit_and_withdraw_are_appended_to_the_assets_stream(
    start_gateway: Start, rds: aioredis.Redis
) -> None:
    _, url = await start_gateway(risk=True)
    ws = await login(url, "alice")
    # 10^6 USDT is 10^21 units: beyond 64 bits, the stream codec's exact path.
    await send(ws, {"op": "deposit", "asset": "USDT", "amount": "1000000", "request_id": "d-1"})
    assert await recv(ws) == {
        "type": "ack",
        "op": "deposit",
        "request_id": "d-1",
        "account": "alice",
        "asset": "USDT",
        "amount": "1000000",
    }
    await send(ws, '{"op":"withdraw","asset":"ETH","amount":0.5}')
    assert await recv(ws) == {
        "type": "ack",
        "op": "withdraw",
        "request_id": None,
        "account": "alice",
        "asset": "ETH",
        "amount": "0.5",
    }
    assert [c for _, c in await stream_commands(rds, BTC)] == [Deposit("alice", "USDT", 10**6 * USDT, "d-1")]
    assert [c for _, c in await stream_commands(rds, ETH)] == [Withdraw("alice", "ETH", 50000, None)]
    await send(ws, {"op": "deposit", "asset": "DOGE", "amount": "1", "request_id": "d-2"})
    reply = await recv(ws)
    assert (reply["code"], reply["request_id"]) == (codes.UNKNOWN_ASSET, "d-2")
    await ws.close()


async def test_risk_off_refuses_funding_and_sends_no_faucet(
    start_gateway: Start, rds: aioredis.Redis
) -> None:
    _, url = await start_gateway(faucet=FAUCET)  # risk off: the faucet has nothing to fund
    ws = await login(url, "alice")
    for op in ("deposit", "withdraw", "balances"):
        await send(ws, {"op": op, "asset": "USDT", "amount": "1"})
        assert (await recv(ws))["code"] == codes.BALANCES_DISABLED
    await send(ws, order("o-1"))
    assert (await recv(ws))["type"] == "ack"
    assert [type(c) for _, c in await stream_commands(rds, BTC)] == [NewOrder]
    await ws.close()


async def test_cancel_all_appends_one_command_per_symbol_then_acks(
    start_gateway: Start, rds: aioredis.Redis
) -> None:
    _, url = await start_gateway()  # works with risk off too
    ws = await login(url, "alice")
    await send(ws, {"op": "cancel_all"})
    assert await recv(ws) == {"type": "ack", "op": "cancel_all", "symbol": None}
    await send(ws, {"op": "cancel_all", "symbol": ETH})
    assert await recv(ws) == {"type": "ack", "op": "cancel_all", "symbol": ETH}
    assert [c for _, c in await stream_commands(rds, BTC)] == [CancelAll(BTC, "alice", "user")]
    assert [c for _, c in await stream_commands(rds, ETH)] == [CancelAll(ETH, "alice", "user")] * 2
    await send(ws, {"op": "cancel_all", "symbol": "DOGE-USDT"})
    assert (await recv(ws))["code"] == codes.UNKNOWN_SYMBOL
    await ws.close()


async def test_the_faucet_grants_once_before_the_accounts_orders(
    start_gateway: Start, rds: aioredis.Redis
) -> None:
    gateway, url = await start_gateway(risk=True, faucet=FAUCET)
    ws = await login(url, "alice")
    await send(ws, order("o-1", symbol=ETH))
    assert (await recv(ws))["type"] == "ack"  # the grant was submitted first: it is appended by now
    again = await login(url, "alice")  # a second login of the same process sends no second grant
    await send(again, order("o-2"))
    assert (await recv(again))["type"] == "ack"
    btc, eth = await stream_commands(rds, BTC), await stream_commands(rds, ETH)
    grant = Grant("alice", [["USDT", 10**6 * USDT], ["BTC", 100 * 10**5]])
    assert [c for _, c in btc] == [grant, btc[1][1]] and type(btc[1][1]) is NewOrder
    assert [type(c) for _, c in eth] == [NewOrder]
    # Risk on: ids from the venue clock, so the one matcher applies the grant before either order.
    assert entry_to_seq(btc[0][0]) < entry_to_seq(eth[0][0]) < entry_to_seq(btc[1][0])
    assert "alice" in gateway.granted
    await ws.close()
    await again.close()


async def test_a_seed_order_gets_the_faucet_for_its_account(
    start_gateway: Start, rds: aioredis.Redis
) -> None:
    _, url = await start_gateway(risk=True, faucet=FAUCET)
    async with connect(url, compression=None) as ws:
        seed_order = '{"user_id": 901, "order_type": "LIMIT", "side": "BUY", "price": 98.0, "quantity": 1.0}'
        await ws.send(seed_order)
        assert (await recv(ws))["status"] == "ACCEPTED"
        await ws.send(seed_order)
        assert (await recv(ws))["status"] == "ACCEPTED"
    commands = [c for _, c in await stream_commands(rds, BTC)]
    assert [type(c) for c in commands] == [Grant, NewOrder, NewOrder]
    assert commands[0] == Grant("901", [["USDT", 10**6 * USDT], ["BTC", 100 * 10**5]])


async def test_balances_are_read_from_the_read_model(start_gateway: Start, rds: aioredis.Redis) -> None:
    _, url = await start_gateway(risk=True)
    await rds.hset(
        keys.balances("alice"), mapping={"USDT": f"{1500 * USDT} {25 * USDT // 1000}", "BTC": "1 0"}
    )
    ws = await login(url, "alice")
    await send(ws, {"op": "balances"})
    await send(ws, {"op": "ping"})  # answered after the balances: the outbox keeps the order
    assert await recv(ws) == {
        "type": "balances",
        "account": "alice",
        "balances": {
            "BTC": {"available": "0.00001", "held": "0"},
            "USDT": {"available": "1500", "held": "0.025"},
        },
    }
    assert await recv(ws) == {"type": "pong"}
    await send(ws, {"op": "balances", "account": "bob"})  # open mode: anyone's; none yet
    assert await recv(ws) == {"type": "balances", "account": "bob", "balances": {}}
    await rds.hset(keys.balances("alice"), "ETH", "garbage")
    await send(ws, {"op": "balances"})
    reply = await recv(ws)
    assert (reply["code"], reply["op"]) == (codes.INTERNAL_ERROR, "balances")
    await ws.close()


async def test_api_key_mode_with_admin_keys(start_gateway: Start, rds: aioredis.Redis) -> None:
    auth = Authenticator({ALICE_KEY: "alice"}, {ADMIN_KEY: "ops"})
    _, url = await start_gateway(auth=auth, risk=True, auth_timeout=0.5)
    ops = await connect(url, compression=None)
    await send(ops, {"op": "auth", "admin_key": ADMIN_KEY})
    assert await recv(ops) == {"type": "authenticated", "admin": True}
    alice = await connect(url, compression=None)
    await send(alice, {"op": "auth", "api_key": ALICE_KEY})
    assert await recv(alice) == {"type": "authenticated", "account": "alice"}
    await send(alice, {"op": "deposit", "asset": "USDT", "amount": "5"})
    assert (await recv(alice))["code"] == codes.UNAUTHENTICATED
    await send(
        ops, {"op": "deposit", "account": "alice", "asset": "USDT", "amount": "5", "request_id": "a-1"}
    )
    assert await recv(ops) == {
        "type": "ack",
        "op": "deposit",
        "request_id": "a-1",
        "account": "alice",
        "asset": "USDT",
        "amount": "5",
    }
    await send(ops, {"op": "withdraw", "account": "_fees", "asset": "USDT", "amount": "1"})
    assert (await recv(ops))["type"] == "ack"
    await send(ops, order("o-1"))
    assert (await recv(ops))["code"] == codes.UNAUTHENTICATED
    # No faucet with API keys unless one is given: only the admin's two commands are on the stream.
    assert [c for _, c in await stream_commands(rds, BTC)] == [
        Deposit("alice", "USDT", 5 * USDT, "a-1"),
        Withdraw("_fees", "USDT", USDT, None),
    ]
    # The auth deadline closes a connection that never logs in, not an admin one.
    idle = await connect(url, compression=None)
    assert (await closed_with(idle))[1] == "authentication timeout"
    await send(ops, {"op": "ping"})
    assert await recv(ops) == {"type": "pong"}
    await ops.close()
    await alice.close()


async def test_a_failed_funding_append_is_an_internal_error(
    start_gateway: Start, own_redis: RedisServer
) -> None:
    _, url = await start_gateway(own_redis.url, risk=True)
    ws = await login(url, "alice")
    own_redis.kill()
    await send(ws, {"op": "deposit", "asset": "USDT", "amount": "1", "request_id": "d-9"})
    reply = await recv(ws, timeout=10)
    assert (reply["code"], reply["op"], reply["request_id"]) == (codes.INTERNAL_ERROR, "deposit", "d-9")
    await send(ws, {"op": "cancel_all"})
    reply = await recv(ws, timeout=10)
    assert (reply["code"], reply["op"]) == (codes.INTERNAL_ERROR, "cancel_all")
    await send(ws, {"op": "balances"})
    reply = await recv(ws, timeout=10)
    assert (reply["code"], reply["op"]) == (codes.INTERNAL_ERROR, "balances")


def test_a_bad_faucet_is_a_configuration_error(capsys: pytest.CaptureFixture[str]) -> None:
    from services import cli
    from services.gateway import server

    assert server.run(cli.parse(["gateway", "--risk", "on", "--faucet", "DOGE=1"])) == 2
    assert "not the base or quote" in capsys.readouterr().err
