"""Fan-out of pre-encoded WebSocket frames to many clients, each with a bounded outbox.

Why not frame and send every message for every client separately: that is one transport write (usually
one syscall) per message per client, which measured 1.8k distinct messages/s to 100 clients. Here a
message is framed once per process (shared.wsserver's `text_frame`, `frames`), a batch of messages
becomes one shared bytes object, a client's outbox holds references to such blobs, and one flusher
writes every client's whole outbox in one `Connection.writelines` per loop tick.

Frames are plain text frames (shared.wsserver never negotiates compression, which per client would
undo the sharing). They are written only while the connection is open; control frames (ping, pong,
close) are shared.wsserver's own, and frames never interleave since every write is one whole frame or
more. Measured on a 2-core VM shared with Redis, the publisher and the clients: 10k distinct
messages/s to 100 clients at about 2 ms mean publish-to-write.

A client whose socket cannot keep up stops being written to once the transport's buffer passes its
high-water mark (the connection is `paused`); its outbox then grows and, past `max_buffer` messages,
the client is closed with 1008 "slow consumer: send buffer full". Nothing here ever awaits a client,
so one slow client never delays the others.
"""

from __future__ import annotations

import asyncio
import logging
import struct
import time
from collections.abc import Coroutine
from typing import Any

from services.feeds.candles import INTERVALS
from shared import metrics
from shared.wsserver import Connection

log = logging.getLogger(__name__)

L2, DEPTH, TRADES, TICKER = "l2", "depth", "trades", "ticker"
SEED_L2, SEED_TRADES = "seed_l2", "seed_trades"  # the seed's dialect (services.feeds.seed)
# One fan-out channel per candle interval (a client may hold several intervals of one symbol).
CANDLES = {interval: f"candles_{interval}" for interval in INTERVALS}
CHANNELS = (L2, DEPTH, TRADES, TICKER, SEED_L2, SEED_TRADES, *CANDLES.values())
CONTROL = ""  # replies to the client's own messages: not feed data, not in the feed metrics

SLOW_CONSUMER = "slow consumer: send buffer full"
IDLE = "idle: no subscription"
POLICY_VIOLATION = 1008
Tally = dict[tuple[str, int], int]  # (channel, publish ns) -> messages written in one flush
CLOSE_TIMEOUT = 5.0  # seconds a closed client gets to answer our close frame before it is cut


def text_frame_ending(data: bytes, end: bytes) -> bytes:
    """text_frame(data[:-1] + end) with one copy fewer: a JSON object line whose closing brace `end`
    replaces (the feed's l2_update lines with their checksum)."""
    n = len(data) - 1 + len(end)
    if n < 126:
        head = bytes((0x81, n))
    elif n < 65536:
        head = struct.pack("!BBH", 0x81, 126, n)
    else:
        head = struct.pack("!BBQ", 0x81, 127, n)
    return b"%b%b%b" % (head, data[:-1], end)


class Client:
    """One WebSocket connection of the md or trades server and what is queued for it."""

    __slots__ = ("bad", "conn", "dropped", "idle", "outbox", "pending", "server", "subs", "waiting")

    def __init__(self, conn: Connection, server: str) -> None:
        self.conn = conn
        self.server = server  # "md" | "trades", for logs and the connections gauge
        # (blob of frames, messages in it, channel label, publish ns or 0)
        self.outbox: list[tuple[bytes, int, str, int]] = []
        self.pending = 0  # messages in the outbox
        self.dropped = False
        self.waiting = False  # a task waits for the transport to drain
        self.subs: set[tuple[str, str]] = set()  # (channel, symbol)
        self.bad = 0  # invalid client messages so far
        self.idle: asyncio.TimerHandle | None = None  # armed while it holds no subscription

    def __repr__(self) -> str:
        return f"<Client {self.server} {self.conn.remote_address}>"


