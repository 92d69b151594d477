"""Hostile clients for the hardening tests of the gateway and the feeds (raw sockets, no client library)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import urllib.error
import urllib.request

from services.fuzz import PING, upgrade_request, ws_frame

FLOOD_LIMIT = 128 << 20  # bytes a flooder sends at most: far beyond every buffer on its way when reads stop
# Lone surrogates: any of them once closed a gateway connection with 1011 and logged a traceback.
SURROGATES = [
    '{"op":"\\ud800"}',
    '{"op":"\\udfff","symbol":"BTC-USDT"}',
    '{"op":"ping","id":"\\ud800"}',
    '{"op":"auth","account":"\\ud83d"}',
    '{"op":"new","symbol":"BTC-USDT","side":"buy","price":"1","quantity":"1","client_order_id":"\\udc00"}',
    '{"op":"subscribe","symbol":"\\ud800"}',
    '{"op":"subscribe","symbol":"BTC-USDT","channel":"\\ud800"}',
]
OTHER_HOSTILE = [
    "[" * 2000 + "]" * 2000,  # all of these fit the feeds' 4 KiB frame limit
    '{"a":' * 500 + "1" + "}" * 500,
    '{"op":"ping","id":' + "9" * 3000 + "}",
    '{"op":"new","symbol":"BTC-USDT","price":1e400,"quantity":1e-400}',
    '{"op":"new","symbol":"BTC-USDT","price":NaN,"quantity":Infinity}',
    '"\\u0000"',
    "null",
]


class PingFlooder(threading.Thread):
    """Sends 125-byte pings as fast as it can on a socket with a tiny receive buffer; never reads.

    `blocked` is set once a send makes no progress for half a second (the server stopped reading),
    `cut` once the server tore the connection down; it gives up after FLOOD_LIMIT bytes (`overflowed`).
    """

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.sock.connect(("127.0.0.1", port))
        self.port = port
        self.sent = 0
        self.blocked = threading.Event()
        self.cut = threading.Event()
        self.overflowed = False
        self.upgraded = False

    def run(self) -> None:
        self.sock.sendall(upgrade_request("127.0.0.1", self.port))
        head = b""
        while b"\r\n\r\n" not in head:
            head += self.sock.recv(1)  # byte by byte: nothing after the handshake is ever read
        if not head.startswith(b"HTTP/1.1 101"):
            self.sock.close()
            return
        self.upgraded = True
        block = ws_frame(PING, b"p" * 125) * 256
        view = memoryview(block)
        offset = 0
        self.sock.settimeout(0.5)
        try:
            while self.sent < FLOOD_LIMIT:
                try:
                    n = self.sock.send(view[offset:])
                except TimeoutError:
                    self.blocked.set()
                    continue
                self.sent += n
                offset = (offset + n) % len(block)
            self.overflowed = True
        except OSError:  # reset or broken pipe: the server aborted the connection
            self.cut.set()
        finally:
            self.sock.close()


async def bare(port: int, source: str = "127.0.0.1") -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A TCP connection from `source` (any 127.x address is loopback) that sends nothing yet."""
    return await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))


async def cut_off(reader: asyncio.StreamReader, timeout: float = 5.0) -> bool:
    """Did the server close this connection (EOF or reset) without a word?"""
    try:
        data = await asyncio.wait_for(reader.read(1), timeout)
    except ConnectionError:
        return True
    except TimeoutError:
        return False
    return data == b""


async def upgrades(port: int, conn: tuple[asyncio.StreamReader, asyncio.StreamWriter]) -> bool:
    """Does a WebSocket upgrade on this (so far silent) connection succeed?"""
    reader, writer = conn
    writer.write(upgrade_request("127.0.0.1", port))
    with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError, TimeoutError):
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        return head.startswith(b"HTTP/1.1 101")
    return False


def http_get(port: int, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
            return int(resp.status), bytes(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
