"""The feed server end to end: real Redis, real sockets, and a real Engine playing the matcher.

`Matcher` renders a seeded random flow with shared.wire exactly as the matcher service does and
publishes the framed payloads on the md and trades channels; it answers snapshot requests the way the
contract says (all updates up to the snapshot's seq published before it, later ones after). Clients
rebuild the book with their own code (`L2Client`), not the feed's BookView, and check every seq.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from services.bench.flow import SYMBOL, FlowConfig, FlowGenerator
from services.feeds.fanout import SLOW_CONSUMER
from services.feeds.server import FeedServer
from services.matcher.engine import Engine
from shared import keys, metrics
from shared.events import TRADE, Event
from shared.instruments import default_instruments
from shared.redis_server import RedisServer, free_port
from shared.stream import encode_events
from shared.wire import Rendered, frame, l2_snapshot, render
from tests.feeds.test_candles import as_numbers, expected
from tests.feeds.test_checksum import kraken_checksum

INSTRUMENTS = default_instruments()
INST = INSTRUMENTS[SYMBOL]
ROOT = Path(__file__).resolve().parents[2]
Msg = dict[str, Any]
pytestmark = pytest.mark.timeout(60)


class Matcher:
    """A real engine fed a seeded flow, published the way services.matcher does."""

    def __init__(self, redis_url: str, seed: int = 1, ms_per_command: int = 1, ts_base: int = 0) -> None:
        self.redis = aioredis.Redis.from_url(redis_url)
        self.ms_per_command, self.ts_base = ms_per_command, ts_base  # a command's ts: base + seq x ms
        self.trades: list[Event] = []  # every trade event, in order
        self.url = redis_url
        self.steps = FlowGenerator(FlowConfig(commands=10**7, seed=seed), INST).flow()
        self.engine = Engine([INST])
        self.book = self.engine.books[SYMBOL]
        self.lock = asyncio.Lock()  # a snapshot is never built between applying a batch and publishing it
        self.requests = 0
        self.answering = True
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> Matcher:
        """Listen for snapshot requests (again, after a Redis restart: on a new connection)."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            await self.redis.aclose()
            self.redis = aioredis.Redis.from_url(self.url)
        pubsub = self.redis.pubsub()
        await pubsub.subscribe(keys.snapshot_request_channel(SYMBOL))
        await pubsub.get_message(timeout=5)  # the subscribe confirmation: requests are heard from now on
        self._task = asyncio.create_task(self._answer(pubsub))
        return self

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self.redis.aclose()

    async def _answer(self, pubsub: Any) -> None:
        async for msg in pubsub.listen():
            if msg["type"] == "message":
                self.requests += 1
                if self.answering:
                    await self.publish_snapshot()

    def snapshot(self) -> Msg:
        bids, asks = self.book.depth(10**9)
        msg: Msg = orjson.loads(orjson.dumps(l2_snapshot(SYMBOL, self.book.book_seq, bids, asks, INST)))
        return msg

    async def publish_snapshot(self) -> None:
        async with self.lock:
            payload = frame([orjson.dumps(self.snapshot())], time.time_ns())
            assert payload is not None
            await self.redis.publish(keys.md_channel(SYMBOL), payload)

    async def step(self, commands: int, publish_md: bool = True) -> Rendered:
        """Apply `commands` commands as one batch, append its events to the events stream and publish
        its md and trades payloads, in one transaction as the matcher's commit script does."""
        async with self.lock:
            out = Rendered()
            pairs: list[list[Any]] = []
            for _ in range(commands):
                cmd, seq = next(self.steps)
                ts = self.ts_base + seq * self.ms_per_command
                events = self.engine.apply(cmd, seq, ts)
                self.trades.extend(e for e in events if e[0] == TRADE)
                pairs.append([f"{seq}-0", events])
                render(events, INST, ts, out)
            md, trades, _ = out.payloads(time.time_ns())
            pipe = self.redis.pipeline(transaction=True)
            pipe.xadd(keys.events(SYMBOL), {"d": encode_events(pairs)})
            if md and publish_md:
                pipe.publish(keys.md_channel(SYMBOL), md)
            if trades:
                pipe.publish(keys.trades_channel(SYMBOL), trades)
            await pipe.execute()
            return out

    async def run(self, batches: int, size: int, pause: float = 0.0) -> None:
        for _ in range(batches):
            await self.step(size)
            await asyncio.sleep(pause)


