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
Any number of these processes may run side by side: they share nothing but Redis, and the listening
sockets use SO_REUSEPORT so several on one host share the md and trades ports.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
import redis.asyncio as aioredis
from redis.exceptions import RedisError
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from services.feeds.fanout import (
    CONTROL,
    DEPTH,
    L2,
    POLICY_VIOLATION,
    TRADES,
    Client,
    Fanout,
    close,
    frames,
    text_frame,
)
from services.feeds.views import Applied, BookView, Malformed
from shared import aio, codes, keys, metrics
from shared.gcpolicy import quiet_gc
from shared.instruments import Instrument, load_instruments
from shared.wire import unframe

log = logging.getLogger("cme.feeds")

MD, TRADES_SERVER = "md", "trades"
REQUEST_EVERY = 1.0  # seconds between snapshot requests while a symbol is unsynced
REDIS_RETRY = 1.0  # seconds before reconnecting to Redis after an error
MAX_FRAME = 4096  # largest client frame: subscribe messages are tiny
MAX_BAD = 20  # invalid client messages before we give up on the connection
DEFAULT_DEPTH, MAX_DEPTH = 10, 1000
UNSUPPORTED_DATA = 1003
GOING_AWAY = 1001


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
    ) -> None:
        self.redis_url = redis_url
        self.instance = instance or metrics.instance_name("feeds")
        self.depth_interval = depth_interval
        self.views = {sym: BookView(inst) for sym, inst in instruments.items()}
        self.fanout = Fanout(max_buffer)
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
        self._servers: list[Server] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._resyncs = {sym: metrics.FEED_RESYNCS.labels(sym) for sym in self.views}
        self._connections = {name: metrics.CONNECTIONS.labels(name) for name in (MD, TRADES_SERVER)}

    # Lifecycle ----------------------------------------------------------------------------------
    async def start(
        self, host: str = "127.0.0.1", md_port: int = 8001, trades_port: int = 8002, wait: float = 5.0
    ) -> None:
        """Listen and subscribe; wait up to `wait` seconds for Redis to confirm the subscriptions (so
        nothing published afterwards is missed), but serve anyway if Redis is not there yet."""
        self._redis = aioredis.Redis.from_url(self.redis_url)
        for name, port in ((MD, md_port), (TRADES_SERVER, trades_port)):
            server = await serve(
                self._handler(name),
                host,
                port,
                reuse_port=True,  # N feed processes on one host share the ports
                compression=None,  # frames are shared between clients: no per-client compression
                max_size=MAX_FRAME,
                close_timeout=5.0,
            )
            self._servers.append(server)
        self.md_port = _bound_port(self._servers[0])
        self.trades_port = _bound_port(self._servers[1])
        for coro in (self._redis_loop(), self._requester(), self._depth_loop()):
            self._tasks.append(asyncio.create_task(coro))
        try:
            await asyncio.wait_for(self.ready.wait(), wait)
        except TimeoutError:
            log.warning("redis pub/sub not subscribed after %.0f s; serving anyway, retrying", wait)

    async def stop(self) -> None:
        """Close every client with 1001, stop the servers and background tasks."""
        for server in self._servers:
            server.close(close_connections=False)  # stop accepting; we close the clients ourselves
        await self.fanout.close_all(GOING_AWAY, "server shutting down")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.gather(*(s.wait_closed() for s in self._servers)), 5.0)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.fanout.wait_idle()
        if self._redis is not None:
            await self._redis.aclose()

    # Redis side ---------------------------------------------------------------------------------
    async def _redis_loop(self) -> None:
        """Read md and trades payloads forever; reconnect (and resync every book) after errors."""
        while True:
            client = aioredis.Redis.from_url(self.redis_url)
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
                        if channel in self._md_routes:
                            self._on_subscribed(self._md_routes[channel])
            except (RedisError, OSError) as exc:
                log.warning("redis pub/sub failed (%s); reconnecting in %.0f s", exc, REDIS_RETRY)
            finally:
                self.ready.clear()
                self._live.clear()
                self._md_live.clear()
                for view in self.views.values():
                    self._unsync(view)  # whatever was published meanwhile is lost to us
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
        out: list[bytes] = []  # protocol lines for l2 subscribers, in order
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
                    out.append(line)
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
                    out.append(self._snapshot_line(symbol))
        if changed:
            self._snapshots.pop(symbol, None)
            self._md_pub_ns[symbol] = pub_ns
        if out and self.fanout.subscribers(L2, symbol):
            self.fanout.publish(L2, symbol, frames(out), len(out), pub_ns)

    def _on_trades(self, symbol: str, payload: bytes) -> None:
        """Forward trade lines raw, once each: trade_id rises per symbol, so anything at or below the
        last one seen is a duplicate (a matcher publishing a batch again) and is dropped."""
        pub_ns, lines = unframe(payload)
        last = self._last_trade.get(symbol, 0)
        out: list[bytes] = []
        for line in lines:
            if not line:
                continue
            try:
                trade_id = orjson.loads(line).get("trade_id")
            except (orjson.JSONDecodeError, AttributeError):
                trade_id = None
            if type(trade_id) is not int:
                log.error("%s: unreadable trade line %r", symbol, line[:200])
                continue
            if trade_id <= last:
                continue
            if last and trade_id != last + 1:
                log.warning("%s: trades %d..%d never reached this feed", symbol, last + 1, trade_id - 1)
            last = trade_id
            out.append(line)
        self._last_trade[symbol] = last
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
                    log.warning("%s: snapshot request failed: %s", sym, exc)

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

    # Client side --------------------------------------------------------------------------------
    def _handler(self, server: str) -> Callable[[ServerConnection], Awaitable[None]]:
        async def handler(conn: ServerConnection) -> None:
            await self._serve_client(conn, server)

        return handler

    async def _serve_client(self, conn: ServerConnection, server: str) -> None:
        client = self.fanout.register(conn, server)
        gauge = self._connections[server]
        gauge.inc()
        log.debug("%s client connected from %s", server, conn.remote_address)
        try:
            async for raw in conn:
                if client.dropped:
                    continue  # the drop is closing it; websockets ends this loop when it is closed
                if not isinstance(raw, str):
                    await close(conn, UNSUPPORTED_DATA, "binary frames are not supported")
                    break
                self._on_client_message(client, raw)
                if client.bad > MAX_BAD:
                    self.fanout.flush()  # the last reject goes out before the close frame
                    await close(conn, POLICY_VIOLATION, "too many invalid messages")
                    break
        except ConnectionClosed:
            pass
        finally:
            self.fanout.unregister(client)
            gauge.dec()
            log.debug("%s client %s gone", server, conn.remote_address)

    def _on_client_message(self, client: Client, text: str) -> None:
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
            if channel not in (L2, DEPTH):
                return self._reject(client, op, codes.INVALID_MESSAGE, "channel must be l2 or depth", symbol)
        reply: dict[str, Any] = {"type": op + "d", "channel": channel, "symbol": symbol}
        if op == "unsubscribe":
            self.fanout.unsubscribe(client, channel, symbol)
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
        self.fanout.subscribe(client, channel, symbol, n)
        self.fanout.send(client, text_frame(orjson.dumps(reply)))
        if channel == L2:
            # Subscribing again (after the client saw a gap) also gets a fresh snapshot. While the
            # view is unsynced the client waits: the resync sends every l2 subscriber a snapshot.
            if self.views[symbol].synced:
                self.fanout.send(client, self._snapshot_frame(symbol), 1, L2)
        elif channel == DEPTH:
            self._depth_new.setdefault(symbol, set()).add(client)
        return None

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


def _bound_port(server: Server) -> int:
    for sock in server.sockets:
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            return int(sock.getsockname()[1])
    raise RuntimeError("server has no TCP socket")


# Entry point ------------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> int:
    """`cme feeds`: serve until SIGTERM or SIGINT, then close clients with 1001 and exit 0."""
    logging.basicConfig(
        level=str(args.log_level).upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    return aio.run(_main(args))


async def _main(args: argparse.Namespace) -> int:
    instruments = load_instruments(args.instruments)
    instance = args.instance or metrics.instance_name("feeds")
    metrics_port = metrics.serve("feeds", args.metrics_port, instance)
    feeds = FeedServer(
        args.redis_url,
        instruments,
        max_buffer=args.max_buffer,
        depth_interval=args.depth_interval,
        instance=instance,
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
        client = aioredis.Redis.from_url(feeds.redis_url)
        try:
            if metrics_port is None:
                await client.hdel(keys.instances("feeds"), instance)
            else:
                await client.hset(keys.instances("feeds"), instance, f"{socket.gethostname()}:{metrics_port}")
        finally:
            await client.aclose()
    except (RedisError, OSError) as exc:
        log.warning("could not update %s: %s", keys.instances("feeds"), exc)
