"""The lean WebSocket transport against the `websockets` server library on 127.0.0.1: an independent
implementation of the RFC on the other end."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from http import HTTPStatus

import pytest
from cme_client import HandshakeError, WebSocket
from websockets.asyncio.server import ServerConnection, serve
from websockets.datastructures import Headers
from websockets.http11 import Request, Response

pytestmark = pytest.mark.timeout(30)

Handler = Callable[[ServerConnection], Awaitable[None]]
Serve = Callable[..., Awaitable[str]]


@pytest.fixture()
async def server() -> AsyncIterator[Serve]:
    """Start websockets servers on free ports; each gets the handler a test gives."""
    servers = []

    async def start(handler: Handler, **kw: object) -> str:
        srv = await serve(handler, "127.0.0.1", 0, compression=None, **kw)  # type: ignore[arg-type]
        servers.append(srv)
        port = next(iter(srv.sockets)).getsockname()[1]
        return f"ws://127.0.0.1:{port}/path?x=1"

    yield start
    for srv in servers:
        srv.close()
        await srv.wait_closed()


class Inbox:
    def __init__(self) -> None:
        self.items: asyncio.Queue[bytes] = asyncio.Queue()

    def __call__(self, data: bytes | bytearray) -> None:
        self.items.put_nowait(bytes(data))

    async def get(self) -> bytes:
        return await asyncio.wait_for(self.items.get(), 5)


async def echo(ws: ServerConnection) -> None:
    async for msg in ws:
        await ws.send(msg)


async def test_text_frames_both_ways_small_medium_and_large(server: Serve) -> None:
    url = await server(echo, max_size=None)
    inbox = Inbox()
    ws = await WebSocket.connect(url, inbox)
    sizes = [0, 1, 125, 126, 65535, 65536, 200_000]
    ws.send_texts([b"x" * n for n in sizes])  # one write: every frame length encoding
    for n in sizes:
        assert await inbox.get() == b"x" * n
    ws.send_text('{"a":"\u00e9"}')
    assert await inbox.get() == '{"a":"\u00e9"}'.encode()
    await ws.close()
    assert ws.close_code == 1000 and not ws.is_open


async def test_fragmented_text_is_reassembled_and_binary_is_dropped(server: Serve) -> None:
    async def handler(ws: ServerConnection) -> None:
        await ws.recv()
        await ws.send(b"binary")  # the exchange never sends binary frames: the client skips them
        await ws.send(["frag", "mented"])  # a message sent as fragments
        await ws.send("last")
        await ws.wait_closed()

    url = await server(handler)
    inbox = Inbox()
    ws = await WebSocket.connect(url, inbox)
    ws.send_text("go")
    assert await inbox.get() == b"fragmented"
    assert await inbox.get() == b"last"
    await ws.close()


async def test_server_ping_is_answered_and_binary_frames_are_sent_as_binary(server: Serve) -> None:
    got: list[str | bytes] = []

    async def handler(ws: ServerConnection) -> None:
        pong = await ws.ping(b"hi")
        await asyncio.wait_for(pong, 5)  # raises if the client never answers
        got.append(await ws.recv())
        await ws.send("done")
        await ws.wait_closed()

    url = await server(handler)
    inbox = Inbox()
    ws = await WebSocket.connect(url, inbox)
    ws.send_binary(b"\x00\x01")
    assert await inbox.get() == b"done"
    assert got == [b"\x00\x01"]
    await ws.close()


async def test_a_server_close_keeps_its_code_and_reason_and_sending_then_fails(server: Serve) -> None:
    async def handler(ws: ServerConnection) -> None:
        await ws.close(1008, "slow consumer")

    url = await server(handler)
    closed = asyncio.Event()
    ws = await WebSocket.connect(url, Inbox())
    ws.on_close = closed.set
    await asyncio.wait_for(closed.wait(), 5)
    assert (ws.close_code, ws.close_reason) == (1008, "slow consumer")
    with pytest.raises(ConnectionError):
        ws.send_text("x")


async def test_a_dropped_tcp_connection_is_an_abnormal_close(server: Serve) -> None:
    async def handler(ws: ServerConnection) -> None:
        ws.transport.abort()  # like a server process killed with -9: no close frame

    url = await server(handler)
    ws = await WebSocket.connect(url, Inbox())
    await asyncio.wait_for(asyncio.shield(ws.closed), 5)
    assert ws.close_code == 1006 and not ws.is_open


async def test_a_refused_upgrade_is_a_handshake_error(server: Serve) -> None:
    def refuse(_: ServerConnection, request: Request) -> Response:
        return Response(HTTPStatus.SERVICE_UNAVAILABLE.value, "Service Unavailable", Headers(), b"busy\n")

    url = await server(echo, process_request=refuse)
    with pytest.raises(HandshakeError, match="503"):
        await WebSocket.connect(url, Inbox())


async def test_the_request_target_and_the_chosen_subprotocol(server: Serve) -> None:
    paths: list[str] = []

    async def handler(ws: ServerConnection) -> None:
        assert ws.request is not None
        paths.append(ws.request.path)
        await ws.send("hello")
        await ws.wait_closed()

    url = await server(handler, subprotocols=["order-submission"])
    inbox = Inbox()
    ws = await WebSocket.connect(url, inbox, subprotocols=["order-submission"])
    assert await inbox.get() == b"hello"
    assert ws.subprotocol == "order-submission" and paths == ["/path?x=1"]
    await ws.close()


async def test_nothing_listening_is_an_os_error() -> None:
    from shared.redis_server import free_port

    with pytest.raises(OSError):
        await WebSocket.connect(f"ws://127.0.0.1:{free_port('127.0.0.1')}", Inbox())