class L2Client:
    """A market-data client that rebuilds the book itself and checks every seq."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.seq: int | None = None
        self.bids: dict[Decimal, list[str]] = {}
        self.asks: dict[Decimal, list[str]] = {}
        self.snapshots: list[Msg] = []
        self.updates: list[bytes] = []  # raw l2_update messages as received
        self.other: list[Msg] = []
        self.heartbeats: list[Msg] = []
        self.checked = 0  # messages whose checksum was verified

    @classmethod
    async def open(cls, url: str, symbol: str = SYMBOL, **kw: Any) -> L2Client:
        ws = await connect(url, compression=None, max_size=None, **kw)
        await ws.send(orjson.dumps({"op": "subscribe", "symbol": symbol}).decode())
        return cls(ws)

    def apply(self, raw: str) -> Msg:
        msg: Msg = orjson.loads(raw)
        if msg["type"] == "l2_snapshot":
            self.snapshots.append(msg)
            self.seq = msg["seq"]
            self.bids = {Decimal(p): [p, q] for p, q in msg["bids"]}
            self.asks = {Decimal(p): [p, q] for p, q in msg["asks"]}
            self.check_checksum(msg)
        elif msg["type"] == "l2_update":
            assert self.seq is not None, "an update before any snapshot"
            assert msg["seq"] == self.seq + 1, f"seq {msg['seq']} after {self.seq}"
            self.seq = msg["seq"]
            self.updates.append(raw.encode())
            for side, price, qty in msg["changes"]:
                levels = self.bids if side == "buy" else self.asks
                if Decimal(qty) == 0:
                    del levels[Decimal(price)]
                else:
                    levels[Decimal(price)] = [price, qty]
            bbo = msg["bbo"]
            best_bid = self.bids[max(self.bids)] if self.bids else None
            best_ask = self.asks[min(self.asks)] if self.asks else None
            assert (bbo["bid"], bbo["ask"]) == (best_bid, best_ask)
            self.check_checksum(msg)
        elif msg["type"] == "heartbeat":
            assert msg["seq"] == self.seq, "a heartbeat's seq is the book's"
            self.heartbeats.append(msg)
        else:
            self.other.append(msg)
        return msg

    def check_checksum(self, msg: Msg) -> None:
        """Every l2 message's checksum is Kraken's over the book this client rebuilt."""
        bids, asks = self.book()
        assert msg["checksum"] == kraken_checksum(asks, bids), f"checksum at seq {msg['seq']}"
        self.checked += 1

    async def until_seq(self, seq: int, timeout: float = 10.0) -> None:
        async with asyncio.timeout(timeout):
            while self.seq is None or self.seq < seq:
                self.apply(str(await self.ws.recv()))

    async def next_snapshot(self, timeout: float = 10.0) -> Msg:
        count = len(self.snapshots)
        async with asyncio.timeout(timeout):
            while len(self.snapshots) == count:
                self.apply(str(await self.ws.recv()))
        return self.snapshots[-1]

    def book(self) -> tuple[list[list[str]], list[list[str]]]:
        return (
            [self.bids[p] for p in sorted(self.bids, reverse=True)],
            [self.asks[p] for p in sorted(self.asks)],
        )


def engine_book(m: Matcher) -> tuple[list[list[str]], list[list[str]]]:
    snap = m.snapshot()
    return snap["bids"], snap["asks"]


async def recv_json(ws: ClientConnection, timeout: float = 5.0) -> Msg:
    msg: Msg = orjson.loads(await asyncio.wait_for(ws.recv(), timeout))
    return msg


def counter(name: str, **labels: str) -> float:
    return metrics.REGISTRY.get_sample_value(name, labels) or 0.0


@pytest.fixture()
async def matcher(redis_url: str) -> AsyncIterator[Matcher]:
    m = await Matcher(redis_url).start()
    await m.run(20, 10)  # some history before any feed starts
    yield m
    await m.stop()


@contextlib.asynccontextmanager
async def feed(redis_url: str, **kw: Any) -> AsyncIterator[FeedServer]:
    server = FeedServer(redis_url, INSTRUMENTS, **kw)
    await server.start("127.0.0.1", 0, 0)
    try:
        yield server
    finally:
        await server.stop()


async def synced(server: FeedServer, symbol: str = SYMBOL, timeout: float = 5.0) -> None:
    """Until the feed holds the matcher's book (its answer to the feed's first snapshot request)."""
    async with asyncio.timeout(timeout):
        while not server.views[symbol].synced:
            await asyncio.sleep(0.005)


def md_url(server: FeedServer) -> str:
    return f"ws://127.0.0.1:{server.md_port}"


def trades_url(server: FeedServer) -> str:
    return f"ws://127.0.0.1:{server.trades_port}"


# --------------------------------------------------------------------------------------------------
async def test_snapshot_lines_up_with_updates_and_rebuilds_the_book(redis_url: str, matcher: Matcher) -> None:
    async with feed(redis_url) as server:
        await synced(server)
        early = await L2Client.open(md_url(server))
        assert (await recv_json(early.ws)) == {"type": "subscribed", "channel": "l2", "symbol": SYMBOL}
        await early.next_snapshot()
        producer = asyncio.create_task(matcher.run(60, 15, pause=0.002))
        await asyncio.sleep(0.05)
        late = await L2Client.open(md_url(server))  # joins while updates are flowing
        await producer
        for client in (early, late):
            await client.until_seq(matcher.book.book_seq)
            assert client.book() == engine_book(matcher)
            assert len(client.snapshots) == 1  # one snapshot, then an unbroken run of updates
        assert late.other == [{"type": "subscribed", "channel": "l2", "symbol": SYMBOL}]
        # Both saw the same bytes for every seq they share: forwarded raw, not re-encoded.
        assert late.updates == early.updates[-len(late.updates) :]
        assert late.snapshots[0]["seq"] + len(late.updates) == matcher.book.book_seq
        for client in (early, late):
            await client.ws.close()


async def test_gap_on_redis_resyncs_from_the_matcher(redis_url: str, matcher: Matcher) -> None:
    async with feed(redis_url) as server:
        client = await L2Client.open(md_url(server))
        await client.next_snapshot()
        await matcher.run(5, 10)
        await client.until_seq(matcher.book.book_seq)
        requests, resyncs = matcher.requests, counter("cme_feed_resyncs_total", symbol=SYMBOL)
        # One md payload never reaches the feed; the matcher's state moves on.
        matcher.answering = False  # hold the answer to see that nothing is forwarded meanwhile
        while not (await matcher.step(10, publish_md=False)).md:
            pass
        lost_up_to = matcher.book.book_seq
        await matcher.run(3, 10)
        async with asyncio.timeout(5):
            while matcher.requests == requests:
                await asyncio.sleep(0.01)
        assert counter("cme_feed_resyncs_total", symbol=SYMBOL) == resyncs + 1
        await asyncio.sleep(0.1)
        assert client.seq is not None and client.seq < lost_up_to  # nothing after the gap was forwarded
        matcher.answering = True
        await matcher.publish_snapshot()
        snap = await client.next_snapshot()  # L2Client.apply asserted seq continuity until here
        assert snap["seq"] == matcher.book.book_seq
        assert client.book() == engine_book(matcher)
        await matcher.run(5, 10)
        await client.until_seq(matcher.book.book_seq)
        assert client.book() == engine_book(matcher)
        await client.ws.close()


async def test_feed_started_before_the_matcher_waits_then_syncs(redis_url: str) -> None:
    m = Matcher(redis_url, seed=3)  # not answering yet: the feed must keep asking (every ~1 s)
    async with feed(redis_url) as server:
        client = await L2Client.open(md_url(server))
        assert (await recv_json(client.ws))["type"] == "subscribed"
        await m.run(3, 10)  # updates without a snapshot are not forwarded
        await asyncio.sleep(0.2)
        assert client.snapshots == [] and client.seq is None
        await m.start()
        await client.next_snapshot(timeout=5)
        await m.run(3, 10)
        await client.until_seq(m.book.book_seq)
        assert client.book() == engine_book(m)
        await client.ws.close()
    await m.stop()


async def test_depth_channel_is_conflated(redis_url: str, matcher: Matcher) -> None:
    interval = 0.2
    async with feed(redis_url, depth_interval=interval) as server:
        await synced(server)
        ws = await connect(md_url(server), compression=None)
        sub = {"op": "subscribe", "symbol": SYMBOL, "channel": "depth", "depth": 5}
        await ws.send(orjson.dumps(sub).decode())
        reply = {"type": "subscribed", "channel": "depth", "symbol": SYMBOL, "depth": 5}
        assert (await recv_json(ws)) == reply
        first = await recv_json(ws, timeout=3)  # the initial image, on the next tick
        assert first["type"] == "depth" and len(first["bids"]) <= 5
        arrivals: list[float] = []
        msgs: list[Msg] = []

        async def read() -> None:
            while True:
                msgs.append(await recv_json(ws, timeout=10))
                arrivals.append(time.monotonic())

        reader = asyncio.create_task(read())
        start = time.monotonic()
        await matcher.run(100, 2, pause=0.01)  # ~100 md payloads in ~1 s
        await asyncio.sleep(2 * interval)  # the last change still goes out
        elapsed = time.monotonic() - start
        reader.cancel()
        updates = matcher.book.book_seq - first["seq"]
        assert updates > 50
        assert 2 <= len(msgs) <= elapsed / interval + 1, (len(msgs), elapsed)
        gaps = [b - a for a, b in itertools.pairwise(arrivals)]
        assert min(gaps) > interval / 4, gaps  # the bound is on sending; arrival times jitter
        last = msgs[-1]
        bids, asks = engine_book(matcher)
        assert last["seq"] == matcher.book.book_seq
        assert (last["bids"], last["asks"]) == (bids[:5], asks[:5])
        assert last["bbo"] == {"bid": bids[0] if bids else None, "ask": asks[0] if asks else None}
        await ws.close()


async def test_trades_are_forwarded_once(redis_url: str, matcher: Matcher) -> None:
    async with feed(redis_url) as server:
        ws = await connect(trades_url(server), compression=None)
        await ws.send('{"op":"subscribe","symbol":"BTC-USDT"}')
        assert (await recv_json(ws))["type"] == "subscribed"
        sent: list[bytes] = []
        while len(sent) < 30:
            out = await matcher.step(20)
            sent.extend(out.trades)
            if out.trades:  # the same payload again: a matcher replaying after a restart
                payload = frame(out.trades, time.time_ns())
                assert payload is not None
                await matcher.redis.publish(keys.trades_channel(SYMBOL), payload)
        got: list[bytes] = []
        async with asyncio.timeout(5):
            while len(got) < len(sent):
                got.append((await ws.recv()).encode())  # type: ignore[union-attr]
        assert got == sent  # byte for byte, each once, in trade_id order
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(ws.recv(), 0.3)
        await ws.send('{"op":"unsubscribe","symbol":"BTC-USDT"}')
        assert (await recv_json(ws))["type"] == "unsubscribed"
        await matcher.run(10, 20)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(ws.recv(), 0.3)
        await ws.close()


async def test_slow_client_is_dropped_others_get_everything(redis_url: str, matcher: Matcher) -> None:
    async with feed(redis_url, max_buffer=100) as server:
        normal = await L2Client.open(md_url(server))
        await normal.next_snapshot()
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", server.md_port))
        slow = await L2Client.open(md_url(server), sock=sock, max_queue=1)  # and it never reads
        before = counter("cme_feed_dropped_clients_total", reason="buffer_full")

        async def produce() -> None:
            while counter("cme_feed_dropped_clients_total", reason="buffer_full") == before:
                await matcher.step(20)
                await asyncio.sleep(0)

        async def consume() -> None:
            async for raw in normal.ws:
                normal.apply(str(raw))

        consumer = asyncio.create_task(consume())
        await asyncio.wait_for(produce(), 30)
        await matcher.run(5, 20)
        async with asyncio.timeout(10):
            while normal.seq != matcher.book.book_seq:
                await asyncio.sleep(0.01)
        consumer.cancel()
        assert normal.book() == engine_book(matcher)
        assert len(normal.snapshots) == 1  # never interrupted
        with pytest.raises(ConnectionClosed) as info:
            async with asyncio.timeout(10):
                async for _ in slow.ws:
                    pass
        assert info.value.rcvd is not None
        assert (info.value.rcvd.code, info.value.rcvd.reason) == (1008, SLOW_CONSUMER)
        await normal.ws.close()


async def test_bad_client_messages(redis_url: str, matcher: Matcher) -> None:
    async with feed(redis_url) as server:
        ws = await connect(md_url(server), compression=None)
        cases = [
            ("not json", "INVALID_MESSAGE"),
            ("[1, 2]", "INVALID_MESSAGE"),
            ('{"symbol":"BTC-USDT"}', "INVALID_MESSAGE"),
            ('{"op":"trade","symbol":"BTC-USDT"}', "UNKNOWN_OP"),
            ('{"op":"subscribe"}', "INVALID_MESSAGE"),
            ('{"op":"subscribe","symbol":"DOGE-USDT"}', "UNKNOWN_SYMBOL"),
            ('{"op":"subscribe","symbol":"BTC-USDT","channel":"l3"}', "INVALID_MESSAGE"),
            ('{"op":"subscribe","symbol":"BTC-USDT","channel":"depth","depth":0}', "INVALID_MESSAGE"),
            ('{"op":"subscribe","symbol":"BTC-USDT","channel":"depth","depth":"10"}', "INVALID_MESSAGE"),
        ]
        for text, code in cases:
            await ws.send(text)
            msg = await recv_json(ws)
            assert msg["type"] == "reject" and msg["code"] == code, (text, msg)
            assert msg["reason"]
        # Still open and working.
        await ws.send('{"op":"subscribe","symbol":"BTC-USDT"}')
        assert (await recv_json(ws))["type"] == "subscribed"
        assert (await recv_json(ws))["type"] == "l2_snapshot"
        await ws.close()

        ws = await connect(trades_url(server), compression=None)
        await ws.send('{"op":"subscribe","symbol":"BTC-USDT","channel":"l2"}')
        assert (await recv_json(ws))["code"] == "INVALID_MESSAGE"
        await ws.send(b"\x00binary")  # not a text frame: closed with a reason
        with pytest.raises(ConnectionClosed) as info:
            await recv_json(ws)
        assert info.value.rcvd is not None and info.value.rcvd.code == 1003 and info.value.rcvd.reason

        ws = await connect(md_url(server), compression=None, max_size=None)
        await ws.send('{"op":"subscribe","symbol":"' + "X" * 10_000 + '"}')  # over the frame limit
        with pytest.raises(ConnectionClosed) as info:
            await recv_json(ws)
        assert info.value.rcvd is not None and info.value.rcvd.code == 1009 and info.value.rcvd.reason

        ws = await connect(md_url(server), compression=None)
        with pytest.raises(ConnectionClosed) as info:
            async with asyncio.timeout(5):
                while True:  # a client that keeps sending garbage is closed in the end
                    await ws.send("{")
                    assert (await recv_json(ws))["code"] == "INVALID_MESSAGE"
        assert info.value.rcvd is not None
        assert (info.value.rcvd.code, info.value.rcvd.reason) == (1008, "too many invalid messages")


async def test_redis_restart_resyncs_every_book(own_redis: RedisServer) -> None:
    """Whatever was published while the feed was cut off is lost to it: after reconnecting it must
    not carry on from its old book but resync, and its clients get a fresh snapshot."""
    m = await Matcher(own_redis.url).start()
    await m.run(10, 10)
    async with feed(own_redis.url) as server:
        client = await L2Client.open(md_url(server))
        await client.next_snapshot()
        own_redis.kill()
        await asyncio.to_thread(own_redis.start)
        await m.start()  # the matcher's request listener reconnects too
        await m.run(5, 10)  # published while the feed may still be reconnecting: some are lost
        snap = await client.next_snapshot(timeout=15)  # seq continuity checked up to here
        assert snap["seq"] <= m.book.book_seq
        await m.run(5, 10)
        await client.until_seq(m.book.book_seq)
        assert client.book() == engine_book(m)
        await client.ws.close()
    await m.stop()


async def test_feed_processes_on_one_host_share_the_ports(redis_url: str, matcher: Matcher) -> None:
    """SO_REUSEPORT: `cme up --feeds N` starts N processes on the same md and trades ports."""
    async with feed(redis_url) as first:
        second = FeedServer(redis_url, INSTRUMENTS)
        await second.start("127.0.0.1", first.md_port, first.trades_port)
        try:
            assert (second.md_port, second.trades_port) == (first.md_port, first.trades_port)
            clients = [await L2Client.open(md_url(first)) for _ in range(6)]
            for client in clients:
                await client.next_snapshot()
            await matcher.run(3, 10)
            for client in clients:
                await client.until_seq(matcher.book.book_seq)
                assert client.book() == engine_book(matcher)
                await client.ws.close()
        finally:
            await second.stop()


# Separate processes ------------------------------------------------------------------------------
def start_feed_process(redis_url: str, md_port: int, trades_port: int) -> subprocess.Popen[bytes]:
    cmd = [
        sys.executable, "-m", "services.cli", "feeds", "--redis-url", redis_url, "--md-port", str(md_port),
        "--trades-port", str(trades_port), "--metrics-port", "0", "--log-level", "WARNING",
    ]  # fmt: skip
    return subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})


async def wait_listening(port: int, proc: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    async with asyncio.timeout(timeout):
        while True:
            assert proc.poll() is None, "feed process exited"
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.close()
                return
            except OSError:
                await asyncio.sleep(0.05)


async def test_two_feed_processes_deliver_the_same_stream(redis_url: str, matcher: Matcher) -> None:
    ports = [(free_port(), free_port()) for _ in range(2)]
    procs = [start_feed_process(redis_url, md, tr) for md, tr in ports]
    try:
        for (md, _), proc in zip(ports, procs, strict=True):
            await wait_listening(md, proc)
        l2 = [await L2Client.open(f"ws://127.0.0.1:{md}") for md, _ in ports]
        trades = []
        for _, tr in ports:
            ws = await connect(f"ws://127.0.0.1:{tr}", compression=None)
            await ws.send('{"op":"subscribe","symbol":"BTC-USDT"}')
            assert (await recv_json(ws))["type"] == "subscribed"
            trades.append(ws)
        for client in l2:
            await client.next_snapshot()
        start_seq = max(c.seq or 0 for c in l2)
        sent: list[bytes] = []
        for _ in range(30):
            sent.extend((await matcher.step(10)).trades)
        for client in l2:
            await client.until_seq(matcher.book.book_seq)
            assert client.book() == engine_book(matcher)
        tail = [c.updates[-(matcher.book.book_seq - start_seq) :] for c in l2]
        assert tail[0] == tail[1] and len(tail[0]) == matcher.book.book_seq - start_seq
        for ws in trades:
            got: list[bytes] = []
            async with asyncio.timeout(5):
                while len(got) < len(sent):
                    got.append((await ws.recv()).encode())  # type: ignore[union-attr]
            assert got == sent
        # SIGTERM: clients are closed with 1001 and the process exits 0.
        procs[0].send_signal(signal.SIGTERM)
        with pytest.raises(ConnectionClosed) as info:
            async with asyncio.timeout(10):
                while True:
                    await l2[0].ws.recv()
        assert info.value.rcvd is not None and info.value.rcvd.code == 1001
        assert await asyncio.to_thread(procs[0].wait, 10) == 0
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
                await asyncio.to_thread(proc.wait, 10)


async def test_quiet_l2_subscription_gets_heartbeats(redis_url: str, matcher: Matcher) -> None:
    async with feed(redis_url) as server:
        await synced(server)
        client = await L2Client.open(md_url(server))
        await client.next_snapshot()
        async with asyncio.timeout(5):
            while not client.heartbeats:
                client.apply(str(await client.ws.recv()))
        beat = client.heartbeats[0]
        assert set(beat) == {"type", "symbol", "seq", "last_trade_id", "ts"}
        assert (beat["symbol"], beat["seq"]) == (SYMBOL, matcher.book.book_seq)
        assert beat["last_trade_id"] == matcher.trades[-1][2]
        await matcher.run(3, 10)  # updates, then quiet again: the next beat has the new seq
        async with asyncio.timeout(5):
            while len(client.heartbeats) < 2:
                client.apply(str(await client.ws.recv()))
        assert client.heartbeats[1]["seq"] == matcher.book.book_seq == client.seq
        assert client.checked == len(client.snapshots) + len(client.updates)
        await client.ws.close()


async def test_candles_and_ticker_channels(redis_url: str) -> None:
    # A 1m bar per 20 commands, from now on: the bars' clock runs ahead of the wall clock, so the last
    # one stays open and the others close because a later one began.
    now = time.time_ns() // 1_000_000
    m = await Matcher(redis_url, seed=31, ms_per_command=3000, ts_base=now - now % 60_000).start()
    try:
        await m.run(10, 10)
        async with feed(redis_url) as server:
            ws = await connect(md_url(server), compression=None, max_size=None)
            for sub in (
                {"op": "subscribe", "symbol": SYMBOL, "channel": "candles", "interval": "1m"},
                {"op": "subscribe", "symbol": SYMBOL, "channel": "ticker"},
            ):
                await ws.send(orjson.dumps(sub).decode())
            seen: dict[str, list[Msg]] = {}

            async def until(kind: str, n: int = 1) -> Msg:
                async with asyncio.timeout(10):
                    while len(seen.get(kind, [])) < n:
                        msg = await recv_json(ws)
                        seen.setdefault(msg["type"], []).append(msg)
                return seen[kind][n - 1]

            await until("subscribed", 2)
            assert seen["subscribed"][0]["interval"] == "1m"
            snap = await until("candles_snapshot")
            ticks = [(e[19], e[3], e[4]) for e in m.trades]
            assert [as_numbers(c) for c in snap["candles"]] == expected(ticks, 60_000)
            ticker = await until("ticker")
            assert ticker["last"] == INST.price_str(m.trades[-1][3])
            await m.run(8, 10)  # past more bar boundaries
            last_id = m.trades[-1][2]
            async with asyncio.timeout(10):
                while server.market[SYMBOL].last_trade_id < last_id:
                    await asyncio.sleep(0.005)
            want = expected([(e[19], e[3], e[4]) for e in m.trades], 60_000)
            # Candle messages follow each bar's changes; the bars before the current one end closed.
            async with asyncio.timeout(10):
                while True:
                    msg = await recv_json(ws)
                    seen.setdefault(msg["type"], []).append(msg)
                    if msg["type"] == "candle" and as_numbers(msg) == want[-1]:
                        break
            candles = seen["candle"]
            latest = {c["open_time"]: c for c in candles}
            closed = [c for c in candles if c["closed"]]
            assert closed and all(c["open_time"] < want[-1]["open_time"] for c in closed)
            for c in closed:
                assert as_numbers(c) in want  # a closed bar is final: it matches the trades
            assert as_numbers(latest[want[-1]["open_time"]]) == want[-1]
            final = INST.price_str(m.trades[-1][3])
            async with asyncio.timeout(10):  # it changed: a new ticker follows (at most once a second)
                while len(seen["ticker"]) < 2 or seen["ticker"][-1]["last"] != final:
                    msg = await recv_json(ws)
                    seen.setdefault(msg["type"], []).append(msg)
            stamps = [t["ts"] for t in seen["ticker"]]
            assert all(b - a >= 990 for a, b in itertools.pairwise(stamps))  # the feed's own clock, ms
            assert Decimal(seen["ticker"][-1]["volume_24h"]) == sum(
                Decimal(INST.qty_str(e[4])) for e in m.trades
            )
            # A bad interval is a reject, nothing subscribed.
            await ws.send(orjson.dumps({"op": "subscribe", "symbol": SYMBOL, "channel": "candles"}).decode())
            reject = await until("reject")
            assert reject["code"] == "INVALID_MESSAGE" and "interval" in reject["reason"]
            await ws.close()
    finally:
        await m.stop()
