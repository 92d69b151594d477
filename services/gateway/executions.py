"""Execution reports, exactly once: the exec channel for speed, the matcher's exec log for what it missed.

Every line the matcher publishes on a symbol's exec channel carries an exec_id that rises by exactly one
per symbol, and the same payload is appended to the durable exec log (keys.exec_log) in the same fenced
commit. So the router needs no acknowledgements: it remembers the last exec_id it delivered per symbol,
drops what it has already delivered, and reads from the log whatever the subscription skipped (a Redis
restart, a network blip, a payload whose first id is not the next one). The same log answers a client's
`executions` request after its own reconnect.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any, Final, cast

import orjson
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from services.gateway.validation import ExecutionsQuery
from shared import keys
from shared.metrics import FEED_SEND_SECONDS, REDIS_ERRORS, REDIS_ROUNDTRIPS
from shared.wire import split_exec_line, unframe_exec

log = logging.getLogger("gateway.executions")

LOG_PAGE: Final = 200  # exec log entries (matcher batches) per XRANGE
# Exec log entries one `executions` request may scan; the client continues from next_after.
QUERY_SCAN_LIMIT: Final = 5_000
RESUBSCRIBE_SECONDS: Final = 0.5

Push = Callable[[bytes], None]  # one exec line, `<account> <json>`, to the connections of its account


class ExecLog:
    """Reads of a symbol's durable exec log: entry id `<last exec_id of the batch>-0`, field d = payload."""

    def __init__(self, redis: aioredis.Redis) -> None:
        self.redis = redis

    async def batches(
        self, symbol: str, after: int, *, max_entries: int | None = None
    ) -> AsyncIterator[tuple[int, list[bytes]]]:
        """(first exec_id, lines) of every batch holding an exec_id > after, oldest first."""
        start = f"({after}-0"
        key = keys.exec_log(symbol)
        seen = 0
        while max_entries is None or seen < max_entries:
            page = LOG_PAGE if max_entries is None else min(LOG_PAGE, max_entries - seen)
            REDIS_ROUNDTRIPS.labels("execlog").inc()
            entries = cast(
                list[tuple[bytes, dict[bytes, bytes]]], await self.redis.xrange(key, start, "+", count=page)
            )
            for entry_id, fields in entries:
                _, first, lines = unframe_exec(fields[b"d"])
                if first is None:  # every logged payload carries ids; one without cannot be placed
                    log.error("%s: exec log entry %r has no exec ids; skipped", symbol, entry_id)
                    continue
                yield first, lines
            seen += len(entries)
            if len(entries) < page:
                return
            start = "(" + entries[-1][0].decode()

    async def newest(self, symbol: str) -> int:
        """The last exec_id in the log (0 when empty)."""
        REDIS_ROUNDTRIPS.labels("execlog").inc()
        entries = cast(
            list[tuple[bytes, Any]], await self.redis.xrevrange(keys.exec_log(symbol), "+", "-", count=1)
        )
        return int(entries[0][0].partition(b"-")[0]) if entries else 0


