"""The server side of the services' WebSockets (the gateway; the feeds next), on picows.

picows parses frames in C and calls back once per frame, synchronously, from the read: no task per
connection, no message queue, no reassembly buffer unless a message is fragmented. On one connection it
carried 1.5-1.8x the messages per second websockets 17 did on this machine. What picows leaves to its
user is done here, once, so that every service keeps the same rules:

- Limits (shared/wsguard.py): the global and per-IP caps at accept time, before any byte of the
  handshake is read; the handshake deadline; reading paused while the write side is paused (pongs and
  close replies are written from reads, so a client that sends pings and never reads would otherwise
  make the server buffer pongs without end), and meanwhile only the latest ping is answered, once the
  writes resume (one read can hold thousands of pings); a connection with more than `max_queued` bytes
  unsent after a read is aborted; one whose writes stay paused for `send_timeout` seconds is aborted.
- RFC 6455 as websockets applied it: messages over `max_size` bytes (fragments summed) close with 1009,
  invalid UTF-8 in a text message with 1007, reserved bits or a stray continuation with 1002, each with
  websockets' close reason; fragmented messages are reassembled; pings are answered; a close frame is
  answered and the TCP connection closed; our own close waits `close_timeout` for the peer's answer,
  then the connection is aborted. No extension (compression) is ever negotiated; no Server header.
- Keepalive as websockets' defaults had it: a ping every 20 s, and 1011 "keepalive ping timeout" if
  its pong is not back within 20 s.
- Plain HTTP GETs (health checks) are answered by `process_request`; the subprotocol is chosen by
  `select_subprotocol` (websockets' signatures: the request, then what the client offered).

Interface: `serve(on_connect, host, port, guard=..., max_size=..., close_timeout=...)` returns a
`Server` (`port`, `connections`, `stop_accepting()`, `close(code, reason)`, `wait_closed()`). Each
connection past its handshake is a `Connection` (`transport`, `peer_ip`, `remote_address`,
`accepted_at`, `subprotocol`, `request`, `open`, `paused` (writes), `close_code`, `close_reason`;
`send_texts`, `write`, `writelines`, `drain`, `close`, `abort`) handed to `on_connect`, which returns
its `Handler` (`on_text`, `on_binary`, `on_closed`), called synchronously from the socket read.

Writes: `send_texts` frames several messages and writes them in one transport write (one syscall for
everything a connection is sent in one event-loop tick); `write` and `writelines` take frames already
built (`text_frame`, `frames`), so a message framed once can be written to many connections. A writer
that keeps its own bounded queue (the feeds' fan-out) stops writing while `paused` and awaits `drain()`.

picows' own log lines (a line per connection, and ERROR for a client's protocol error) are kept at
CRITICAL; this module logs what matters through `cme.wsserver` and the guard's throttled warnings.
"""

from __future__ import annotations

import asyncio
import logging
import struct
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, Final, Protocol, cast

from picows import (
    WSAutoPingStrategy,
    WSCloseCode,
    WSFrame,
    WSListener,
    WSMsgType,
    WSTransport,
    WSUpgradeRequest,
    WSUpgradeResponse,
    WSUpgradeResponseWithListener,
)
from picows.picows import WSProtocol  # type: ignore[attr-defined]  # what ws_create_server builds

from shared.wsguard import Guard, ReadGate

log = logging.getLogger("cme.wsserver")
_PICOWS_LOG = logging.getLogger("cme.wsserver.picows")
_PICOWS_LOG.setLevel(logging.CRITICAL)

TEXT: Final = WSMsgType.TEXT
BINARY: Final = WSMsgType.BINARY
CONTINUATION: Final = WSMsgType.CONTINUATION
PING: Final = WSMsgType.PING
PONG: Final = WSMsgType.PONG
CLOSE: Final = WSMsgType.CLOSE

