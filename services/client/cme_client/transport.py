"""A lean RFC 6455 WebSocket client: the one transport under every connection the library opens.

The exchange's messages are small JSON text frames, and the client often shares a machine with the
venue it talks to (the load generator runs on the same cores as the stack it measures), so this is
an asyncio Protocol with no per-message task, queue or future: a received text frame is handed to a
callback as the bytes it arrived in, and a batch of frames leaves in one socket write. The general
`websockets` library costs about 15 us of CPU per message at the client; this costs a few.

Frames are masked with a fresh random key each, as the RFC requires of clients; fragmented messages
are reassembled; pings are answered; a close frame is answered and its code and reason are kept.
No extensions (no compression: deflate costs more CPU than it saves on the exchange's messages).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import os
import ssl
from collections.abc import Callable, Sequence
from typing import cast
from urllib.parse import urlsplit

try:
    from websockets.speedups import apply_mask  # C; websockets is a dependency of this distribution
except ImportError:  # pragma: no cover - a build without the extension
    from websockets.utils import apply_mask

TextHandler = Callable[[bytes | bytearray], None]

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
CLOSE_NORMAL = 1000
CLOSE_ABNORMAL = 1006  # RFC 6455 7.1.5: the connection ended without a close frame


class HandshakeError(ConnectionError):
    """The server did not upgrade the connection to a WebSocket (wrong port, refused, shutting down)."""


class WebSocket(asyncio.Protocol):
    """One client connection. Use `await WebSocket.connect(url, on_text)`; not thread-safe."""

    def __init__(self, host: str, target: str, on_text: TextHandler, subprotocols: Sequence[str]) -> None:
        self.host, self.target, self.on_text = host, target, on_text
        self.subprotocols = tuple(subprotocols)
        self.subprotocol: str | None = None  # the one the server chose, if any
        self.on_close: Callable[[], None] | None = None  # called once the TCP connection is gone
        self.close_code: int | None = None  # set when the connection has ended
        self.close_reason = ""
        self.key = base64.b64encode(os.urandom(16))
        loop = asyncio.get_running_loop()
        self.handshake: asyncio.Future[None] = loop.create_future()
        self.closed: asyncio.Future[None] = loop.create_future()
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.upgraded = False
        self._fragments: list[bytes | bytearray] = []
        self._fragmented_text = False
        self._received_close: tuple[int, str] | None = None
        self._sent_close = False
        self._writable: asyncio.Future[None] | None = None

    @classmethod
    async def connect(
        cls,
        url: str,
        on_text: TextHandler,
        *,
        timeout: float = 10.0,
        subprotocols: Sequence[str] = (),
        ssl_context: ssl.SSLContext | None = None,
    ) -> WebSocket:
        """Open a ws:// or wss:// URL; OSError (ConnectionError, HandshakeError) or TimeoutError."""
        parts = urlsplit(url)
        if parts.scheme not in ("ws", "wss") or not parts.hostname:
            raise ValueError(f"not a ws:// or wss:// URL: {url!r}")
        secure = parts.scheme == "wss"
        host, port = parts.hostname, parts.port or (443 if secure else 80)
        host_header = f"[{host}]" if ":" in host else host
        if parts.port is not None:
            host_header += f":{port}"
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        context = (ssl_context or ssl.create_default_context()) if secure else None
        loop = asyncio.get_running_loop()
        _, proto = await asyncio.wait_for(
            loop.create_connection(
                lambda: cls(host_header, target, on_text, subprotocols),
                host,
                port,
                ssl=context,
                server_hostname=host if secure else None,
            ),
            timeout,
        )
        try:
            await asyncio.wait_for(asyncio.shield(proto.handshake), timeout)
        except BaseException:
            proto.abort()
            raise
        return proto

    @property
    def is_open(self) -> bool:
        """Upgraded, and no close frame sent or received yet."""
        return self.upgraded and not self.closed.done() and not self._sent_close

    # asyncio callbacks ------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass
        request = (
            b"GET %s HTTP/1.1\r\nHost: %s\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n"
            % (self.target.encode(), self.host.encode(), self.key)
        )
        if self.subprotocols:
            request += b"Sec-WebSocket-Protocol: %s\r\n" % ", ".join(self.subprotocols).encode()
        transport.write(request + b"\r\n")

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if not self.upgraded and not self._upgrade():
            return
        self._frames()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.handshake.done():
            self.handshake.set_exception(ConnectionError(f"connection lost during the handshake: {exc}"))
        code, reason = self._received_close or (CLOSE_ABNORMAL, str(exc) if exc else "")
        self.close_code, self.close_reason = code, reason
        if not self.closed.done():
            self.closed.set_result(None)
        self.resume_writing()
        if self.on_close is not None:
            self.on_close()

    def pause_writing(self) -> None:
        self._writable = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)
        self._writable = None

    # the protocol -----------------------------------------------------------------------------
    def _upgrade(self) -> bool:
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            return False
        head = bytes(self.buf[:end]).split(b"\r\n")
        del self.buf[: end + 4]
        accept = base64.b64encode(hashlib.sha1(self.key + _GUID).digest())
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(b":") for line in head[1:])}
        if not head[0].startswith(b"HTTP/1.1 101") or headers.get(b"sec-websocket-accept") != accept:
            self.handshake.set_exception(
                HandshakeError(f"handshake refused: {head[0].decode(errors='replace')}")
            )
            self.abort()
            return False
        chosen = headers.get(b"sec-websocket-protocol")
        self.subprotocol = chosen.decode() if chosen else None
        self.upgraded = True
        self.handshake.set_result(None)
        return True

    def _frames(self) -> None:
        buf, i, n = self.buf, 0, len(self.buf)
        while n - i >= 2:
            b0, b1 = buf[i], buf[i + 1]
            length, head = b1 & 0x7F, 2
            if length == 126:
                if n - i < 4:
                    break
                length, head = int.from_bytes(buf[i + 2 : i + 4], "big"), 4
            elif length == 127:
                if n - i < 10:
                    break
                length, head = int.from_bytes(buf[i + 2 : i + 10], "big"), 10
            if n - i < head + length:
                break
            payload = buf[i + head : i + head + length]  # one copy; orjson reads a bytearray as is
            i += head + length
            opcode = b0 & 0x0F
            if opcode == 1 and b0 & 0x80:
                self.on_text(payload)
            elif opcode in (0, 1, 2):  # fragments (text or binary), or a whole binary frame
                if opcode:
                    self._fragmented_text = opcode == 1
                    self._fragments.clear()
                self._fragments.append(payload)
                if b0 & 0x80:
                    if self._fragmented_text:  # the exchange never sends binary: those are dropped
                        self.on_text(b"".join(self._fragments))
                    self._fragments.clear()
            elif opcode == 8:
                self._on_close_frame(payload)
            elif opcode == 9:  # ping
                self._write_frame(0x8A, payload)
        if i:
            del buf[:i]

    def _on_close_frame(self, payload: bytearray) -> None:
        code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
        self._received_close = (code, payload[2:].decode(errors="replace"))
        if not self._sent_close:  # echo it; the server then ends the TCP connection
            self._write_frame(0x88, payload[:2])
            self._sent_close = True

    def _write_frame(self, first: int, payload: bytes | bytearray) -> None:
        if self.transport is not None and not self.transport.is_closing():
            key = os.urandom(4)
            self.transport.write(_header(first, len(payload)) + key + apply_mask(payload, key))

    # sending ----------------------------------------------------------------------------------
    def send_texts(self, messages: Sequence[bytes]) -> None:
        """Write text frames (UTF-8 bytes each) in one socket write. ConnectionError once closed."""
        self._check_open()
        assert self.transport is not None
        keys = os.urandom(4 * len(messages))
        parts: list[bytes] = []
        for k, data in enumerate(messages):
            n, key = len(data), keys[4 * k : 4 * k + 4]
            if n < 126:  # _header inlined: this loop is the load generator's hot path
                parts.append(bytes((0x81, 0x80 | n)))
            elif n < 65536:
                parts.append(b"\x81\xfe" + n.to_bytes(2, "big"))
            else:
                parts.append(b"\x81\xff" + n.to_bytes(8, "big"))
            parts.append(key)
            parts.append(apply_mask(data, key))
        self.transport.write(b"".join(parts))

    def send_text(self, data: bytes | str) -> None:
        self.send_texts([data.encode() if isinstance(data, str) else data])

    def send_binary(self, data: bytes) -> None:
        self._check_open()
        self._write_frame(0x82, data)

    def _check_open(self) -> None:
        if not self.is_open:
            raise ConnectionError(f"the WebSocket is closed ({self.close_code} {self.close_reason})".strip())

    async def drain(self) -> None:
        """Wait while the kernel's send buffer is full (flow control for bulk senders)."""
        if self._writable is not None:
            await self._writable

    async def close(self, code: int = CLOSE_NORMAL, reason: str = "", timeout: float = 2.0) -> None:
        """The closing handshake: send a close frame and wait (up to timeout) for the server to end."""
        if self.upgraded and not self._sent_close and not self.closed.done():
            self._write_frame(0x88, code.to_bytes(2, "big") + reason.encode()[:123])
            self._sent_close = True
        if not self.closed.done():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self.closed), timeout)
        self.abort()

    def abort(self) -> None:
        """End the TCP connection at once, without a closing handshake."""
        if self.transport is not None:
            self.transport.close()


def _header(first: int, n: int) -> bytes:
    if n < 126:
        return bytes((first, 0x80 | n))
    if n < 65536:
        return bytes((first, 0xFE)) + n.to_bytes(2, "big")
    return bytes((first, 0xFF)) + n.to_bytes(8, "big")
