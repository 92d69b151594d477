"""Batched appends of accepted commands to the symbols' order streams.

Awaiting one XADD per order caps a connection near 20k orders/s, so every order submitted while the
previous round trip was in flight (or during the current event-loop tick) goes out in the next one:
one write of pipelined `XADD cme:{SYM}:orders * d <entry>` commands plus one `INCRBY
cme:{SYM}:appended n` per symbol, then one read of all replies (with balances on, the XADDs are one
call of the venue clock's script instead, shared.stream.APPEND_SCRIPT). When idle an order goes alone at once:
there is no timer, only "whatever queued up while we were busy".

The commands are encoded here as RESP and the replies parsed with hiredis: redis-py's per-command
packing and response handling cost more than the append itself on this path. A waiter learns its
entry id only after Redis replied, so the gateway acks only what is really on the stream.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any, Final, Protocol

import hiredis

from shared import keys
from shared.metrics import APPEND_BATCH, REDIS_ERRORS, REDIS_ROUNDTRIPS
from shared.resp import RespConnection, pack
from shared.stream import APPEND_SCRIPT, APPEND_SHA

log = logging.getLogger(__name__)

NOT_QUEUED: Final = "Redis is unavailable; the order was not queued"
OUTCOME_UNKNOWN: Final = (
    "Redis connection failed during the append; the order may or may not have been queued "
    "(watch the execution reports before retrying)"
)


class Waiter(Protocol):
    """Told exactly once how its append ended."""

    def appended(self, entry_id: str, now_ns: int) -> None: ...

    def failed(self, reason: str) -> None: ...


class Appender:
    """Queue of (symbol, entry, waiter); one task sends them in batches, in submission order.

    Order matters: a cancel sent after a new order on the same connection must land after it, and
    a single FIFO with one batch in flight keeps that without further bookkeeping.
    """

    def __init__(
        self,
        url: str,
        *,
        max_batch: int = 1000,
        timeout: float = 5.0,
        retry_after: float = 0.5,
        on_batch: Callable[[dict[str, int]], None] | None = None,
        id_clock: bool = False,
    ) -> None:
        self.url = url
        self.max_batch = max_batch
        self.timeout = timeout
        self.retry_after = retry_after  # after a failed connect, fail fast for this long
        self.on_batch = on_batch  # per-symbol counts of each successful batch (lag estimate)
        self.id_clock = id_clock  # ids from the venue clock (balances on: see shared.stream.APPEND_SCRIPT)
        self._pending: list[tuple[str, bytes, Waiter]] = []
        self.backlog = 0  # submitted and not answered yet (read per order: a plain attribute)
        self._wake = asyncio.Event()
        self._closing = False
        self._conn: RespConnection | None = None
        self._down_until = 0.0
        self._prefixes: dict[str, bytes] = {}
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self.run(), name="appender")

    def submit(self, symbol: str, entry: bytes, waiter: Waiter) -> None:
        self._pending.append((symbol, entry, waiter))
        self.backlog += 1
        if not self._wake.is_set():
            self._wake.set()

    async def close(self) -> None:
        """Send what was submitted, wait for its replies, then stop."""
        self._closing = True
        self._wake.set()
        if self._task is not None:
            await self._task

    async def run(self) -> None:
        try:
            while True:
                if not self._pending:
                    if self._closing:
                        return
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                batch = self._pending
                if len(batch) > self.max_batch:
                    self._pending = batch[self.max_batch :]
                    batch = batch[: self.max_batch]
                else:
                    self._pending = []
                try:
                    await self._append(batch)
                except Exception:  # a bug must not stop every future append
                    log.exception("append batch failed")
                    _fail(batch, OUTCOME_UNKNOWN)
                    self._drop_connection()
                finally:
                    self.backlog -= len(batch)
        finally:
            self._drop_connection()

    # ------------------------------------------------------------------------------------------
    def _prefix(self, symbol: str) -> bytes:
        """`XADD <key> * d` as RESP, up to the entry's bulk string."""
        prefix = self._prefixes.get(symbol)
        if prefix is None:
            key = keys.orders(symbol).encode()
            prefix = b"*5\r\n$4\r\nXADD\r\n$%d\r\n%s\r\n$1\r\n*\r\n$1\r\nd\r\n" % (len(key), key)
            self._prefixes[symbol] = prefix
        return prefix

    @staticmethod
    def _clock_call(batch: list[tuple[str, bytes, Waiter]]) -> bytes:
        """The whole batch as one call of the id-clock script (shared.stream.APPEND_SCRIPT)."""
        streams: dict[str, bytes] = {}  # symbol -> its index in KEYS, as the script's ARGV says it
        args: list[bytes] = []
        for symbol, entry, _ in batch:
            index = streams.get(symbol)
            if index is None:
                index = streams[symbol] = b"%d" % (len(streams) + 2)
            args += (index, entry)
        stream_keys = [keys.orders(symbol).encode() for symbol in streams]
        return pack(
            b"EVALSHA", APPEND_SHA, b"%d" % (len(streams) + 1), keys.id_clock().encode(), *stream_keys, *args
        )

    async def _connect(self) -> RespConnection | None:
        if self._conn is not None:
            if self._conn.lost is None:
                return self._conn
            self._drop_connection()  # it died while idle: nothing of the next batch was written
        if time.monotonic() < self._down_until:
            return None
        try:
            async with asyncio.timeout(self.timeout):
                self._conn = await RespConnection.open(self.url)
                if self.id_clock:  # after a Redis restart the script must be loaded again
                    await self._conn.roundtrip(pack(b"SCRIPT", b"LOAD", APPEND_SCRIPT.encode()), 1)
        except (OSError, TimeoutError, ConnectionError, hiredis.ProtocolError) as exc:
            REDIS_ERRORS.labels("connect").inc()
            log.warning("cannot connect to Redis for appends: %s", exc)
            self._down_until = time.monotonic() + self.retry_after
            return None
        return self._conn

    def _drop_connection(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    async def _append(self, batch: list[tuple[str, bytes, Waiter]]) -> None:
        conn = await self._connect()
        if conn is None:
            _fail(batch, NOT_QUEUED)  # nothing was written
            return
        parts: list[bytes] = []
        counts: dict[str, int] = {}
        if self.id_clock:
            parts.append(self._clock_call(batch))
            for symbol, _, _ in batch:
                counts[symbol] = counts.get(symbol, 0) + 1
        else:
            prefixes = self._prefixes
            for symbol, entry, _ in batch:
                prefix = prefixes.get(symbol) or self._prefix(symbol)
                parts.append(b"%s$%d\r\n%s\r\n" % (prefix, len(entry), entry))
                counts[symbol] = counts.get(symbol, 0) + 1
        calls = len(parts)
        for symbol, n in counts.items():
            parts.append(pack(b"INCRBY", keys.appended(symbol).encode(), b"%d" % n))
        try:
            async with asyncio.timeout(self.timeout):
                replies = await conn.roundtrip(b"".join(parts), calls + len(counts))
        except (OSError, TimeoutError, ConnectionError, hiredis.ProtocolError) as exc:
            REDIS_ERRORS.labels("xadd").inc()
            log.warning("append of %d orders failed, outcome unknown: %s", len(batch), exc)
            self._drop_connection()
            _fail(batch, OUTCOME_UNKNOWN)
            return
        if self.id_clock:  # one reply per entry, in a list; an error instead: the script failed midway
            script, counters = replies[0], replies[1:]
            if type(script) is not list:
                REDIS_ERRORS.labels("xadd").inc()
                log.error("the id-clock append of %d orders failed, outcome unknown: %s", len(batch), script)
                _fail(batch, OUTCOME_UNKNOWN)
                # Most likely NOSCRIPT, with nothing written: count nothing, and reconnect (which
                # loads the script again).
                await self._correct_counters(conn, counts)
                self._drop_connection()
                return
            replies = [*script, *counters]
        REDIS_ROUNDTRIPS.labels("xadd").inc()
        APPEND_BATCH.labels().observe(len(batch))
        now_ns = time.time_ns()
        refused: dict[str, int] = {}
        for (symbol, _, waiter), reply in zip(batch, replies, strict=False):
            if type(reply) is bytes:
                try:  # inline rather than _call(): this loop runs once per order
                    waiter.appended(reply.decode(), now_ns)
                except Exception:
                    log.exception("append waiter failed")
            else:  # an error reply: this command did nothing
                REDIS_ERRORS.labels("xadd").inc()
                log.error("XADD to %s refused: %s", symbol, reply)
                refused[symbol] = refused.get(symbol, 0) + 1
                _call(waiter.failed, f"Redis refused the append ({reply}); the order was not queued")
        for reply in replies[len(batch) :]:
            if not isinstance(reply, int):
                REDIS_ERRORS.labels("incrby").inc()
                log.error("INCRBY of the appended counter failed: %s", reply)
        if refused:
            for symbol, n in refused.items():
                counts[symbol] -= n
            await self._correct_counters(conn, refused)
        if self.on_batch is not None:
            _call(self.on_batch, counts)

    async def _correct_counters(self, conn: RespConnection, refused: dict[str, int]) -> None:
        """Take refused appends back out of the appended counters (they only feed the lag bound)."""
        payload = b"".join(pack(b"INCRBY", keys.appended(s).encode(), b"%d" % -n) for s, n in refused.items())
        try:
            async with asyncio.timeout(self.timeout):
                await conn.roundtrip(payload, len(refused))
        except (OSError, TimeoutError, ConnectionError, hiredis.ProtocolError) as exc:
            REDIS_ERRORS.labels("incrby").inc()
            log.warning("could not correct the appended counters: %s", exc)
            self._drop_connection()


def _fail(batch: list[tuple[str, bytes, Waiter]], reason: str) -> None:
    for _, _, waiter in batch:
        _call(waiter.failed, reason)


def _call(fn: Callable[..., None], *args: Any) -> None:
    # A waiter's bug must not leave the rest of the batch unanswered.
    try:
        fn(*args)
    except Exception:
        log.exception("append waiter failed")