# Close codes (RFC 6455 7.4.1) the services send or report.
GOING_AWAY: Final = 1001
PROTOCOL_ERROR: Final = 1002
UNSUPPORTED_DATA: Final = 1003
NO_STATUS: Final = 1005  # close_code of a close frame without a code
ABNORMAL_CLOSURE: Final = 1006  # close_code of a connection that ended without a close frame
INVALID_DATA: Final = 1007
POLICY_VIOLATION: Final = 1008
MESSAGE_TOO_BIG: Final = 1009
INTERNAL_ERROR: Final = 1011

PING_INTERVAL: Final = 20.0  # websockets' keepalive defaults, which the services ran with
PING_TIMEOUT: Final = 20.0

# picows refuses a frame over its limit at the frame's header, with its own close reason. Ours is
# checked when the frame is delivered, with websockets' reason, so picows' limit sits above ours: a
# frame up to this many times max_size is read whole before it is refused (both close with 1009).
_PARSER_LIMIT_FACTOR: Final = 4
WRITE_LIMIT: Final = 1 << 15  # the transport's high-water mark, websockets' default write_limit
_KEEPALIVE: Final = b"cme"  # the payload of our keepalive pings
_READ_BUFFER: Final = 4096  # per connection at first; picows doubles it when a read fills it
_TEXT_PLAIN: Final = "text/plain; charset=utf-8"
_NO_UPGRADE: Final = (
    b"Failed to open a WebSocket connection: missing Upgrade header.\n\n"
    b"You cannot access a WebSocket server directly with a browser. You need a WebSocket client.\n"
)


@dataclass(frozen=True, slots=True)
class Request:
    """The HTTP request of a connection: path (with its query string) and headers (case-insensitive)."""

    path: str
    headers: Mapping[str, str]


@dataclass(frozen=True, slots=True)
class HttpResponse:
    """A plain HTTP answer instead of the WebSocket upgrade; the connection is closed after it.
    The status is 200 or an error (4xx, 5xx)."""

    status: int
    body: bytes
    content_type: str = _TEXT_PLAIN


class Handler(Protocol):
    """What a service does with one upgraded connection (returned by serve()'s `on_connect`).

    Called synchronously from the read, in the order the frames arrived; none of them may block."""

    def on_text(self, text: str) -> None: ...

    def on_binary(self, data: bytes) -> None: ...

    def on_closed(self) -> None:
        """The TCP connection is gone (after a close handshake or not); called once."""


class _Nobody:
    """The handler of a connection before its handshake and after its close: ignores everything."""

    def on_text(self, text: str) -> None:
        pass

    def on_binary(self, data: bytes) -> None:
        pass

    def on_closed(self) -> None:
        pass


_NOBODY: Final = _Nobody()

ProcessRequest = Callable[[Request], HttpResponse | None]
SelectSubprotocol = Callable[[Request, Sequence[str]], str | None]


def text_frame(data: bytes) -> bytes:
    """One unmasked, unfragmented text frame (RFC 6455 5.2), as a server sends it."""
    n = len(data)
    if n < 126:
        return bytes((0x81, n)) + data
    if n < 65536:
        return struct.pack("!BBH", 0x81, 126, n) + data
    return struct.pack("!BBQ", 0x81, 127, n) + data


_SHORT_HEADS: Final = [bytes((0x81, n)) for n in range(126)]
_MEDIUM_HEAD: Final = struct.Struct("!BBH").pack


def frames(messages: Iterable[bytes]) -> bytes:
    """Several messages as one blob of consecutive text frames (each payload copied once, by the join)."""
    parts: list[bytes] = []
    for m in messages:
        n = len(m)
        if n < 126:
            parts.append(_SHORT_HEADS[n])
        elif n < 65536:
            parts.append(_MEDIUM_HEAD(0x81, 126, n))
        else:
            parts.append(struct.pack("!BBQ", 0x81, 127, n))
        parts.append(m)
    return b"".join(parts)


