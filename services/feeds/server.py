"""`cme feeds`: the market-data (l2, depth) and trade WebSocket servers of one feed process.

One Redis pub/sub connection carries the matcher's md and trades channels of every symbol. Per symbol
the process keeps a BookView (services.feeds.views):

- l2: a new subscriber gets the view's l2_snapshot, then the matcher's l2_update lines as published
  (raw bytes, never re-encoded), so its seq lines up exactly. A gap in seq from Redis makes the view
  unsynced: updates stop for that symbol, the feed asks the matcher for a snapshot (PUBLISH on the
  l2req channel, repeated every REQUEST_EVERY seconds), and once it arrives every l2 subscriber gets a
  fresh l2_snapshot and the updates resume. A client is never shown a book the feed is unsure of.
- depth: a timer sends each changed symbol's top N levels (and BBO) at most once per interval.
- trades: the matcher's trade lines, raw, with duplicates (trade_id at or below the last) dropped.

Writing to clients goes through services.feeds.fanout: bounded outboxes, one write per client per tick.
The WebSocket side is shared/wsserver.py's, as the gateway's (the wsguard limits, RFC 6455, keepalive,
plain HTTP answers); a client's messages reach FeedServer.on_text synchronously from the socket read.
Any number of these processes may run side by side: they share nothing but Redis, and the listening
sockets use SO_REUSEPORT so several on one host share the md and trades ports.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import math
import signal
import socket
import time
from collections.abc import Callable
from typing import Any, Final

import orjson
import redis.asyncio as aioredis
from redis.exceptions import NoPermissionError, RedisError

from services.feeds import http as md_http
from services.feeds.candles import INTERVALS
from services.feeds.fanout import (
    CANDLES,
    CLOSE_TIMEOUT,
    CONTROL,
    DEPTH,
    L2,
    POLICY_VIOLATION,
    SEED_L2,
    SEED_TRADES,
    TICKER,
    TRADES,
    Client,
    Fanout,
    text_frame_ending,
)
from services.feeds.market import MarketData, catch_up
from services.feeds.seed import DEFAULT_SYMBOL, SeedFeed
from services.feeds.views import Applied, BookView, Malformed
from shared import aio, codes, keys, logs, metrics, wsguard, wsserver
from shared.gcpolicy import quiet_gc
from shared.instruments import Instrument, load_instruments
from shared.resp import client_options
from shared.wire import unframe
from shared.wsserver import frames, text_frame

log = logging.getLogger("cme.feeds")
REDIS_TIMEOUT: Final = 5.0  # seconds for a Redis command or connect before it counts as failed

MD, TRADES_SERVER = "md", "trades"
REQUEST_EVERY = 1.0  # seconds between snapshot requests while a symbol is unsynced
REDIS_RETRY = 1.0  # seconds before reconnecting to Redis after an error
LEASE_POLL = 1.0  # seconds between reads of the matcher leases (health)
MAX_FRAME = 4096  # largest client frame: subscribe messages are tiny
MAX_BAD = 20  # invalid client messages before we give up on the connection
DEFAULT_DEPTH, MAX_DEPTH = 10, 1000
UNSUPPORTED_DATA = wsserver.UNSUPPORTED_DATA
GOING_AWAY = wsserver.GOING_AWAY
SHUTDOWN_REASON: Final = "server shutting down"
IDLE_TIMEOUT = 60.0  # seconds a connection may hold no subscription
HEARTBEAT_AFTER = 1.0  # seconds of l2 silence on a symbol before a heartbeat
CANDLE_EVERY = 0.25  # seconds between candle messages for one bar while it changes
TICKER_EVERY = 1.0  # seconds between ticker messages of one symbol (at most)
MD_CHANNELS = (L2, DEPTH, "candles", TICKER)  # what the market-data port's subscribe accepts
CATCH_UP_PASSES = 3  # reads of the events stream before held trades are taken as they are
_HANDLING_FAILED = wsguard.Throttled(log)


class FeedServer:
    """Both feeds of one process. start() binds the ports and connects to Redis; stop() ends it all."""

    def __init__(
        self,
        redis_url: str,
        instruments: dict[str, Instrument],
        *,
        max_buffer: int = 10_000,
        depth_interval: float = 0.1,
        instance: str | None = None,
        policy: wsguard.Policy | None = None,
        idle_timeout: float = IDLE_TIMEOUT,
        seed_symbol: str | None = DEFAULT_SYMBOL,  # None: no seed dialect (silent clients get nothing)
        checksums: bool = True,  # False only for `cme bench feeds`'s baseline: l2 lines as received
    ) -> None:
        self.redis_url = redis_url
        self.checksums = checksums
        self.policy = policy or wsguard.Policy()
        # One guard for both ports: the descriptors and the per-address budget are the process's.
        self.guard = wsguard.Guard(self.policy, "feeds")
        self.instance = instance or metrics.instance_name("feeds")
        self.depth_interval = depth_interval
        self.views = {sym: BookView(inst) for sym, inst in instruments.items()}
        self.market = {sym: MarketData(inst) for sym, inst in instruments.items()}  # candles, ticker
        self._l2_sent: dict[str, float] = {}  # symbol -> monotonic time l2 subscribers last got data
        self._candle_sent: dict[tuple[str, str], tuple[int, int, bool]] = {}  # open_time, trades, closed
        self._ticker_sent: dict[str, bytes] = {}  # symbol -> the last ticker sent, without its ts
        self._ticker_at: dict[str, float] = {}  # symbol -> monotonic time of that ticker
        self._catch_ups: dict[str, asyncio.Task[None]] = {}  # symbol -> its events stream reader
        self._owed: dict[tuple[str, str], set[Client]] = {}  # (fan-out channel, symbol) -> new subscribers
        self.fanout = Fanout(max_buffer, idle_timeout)
        # Silent connections are the seed's client (services.feeds.seed).
        self.seed = SeedFeed(self.fanout, self.views, seed_symbol, {MD: SEED_L2, TRADES_SERVER: SEED_TRADES})
        self.md_port = 0
        self.trades_port = 0
        # Redis channel -> symbol
        self._md_routes = {keys.md_channel(sym).encode(): sym for sym in self.views}
        self._trade_routes = {keys.trades_channel(sym).encode(): sym for sym in self.views}
        self._last_trade: dict[str, int] = {}
        self._md_pub_ns: dict[str, int] = {}  # publish clock of the newest md payload that changed a view
        self._snapshots: dict[str, bytes] = {}  # symbol -> framed view.snapshot(), until the view changes
        self._depth_new: dict[str, set[Client]] = {}  # depth subscribers still owed their first message
        self._live: set[bytes] = set()  # channels whose subscription Redis confirmed
        self._md_live: set[str] = set()  # symbols whose md channel subscription Redis confirmed
        self.ready = asyncio.Event()  # set while every channel is subscribed
        self._want: set[str] = set()  # symbols to request a snapshot for now
        self._want_event = asyncio.Event()
        self._requested: dict[str, float] = {}  # symbol -> monotonic time of the last request
        self._unanswered: dict[str, int] = {}  # symbol -> requests since it was last synced
        self._redis: aioredis.Redis | None = None
        # Health (/healthz, /readyz), kept by the Redis loops and read by the HTTP hooks.
        self._pubsub_problem: str | None = None  # the pub/sub connection's last error, until resubscribed
        self._lease_problem: str | None = None  # the lease reader's last Redis error
        self.no_matcher: list[str] = list(self.views)  # symbols no matcher holds the lease of
        self._redis_failed = wsguard.Throttled(log, 30.0)  # Redis down: a line per 30 s, not per retry
        self._request_failed = wsguard.Throttled(log, 30.0)
        self._servers: list[wsserver.Server] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._resyncs = {sym: metrics.FEED_RESYNCS.labels(sym) for sym in self.views}
        self._connections = {name: metrics.CONNECTIONS.labels(name) for name in (MD, TRADES_SERVER)}

    # Lifecycle ----------------------------------------------------------------------------------
    async def start(
        self, host: str = "127.0.0.1", md_port: int = 8001, trades_port: int = 8002, wait: float = 5.0
    ) -> None:
        """Listen and subscribe; wait up to `wait` seconds for Redis to confirm the subscriptions (so
        nothing published afterwards is missed), but serve anyway if Redis is not there yet."""
        self._redis = aioredis.Redis.from_url(self.redis_url, **client_options(REDIS_TIMEOUT))
        answers = {MD: self._md_request, TRADES_SERVER: self._health_request}
        for name, port in ((MD, md_port), (TRADES_SERVER, trades_port)):
            # SO_REUSEPORT (N feed processes on one host share the ports), no compression (frames are
            # shared between clients), the guard's limits.
            server = await wsserver.serve(
                self._connector(name),
                host,
                port,
                guard=self.guard,
                max_size=MAX_FRAME,
                close_timeout=CLOSE_TIMEOUT,
                process_request=answers[name],
            )
            self._servers.append(server)
        self.md_port = self._servers[0].port
        self.trades_port = self._servers[1].port
        self._tasks.append(asyncio.create_task(self._watch_matcher()))
        metrics.HEALTH.source = self
        for coro in (
            self._redis_loop(),
            self._requester(),
            self._depth_loop(),
            self._heartbeat_loop(),
            self._candle_loop(),
            self._ticker_loop(),
            self.seed.run(),
            metrics.HEARTBEAT.run(),
        ):
            self._tasks.append(asyncio.create_task(coro))
        try:
            await asyncio.wait_for(self.ready.wait(), wait)
        except TimeoutError:
            log.warning("redis pub/sub not subscribed after %.0f s; serving anyway, retrying", wait)

    async def stop(self) -> None:
        """Close every client with 1001, stop the servers and background tasks."""
        for server in self._servers:
            server.stop_accepting()
        self.fanout.close_all(GOING_AWAY, SHUTDOWN_REASON)  # what is queued first, then the close frame
        for server in self._servers:
            server.close(GOING_AWAY, SHUTDOWN_REASON)  # the rest: connections still in their handshake
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT + 1.0):  # each is cut CLOSE_TIMEOUT after its close
                await asyncio.gather(*(s.wait_closed() for s in self._servers))
        except TimeoutError:
            for server in self._servers:
                for conn in list(server.connections):
                    conn.transport.abort()
        # With the events stream readers still at it (a snapshot request's PUBLISH can swallow the
        # first cancel in about half of the stops right after a start).
        await aio.cancel_until_done([*self._tasks, *self._catch_ups.values()])
        await self.fanout.wait_idle()
        if metrics.HEALTH.source is self:
            metrics.HEALTH.source = metrics.AlwaysHealthy()
        if self._redis is not None:
            await self._redis.aclose()

    # Redis side ---------------------------------------------------------------------------------
    async def _redis_loop(self) -> None:
        """Read md and trades payloads forever; reconnect (and resync every book) after errors."""
        while True:
            client = aioredis.Redis.from_url(self.redis_url, **client_options(REDIS_TIMEOUT, blocking=True))
            pubsub = client.pubsub()
            try:
                await pubsub.subscribe(*self._md_routes, *self._trade_routes)
                async for msg in pubsub.listen():
                    kind, channel = msg["type"], msg["channel"]
                    if kind == "message":
                        if channel in self._md_routes:
                            self._on_md(self._md_routes[channel], msg["data"])
                        elif channel in self._trade_routes:
                            self._on_trades(self._trade_routes[channel], msg["data"])
                    elif kind == "subscribe":
                        self._live.add(channel)
                        if len(self._live) == len(self._md_routes) + len(self._trade_routes):
                            self.ready.set()
                            for sym in self.market:
                                self._catch_up(sym)
                            if self._pubsub_problem is not None:
                                log.info("redis pub/sub subscribed again")
                            self._pubsub_problem = None
                        if channel in self._md_routes:
                            self._on_subscribed(self._md_routes[channel])
            except (RedisError, OSError) as exc:
                self._pubsub_problem = f"{type(exc).__name__}: {exc}"
                self._redis_failed.warning(
                    "redis pub/sub failed (%s); reconnecting every %.0f s", exc, REDIS_RETRY
                )
            finally:
                self.ready.clear()
                self._live.clear()
                self._md_live.clear()
                for view in self.views.values():
                    self._unsync(view)  # whatever was published meanwhile is lost to us
                for md in self.market.values():
                    md.catching_up = True  # the trades too: read from the events stream once back
                with contextlib.suppress(Exception):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
                    await client.aclose()
            await asyncio.sleep(REDIS_RETRY)

    def _on_subscribed(self, symbol: str) -> None:
        """Redis confirmed a symbol's md subscription: from now on nothing published there is lost, so
        this is the moment to ask for a snapshot. Also runs after redis-py resubscribes on a reconnect,
        when messages may have been missed: the book is dropped until the snapshot comes."""
        self._md_live.add(symbol)
        self._unsync(self.views[symbol])
        self._request(symbol)

    def _on_md(self, symbol: str, payload: bytes) -> None:
        """One matcher md payload: apply each line to the view, forward what clients may see."""
        pub_ns, lines = unframe(payload)
        view = self.views[symbol]
        out: list[bytes] = []  # framed protocol lines for l2 subscribers, in order
        wanted = bool(self.fanout.subscribers(L2, symbol))  # no subscriber: no checksum to compute
        checksums = self.checksums
        changed = False
        for line in lines:
            if not line:
                continue
            try:
                msg = orjson.loads(line)
                kind = msg.get("type")
            except (orjson.JSONDecodeError, AttributeError):
                log.error("%s: unreadable md line %r", symbol, line[:200])
                continue
            if kind == "l2_update":
                before = view.seq
                result = view.apply_update(msg)
                if result is Applied.OK:
                    if wanted:  # the matcher's bytes plus the checksum of the book after them, framed
                        out.append(
                            text_frame_ending(line, view.checksum_end()) if checksums else text_frame(line)
                        )
                    changed = True
                elif result is Applied.GAP:
                    changed = True
                    self._resyncs[symbol].inc()
                    log.warning(
                        "%s: l2 gap (have seq %d, got %r); requesting a snapshot",
                        symbol,
                        before,
                        msg.get("seq"),
                    )
                    self._request(symbol)
            elif kind == "l2_snapshot":
                was_synced, before = view.synced, view.seq
                try:
                    fresh = view.apply_snapshot(msg)
                except Malformed as exc:
                    log.error("%s: bad l2_snapshot: %s", symbol, exc)
                    continue
                if fresh:
                    changed = True
                    if was_synced:  # a snapshot told us what a gap would have: we had missed updates
                        self._resyncs[symbol].inc()
                    log.info(
                        "%s: book synced at seq %d (was %s)",
                        symbol,
                        view.seq,
                        before if was_synced else "unsynced",
                    )
                    self._snapshots.pop(symbol, None)
                    out.append(text_frame(self._snapshot_line(symbol)))
        if changed:
            self._snapshots.pop(symbol, None)
            self._md_pub_ns[symbol] = pub_ns
            self.seed.book_changed(symbol, pub_ns)
        if out and self.fanout.subscribers(L2, symbol):
            self.fanout.publish(L2, symbol, b"".join(out), len(out), pub_ns)
            self._l2_sent[symbol] = time.monotonic()

    def _on_trades(self, symbol: str, payload: bytes) -> None:
        """Forward trade lines raw, once each: trade_id rises per symbol, so anything at or below the
        last one seen is a duplicate (a matcher publishing a batch again) and is dropped."""
        pub_ns, lines = unframe(payload)
        last = self._last_trade.get(symbol, 0)
        md = self.market[symbol]
        out: list[bytes] = []
        for line in lines:
            if not line:
                continue
            try:
                msg = orjson.loads(line)
                trade_id = msg.get("trade_id")
            except (orjson.JSONDecodeError, AttributeError):
                trade_id = None
            if type(trade_id) is not int:
                log.error("%s: unreadable trade line %r", symbol, line[:200])
                continue
            try:
                if md.live(msg, line):
                    self._catch_up(symbol)
            except (KeyError, TypeError, ValueError) as exc:
                log.error("%s: trade line without a usable price, quantity or ts: %s", symbol, exc)
            if trade_id <= last:
                continue
            if last and trade_id != last + 1:
                log.warning("%s: trades %d..%d never reached this feed", symbol, last + 1, trade_id - 1)
            last = trade_id
            out.append(line)
        self._last_trade[symbol] = last
        if out:
            self.seed.trades(symbol, out, pub_ns)
        if out and self.fanout.subscribers(TRADES, symbol):
            self.fanout.publish(TRADES, symbol, frames(out), len(out), pub_ns)

    def _unsync(self, view: BookView) -> None:
        view.unsync()
        self._snapshots.pop(view.symbol, None)

    def _request(self, symbol: str) -> None:
        self._want.add(symbol)
        self._want_event.set()

    async def _requester(self) -> None:
        """PUBLISH snapshot requests: at once when asked, then every REQUEST_EVERY s while unsynced."""
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._want_event.wait(), REQUEST_EVERY)
            self._want_event.clear()
            now = time.monotonic()
            due = [
                sym
                for sym, view in self.views.items()
                if not view.synced
                and sym in self._md_live  # before Redis confirms our subscription the answer would be lost
                # (a little slack: this loop itself wakes every REQUEST_EVERY seconds)
                and (sym in self._want or now - self._requested.get(sym, -1e9) >= 0.9 * REQUEST_EVERY)
            ]
            self._want.clear()
            for sym in self.views:
                if self.views[sym].synced:
                    self._unanswered.pop(sym, None)
            for sym in due:
                self._requested[sym] = now
                asked = self._unanswered[sym] = self._unanswered.get(sym, 0) + 1
                if asked % 10 == 0:
                    log.warning("%s: no snapshot after %d requests; is the matcher running?", sym, asked)
                try:
                    assert self._redis is not None
                    await self._redis.publish(keys.snapshot_request_channel(sym), self.instance)
                except (RedisError, OSError) as exc:
                    self._request_failed.warning("%s: snapshot request failed: %s", sym, exc)

    async def _depth_loop(self) -> None:
        """Every interval, one depth message per changed symbol per subscriber: the conflation.

        A plain sleep between rounds (it drifts a little) rather than a fixed schedule: after a stall
        a schedule would fire twice in a row, two messages within one interval."""
        while True:
            await asyncio.sleep(self.depth_interval)
            self.send_depth()

    def send_depth(self) -> None:
        for symbol, view in self.views.items():
            subs = self.fanout.subscribers(DEPTH, symbol)
            if not view.synced:
                # Never show a book we are unsure of: new subscribers keep waiting (departed ones
                # are forgotten, so a symbol that stays unsynced does not collect dead clients).
                owed = self._depth_new.get(symbol)
                if owed:
                    owed.intersection_update(subs)
                continue
            owed = self._depth_new.pop(symbol, set())
            if view.changed:
                targets = subs
            else:
                targets = {c: n for c, n in subs.items() if c in owed}
            view.changed = False
            if not targets:
                continue
            pub_ns = self._md_pub_ns.get(symbol, 0)
            blobs: dict[int, bytes] = {}  # one encoding per distinct N
            for client, n in list(targets.items()):
                blob = blobs.get(n)
                if blob is None:
                    blob = blobs[n] = text_frame(orjson.dumps(view.depth(n)))
                self.fanout.send(client, blob, 1, DEPTH, pub_ns)

    # Trade-built market data, heartbeats -------------------------------------------------------
    def _catch_up(self, symbol: str) -> None:
        """Read the symbol's events stream (services.feeds.market) unless a reader is at it already:
        a running reader finishes only once the held live trades follow on from what it read."""
        self.market[symbol].catching_up = True
        task = self._catch_ups.get(symbol)
        if task is None or task.done():
            self._catch_ups[symbol] = asyncio.create_task(self._read_history(symbol))

    async def _read_history(self, symbol: str) -> None:
        md = self.market[symbol]
        passes = 0
        while True:
            try:
                assert self._redis is not None
                await catch_up(self._redis, md)
            except (RedisError, OSError) as exc:
                self._redis_failed.warning("%s: reading the events stream failed: %s", symbol, exc)
                await asyncio.sleep(REDIS_RETRY)
                continue
            passes += 1
            # A held trade that does not follow on from the stream's last means the reader finished
            # before the missing trades were committed: read again (a few times at most: a trade
            # that never reaches the stream must not stop the candles for good).
            if md.caught_up(force=passes >= CATCH_UP_PASSES):
                break
        log.info("%s: trade history read up to trade %d", symbol, md.last_trade_id)

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT_AFTER / 4)
            self.send_heartbeats(time.monotonic(), time.time_ns() // 1_000_000)

    def send_heartbeats(self, now: float, now_ms: int) -> None:
        """A heartbeat to a symbol's l2 subscribers once nothing went to them for HEARTBEAT_AFTER."""
        for symbol, view in self.views.items():
            if not view.synced or not self.fanout.subscribers(L2, symbol):
                continue
            last = self._l2_sent.setdefault(symbol, now)
            if now - last < HEARTBEAT_AFTER:
                continue
            trade_id = max(self._last_trade.get(symbol, 0), self.market[symbol].last_trade_id)
            beat = {"type": "heartbeat", "symbol": symbol, "seq": view.seq, "last_trade_id": trade_id,
                    "ts": now_ms}  # fmt: skip
            self.fanout.publish(L2, symbol, text_frame(orjson.dumps(beat)), 1)
            self._l2_sent[symbol] = now

    async def _candle_loop(self) -> None:
        while True:
            await asyncio.sleep(CANDLE_EVERY)
            self.send_candles(time.time_ns() // 1_000_000)

    def send_candles(self, now_ms: int) -> None:
        """New subscribers get their candles_snapshot; every subscriber gets the current bar when it
        changed since the last round, and the bar before it once more, closed, when a new one began."""
        for symbol, md in self.market.items():
            if md.catching_up:
                continue  # new subscribers stay owed: a snapshot now would lack history
            for interval, series in md.candles.series.items():
                key = CANDLES[interval]
                subs = self.fanout.subscribers(key, symbol)
                owed = self._owed.pop((key, symbol), None)
                if owed:
                    blob = text_frame(orjson.dumps(series.snapshot(now_ms)))
                    for client in owed.intersection(subs):
                        self.fanout.send(client, blob, 1, key)
                bar = series.last
                if not subs or bar is None:
                    self._candle_sent.pop((symbol, interval), None)
                    continue
                closed = series.closed(bar, now_ms)
                state = (bar.open_time, bar.trades, closed)
                sent = self._candle_sent.get((symbol, interval))
                self._candle_sent[(symbol, interval)] = state
                if sent is None or sent == state:
                    continue  # first round: the snapshot told them
                out: list[bytes] = []
                if sent[0] != bar.open_time and not sent[2]:
                    previous = next((b for b in series.bars if b.open_time == sent[0]), None)
                    if previous is not None:
                        out.append(orjson.dumps(series.render(previous, True)))
                out.append(orjson.dumps(series.render(bar, closed)))
                self.fanout.publish(key, symbol, frames(out), len(out))

    async def _ticker_loop(self) -> None:
        while True:
            await asyncio.sleep(CANDLE_EVERY)
            self.send_tickers(time.monotonic(), time.time_ns() // 1_000_000)

    def send_tickers(self, now: float, now_ms: int) -> None:
        """A new subscriber gets the ticker at once; the others when it changed, at most once per
        TICKER_EVERY per symbol."""
        for symbol, md in self.market.items():
            if md.catching_up:
                continue
            subs = self.fanout.subscribers(TICKER, symbol)
            owed = self._owed.pop((TICKER, symbol), None)
            if not subs:
                continue
            msg = md_http.ticker(md, self.views[symbol], now_ms)
            blob = text_frame(orjson.dumps(msg))
            del msg["ts"]
            body = orjson.dumps(msg)
            if now - self._ticker_at.get(symbol, -math.inf) >= TICKER_EVERY and (
                body != self._ticker_sent.get(symbol)
            ):
                self._ticker_at[symbol], self._ticker_sent[symbol] = now, body
                self.fanout.publish(TICKER, symbol, blob, 1)
            elif owed:
                for client in owed.intersection(subs):
                    self.fanout.send(client, blob, 1, TICKER)

    # Client side --------------------------------------------------------------------------------
    def _connector(self, server: str) -> Callable[[wsserver.Connection], ClientHandler]:
        def connect(conn: wsserver.Connection) -> ClientHandler:
            client = self.fanout.register(conn, server)
            self.seed.connected(client)
            self._connections[server].inc()
            log.info("%s connection from %s", server, _address(conn))
            return ClientHandler(self, client)

        return connect

    def on_text(self, client: Client, text: str) -> None:
        """One message of a client, called synchronously from the socket read."""
        if client.dropped:
            return  # the drop is closing it
        try:
            self._on_client_message(client, text)
        except Exception as exc:
            # Input that makes handling fail is invalid input: a reject, never a traceback.
            _HANDLING_FAILED.warning("a message could not be handled: %s: %.200s", type(exc).__name__, exc)
            log.debug("client message handling failed", exc_info=True)
            self._reject(client, None, codes.INVALID_MESSAGE, "message could not be handled")
        if client.bad > MAX_BAD:
            self.fanout.flush()  # the last reject goes out before the close frame
            client.conn.close(POLICY_VIOLATION, "too many invalid messages")

    def on_binary(self, client: Client) -> None:
        if not client.dropped:
            client.conn.close(UNSUPPORTED_DATA, "binary frames are not supported")

    def disconnected(self, client: Client) -> None:
        self.seed.gone(client)
        self.fanout.unregister(client)
        self._connections[client.server].dec()
        conn = client.conn
        log.info(
            "%s connection from %s closed: %s %s",
            client.server,
            _address(conn),
            conn.close_code,
            conn.close_reason,
        )

    def _on_client_message(self, client: Client, text: str) -> None:
        self.seed.heard(client)
        try:
            msg = orjson.loads(text)
        except orjson.JSONDecodeError:
            return self._reject(client, None, codes.INVALID_MESSAGE, "not valid JSON")
        if not isinstance(msg, dict):
            return self._reject(client, None, codes.INVALID_MESSAGE, "a message is a JSON object")
        op = msg.get("op")
        if not isinstance(op, str):
            return self._reject(client, None, codes.INVALID_MESSAGE, "op is required")
        if op not in ("subscribe", "unsubscribe"):
            return self._reject(client, op, codes.UNKNOWN_OP, "op must be subscribe or unsubscribe")
        symbol = msg.get("symbol")
        if not isinstance(symbol, str):
            return self._reject(client, op, codes.INVALID_MESSAGE, "symbol is required")
        if symbol not in self.views:
            return self._reject(client, op, codes.UNKNOWN_SYMBOL, f"unknown symbol {symbol[:40]!r}", symbol)
        if client.server == TRADES_SERVER:
            channel = msg.get("channel", TRADES)
            if channel != TRADES:
                return self._reject(client, op, codes.INVALID_MESSAGE, "channel must be trades", symbol)
        else:
            channel = msg.get("channel", L2)
            if channel not in MD_CHANNELS:
                why = "channel must be l2, depth, candles or ticker"
                return self._reject(client, op, codes.INVALID_MESSAGE, why, symbol)
        reply: dict[str, Any] = {"type": op + "d", "channel": channel, "symbol": symbol}
        key = channel  # the fan-out channel: one per candle interval
        if channel == "candles":
            interval = msg.get("interval")
            if type(interval) is not str or interval not in INTERVALS:
                why = f"interval must be one of {', '.join(INTERVALS)}"
                return self._reject(client, op, codes.INVALID_MESSAGE, why, symbol)
            reply["interval"] = interval
            key = CANDLES[interval]
        if op == "unsubscribe":
            self.fanout.unsubscribe(client, key, symbol)
            self.fanout.send(client, text_frame(orjson.dumps(reply)))
            return None
        n = 0
        if channel == DEPTH:
            n = msg.get("depth", DEFAULT_DEPTH)
            if type(n) is not int or not 1 <= n <= MAX_DEPTH:
                return self._reject(
                    client,
                    op,
                    codes.INVALID_MESSAGE,
                    f"depth must be an integer from 1 to {MAX_DEPTH}",
                    symbol,
                )
            reply["depth"] = n
        self.fanout.subscribe(client, key, symbol, n)
        waiting = self._waiting(channel, symbol)
        if waiting is not None:  # subscribed, but nothing can be sent yet: say why (docs/protocol.md)
            reply["status"], reply["reason"] = "waiting", waiting
        self.fanout.send(client, text_frame(orjson.dumps(reply)))
        if channel == L2:
            # Subscribing again (after the client saw a gap) also gets a fresh snapshot. While the
            # view is unsynced the client waits: the resync sends every l2 subscriber a snapshot.
            if self.views[symbol].synced:
                self.fanout.send(client, self._snapshot_frame(symbol), 1, L2)
        elif channel == DEPTH:
            self._depth_new.setdefault(symbol, set()).add(client)
        else:  # candles, ticker: their timers send the first message (a snapshot, a ticker)
            self._owed.setdefault((key, symbol), set()).add(client)
        return None

    def _waiting(self, channel: str, symbol: str) -> str | None:
        """Why a new subscription gets nothing yet (None: it is served at once)."""
        if not self.ready.is_set():
            return "not subscribed to Redis yet: messages follow once it is reachable"
        if channel in (L2, DEPTH) and not self.views[symbol].synced:
            return "no book snapshot from the matcher yet: the book follows when it arrives"
        if channel in ("candles", TICKER) and self.market[symbol].catching_up:
            return "reading the trade history: the data follows when it is read"
        return None

    # Health -------------------------------------------------------------------------------------
    async def _watch_matcher(self) -> None:
        """Read the matcher leases (a live matcher renews its lease) about once a second."""
        while True:
            try:
                assert self._redis is not None
                pipe = self._redis.pipeline(transaction=False)  # one GET per key: each symbol has its slot
                for sym in self.views:
                    pipe.get(keys.matcher_lease(sym))
                held = await asyncio.wait_for(pipe.execute(), 5.0)
                self.no_matcher = [sym for sym, v in zip(self.views, held, strict=True) if v is None]
                self._lease_problem = None
            except NoPermissionError:  # an ACL file from before this check: no matcher check, say so once
                log.warning("the feeds' Redis user may not read matcher leases: health ignores them")
                self.no_matcher = []
                return
            except (RedisError, OSError, TimeoutError) as exc:
                self._lease_problem = f"{type(exc).__name__}: {exc}"
            await asyncio.sleep(LEASE_POLL)

    def problem(self) -> str | None:
        """Why this feed cannot serve now: the reason /healthz gives with its 503."""
        redis_problem = self._pubsub_problem or self._lease_problem
        if redis_problem is not None:
            return f"Redis unreachable: {redis_problem}"
        if self.no_matcher:  # never started, or died and no standby took over: no book moves
            return f"matcher unreachable: no matcher holds the lease of {', '.join(self.no_matcher)}"
        return None

    def unready(self) -> str | None:
        """/readyz: the problems, or what the feed still waits for before it can serve a book."""
        problem = self.problem()
        if problem is not None:
            return problem
        if not self.ready.is_set():
            return "Redis pub/sub not subscribed yet"
        unsynced = [sym for sym, view in self.views.items() if not view.synced]
        if unsynced:
            return f"waiting for the matcher's book snapshot of {', '.join(unsynced)}"
        return None

    def _health_request(self, request: wsserver.Request) -> wsserver.HttpResponse | None:
        """Plain HTTP GET /healthz and /readyz on either port: 200, or 503 with the reason."""
        if "Upgrade" in request.headers:
            return None
        answer = metrics.HEALTH.answer(request.path, self)
        if answer is None:
            return None
        status, body = answer
        return wsserver.HttpResponse(status, body.encode())

    def _md_request(self, request: wsserver.Request) -> wsserver.HttpResponse | None:
        """The market-data port's: health, then GET /v1/... (services.feeds.http); None lets the
        handshake go on (a plain GET of any other path gets 426)."""
        answer = self._health_request(request)
        if answer is not None or "Upgrade" in request.headers:
            return answer
        routed = md_http.answer(request.path, self.views, self.market, time.time_ns() // 1_000_000)
        if routed is None:
            return None
        status, body = routed
        return wsserver.HttpResponse(status, body, "application/json")

    def _reject(
        self, client: Client, op: str | None, code: str, reason: str, symbol: str | None = None
    ) -> None:
        client.bad += 1
        msg = {"type": "reject", "op": op, "symbol": symbol, "code": code, "reason": reason}
        self.fanout.send(client, text_frame(orjson.dumps(msg)), 1, CONTROL)

    def _snapshot_line(self, symbol: str) -> bytes:
        return orjson.dumps(self.views[symbol].snapshot())

    def _snapshot_frame(self, symbol: str) -> bytes:
        blob = self._snapshots.get(symbol)
        if blob is None:
            blob = self._snapshots[symbol] = text_frame(self._snapshot_line(symbol))
        return blob


class ClientHandler:
    """The wsserver.Handler of one client connection: its messages go to its FeedServer."""

    __slots__ = ("client", "feeds")

    def __init__(self, feeds: FeedServer, client: Client) -> None:
        self.feeds, self.client = feeds, client

    def on_text(self, text: str) -> None:
        self.feeds.on_text(self.client, text)

    def on_binary(self, data: bytes) -> None:
        self.feeds.on_binary(self.client)

    def on_closed(self) -> None:
        self.feeds.disconnected(self.client)


def _address(conn: wsserver.Connection) -> str:
    """host:port of the peer, for log lines."""
    peer = conn.remote_address
    return f"{peer[0]}:{peer[1]}" if peer else "?"


# Entry point ------------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> int:
    """`cme feeds`: serve until SIGTERM or SIGINT, then close clients with 1001 and exit 0."""
    logs.from_args("feeds", args)
    return aio.run(_main(args))


async def _main(args: argparse.Namespace) -> int:
    instruments = load_instruments(args.instruments)
    instance = args.instance or metrics.instance_name("feeds")
    metrics_port = metrics.serve("feeds", args.metrics_port, instance, args.metrics_host)
    feeds = FeedServer(
        args.redis_url,
        instruments,
        max_buffer=args.max_buffer,
        depth_interval=args.depth_interval,
        instance=instance,
        policy=wsguard.Policy.from_args(args),
        idle_timeout=args.idle_timeout,
        seed_symbol=args.seed_symbol,
    )
    await feeds.start(args.host, args.md_port, args.trades_port)
    log.info(
        "%s: md ws://%s:%d, trades ws://%s:%d, metrics :%d, symbols %s",
        instance,
        args.host,
        feeds.md_port,
        args.host,
        feeds.trades_port,
        metrics_port,
        ",".join(instruments),
    )
    await _register(feeds, instance, metrics_port)
    quiet_gc()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("%s: stopping", instance)
    await _register(feeds, instance, None)
    await feeds.stop()
    return 0


async def _register(feeds: FeedServer, instance: str, metrics_port: int | None) -> None:
    """Advertise (or withdraw) this instance's metrics endpoint for discovery; best effort."""
    try:
        client = aioredis.Redis.from_url(feeds.redis_url, **client_options(REDIS_TIMEOUT))
        try:
            if metrics_port is None:
                await client.hdel(keys.instances("feeds"), instance)
            else:
                await client.hset(keys.instances("feeds"), instance, f"{socket.gethostname()}:{metrics_port}")
        finally:
            await client.aclose()
    except (RedisError, OSError) as exc:
        log.warning("could not update %s: %s", keys.instances("feeds"), exc)
