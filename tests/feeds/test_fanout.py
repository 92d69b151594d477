"""Fanout on real sockets: a client that stops reading is dropped with a reason once its bounded
outbox overflows, while a client that keeps reading gets every message in order."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed
from websockets.frames import Frame, Opcode

from services.feeds.fanout import CLOSE_TIMEOUT, L2, SLOW_CONSUMER, Client, Fanout, text_frame_ending
from shared import metrics, wsserver
from shared.wsguard import Guard, Policy
from shared.wsserver import frames, text_frame

SYMBOL = "BTC-USDT"
pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize("size", [1, 74, 75, 65484, 65485, 70000])  # frames of 125, 126, 65535, 65536
def test_text_frame_ending_matches_websockets(size: int) -> None:
    data, end = b"{" + b"x" * size + b"}", b',"checksum":4294967295}'
    assert text_frame_ending(data, end) == Frame(Opcode.TEXT, data[:-1] + end).serialize(mask=False)


class Subscriber:
    """The harness's wsserver.Handler: the connection stays subscribed to l2 until it is gone."""

    def __init__(self, fanout: Fanout, client: Client) -> None:
        self.fanout, self.client = fanout, client

    def on_text(self, text: str) -> None:
        pass

    def on_binary(self, data: bytes) -> None:
        pass

    def on_closed(self) -> None:
        self.fanout.unregister(self.client)


class Harness:
    """A wsserver server whose connections are registered with a Fanout on the l2 channel."""

    def __init__(self, fanout: Fanout) -> None:
        self.fanout = fanout
        self.server: wsserver.Server | None = None
        self.count = 0

    def connect(self, conn: wsserver.Connection) -> Subscriber:
        client = self.fanout.register(conn, "md")
        self.fanout.subscribe(client, L2, SYMBOL)
        self.count += 1
        return Subscriber(self.fanout, client)

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"ws://127.0.0.1:{self.server.port}"


@pytest.fixture()
async def harness() -> AsyncIterator[Harness]:
    h = Harness(Fanout(max_buffer=200))
    h.server = await wsserver.serve(
        h.connect,
        "127.0.0.1",
        0,
        guard=Guard(Policy(), "test"),
        max_size=4096,
        close_timeout=CLOSE_TIMEOUT,
    )
    yield h
    h.fanout.close_all(1001, "test over")
    h.server.close(1001, "test over")
    await asyncio.wait_for(h.server.wait_closed(), 10)
    await h.fanout.wait_idle()


async def join(h: Harness, ws: ClientConnection, n: int) -> None:
    async with asyncio.timeout(5):
        while h.count < n:
            await asyncio.sleep(0.01)


def peer_port(client: Client) -> int:
    peer = client.conn.remote_address
    assert peer is not None
    return int(peer[1])


def dropped() -> float:
    value = metrics.REGISTRY.get_sample_value("cme_feed_dropped_clients_total", {"reason": "buffer_full"})
    return value or 0.0


async def test_slow_client_is_dropped_and_the_fast_one_gets_everything(harness: Harness) -> None:
    total, batch, size = 4000, 20, 2000
    # The slow client: a tiny receive buffer and a websockets queue of one message, and it never reads.
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", int(harness.url.rsplit(":", 1)[1])))
    slow = await connect(harness.url, sock=sock, max_queue=1, compression=None)
    fast = await connect(harness.url, compression=None, max_size=None)
    await join(harness, fast, 2)
    before = dropped()

    received: list[bytes] = []

    async def read_fast() -> None:
        async for msg in fast:
            assert isinstance(msg, str)
            received.append(msg.encode())
            if len(received) == total:
                return

    reader = asyncio.create_task(read_fast())
    for start in range(0, total, batch):
        msgs = [b"%06d" % i + b"." * size for i in range(start, start + batch)]
        harness.fanout.publish(L2, SYMBOL, frames(msgs), len(msgs))
        await asyncio.sleep(0.001)  # a matcher publishes in bursts, not in one tight loop
    await asyncio.wait_for(reader, 20)

    assert [int(m[:6]) for m in received] == list(range(total))
    assert dropped() == before + 1
    slow_clients = [c for c in harness.fanout.clients if peer_port(c) == sock.getsockname()[1]]
    assert slow_clients == []  # unregistered at once: publishing to it costs nothing any more

    # The slow client, reading at last, finds the close frame with the reason after what it was sent.
    with pytest.raises(ConnectionClosed) as info:
        async with asyncio.timeout(10):
            async for _ in slow:
                pass
    assert info.value.rcvd is not None
    assert (info.value.rcvd.code, info.value.rcvd.reason) == (1008, SLOW_CONSUMER)
    await fast.close()


async def test_burst_larger_than_the_buffer_is_not_a_drop(harness: Harness) -> None:
    """Many payloads queued before the loop runs the flusher: the outbox is written early instead of
    calling a client slow that has not had a chance to read."""
    ws = await connect(harness.url, compression=None)
    await join(harness, ws, 1)
    before = dropped()
    total = 1000  # five times max_buffer, without yielding
    for i in range(total):
        harness.fanout.publish(L2, SYMBOL, text_frame(b"%d" % i), 1)
    got: list[int] = []
    async with asyncio.timeout(10):
        while len(got) < total:
            got.append(int(await ws.recv()))
    assert got == list(range(total))
    assert dropped() == before
    await ws.close()


async def test_unsubscribed_and_departed_clients_get_nothing(harness: Harness) -> None:
    a = await connect(harness.url, compression=None)
    await join(harness, a, 1)
    b = await connect(harness.url, compression=None)
    await join(harness, b, 2)
    client_a = next(c for c in harness.fanout.clients if peer_port(c) == a.local_address[1])
    assert harness.fanout.unsubscribe(client_a, L2, SYMBOL)
    assert not harness.fanout.unsubscribe(client_a, L2, SYMBOL)  # idempotent
    harness.fanout.publish(L2, SYMBOL, text_frame(b"hello"), 1)
    assert await asyncio.wait_for(b.recv(), 5) == "hello"
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(a.recv(), 0.2)
    await b.close()
    async with asyncio.timeout(5):
        while harness.fanout.subscribers(L2, SYMBOL):
            await asyncio.sleep(0.01)
    harness.fanout.publish(L2, SYMBOL, text_frame(b"nobody"), 1)  # no subscriber left: a no-op
    await a.close()


async def test_a_client_that_reads_late_gets_everything_once_its_writes_resume(harness: Harness) -> None:
    """Its transport pauses: its outbox waits (bounded, under max_buffer) for the drain, then goes out."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", int(harness.url.rsplit(":", 1)[1])))
    ws = await connect(harness.url, sock=sock, max_queue=1, compression=None, max_size=None)
    await join(harness, ws, 1)
    client = next(iter(harness.fanout.clients))
    before = dropped()
    total, size = 150, 60_000  # 9 MB: far past the socket buffers, under max_buffer messages
    for i in range(total):
        harness.fanout.publish(L2, SYMBOL, text_frame(b"%06d" % i + b"." * size), 1)
        await asyncio.sleep(0)
    async with asyncio.timeout(5):
        while not client.waiting:
            await asyncio.sleep(0.01)
    assert client.conn.paused and client.pending
    got: list[int] = []
    async with asyncio.timeout(20):
        while len(got) < total:
            msg = await ws.recv()
            got.append(int(msg[:6]))
    assert got == list(range(total))
    assert dropped() == before and not client.dropped and not client.waiting
    await ws.close()