class Connection(WSListener):
    """One accepted TCP connection: its limits, its WebSocket state and its writes.

    `transport` is the asyncio transport (its write buffer size is the client's backlog); `open` is
    true between the handshake and the first close frame either way."""

    __slots__ = (
        "_drainers",
        "_gate",
        "_keepalive",
        "_parts",
        "_pinged_at",
        "_pong",
        "_size",
        "_timer",
        "accepted_at",
        "close_code",
        "close_reason",
        "closing",
        "handler",
        "open",
        "paused",
        "peer_ip",
        "remote_address",
        "request",
        "server",
        "subprotocol",
        "transport",
        "ws",
    )

    def __init__(self, server: Server) -> None:
        self.server = server
        self.transport: asyncio.Transport = cast(asyncio.Transport, None)  # set at accept, before any use
        self.ws: WSTransport | None = None
        self.handler: Handler = _NOBODY  # on_connect's, from the handshake to the close
        self.request: Request | None = None
        self.subprotocol: str | None = None
        self.remote_address: tuple[Any, ...] | None = None
        self.peer_ip: str | None = None  # None: refused at accept time (or not accepted yet)
        self.accepted_at = 0.0  # loop time of the accept
        self.open = False
        self.closing = False  # a close frame was sent or received: data frames are dropped
        self.close_code: int | None = None  # of the first close frame, ours or the peer's
        self.close_reason = ""
        self._parts: list[bytes] | None = None  # a fragmented message in progress (first: its type)
        self._size = 0
        self._timer: asyncio.TimerHandle | None = None  # the close deadline, or the send timeout
        self._keepalive: asyncio.TimerHandle | None = None  # the next ping, or the pong's deadline
        self._pinged_at: float | None = None  # loop time of the keepalive ping awaiting its pong
        self._gate: ReadGate | None = None
        self.paused = False  # the transport's buffer is over its high-water mark
        self._pong: bytes | None = None  # the payload of the latest ping not answered while paused
        self._drainers: list[asyncio.Future[None]] | None = None  # drain() calls waiting for a resume

    # Accept and handshake (called by _Protocol and picows) --------------------------------------
    def _admit(self, transport: asyncio.Transport) -> bool:
        peer = transport.get_extra_info("peername")
        ip = str(peer[0]) if isinstance(peer, tuple) else ""
        guard = self.server.guard
        refusal = guard.limiter.admit(ip)
        if refusal is not None:
            guard.refused.warning("%s: refused a connection from %s: %s", guard.name, ip, refusal)
            return False
        self.peer_ip, self.remote_address = ip, peer if isinstance(peer, tuple) else None
        self.transport = transport
        transport.set_write_buffer_limits(WRITE_LIMIT)  # pause_writing past it (low mark: a quarter)
        self.accepted_at = self.server.loop.time()
        self._gate = ReadGate(transport.pause_reading, transport.resume_reading)
        self.server.track(self)
        return True

    def _upgrade(self, raw: WSUpgradeRequest) -> WSUpgradeResponseWithListener:
        """picows' listener factory: the HTTP answer, or the 101 with this connection as listener."""
        server = self.server
        request = Request(raw.path.decode("latin-1"), raw.headers)
        if server.process_request is not None:
            try:
                answer = server.process_request(request)
            except Exception:  # picows would answer 500 with the exception's text: not to a client
                log.exception("%s: process_request failed", server.guard.name)
                answer = HttpResponse(500, b"Internal Server Error\n")
            if answer is not None:
                return WSUpgradeResponseWithListener(_response(answer), None)
        if "Upgrade" not in raw.headers:  # a browser or a plain HTTP client, as websockets answers it
            return WSUpgradeResponseWithListener(_response(HttpResponse(426, _NO_UPGRADE)), None)
        headers = None
        if server.select_subprotocol is not None:
            offered = [
                p.strip() for h in raw.headers.getall("Sec-WebSocket-Protocol", ()) for p in h.split(",")
            ]
            chosen = server.select_subprotocol(request, [p for p in offered if p])
            if chosen is not None:
                headers = {"Sec-WebSocket-Protocol": chosen}
                self.subprotocol = chosen
        self.request = request
        return WSUpgradeResponseWithListener(WSUpgradeResponse.create_101_response(headers), self)

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.ws = transport
        self.open = True
        try:
            self.handler = self.server.on_connect(self)
        except Exception:
            self._failed("accepting a connection")
            return
        self._keepalive_in(self.server.ping_interval)

    # Frames in (the hot path: a complete text frame goes straight to the handler) ---------------
    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        try:
            kind = frame.msg_type
            if kind is TEXT and frame.fin and self._parts is None and not self.closing:
                if frame.rsv1 or frame.rsv2 or frame.rsv3:
                    self._fail(PROTOCOL_ERROR, "reserved bits must be 0")
                elif frame.payload_size > self.server.max_size:
                    self._too_big(frame.payload_size)
                else:
                    try:
                        text = frame.get_payload_as_utf8_text()
                    except UnicodeDecodeError as exc:
                        self._fail(INVALID_DATA, f"{exc.reason} at position {exc.start}")
                    else:
                        self.handler.on_text(text)
            else:
                self._other_frame(frame, kind)
            if frame.last_in_buffer:  # the end of one read: what it made us queue counts
                queued = self.transport.get_write_buffer_size()
                limit = self.server.guard.policy.max_queued
                if queued > limit:
                    self.abort(f"{queued} bytes queued, over the limit of {limit}")
        except Exception:
            self._failed("handling a frame")

    def _deliver(self, message: str | bytes) -> None:
        if isinstance(message, str):
            self.handler.on_text(message)
        else:
            self.handler.on_binary(message)

    def _failed(self, doing: str) -> None:
        """A bug (of a handler, most likely): logged, and the connection closed with 1011 as
        websockets did. picows would do the same, but its log is kept quiet (see the module doc)."""
        log.exception("%s: failed %s from %s", self.server.guard.name, doing, self.peer_ip)
        self._fail(INTERNAL_ERROR, "")

    def _other_frame(self, frame: WSFrame, kind: WSMsgType) -> None:
        """Everything but a complete text frame: control frames, binary, fragments, late data."""
        if frame.rsv1 or frame.rsv2 or frame.rsv3:
            self._fail(PROTOCOL_ERROR, "reserved bits must be 0")
        elif kind is PING:
            if self.closing:
                return
            if self.paused:  # RFC 6455 5.5.3: only the latest ping needs its pong; sent on resume
                self._pong = frame.get_payload_as_bytes()
            else:
                cast(WSTransport, self.ws).send_pong(frame.get_payload_as_bytes())
        elif kind is CLOSE:
            self._close_received(frame)
        elif kind is PONG:
            self._ponged()
        elif self.closing:
            return  # after a close frame, data is dropped (RFC 6455 1.4)
        elif kind is CONTINUATION:
            self._continue(frame)
        elif self._parts is not None:
            self._fail(PROTOCOL_ERROR, "expected a continuation frame")
        elif frame.payload_size > self.server.max_size:
            self._too_big(frame.payload_size)
        elif frame.fin:  # a complete binary frame
            self._deliver(frame.get_payload_as_bytes())
        else:  # the first fragment of a message
            self._parts = [b"t" if kind is TEXT else b"b", frame.get_payload_as_bytes()]
            self._size = frame.payload_size

    def _continue(self, frame: WSFrame) -> None:
        parts = self._parts
        if parts is None:
            self._fail(PROTOCOL_ERROR, "unexpected continuation frame")
            return
        n = frame.payload_size
        if self._size + n > self.server.max_size:
            self._too_big(n, self._size)
            return
        parts.append(frame.get_payload_as_bytes())
        self._size += n
        if not frame.fin:
            return
        self._parts = None
        data = b"".join(parts[1:])
        if parts[0] == b"b":
            self._deliver(data)
            return
        try:
            text = data.decode()
        except UnicodeDecodeError as exc:
            self._fail(INVALID_DATA, f"{exc.reason} at position {exc.start}")
            return
        self._deliver(text)

    def _too_big(self, size: int, before: int = 0) -> None:
        after = f"after reading {before} bytes " if before else ""
        self._fail(
            MESSAGE_TOO_BIG, f"frame with {size} bytes {after}exceeds limit of {self.server.max_size} bytes"
        )

    # Writes -------------------------------------------------------------------------------------
    def send_texts(self, messages: Sequence[bytes]) -> None:
        """Text messages (UTF-8 already), framed and written in one transport write; nothing once the
        connection is no longer open."""
        ws = self.ws
        if not self.open or ws is None or ws.is_close_frame_sent:  # picows' own close (a protocol error)
            return
        if len(messages) == 1:
            ws.send(TEXT, messages[0])  # framed in C, no join
        else:
            self.transport.write(frames(messages))

    def write(self, data: bytes) -> None:
        """Frames already built (text_frame, frames), written as they are while the connection is open."""
        ws = self.ws
        if self.open and ws is not None and not ws.is_close_frame_sent:
            self.transport.write(data)

    def writelines(self, blobs: Iterable[bytes]) -> None:
        """Several blobs of frames already built, in one transport write (no join: each blob may be
        shared with other connections), while the connection is open."""
        ws = self.ws
        if self.open and ws is not None and not ws.is_close_frame_sent:
            self.transport.writelines(blobs)

    async def drain(self) -> None:
        """Until the writes are no longer paused (at once if they are not), or the connection is gone:
        the caller checks `open` before it writes again. Several callers may wait at once."""
        if not self.paused or self.transport.is_closing():
            return
        waiter: asyncio.Future[None] = self.server.loop.create_future()
        if self._drainers is None:
            self._drainers = [waiter]
        else:
            self._drainers.append(waiter)
        await waiter

    def _drained(self) -> None:
        waiters, self._drainers = self._drainers, None
        for waiter in waiters or ():
            if not waiter.done():  # a cancelled drain()
                waiter.set_result(None)

    # Closing ------------------------------------------------------------------------------------
    def close(self, code: int, reason: str) -> None:
        """Send a close frame; the connection is aborted if the peer has not closed within close_timeout."""
        if not self.open:
            return
        self.open = False
        self.closing = True
        self.close_code, self.close_reason = code, reason
        cast(WSTransport, self.ws).send_close(cast(WSCloseCode, code), reason.encode())
        self._arm(self.server.close_timeout)

    def _fail(self, code: int, reason: str) -> None:
        """A protocol error: close frame, then the TCP connection closed at once (as websockets fails)."""
        self.close(code, reason)
        self.transport.close()

    def _close_received(self, frame: WSFrame) -> None:
        if self.open:  # the peer closes first: echo its frame (code and reason), then end the connection
            self.open = False
            self.closing = True
            payload = frame.get_payload_as_bytes()  # picows checked the code and the reason's UTF-8
            if payload:
                self.close_code = int.from_bytes(payload[:2], "big")
                self.close_reason = payload[2:].decode()
            else:
                self.close_code = NO_STATUS
            cast(WSTransport, self.ws).send(CLOSE, payload)
            self._arm(self.server.close_timeout)
        self.transport.close()  # our close was answered (or this one is): the server closes TCP first

    def abort(self, why: str) -> None:
        """Cut the TCP connection now, freeing what is queued for it."""
        transport = self.transport
        if not transport.is_closing():
            guard = self.server.guard
            guard.aborted.warning("%s: aborted the connection of %s: %s", guard.name, self.peer_ip, why)
        transport.abort()

    # Keepalive: a ping every ping_interval; no pong within ping_timeout closes with 1011 ---------
    def _keepalive_in(self, seconds: float | None) -> None:
        if seconds is not None and self.open:
            self._keepalive = self.server.loop.call_later(seconds, self._ping)

    def _ping(self) -> None:
        self._keepalive = None
        if not self.open:
            return
        self._pinged_at = self.server.loop.time()
        cast(WSTransport, self.ws).send_ping(_KEEPALIVE)
        timeout = self.server.ping_timeout
        if timeout is not None:
            self._keepalive = self.server.loop.call_later(timeout, self._no_pong)
        else:
            self._keepalive_in(self.server.ping_interval)

    def _ponged(self) -> None:
        if self._pinged_at is None:
            return  # unsolicited: allowed, answers nothing
        interval = cast(float, self.server.ping_interval)
        latency = self.server.loop.time() - self._pinged_at
        self._pinged_at = None
        if self._keepalive is not None:
            self._keepalive.cancel()
        self._keepalive_in(max(interval - latency, 0.0))

    def _no_pong(self) -> None:
        self._keepalive = None
        self._fail(INTERNAL_ERROR, "keepalive ping timeout")

    def _arm(self, seconds: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self.server.loop.call_later(seconds, self.transport.abort)

    # Flow control (called by picows' protocol) --------------------------------------------------
    def pause_writing(self) -> None:
        self.paused = True
        assert self._gate is not None
        self._gate.hold(ReadGate.WRITE)
        timeout = self.server.guard.policy.send_timeout
        if timeout > 0 and self._timer is None:
            self._timer = self.server.loop.call_later(timeout, self._stalled)

    def resume_writing(self) -> None:
        self.paused = False
        if self._timer is not None and not self.closing:
            self._timer.cancel()
            self._timer = None
        pong, self._pong = self._pong, None
        if pong is not None and not self.closing:
            cast(WSTransport, self.ws).send_pong(pong)
        assert self._gate is not None
        self._gate.release(ReadGate.WRITE)
        if self._drainers is not None:
            self._drained()

    def _stalled(self) -> None:
        self._timer = None
        self.abort(f"read nothing for {self.server.guard.policy.send_timeout:g} s with its send buffer full")

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        self.open = False
        if self.close_code is None:
            self.close_code = ABNORMAL_CLOSURE
        handler, self.handler = self.handler, _NOBODY
        try:
            handler.on_closed()
        except Exception:
            log.exception("%s: a connection's close handler failed", self.server.guard.name)

    def _lost(self) -> None:
        ip, self.peer_ip = self.peer_ip, None
        if ip is None:
            return
        self.server.guard.limiter.release(ip)
        for timer in (self._timer, self._keepalive):
            if timer is not None:
                timer.cancel()
        self._timer = self._keepalive = None
        if self._drainers is not None:  # a lost connection never resumes its writes
            self._drained()
        self.server.forget(self)


class _Protocol(WSProtocol):  # type: ignore[misc]  # picows' protocol is untyped
    """picows' protocol, with the accept-time caps before it sees a byte and the limiter's release."""

    def __init__(self, conn: Connection, handshake_timeout: float | None, parser_limit: int) -> None:
        super().__init__(
            None,  # host and port: a client's
            None,  # path: a client's
            False,  # server side
            conn._upgrade,
            _PICOWS_LOG,
            True,  # disconnect on an exception of ours (Connection catches the handlers')
            handshake_timeout,
            False,  # no pings of our own
            20.0,
            20.0,
            WSAutoPingStrategy.PING_WHEN_IDLE,
            False,  # pongs are ours: none once a close frame is out
            parser_limit,
            None,  # extra headers: a client's
            _READ_BUFFER,
        )
        self.conn = conn

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's transports are not subclasses
        if not self.conn._admit(transport):
            transport.abort()  # no handshake, no picows state: connection_lost only
            return
        super().connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.conn.peer_ip is None:
            return  # refused at accept: picows never saw it
        try:
            super().connection_lost(exc)
        finally:
            self.conn._lost()


class Server:
    """The listening socket(s) and the connections of one WebSocket endpoint (see serve())."""

    def __init__(
        self,
        on_connect: Callable[[Connection], Handler],
        guard: Guard,
        *,
        max_size: int,
        close_timeout: float,
        ping_interval: float | None,
        ping_timeout: float | None,
        process_request: ProcessRequest | None,
        select_subprotocol: SelectSubprotocol | None,
    ) -> None:
        self.on_connect, self.guard = on_connect, guard
        self.max_size, self.close_timeout = max_size, close_timeout
        self.ping_interval, self.ping_timeout = ping_interval, ping_timeout
        self.process_request, self.select_subprotocol = process_request, select_subprotocol
        self.loop = asyncio.get_running_loop()
        self.connections: set[Connection] = set()  # accepted and not lost yet, upgraded or not
        self._idle = asyncio.Event()
        self._idle.set()
        self._listener: asyncio.Server | None = None

    async def listen(self, host: str, port: int) -> None:
        timeout = self.guard.policy.handshake_timeout
        handshake_timeout = timeout if timeout > 0 else None
        limit = self.max_size * _PARSER_LIMIT_FACTOR

        def protocol() -> _Protocol:
            return _Protocol(Connection(self), handshake_timeout, limit)

        # SO_REUSEPORT: several processes may listen on the port; the kernel spreads the accepts.
        self._listener = await self.loop.create_server(protocol, host, port, reuse_port=True)

    @property
    def port(self) -> int:
        assert self._listener is not None
        return int(self._listener.sockets[0].getsockname()[1])

    def track(self, conn: Connection) -> None:
        self.connections.add(conn)
        self._idle.clear()

    def forget(self, conn: Connection) -> None:
        self.connections.discard(conn)
        if not self.connections:
            self._idle.set()

    def stop_accepting(self) -> None:
        if self._listener is not None:
            self._listener.close()

    def close(self, code: int, reason: str) -> None:
        """Stop accepting; close every open connection with code and reason (the others are cut)."""
        self.stop_accepting()
        for conn in list(self.connections):
            if conn.open:
                conn.close(code, reason)
            elif conn.ws is None:  # still in its handshake
                conn.transport.close()

    async def wait_closed(self) -> None:
        """Until every connection accepted so far is gone."""
        await self._idle.wait()


async def serve(
    on_connect: Callable[[Connection], Handler],
    host: str,
    port: int,
    *,
    guard: Guard,
    max_size: int,
    close_timeout: float,
    ping_interval: float | None = PING_INTERVAL,
    ping_timeout: float | None = PING_TIMEOUT,
    process_request: ProcessRequest | None = None,
    select_subprotocol: SelectSubprotocol | None = None,
) -> Server:
    """Listen on host:port; `on_connect` gets each connection once its handshake is done and returns
    its Handler. `guard` holds the limits (wsguard.Guard); `max_size`: bytes per message; keepalive
    pings every `ping_interval` seconds (None: none), closing with 1011 after `ping_timeout` without
    a pong (None: never)."""
    server = Server(
        on_connect,
        guard,
        max_size=max_size,
        close_timeout=close_timeout,
        ping_interval=ping_interval,
        ping_timeout=ping_timeout,
        process_request=process_request,
        select_subprotocol=select_subprotocol,
    )
    await server.listen(host, port)
    return server


def _response(answer: HttpResponse) -> WSUpgradeResponse:
    headers = {"Content-Type": answer.content_type}
    if answer.status == HTTPStatus.OK:
        response = WSUpgradeResponse.create_ok_response(answer.body, headers)
    else:
        response = WSUpgradeResponse.create_error_response(answer.status, answer.body, headers)
    return cast(WSUpgradeResponse, response)
