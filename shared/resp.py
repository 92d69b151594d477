"""A bare Redis connection for hot loops: RESP encoded here, replies parsed by hiredis.

redis-py's per-command packing, response callbacks and connection-pool machinery cost more than the
command itself on the paths that run per order or per batch (the gateway's appends, the matcher's
read and commit), 3.5-14x in a prototype on this machine. Everything else uses redis-py.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from typing import Any, Final

import hiredis
from redis.asyncio.connection import parse_url

# "\r\n$<length>\r\n" for the lengths nearly every argument has: a bulk string's header, after the end
# of the argument before it.
_SHORT: Final = 4096
_HEADS: Final = [b"\r\n$%d\r\n" % n for n in range(_SHORT)]


def pack(*args: bytes) -> bytes:
    """One RESP command (array of bulk strings).

    The arguments are joined as they are, between ready-made headers. Formatting each into
    b"$%d\r\n%s\r\n" copies it slowly (bytes %-formatting), and hiredis.pack_command is no faster: a
    commit carrying 220 KB of payloads took 310 us to pack either way, 5.5 us joined; a 403-argument
    commit 460 / 330 us, 46 us joined; a 5-argument XADD 1.46 / 0.91 us, 0.65 us joined."""
    heads = _HEADS
    parts = [b"*%d" % len(args)]
    for arg in args:
        n = len(arg)
        parts.append(heads[n] if n < _SHORT else b"\r\n$%d\r\n" % n)
        parts.append(arg)
    parts.append(b"\r\n")
    return b"".join(parts)


class RespConnection(asyncio.Protocol):
    """A bare Redis connection: write a pipeline, get its n replies. Error replies come back as
    hiredis.ReplyError values, not raised: one refused command must not fail its neighbours.

    An asyncio Protocol rather than streams: replies are parsed in data_received and one future per
    round trip is resolved, the least event-loop work per batch (it matters when idle, one order a batch).
    """

    def __init__(self) -> None:
        self.parser = hiredis.Reader()
        self.transport: asyncio.Transport | None = None
        self.lost: Exception | None = None
        self.read_timeout: float | None = None
        self._waiter: asyncio.Future[list[Any]] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._expected = 0
        self._replies: list[Any] = []

    @classmethod
    async def open(
        cls,
        url: str,
        *,
        connect_timeout: float | None = 10.0,
        read_timeout: float | None = None,
        keepalive: bool = True,
    ) -> RespConnection:
        """Connect (and AUTH/SELECT as the URL says).

        connect_timeout bounds the connection and its setup; read_timeout bounds every round trip
        (None: wait for ever), a late round trip fails with TimeoutError and closes the connection,
        since its replies may still arrive. keepalive: TCP keepalive, so a silent peer is noticed
        even while idle."""
        return await asyncio.wait_for(cls._open(url, read_timeout, keepalive), connect_timeout)

    @classmethod
    async def _open(cls, url: str, read_timeout: float | None, keepalive: bool) -> RespConnection:
        params = parse_url(url)
        loop = asyncio.get_running_loop()
        if "path" in params:
            _, conn = await loop.create_unix_connection(cls, params["path"])
        else:
            context = ssl.create_default_context() if url.startswith("rediss://") else None
            _, conn = await loop.create_connection(
                cls, params.get("host", "localhost"), params.get("port", 6379), ssl=context
            )
            if keepalive:
                _keepalive(conn.transport)
        conn.read_timeout = read_timeout
        try:
            setup: list[bytes] = []
            password, username = params.get("password"), params.get("username")
            if password:
                auth = (username.encode(), password.encode()) if username else (password.encode(),)
                setup.append(pack(b"AUTH", *auth))
            if params.get("db"):
                setup.append(pack(b"SELECT", str(params["db"]).encode()))
            if setup:
                for reply in await conn.roundtrip(b"".join(setup), len(setup)):
                    if isinstance(reply, hiredis.ReplyError):
                        raise ConnectionError(f"Redis refused the connection setup: {reply}")
        except BaseException:
            conn.close()
            raise
        return conn

    def roundtrip(self, payload: bytes, n: int) -> asyncio.Future[list[Any]]:
        """Send a pipeline of n commands; the future gets the n replies. One round trip at a time."""
        if self.lost is not None or self.transport is None:
            raise ConnectionError(f"Redis connection lost: {self.lost}")
        assert self._waiter is None, "one round trip at a time"
        loop = asyncio.get_running_loop()
        waiter = self._waiter = loop.create_future()
        self._expected, self._replies = n, []
        if self.read_timeout is not None:
            self._timer = loop.call_later(self.read_timeout, self._timed_out)
        self.transport.write(payload)
        return waiter

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
        self._fail(ConnectionError("connection closed"))

    # asyncio.Protocol -------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        parser = self.parser
        parser.feed(data)
        if self._waiter is None:
            return  # nothing asked: stray data (never sent by Redis in RESP2 request/response mode)
        replies, expected = self._replies, self._expected
        try:
            while len(replies) < expected:
                reply = parser.gets()
                if reply is False:  # incomplete: RESP2 has no boolean replies, False means "need data"
                    return
                replies.append(reply)
        except hiredis.ProtocolError as exc:
            self._fail(exc)
            if self.transport is not None:
                self.transport.abort()
            return
        waiter, self._waiter = self._waiter, None
        self._cancel_timer()
        if not waiter.done():
            waiter.set_result(replies)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = exc or ConnectionError("Redis closed the connection")
        self._fail(self.lost)

    def _fail(self, exc: BaseException) -> None:
        self._cancel_timer()
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _timed_out(self) -> None:
        self._timer = None
        exc = TimeoutError(f"Redis did not answer within {self.read_timeout} s")
        self.lost = exc  # the late replies would be taken for the next round trip's: never reuse it
        self._fail(exc)
        if self.transport is not None:
            self.transport.abort()


# Seconds idle before the first probe, between probes, and probes unanswered before the kernel drops
# the connection: a silent peer is found in about 15 s instead of the system's default two hours.
KEEPALIVE_IDLE, KEEPALIVE_INTERVAL, KEEPALIVE_COUNT = 5, 5, 2


def _keepalive(transport: asyncio.Transport | None) -> None:
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None:
        return
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for option, value in keepalive_options().items():
        sock.setsockopt(socket.IPPROTO_TCP, option, value)


def keepalive_options() -> dict[int, int]:
    """The keepalive probes as TCP socket options, for the bare connection and redis-py's
    socket_keepalive_options alike (not every platform has them all: macOS has no TCP_KEEPIDLE)."""
    names = (
        ("TCP_KEEPIDLE", KEEPALIVE_IDLE),
        ("TCP_KEEPINTVL", KEEPALIVE_INTERVAL),
        ("TCP_KEEPCNT", KEEPALIVE_COUNT),
    )
    return {getattr(socket, n): v for n, v in names if hasattr(socket, n)}


def client_options(timeout: float, *, blocking: bool = False) -> dict[str, Any]:
    """redis-py client settings for every service: a silent partition ends in an error and a reconnect,
    never a hang. A blocking connection (pub/sub) waits for messages by design, so it gets no read
    timeout but a PING when idle, which finds a dead link."""
    options: dict[str, Any] = {
        "socket_connect_timeout": timeout,
        "socket_keepalive": True,
        "socket_keepalive_options": keepalive_options(),
    }
    if blocking:
        options["health_check_interval"] = max(1, int(timeout))
        # RESP2: a message is then a plain reply. Under RESP3 (redis-py 8's default) it is a push, and
        # redis-py 8.1 turns every push into a string for a debug line nobody logs (redis/redis-py#4230,
        # fixed after 8.1.0): 7.7 % of the gateway's CPU at 10,000 orders/s, exec payloads being large.
        options["protocol"] = 2
    else:
        options["socket_timeout"] = timeout
    return options
