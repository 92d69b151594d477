"""GET /v1/... on the market-data port of a real feed fed by a real engine (tests.feeds.test_server)."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest

from services.bench.flow import SYMBOL
from services.feeds.server import FeedServer
from shared.instruments import default_instruments
from shared.wire import trade_message
from tests.feeds.test_candles import as_numbers, expected
from tests.feeds.test_checksum import kraken_checksum
from tests.feeds.test_server import INST, Matcher, engine_book, feed, synced

pytestmark = pytest.mark.timeout(60)


async def get(server: FeedServer, target: str, port: int | None = None) -> tuple[int, Any]:
    """One HTTP/1.1 GET on a raw socket: status and JSON body (the server closes after answering)."""
    async with asyncio.timeout(5):
        reader, writer = await asyncio.open_connection("127.0.0.1", port or server.md_port)
        writer.write(f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
        raw = await reader.read()
    writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    if port is None:
        assert headers["Content-Type"] == "application/json"
        return int(lines[0].split()[1]), orjson.loads(body)
    return int(lines[0].split()[1]), body


async def history_read(server: FeedServer) -> None:
    async with asyncio.timeout(5):
        while server.market[SYMBOL].catching_up:
            await asyncio.sleep(0.005)


async def test_endpoints_answer_from_the_feed_state(redis_url: str) -> None:
    m = await Matcher(redis_url, seed=21, ms_per_command=700).start()
    try:
        await m.run(40, 10)  # history in the events stream before the feed starts
        async with feed(redis_url) as server:
            await synced(server)
            await history_read(server)
            await m.run(20, 10)  # and live trades after
            async with asyncio.timeout(5):
                while server.market[SYMBOL].last_trade_id < m.trades[-1][2]:
                    await asyncio.sleep(0.005)
                while server.views[SYMBOL].seq < m.book.book_seq:
                    await asyncio.sleep(0.005)

            status, body = await get(server, "/v1/instruments")
            assert status == 200 and body["instruments"] == [i.spec() for i in default_instruments().values()]

            status, book = await get(server, f"/v1/book?symbol={SYMBOL}&depth=3")
            bids, asks = engine_book(m)
            assert status == 200 and book["type"] == "l2_snapshot" and book["seq"] == m.book.book_seq
            assert (book["bids"], book["asks"]) == (bids[:3], asks[:3])
            assert book["checksum"] == kraken_checksum(asks, bids)  # of the top 10, whatever the depth

            status, trades = await get(server, f"/v1/trades?symbol={SYMBOL}&limit=50")
            want = [trade_message(e, INST) for e in m.trades[-50:]]
            got = trades["trades"]
            assert status == 200 and len(got) == 50
            # Live trades carry the matcher's latency_us; those read from the stream have none.
            assert [{**t, "latency_us": None} for t in got] == want

            status, candles = await get(server, f"/v1/candles?symbol={SYMBOL}&interval=1m&limit=500")
            ticks = [(e[19], e[3], e[4]) for e in m.trades]
            assert status == 200 and candles["type"] == "candles_snapshot"
            assert [as_numbers(c) for c in candles["candles"]] == expected(ticks, 60_000)
            assert len(candles["candles"]) > 2

            status, ticker = await get(server, f"/v1/ticker?symbol={SYMBOL}")
            assert status == 200 and ticker["type"] == "ticker"
            assert ticker["last"] == INST.price_str(m.trades[-1][3])
            assert (ticker["bid"], ticker["ask"]) == (bids[0][0], asks[0][0])
    finally:
        await m.stop()


BAD = [
    ("/v1/book", 400, "INVALID_MESSAGE"),
    ("/v1/book?symbol=NOPE", 404, "UNKNOWN_SYMBOL"),
    (f"/v1/book?symbol={SYMBOL}&depth=0", 400, "INVALID_MESSAGE"),
    (f"/v1/book?symbol={SYMBOL}&depth=-1", 400, "INVALID_MESSAGE"),
    (f"/v1/trades?symbol={SYMBOL}&limit=1001", 400, "INVALID_MESSAGE"),
    (f"/v1/trades?symbol={SYMBOL}&limit=1e3", 400, "INVALID_MESSAGE"),
    (f"/v1/candles?symbol={SYMBOL}", 400, "INVALID_MESSAGE"),
    (f"/v1/candles?symbol={SYMBOL}&interval=2m", 400, "INVALID_MESSAGE"),
    (f"/v1/candles?symbol={SYMBOL}&interval=1m&limit=501", 400, "INVALID_MESSAGE"),
    ("/v1/ticker?symbol=", 400, "INVALID_MESSAGE"),
    ("/v1/nothing", 404, "NOT_FOUND"),
]


async def test_bad_requests(redis_url: str) -> None:
    async with feed(redis_url) as server:
        for target, status, code in BAD:
            got, body = await get(server, target)
            assert (got, body["type"], body["code"]) == (status, "error", code), target


async def test_book_before_the_snapshot_is_unavailable_and_trades_port_has_no_v1(redis_url: str) -> None:
    async with feed(redis_url) as server:  # no matcher: never synced
        status, body = await get(server, f"/v1/book?symbol={SYMBOL}")
        assert status == 503 and body["code"] == "UNAVAILABLE"
        status, _ = await get(server, "/v1/instruments", server.trades_port)
        assert status == 426  # the trade port serves only WebSocket upgrades (and health)
