"""shared/wsserver.py on real sockets on 127.0.0.1: websockets clients; raw ones send what those refuse to."""

from __future__ import annotations

import asyncio
import struct
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed
from websockets.typing import Subprotocol

from services.fuzz import BINARY, CLOSE, CONT, PING, PONG, TEXT, split_frames, upgrade_request, ws_frame
from shared import wsserver
from shared.wsguard import Guard, Policy
from tests.hostile import PingFlooder, bare, cut_off, upgrades

pytestmark = pytest.mark.timeout(30)
MAX_SIZE = 1024


class Echo:
    """A handler: echoes text; "many N" answers N messages in one write; "close", "pause" and "raise"
    do that."""

    def __init__(self, conn: wsserver.Connection, closed: list[wsserver.Connection]) -> None:
        self.conn, self.closed = conn, closed

    def on_text(self, text: str) -> None:
        if text.startswith("many "):
            self.conn.send_texts([f"m{i}".encode() for i in range(int(text[5:]))])
        elif text == "close":
            self.conn.close(1000, "bye")
        elif text == "pause":  # as the transport does when its buffer passes the high-water mark
            self.conn.pause_writing()
        elif text == "raise":
            raise RuntimeError("a bug in the handler")
        else:
            self.conn.send_texts([text.encode()])

    def on_binary(self, data: bytes) -> None:
        self.conn.send_texts([b"binary " + data.hex().encode()])

    def on_closed(self) -> None:
        self.closed.append(self.conn)


class Started:
    def __init__(self, server: wsserver.Server, closed: list[wsserver.Connection]) -> None:
        self.server, self.closed = server, closed
        self.url = f"ws://127.0.0.1:{server.port}"


Start = Callable[..., Awaitable[Started]]


def health(request: wsserver.Request) -> wsserver.HttpResponse | None:
    if request.path == "/healthz" and "Upgrade" not in request.headers:
        return wsserver.HttpResponse(503, b"not yet\n")
    return None


def pick(_request: object, offered: Sequence[str]) -> str | None:
    return "order-submission" if "order-submission" in offered else None


@pytest.fixture()
async def start() -> AsyncIterator[Start]:
    servers: list[wsserver.Server] = []

    async def start(
        port: int = 0, close_timeout: float = 2.0, ping_interval: float = 20.0, **policy: Any
    ) -> Started:
        closed: list[wsserver.Connection] = []
        server = await wsserver.serve(
            lambda conn: Echo(conn, closed),
            "127.0.0.1",
            port,
            guard=Guard(Policy(**policy), "test"),
            max_size=MAX_SIZE,
            close_timeout=close_timeout,
            ping_interval=ping_interval,
            ping_timeout=ping_interval,
            process_request=health,
            select_subprotocol=pick,
        )
        servers.append(server)
        return Started(server, closed)

    yield start
    for server in servers:
        server.close(1001, "test over")
        await asyncio.wait_for(server.wait_closed(), 5)


async def closed_with(ws: ClientConnection) -> tuple[int, str]:
    with pytest.raises(ConnectionClosed) as info:
        while True:
            await asyncio.wait_for(ws.recv(), 5)
    assert info.value.rcvd is not None
    return info.value.rcvd.code, info.value.rcvd.reason