class ExecRouter:
    """Exec channel payloads -> `push` per line, each exec_id once, gaps filled from the exec log."""

    def __init__(
        self, redis: aioredis.Redis, subscriber: aioredis.Redis, symbols: Iterable[str], push: Push
    ) -> None:
        self.log = ExecLog(redis)
        self.subscriber = subscriber
        self.push = push
        self.by_channel = {keys.exec_channel(s).encode(): s for s in symbols}
        self.last: dict[str, int] = {}  # symbol -> last exec_id delivered; absent until the first payload
        self.subscribed = asyncio.Event()

    async def run(self) -> None:
        sent = FEED_SEND_SECONDS.labels("exec")
        while True:
            pubsub = self.subscriber.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(*self.by_channel)
                # Subscribed first, then read the log: a payload published in between arrives both ways,
                # and the exec_id check delivers it once.
                for symbol in self.by_channel.values():
                    await self.catch_up(symbol)
                self.subscribed.set()
                # Said at every (re)subscription: the chaos soak's logs then show which gateway is not.
                log.info("execution reports subscribed on %d channels, caught up", len(self.by_channel))
                while True:
                    message = await pubsub.get_message(timeout=None)
                    if message is None or message["type"] != "message":
                        continue
                    channel = self.by_channel.get(message["channel"])
                    if channel is None:
                        continue
                    published_ns = await self.on_payload(channel, message["data"])
                    if published_ns:
                        sent.observe(max(0, time.time_ns() - published_ns) / 1e9)
            except Exception as exc:
                # Not only a dropped connection: anything else (a client library surprise, a malformed
                # payload) must not end this task either, or the gateway would go on serving
                # connections that never get another report. Those get their traceback logged.
                self.subscribed.clear()
                REDIS_ERRORS.labels("subscribe").inc()
                if isinstance(exc, RedisError | OSError):
                    log.warning(
                        "execution report subscription lost (%s); will catch up from the exec log", exc
                    )
                else:
                    log.exception("execution report subscription failed; resubscribing and catching up")
                await asyncio.sleep(RESUBSCRIBE_SECONDS)
            finally:
                with contextlib.suppress(RedisError, OSError):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]

    async def on_payload(self, symbol: str, payload: bytes) -> int:
        """Deliver one channel payload (after filling any gap before it); returns its publish time in ns."""
        published_ns, first, lines = unframe_exec(payload)
        if first is None:
            for line in lines:  # no ids to check (an older matcher): deliver as published
                self.push(line)
            return published_ns
        last = self.last.get(symbol)
        if last is not None and first <= last and await self.log.newest(symbol) < last:
            # Ids went back and the log no longer reaches what we delivered: Redis was wiped and the
            # matcher began a new history (a mere repeat would still be in the log).
            log.warning(
                "%s: exec ids went back from %d to %d (a new history); following it", symbol, last, first
            )
            self.last[symbol] = first - 1
        elif last is not None and first > last + 1:
            await self.catch_up(symbol, before=first)
        self._deliver(symbol, first, lines)
        return published_ns

    async def catch_up(self, symbol: str, before: int | None = None) -> None:
        """Deliver from the log what came after the last delivered exec_id (up to `before`, exclusive)."""
        last = self.last.get(symbol)
        if last is None:
            return  # nothing delivered yet, so nothing was missed by anyone connected
        async for first, lines in self.log.batches(symbol, last):
            if before is not None and first >= before:
                break
            self._deliver(symbol, first, lines)
        if before is not None and self.last.get(symbol, 0) < before - 1:
            log.error("%s: exec ids %d..%d are no longer in the exec log; not delivered",
                      symbol, self.last.get(symbol, 0) + 1, before - 1)  # fmt: skip
            self.last[symbol] = before - 1

    def _deliver(self, symbol: str, first: int, lines: list[bytes]) -> None:
        last = self.last.get(symbol, first - 1)
        if first <= last:
            lines = lines[last - first + 1 :]  # already delivered
            first = last + 1
        if lines:
            push = self.push
            for line in lines:
                push(line)
            self.last[symbol] = first + len(lines) - 1


async def answer(log_reader: ExecLog, query: ExecutionsQuery) -> bytes:
    """The `executions` reply: the account's reports on the symbol with exec_id > after, in order.

    Bounded per request (at most `limit` reports, at most QUERY_SCAN_LIMIT batches scanned); with
    "more": true the client asks again from "next_after", the last exec_id this answer covers.
    """
    bodies: list[Any] = []
    next_after = query.after
    more = False
    scanned = 0
    async for first, lines in log_reader.batches(query.symbol, query.after, max_entries=QUERY_SCAN_LIMIT):
        scanned += 1
        for i, line in enumerate(lines):
            exec_id = first + i
            if exec_id <= query.after:
                continue
            account, body = split_exec_line(line)
            if account == query.account:
                if len(bodies) == query.limit:
                    more = True
                    break
                bodies.append(orjson.Fragment(body))  # already JSON: embedded, not re-encoded
            next_after = exec_id
        if more:
            break
    else:
        more = scanned >= QUERY_SCAN_LIMIT
    return orjson.dumps(
        {
            "type": "executions",
            "symbol": query.symbol,
            "reports": bodies,
            "more": more,
            "next_after": next_after,
        }
    )