class Fanout:
    """Subscriptions and outboxes of every client of one process (md and trades servers alike)."""

    def __init__(self, max_buffer: int, idle_timeout: float = 0.0) -> None:
        if max_buffer < 1:
            raise ValueError("max_buffer must be at least 1")
        self.max_buffer = max_buffer
        # A connection that holds no subscription this long is closed (0: never). Whatever made the
        # subscription (a subscribe message or one implied by the connection itself) disarms it.
        self.idle_timeout = idle_timeout
        self.clients: set[Client] = set()
        # (channel, symbol) -> client -> argument (the depth channel's N; 0 otherwise)
        self.subs: dict[tuple[str, str], dict[Client, int]] = {}
        self._dirty: set[Client] = set()
        self._scheduled = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._sent = {ch: metrics.FEED_SENT.labels(ch) for ch in CHANNELS}
        self._latency = {ch: metrics.FEED_SEND_SECONDS.labels(ch) for ch in CHANNELS}
        self._dropped = metrics.FEED_DROPPED.labels("buffer_full")

    # Clients and subscriptions -------------------------------------------------------------------
    def register(self, conn: Connection, server: str) -> Client:
        client = Client(conn, server)
        self.clients.add(client)
        self._arm_idle(client)
        return client

    def unregister(self, client: Client) -> None:
        if client.idle is not None:
            client.idle.cancel()
            client.idle = None
        for key in client.subs:
            self._forget(key, client)
        client.subs.clear()
        client.outbox.clear()
        client.pending = 0
        self.clients.discard(client)
        self._dirty.discard(client)

    def subscribe(self, client: Client, channel: str, symbol: str, arg: int = 0) -> None:
        key = (channel, symbol)
        self.subs.setdefault(key, {})[client] = arg
        client.subs.add(key)
        if client.idle is not None:
            client.idle.cancel()
            client.idle = None

    def unsubscribe(self, client: Client, channel: str, symbol: str) -> bool:
        key = (channel, symbol)
        if key not in client.subs:
            return False
        client.subs.discard(key)
        self._forget(key, client)
        if not client.subs:
            self._arm_idle(client)
        return True

    def subscribers(self, channel: str, symbol: str) -> dict[Client, int]:
        return self.subs.get((channel, symbol)) or {}

    def _arm_idle(self, client: Client) -> None:
        if self.idle_timeout > 0 and client.idle is None and not client.dropped:
            client.idle = asyncio.get_running_loop().call_later(self.idle_timeout, self._idle, client)

    def _idle(self, client: Client) -> None:
        client.idle = None
        if not client.subs:
            self.drop(client, IDLE)

    def _forget(self, key: tuple[str, str], client: Client) -> None:
        subs = self.subs.get(key)
        if subs is not None:
            subs.pop(client, None)
            if not subs:
                del self.subs[key]

    # Queueing ------------------------------------------------------------------------------------
    def send(
        self, client: Client, blob: bytes, count: int = 1, channel: str = CONTROL, pub_ns: int = 0
    ) -> None:
        """Queue `count` messages already framed in `blob` for one client."""
        if client.dropped:
            return
        if client.pending and client.pending + count > self.max_buffer:
            # Before calling the client slow, try to hand what it has to its socket: the outbox may
            # only be full because we have not yielded to the loop yet (a burst from Redis).
            tally: Tally = {}
            self._write(client, tally)
            self._record(tally, time.time_ns())
            if client.pending:
                self.drop(client, SLOW_CONSUMER)
                return
        client.outbox.append((blob, count, channel, pub_ns))
        client.pending += count
        self._dirty.add(client)
        self._schedule()

    def publish(self, channel: str, symbol: str, blob: bytes, count: int, pub_ns: int = 0) -> None:
        """Queue a blob for every subscriber of (channel, symbol): the hot path, kept to a few
        operations per client (one shared tuple, an append, a set add)."""
        subs = self.subs.get((channel, symbol))
        if not subs:
            return
        item = (blob, count, channel, pub_ns)
        limit, dirty = self.max_buffer, self._dirty
        full: list[Client] = []
        for client in subs:
            pending = client.pending
            if pending and pending + count > limit:
                full.append(client)  # send() may drop it, which edits subs: after the loop
                continue
            client.outbox.append(item)
            client.pending = pending + count
            dirty.add(client)
        for client in full:
            self.send(client, blob, count, channel, pub_ns)
        self._schedule()

    def _schedule(self) -> None:
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self.flush)

    # Writing -------------------------------------------------------------------------------------
    def flush(self) -> None:
        """Write every dirty client's outbox: one writelines per client per loop tick."""
        self._scheduled = False
        dirty, self._dirty = self._dirty, set()
        tally: Tally = {}
        for client in dirty:
            if client.outbox and not client.dropped:
                self._write(client, tally)
        if tally:
            self._record(tally, time.time_ns())

    def _write(self, client: Client, tally: Tally) -> None:
        """Hand a client's whole outbox to its transport, unless the transport is backed up."""
        conn = client.conn
        if not conn.open or conn.transport.is_closing():
            # Closing, aborted or closed: the data would be refused anyway; on_closed unregisters it.
            client.outbox.clear()
            client.pending = 0
            return
        if conn.paused:
            # The transport is above its high-water mark: keep queueing (bounded) until it drains.
            self._wait_drain(client)
            return
        outbox = client.outbox
        if len(outbox) == 1:
            conn.write(outbox[0][0])
        else:
            conn.writelines([item[0] for item in outbox])
        for _blob, count, channel, pub_ns in outbox:
            if channel:
                key = (channel, pub_ns)
                tally[key] = tally.get(key, 0) + count
        outbox.clear()
        client.pending = 0

    def _record(self, tally: Tally, now: int) -> None:
        """Metrics for one flush: per channel and payload, not per client and message (a prometheus
        Counter.inc per write cost as much as the write itself)."""
        sent: dict[str, int] = {}
        for (channel, pub_ns), count in tally.items():
            sent[channel] = sent.get(channel, 0) + count
            if pub_ns:
                self._latency[channel].observe_n((now - pub_ns) / 1e9, count)
        for channel, count in sent.items():
            self._sent[channel].inc(count)

    def _wait_drain(self, client: Client) -> None:
        if client.waiting:
            return
        client.waiting = True
        self._spawn(self._drained(client))

    async def _drained(self, client: Client) -> None:
        try:
            await client.conn.drain()  # also returns once the connection is gone: _write clears then
        finally:
            client.waiting = False
        if client.outbox and not client.dropped:
            self._dirty.add(client)
            self._schedule()

    # Closing -------------------------------------------------------------------------------------
    def drop(self, client: Client, reason: str, code: int = POLICY_VIOLATION) -> None:
        """Disconnect a client that fell behind; the others never notice."""
        if client.dropped:
            return
        client.dropped = True
        if reason == SLOW_CONSUMER:
            self._dropped.inc()
        # An idle connection is routine (a client that went quiet); one that fell behind is news.
        level = logging.INFO if reason == IDLE else logging.WARNING
        log.log(level, "dropping %r: %s (%d messages queued)", client, reason, client.pending)
        self.unregister(client)
        client.conn.close(code, reason)  # after what its transport holds; cut if unanswered in time

    def close_all(self, code: int, reason: str) -> None:
        """Close every client (shutdown) after writing what is queued for it; the connections end
        once their close is answered, or CLOSE_TIMEOUT (the server's close_timeout) after it."""
        self.flush()
        for client in list(self.clients):
            client.dropped = True
            self.unregister(client)
            client.conn.close(code, reason)

    async def wait_idle(self) -> None:
        """Wait for the background drain tasks (tests and shutdown)."""
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