class Raw:
    """A client on a bare socket: sends any frame, reads the server's frames until EOF."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.buf = b""

    @classmethod
    async def open(cls, port: int) -> tuple[Raw, bytes]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(upgrade_request("127.0.0.1", port))
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 101"), head
        return cls(reader, writer), head

    def send(self, *frames: bytes) -> None:
        self.writer.write(b"".join(frames))

    async def until_eof(self) -> list[tuple[int, bytes]]:
        try:
            while data := await asyncio.wait_for(self.reader.read(65536), 5):
                self.buf += data
        except ConnectionResetError:
            pass
        frames, self.buf = split_frames(self.buf)
        return frames


def close_frame(code: int, reason: str) -> tuple[int, bytes]:
    return CLOSE, struct.pack("!H", code) + reason.encode()


# Messages in and out ---------------------------------------------------------------------------------
async def test_text_is_echoed_and_many_messages_leave_in_one_write(start: Start) -> None:
    s = await start()
    async with connect(s.url, compression=None) as ws:
        await ws.send("héllo")
        assert await ws.recv() == "héllo"
        await ws.send("many 300")
        assert [await ws.recv() for _ in range(300)] == [f"m{i}" for i in range(300)]
        await ws.send(b"\x00\xff")
        assert await ws.recv() == "binary 00ff"


def test_frames_are_unmasked_final_text_frames_of_each_length_class() -> None:
    sizes = [0, 125, 126, 65535, 65536]
    messages = [b"x" * n for n in sizes]
    heads = [
        b"\x81\x00",
        b"\x81\x7d",
        b"\x81\x7e\x00\x7e",
        b"\x81\x7e\xff\xff",
        b"\x81\x7f" + (65536).to_bytes(8, "big"),
    ]
    assert [wsserver.text_frame(m) for m in messages] == [h + m for h, m in zip(heads, messages, strict=True)]
    assert wsserver.frames(messages) == b"".join(h + m for h, m in zip(heads, messages, strict=True))
    assert split_frames(wsserver.frames(messages)) == ([(TEXT, m) for m in messages], b"")


async def test_fragmented_messages_are_reassembled_in_order(start: Start) -> None:
    s = await start()
    async with connect(s.url, compression=None) as ws:
        await ws.send(["fr", "ag", "ment"])
        await ws.send("whole")
        await ws.send([b"\x01", b"\x02"])
        assert [await ws.recv() for _ in range(3)] == ["fragment", "whole", "binary 0102"]


async def test_a_ping_is_answered(start: Start) -> None:
    s = await start()
    async with connect(s.url, compression=None) as ws:
        latency = await asyncio.wait_for(await ws.ping(b"p1"), 5)
        assert latency >= 0


# Protocol errors close with websockets' codes and reasons ---------------------------------------------
async def test_a_message_over_max_size_closes_with_1009(start: Start) -> None:
    s = await start()
    async with connect(s.url, compression=None) as ws:
        await ws.send("x" * MAX_SIZE)  # at the limit: answered
        assert len(await ws.recv()) == MAX_SIZE
        await ws.send("x" * (MAX_SIZE + 1))
        assert await closed_with(ws) == (
            1009,
            f"frame with {MAX_SIZE + 1} bytes exceeds limit of {MAX_SIZE} bytes",
        )
    async with connect(s.url, compression=None) as ws:
        await ws.send(["x" * 600, "y" * 600])  # each fragment fits, the message does not
        assert await closed_with(ws) == (
            1009,
            f"frame with 600 bytes after reading 600 bytes exceeds limit of {MAX_SIZE} bytes",
        )


async def test_invalid_utf8_closes_with_1007(start: Start) -> None:
    s = await start()
    async with connect(s.url, compression=None) as ws:
        ws.protocol.send_text(b'{"x":"\xff"}')  # past the client's own encoding
        ws.send_data()
        assert await closed_with(ws) == (1007, "invalid start byte at position 6")
    raw, _ = await Raw.open(s.server.port)
    raw.send(
        ws_frame(TEXT, b"ok \xe2\x82", fin=False), ws_frame(CONT, b"\xac"), ws_frame(TEXT, b"\xe2", fin=False)
    )
    raw.send(ws_frame(CONT, b"!"))  # a character split across fragments is fine; a broken one is not
    assert await raw.until_eof() == [
        (TEXT, "ok €".encode()),
        close_frame(1007, "invalid continuation byte at position 0"),
    ]


@pytest.mark.parametrize(
    ("frames", "reason"),
    [
        ([ws_frame(TEXT, b"x", rsv=4)], "reserved bits must be 0"),
        ([ws_frame(CONT, b"x")], "unexpected continuation frame"),
        ([ws_frame(TEXT, b"x", fin=False), ws_frame(BINARY, b"y")], "expected a continuation frame"),
    ],
)
async def test_protocol_errors_close_with_1002(start: Start, frames: list[bytes], reason: str) -> None:
    s = await start()
    raw, _ = await Raw.open(s.server.port)
    raw.send(*frames)
    assert await raw.until_eof() == [close_frame(1002, reason)]


async def test_a_handler_that_raises_closes_with_1011(start: Start) -> None:
    s = await start()
    async with connect(s.url, compression=None) as ws:
        await ws.send("raise")
        assert await closed_with(ws) == (1011, "")


# The close handshake ----------------------------------------------------------------------------------
async def test_a_client_close_is_echoed_then_the_server_closes_tcp(start: Start) -> None:
    s = await start()
    raw, _ = await Raw.open(s.server.port)
    raw.send(
        ws_frame(TEXT, b"before"),
        ws_frame(CLOSE, struct.pack("!H", 1000) + b"done"),
        ws_frame(TEXT, b"after"),
    )
    assert await raw.until_eof() == [(TEXT, b"before"), close_frame(1000, "done")]  # "after" is dropped
    raw2, _ = await Raw.open(s.server.port)
    raw2.send(ws_frame(CLOSE, b""))  # no code: none in the answer either
    assert await raw2.until_eof() == [(CLOSE, b"")]
    async with asyncio.timeout(5):
        while len(s.closed) < 2:
            await asyncio.sleep(0.01)
    assert [(c.close_code, c.close_reason) for c in s.closed] == [(1000, "done"), (1005, "")]
    assert s.server.guard.limiter.total == 0


async def test_a_server_close_waits_for_the_answer_then_aborts_after_close_timeout(start: Start) -> None:
    s = await start(close_timeout=0.3)
    async with connect(s.url, compression=None) as ws:  # a client that answers
        await ws.send("close")
        assert await closed_with(ws) == (1000, "bye")
    raw, _ = await Raw.open(s.server.port)  # one that never answers our close frame
    raw.send(ws_frame(TEXT, b"close"))
    async with asyncio.timeout(5):
        frames = await raw.until_eof()
    assert frames == [close_frame(1000, "bye")]
    await asyncio.wait_for(s.server.wait_closed(), 5)


async def test_keepalive_pings_and_closes_with_1011_without_a_pong(start: Start) -> None:
    s = await start(ping_interval=0.1)
    answering, _ = await Raw.open(s.server.port)
    silent, _ = await Raw.open(s.server.port)
    pings, texts = 0, list[tuple[int, bytes]]()
    while not texts:  # answer every ping; after three rounds (each pong buys the next), still open
        data = await asyncio.wait_for(answering.reader.read(65536), 5)
        frames, answering.buf = split_frames(answering.buf + data)
        for opcode, payload in frames:
            if opcode == PING:
                answering.send(ws_frame(PONG, payload))
                pings += 1
                if pings == 3:
                    answering.send(ws_frame(TEXT, b"alive"))
            else:
                texts.append((opcode, payload))
    assert texts == [(TEXT, b"alive")]
    assert await silent.until_eof() == [(PING, b"cme"), close_frame(1011, "keepalive ping timeout")]


# Limits (shared/wsguard.py) ---------------------------------------------------------------------------
async def test_connection_caps_refuse_at_accept_before_any_handshake_byte(start: Start) -> None:
    s = await start(max_connections=3, max_connections_per_ip=2, handshake_timeout=30)
    held = [await bare(s.server.port) for _ in range(2)]
    assert await cut_off((await bare(s.server.port))[0]), "a third connection from one address was let in"
    held.append(await bare(s.server.port, "127.0.0.2"))
    assert await cut_off((await bare(s.server.port, "127.0.0.3"))[0]), "a fourth connection was let in"
    for conn in held:
        assert await upgrades(s.server.port, conn)
    assert s.server.guard.limiter.total == 3
    for _, writer in held:
        writer.close()
    async with asyncio.timeout(5):
        while s.server.guard.limiter.total:
            await asyncio.sleep(0.01)
    async with connect(s.url, compression=None) as ws:  # room again
        await ws.send("again")
        assert await ws.recv() == "again"


async def test_a_silent_connection_is_cut_at_the_handshake_deadline(start: Start) -> None:
    s = await start(handshake_timeout=0.2)
    reader, _ = await bare(s.server.port)
    assert await cut_off(reader)


async def test_a_ping_flood_pauses_reads_and_is_cut_after_the_send_timeout(start: Start) -> None:
    s = await start(send_timeout=1.5)  # longer than the flooder takes to see its sends block
    flooder = PingFlooder(s.server.port)
    flooder.start()
    await asyncio.to_thread(flooder.join, 20)
    assert flooder.upgraded and flooder.blocked.is_set() and flooder.cut.is_set()
    assert not flooder.overflowed, f"the server read all {flooder.sent} bytes of pings"


async def test_bytes_queued_over_max_queued_abort_the_connection(start: Start) -> None:
    s = await start(send_timeout=0, max_queued=16_384)  # no send timeout: only the queue limit cuts
    flooder = PingFlooder(s.server.port)
    flooder.start()
    await asyncio.to_thread(flooder.join, 20)
    assert flooder.upgraded and flooder.cut.is_set() and not flooder.overflowed


async def test_while_writes_are_paused_only_the_latest_ping_is_answered(start: Start) -> None:
    s = await start(send_timeout=0)
    raw, _ = await Raw.open(s.server.port)
    # One read: the writes pause at its first frame, so its pings wait; only the last one is answered.
    raw.send(ws_frame(TEXT, b"pause"), *(ws_frame(PING, b"p%d" % i) for i in range(5)))
    async with asyncio.timeout(5):
        while not s.server.connections or not next(iter(s.server.connections))._pong:
            await asyncio.sleep(0.01)
    conn = next(iter(s.server.connections))
    assert conn._pong == b"p4"
    conn.resume_writing()
    raw.send(ws_frame(TEXT, b"close"))
    assert await raw.until_eof() == [(PONG, b"p4"), close_frame(1000, "bye")]


# Writes of frames built once, flow control for writers with their own queue ---------------------------
async def only_connection(s: Started) -> wsserver.Connection:
    async with asyncio.timeout(5):
        while not s.server.connections or not next(iter(s.server.connections)).open:
            await asyncio.sleep(0.01)
    return next(iter(s.server.connections))


async def test_writelines_writes_blobs_of_frames_in_order_while_open(start: Start) -> None:
    s = await start()
    async with connect(s.url, compression=None) as ws:
        conn = await only_connection(s)
        shared = wsserver.frames([b"b", b"c"])  # as one blob is written to many connections
        conn.writelines([wsserver.text_frame(b"a"), shared, shared])
        assert [await ws.recv() for _ in range(5)] == ["a", "b", "c", "b", "c"]
        await ws.send("close")
        assert await closed_with(ws) == (1000, "bye")
        conn.writelines([wsserver.text_frame(b"late")])  # after the close frame: nothing
    assert not conn.open and s.server.connections == set()


async def test_drain_waits_until_the_client_reads_what_is_queued(start: Start) -> None:
    s = await start(send_timeout=0)
    raw, _ = await Raw.open(s.server.port)
    conn = await only_connection(s)
    await conn.drain()  # not paused: at once
    blob, sent = wsserver.text_frame(b"x" * 60_000), 0
    while not conn.paused:  # the kernel's buffers fill up first
        conn.write(blob)
        sent += len(blob)
    for _ in range(32):  # and then 2 MB more, far past what the client may buffer without reading
        conn.write(blob)
        sent += len(blob)
    drained = asyncio.ensure_future(conn.drain())
    again = asyncio.ensure_future(conn.drain())  # several writers may wait
    await asyncio.sleep(0)
    assert not drained.done() and conn.paused
    got = 0
    async with asyncio.timeout(10):
        while got < sent:
            got += len(await raw.reader.read(1 << 20))
        await asyncio.gather(drained, again)
    assert not conn.paused and conn.open
    raw.writer.close()


async def test_drain_returns_when_the_connection_is_lost(start: Start) -> None:
    s = await start(send_timeout=0)
    raw, _ = await Raw.open(s.server.port)
    conn = await only_connection(s)
    conn.pause_writing()  # as the transport does when its buffer passes the high-water mark
    drained = asyncio.ensure_future(conn.drain())
    await asyncio.sleep(0)
    assert not drained.done()
    conn.abort("test")
    await asyncio.wait_for(drained, 5)
    assert not conn.open
    raw.writer.close()


# HTTP, subprotocols, headers, ports ------------------------------------------------------------------
async def test_plain_http_gets_the_process_request_answer_or_426(start: Start) -> None:
    s = await start()

    async def get(path: str) -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", s.server.port)
        writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        answer = await asyncio.wait_for(reader.read(), 5)
        writer.close()
        return answer

    answer = await get("/healthz")
    assert answer.startswith(b"HTTP/1.1 503 Service Unavailable\r\n") and answer.endswith(
        b"\r\n\r\nnot yet\n"
    )
    assert b"Content-Type: text/plain; charset=utf-8\r\n" in answer
    assert (await get("/other")).startswith(b"HTTP/1.1 426 Upgrade Required\r\n")


async def test_the_subprotocol_is_chosen_and_offering_none_still_connects(start: Start) -> None:
    s = await start()
    offers: list[list[Subprotocol] | None] = [[Subprotocol("chat"), Subprotocol("order-submission")], None]
    chosen = []
    for offer in [*offers, [Subprotocol("chat")]]:
        async with connect(s.url, subprotocols=offer, compression=None) as ws:
            chosen.append(ws.subprotocol)
            await ws.send("hi")
            assert await ws.recv() == "hi"
    assert chosen == ["order-submission", None, None]


async def test_no_compression_and_no_server_header(start: Start) -> None:
    s = await start()
    async with connect(s.url) as ws:  # offers permessage-deflate
        assert ws.response is not None
        headers = ws.response.headers
        assert "Sec-WebSocket-Extensions" not in headers and "Server" not in headers
        await ws.send("x" * 500)
        assert await ws.recv() == "x" * 500


async def test_several_servers_share_a_port(start: Start) -> None:
    first = await start()
    second = await start(port=first.server.port)  # SO_REUSEPORT
    assert second.server.port == first.server.port
    first.server.stop_accepting()
    async with connect(first.url, compression=None) as ws:  # the second one takes it
        await ws.send("still served")
        assert await ws.recv() == "still served"
    assert not first.server.connections
