"""The feeds against hostile clients: ping floods, connection floods, idle and hostile connections."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
from websockets.asyncio.client import ClientConnection, connect

from services.feeds.fanout import IDLE
from services.feeds.server import FeedServer
from services.fuzz import rss_bytes
from shared import codes
from shared.instruments import default_instruments
from shared.wsguard import Policy
from tests.hostile import OTHER_HOSTILE, SURROGATES, PingFlooder, bare, cut_off, upgrades

pytestmark = pytest.mark.timeout(60)
SUBSCRIBE = '{"op":"subscribe","symbol":"BTC-USDT","channel":"trades"}'


@contextlib.asynccontextmanager
async def feed(redis_url: str, **kw: Any) -> AsyncIterator[FeedServer]:
    server = FeedServer(redis_url, default_instruments(), **kw)
    await server.start("127.0.0.1", 0, 0)
    try:
        yield server
    finally:
        await server.stop()


async def recv(ws: ClientConnection) -> dict[str, Any]:
    msg: dict[str, Any] = orjson.loads(await asyncio.wait_for(ws.recv(), 5))
    return msg


async def subscribed(port: int) -> ClientConnection:
    ws = await connect(f"ws://127.0.0.1:{port}", compression=None)
    await ws.send(SUBSCRIBE)
    assert (await recv(ws))["type"] == "subscribed"
    return ws


async def answers(ws: ClientConnection) -> bool:
    await ws.send(SUBSCRIBE)  # subscribing again is answered again
    return bool((await recv(ws))["type"] == "subscribed")


async def test_a_ping_flood_stops_reads_and_is_cut_off(redis_url: str) -> None:
    async with feed(redis_url, policy=Policy(send_timeout=1.0)) as server:
        neighbour = await subscribed(server.trades_port)
        rss_before = rss_bytes(os.getpid())
        flooder = PingFlooder(server.md_port)
        flooder.start()
        rounds = 0
        while flooder.is_alive():
            rounds += 1
            assert await answers(neighbour)
        assert not flooder.overflowed, f"the server read all {flooder.sent} bytes of pings"
        assert flooder.upgraded and flooder.blocked.is_set() and flooder.cut.is_set()
        assert rss_bytes(os.getpid()) - rss_before < 64 << 20
        assert rounds > 0 and await answers(neighbour)
        await neighbour.close()


async def test_pongs_count_against_the_send_buffer_limit(redis_url: str) -> None:
    async with feed(redis_url, policy=Policy(send_timeout=0, max_queued=16_384)) as server:
        flooder = PingFlooder(server.md_port)
        flooder.start()
        await asyncio.to_thread(flooder.join, 30)
        assert flooder.upgraded and flooder.cut.is_set() and not flooder.overflowed


async def test_connection_caps_span_both_ports(redis_url: str) -> None:
    policy = Policy(max_connections=5, max_connections_per_ip=3, handshake_timeout=30)
    async with feed(redis_url, policy=policy) as server:
        held = [await bare(server.md_port) for _ in range(2)] + [await bare(server.trades_port)]
        assert await cut_off((await bare(server.trades_port))[0]), "a 4th from one address was let in"
        held += [await bare(server.md_port, "127.0.0.2") for _ in range(2)]
        assert await cut_off((await bare(server.md_port, "127.0.0.3"))[0]), "past the global cap"
        assert await upgrades(server.md_port, held[0])
        for _, writer in held:
            writer.close()
        async with asyncio.timeout(10):
            while server.guard.limiter.total:
                await asyncio.sleep(0.01)
        ws = await subscribed(server.trades_port)
        await ws.close()


async def test_a_connection_without_a_subscription_is_closed_when_idle(redis_url: str) -> None:
    # Without the seed's dialect: with it, a silent connection is the seed's client, which the idle
    # timer spares (tests/feeds/test_seed.py).
    async with feed(redis_url, idle_timeout=0.5, seed_symbol=None) as server:
        kept = await subscribed(server.trades_port)
        idle = await connect(f"ws://127.0.0.1:{server.md_port}", compression=None)
        quitter = await subscribed(server.trades_port)
        await quitter.send('{"op":"unsubscribe","symbol":"BTC-USDT","channel":"trades"}')
        assert (await recv(quitter))["type"] == "unsubscribed"
        for ws in (idle, quitter):
            with contextlib.suppress(Exception):
                while True:
                    await recv(ws)
            await ws.wait_closed()
            assert (ws.close_code, ws.close_reason) == (1008, IDLE)
        assert await answers(kept)  # subscribed all along: past the deadline and still open
        await kept.close()


async def test_hostile_json_is_rejected_without_a_traceback(
    redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    async with feed(redis_url) as server:
        ws = await connect(f"ws://127.0.0.1:{server.trades_port}", compression=None)
        for text in SURROGATES + OTHER_HOSTILE:  # 14: under the feed's limit of bad messages
            await ws.send(text)
            reply = await recv(ws)
            assert reply["type"] == "reject", text[:80]
            if text in SURROGATES:
                assert reply["code"] == codes.INVALID_MESSAGE, text
        assert await answers(ws)
        await ws.close()
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING and r.exc_info]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_a_message_whose_handling_raises_is_an_invalid_message_reject(
    redis_url: str, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with feed(redis_url) as server:
        handle = server._on_client_message

        def fragile(client: Any, text: str) -> None:
            if "boom" in text:
                raise TypeError("str is not valid UTF-8: surrogates not allowed")
            handle(client, text)

        monkeypatch.setattr(server, "_on_client_message", fragile)
        ws = await connect(f"ws://127.0.0.1:{server.trades_port}", compression=None)
        await ws.send('{"op":"boom"}')
        assert (await recv(ws))["code"] == codes.INVALID_MESSAGE
        assert await answers(ws)
        await ws.close()
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING and r.exc_info]
