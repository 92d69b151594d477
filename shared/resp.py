"""A bare Redis connection for hot loops: RESP encoded here, replies parsed by hiredis.

redis-py's per-command packing, response callbacks and connection-pool machinery cost more than the
command itself on the paths that run per order or per batch (the gateway's appends, the matcher's
read and commit), 3.5-14x in a prototype on this machine. Everything else uses redis-py.
"""

from __future__ import annotations

import asyncio
import ssl
from typing import Any

import hiredis
from redis.asyncio.connection import parse_url


def pack(*args: bytes) -> bytes:
    """One RESP command (array of bulk strings)."""
    return b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in args)


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
        self._waiter: asyncio.Future[list[Any]] | None = None
        self._expected = 0
        self._replies: list[Any] = []

    @classmethod
    async def open(cls, url: str) -> RespConnection:
        params = parse_url(url)
        loop = asyncio.get_running_loop()
        if "path" in params:
            _, conn = await loop.create_unix_connection(cls, params["path"])
        else:
            context = ssl.create_default_context() if url.startswith("rediss://") else None
            _, conn = await loop.create_connection(
                cls, params.get("host", "localhost"), params.get("port", 6379), ssl=context
            )
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
        waiter = self._waiter = asyncio.get_running_loop().create_future()
        self._expected, self._replies = n, []
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
        if not waiter.done():
            waiter.set_result(replies)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = exc or ConnectionError("Redis closed the connection")
        self._fail(self.lost)

    def _fail(self, exc: BaseException) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)
