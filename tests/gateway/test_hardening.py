"""The gateway against hostile clients: ping floods, connection floods, silent and hostile connections."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import orjson
import pytest
from websockets.asyncio.client import ClientConnection, connect

from services.fuzz import rss_bytes
from services.gateway.server import AUTH_TIMEOUT_REASON, Gateway
from shared import codes, metrics
from shared.instruments import default_instruments
from shared.wsguard import Policy
from tests.hostile import OTHER_HOSTILE, SURROGATES, PingFlooder, bare, cut_off, http_get, upgrades

pytestmark = pytest.mark.timeout(60)
BTC = "BTC-USDT"
Start = Callable[..., Awaitable[tuple[Gateway, int]]]


@pytest.fixture()
async def start_gateway(redis_url: str) -> AsyncIterator[Start]:
    started: list[Gateway] = []

    async def start(**kw: Any) -> tuple[Gateway, int]:
        gateway = Gateway(default_instruments(), redis_url, **kw)
        port = await gateway.start("127.0.0.1", 0)
        started.append(gateway)
        return gateway, port

    yield start
    for gateway in started:
        await gateway.stop(timeout=5)


async def recv(ws: ClientConnection) -> dict[str, Any]:
    msg: dict[str, Any] = orjson.loads(await asyncio.wait_for(ws.recv(), 5))
    return msg


async def login(port: int, account: str) -> ClientConnection:
    ws = await connect(f"ws://127.0.0.1:{port}", compression=None)
    await ws.send(orjson.dumps({"op": "auth", "account": account}).decode())
    assert await recv(ws) == {"type": "authenticated", "account": account}
    return ws


async def order_acked(ws: ClientConnection, cid: str) -> bool:
    new = {"op": "new", "symbol": BTC, "side": "buy", "price": "100", "quantity": "1", "client_order_id": cid}
    await ws.send(orjson.dumps(new).decode())
    return bool((await recv(ws))["type"] == "ack")


def most_queued(gateway: Gateway) -> int:
    return max((c.ws.transport.get_write_buffer_size() for c in gateway.clients), default=0)


# Ping floods ------------------------------------------------------------------------------------
async def test_a_ping_flood_stops_reads_and_is_cut_off_while_orders_flow(start_gateway: Start) -> None:
    """The flooder never reads: the server stops reading from it once its pongs fill the send buffer
    (the flooder's sends block), holds no more than that buffer, and drops it after --send-timeout."""
    # The flooder reports `blocked` after 0.5 s without progress; the cut comes send_timeout after the
    # server stopped reading. 3 s, not 1: the flooder is a thread of this process and waits for the GIL
    # behind the gateway's loop, so on a loaded machine it saw the cut before its own timeout (CI sim).
    gateway, port = await start_gateway(policy=Policy(send_timeout=3.0))
    neighbour = await login(port, "alice")
    rss_before = rss_bytes(os.getpid())
    flooder = PingFlooder(port)
    flooder.start()
    peak, orders = 0, 0
    while flooder.is_alive():
        orders += 1
        assert await order_acked(neighbour, f"n{orders}")
        peak = max(peak, most_queued(gateway))
    assert not flooder.overflowed, f"the server read all {flooder.sent} bytes of pings"
    assert flooder.upgraded and flooder.blocked.is_set() and flooder.cut.is_set()
    assert peak < 1 << 20, peak
    assert rss_bytes(os.getpid()) - rss_before < 64 << 20
    assert orders > 0 and await order_acked(neighbour, "after")
    await neighbour.close()


async def test_pongs_count_against_the_send_buffer_limit(start_gateway: Start) -> None:
    """Control frames the server queues count like any byte: over --max-queued-bytes, it is cut off."""
    _, port = await start_gateway(policy=Policy(send_timeout=0, max_queued=16_384))
    flooder = PingFlooder(port)
    flooder.start()
    await asyncio.to_thread(flooder.join, 30)
    assert flooder.upgraded and flooder.cut.is_set() and not flooder.overflowed
    neighbour = await login(port, "alice")
    assert await order_acked(neighbour, "n1")
    await neighbour.close()


# Connection floods ------------------------------------------------------------------------------
async def test_connection_caps_refuse_at_accept_and_health_stays_served(start_gateway: Start) -> None:
    gateway, port = await start_gateway(
        policy=Policy(max_connections=6, max_connections_per_ip=4, handshake_timeout=30)
    )
    metrics_port = metrics.serve("gateway", 0)
    held = [await bare(port) for _ in range(4)]
    extra = await bare(port)
    assert await cut_off(extra[0]), "a fifth connection from one address was let in"
    held += [await bare(port, "127.0.0.2") for _ in range(2)]
    other = await bare(port, "127.0.0.3")
    assert await cut_off(other[0]), "a seventh connection was let in past the global cap"
    # Served despite the flood (no matcher runs here, so it answers 503 and says why).
    status, body = await asyncio.to_thread(http_get, metrics_port, "/healthz")
    assert (status, body.startswith(b"matcher unreachable")) == (503, True), body
    status, body = await asyncio.to_thread(http_get, metrics_port, "/metrics")
    assert status == 200 and b"cme_ws_connections" in body
    for conn in held:  # the admitted ones are whole connections
        assert await upgrades(port, conn)
    assert gateway.guard.limiter.total == 6
    for _, writer in held:
        writer.close()
    async with asyncio.timeout(10):
        while gateway.guard.limiter.total:
            await asyncio.sleep(0.01)
    ws = await login(port, "alice")  # room again
    assert await order_acked(ws, "n1")
    await ws.close()


async def test_a_silent_connection_is_closed_at_the_handshake_deadline(start_gateway: Start) -> None:
    _, port = await start_gateway(policy=Policy(handshake_timeout=0.3))
    reader, _ = await bare(port)
    assert await cut_off(reader)


async def test_a_connection_that_never_authenticates_is_closed(start_gateway: Start) -> None:
    _, port = await start_gateway(auth_timeout=0.5)
    authed = await login(port, "alice")
    idle = await connect(f"ws://127.0.0.1:{port}", compression=None)
    await idle.send('{"op":"ping"}')  # activity is no authentication
    assert (await recv(idle))["type"] == "pong"
    await idle.wait_closed()
    assert idle.close_code == 1008 and idle.close_reason == AUTH_TIMEOUT_REASON
    assert await order_acked(authed, "n1")  # past the deadline too, and authenticated: still open
    await authed.close()


# Hostile text ------------------------------------------------------------------------------------
async def test_hostile_json_is_rejected_without_a_traceback(
    start_gateway: Start, caplog: pytest.LogCaptureFixture
) -> None:
    _, port = await start_gateway(max_bad=1000)
    ws = await login(port, "alice")
    caplog.set_level(logging.DEBUG)
    for text in SURROGATES:
        await ws.send(text)
        reply = await recv(ws)
        assert (reply["type"], reply["code"]) == ("reject", codes.INVALID_MESSAGE), text
    for text in OTHER_HOSTILE:  # answered, whatever the answer (a ping with a huge id is still a ping)
        await ws.send(text)
        assert (await recv(ws))["type"] in ("reject", "pong"), text[:80]
    await ws.send('{"op":"ping"}')
    assert await recv(ws) == {"type": "pong"}
    assert await order_acked(ws, "n1")
    loud = [r for r in caplog.records if r.levelno >= logging.WARNING and r.exc_info]
    assert not loud and not [r for r in caplog.records if r.levelno >= logging.ERROR]
    await ws.close()


async def test_a_message_whose_handling_raises_is_an_invalid_message_reject(
    start_gateway: Start, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    gateway, port = await start_gateway()
    ws = await login(port, "alice")
    handle = gateway.on_text

    def fragile(client: Any, data: str) -> None:
        if "boom" in data:
            raise TypeError("str is not valid UTF-8: surrogates not allowed")
        handle(client, data)

    monkeypatch.setattr(gateway, "on_text", fragile)
    await ws.send('{"op":"ping","id":"boom"}')
    assert (await recv(ws))["code"] == codes.INVALID_MESSAGE
    assert await order_acked(ws, "n1")  # the connection stays open
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING and r.exc_info]
    await ws.close()
