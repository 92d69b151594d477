"""The order gateway: WebSocket connections in, stream appends out, execution reports back.

Per message the work is synchronous (decode, session rules, validation, submit to the appender), so a
connection never waits for Redis between two of its messages; acks are written when the batched append
returns. Everything a connection is sent goes through its outbox, written once per event-loop tick
(one socket write for many messages) and in order: a reply waits behind an earlier order's pending
ack, so on the connection that placed an order its ack always comes before its execution reports.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import socket
import time
from collections import deque
from collections.abc import Callable, Mapping
from http import HTTPStatus
from typing import Any, Final

import orjson
import redis.asyncio as aioredis
from redis.exceptions import RedisError
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.frames import CloseCode, Frame, Opcode
from websockets.http11 import Request, Response
from websockets.protocol import State

from services.gateway import validation
from services.gateway.appender import Appender
from services.gateway.sessions import MAX_BAD_MESSAGES, Authenticator, Session, load_api_keys
from services.matcher.commands import Command, NewOrder
from shared import aio, codes, keys, metrics, stream
from shared.gcpolicy import quiet_gc
from shared.ids import seq_to_entry
from shared.instruments import Instrument, load_instruments
from shared.metrics import (
    CONNECTIONS,
    FEED_SEND_SECONDS,
    GATEWAY_ACK_SECONDS,
    ORDERS,
    REDIS_ERRORS,
    REDIS_ROUNDTRIPS,
    REJECTS,
)
from shared.wire import split_exec_line, unframe

log = logging.getLogger("gateway")

LAG_POLL_SECONDS: Final = 0.05
REDIS_TIMEOUT: Final = 5.0
CLOSE_TIMEOUT: Final = 3.0  # seconds a peer has to answer our close frame before the TCP connection is cut
MAX_BACKLOG: Final = 100_000  # orders waiting for Redis in this process before OVERLOADED
MAX_WRITE_BUFFER: Final = 8 << 20  # bytes a client may leave unread before it is dropped
SLOW_CLIENT_REASON: Final = "client too slow: send buffer full"
SHUTDOWN_REASON: Final = "server shutting down"
_ORDER_TYPES: Final = {"limit": "limit", "market": "market", "ioc": "limit", "fok": "limit"}


class GatewayConnection(ServerConnection):
    """Handles each complete text frame right where it is parsed, in data_received.

    The default path queues every frame, wakes the handler task and reassembles the message in
    recv(): a few microseconds per message, the largest cost after validation. Frames handled here
    are the complete text frames that arrive while nothing is waiting in recv()'s queue and no
    fragmented message is in progress; everything else (binary frames, fragments, invalid UTF-8)
    takes the library's path, so the order of messages is kept and the library's close rules apply.
    """

    on_text: Callable[[str], None] | None = None
    _fragmented = False

    def process_event(self, event: Any) -> None:
        if type(event) is not Frame or self.request is None:
            super().process_event(event)
            return
        opcode = event.opcode
        if opcode is Opcode.TEXT or opcode is Opcode.BINARY or opcode is Opcode.CONT:
            if self._fragmented or not event.fin:
                self._fragmented = not event.fin
            elif opcode is Opcode.TEXT and self.on_text is not None and not self.recv_messages.frames.queue:
                try:
                    text = bytes(event.data).decode()
                except UnicodeDecodeError:
                    pass  # recv() raises it and the library closes with 1007
                else:
                    self.on_text(text)
                    return
        super().process_event(event)


class PendingOrder:
    """A command on its way to the stream: an outbox cell until Redis answers, then its ack or reject."""

    __slots__ = ("client", "cmd", "data", "label", "op", "recv_ns")

    def __init__(self, client: Client, cmd: Command, op: str, label: str, recv_ns: int) -> None:
        self.client, self.cmd, self.op, self.label, self.recv_ns = client, cmd, op, label, recv_ns
        self.data: bytes | None = None

    def appended(self, entry_id: str, now_ns: int) -> None:
        if self.data is not None:
            return
        cmd = self.cmd
        if type(cmd) is NewOrder:
            order_id: str | None = entry_id  # the stream entry id is the order id
            cid = cmd.client_order_id
        else:  # cancel / amend: the order it targets (the result follows as a report or reject)
            assert not isinstance(cmd, NewOrder)
            order_id = None if cmd.order_id is None else seq_to_entry(cmd.order_id)
            cid = cmd.client_order_id
        self.data = orjson.dumps(
            {"type": "ack", "op": self.op, "client_order_id": cid, "order_id": order_id, "symbol": cmd.symbol}
        )
        gateway = self.client.gateway
        gateway.count_order(cmd.symbol, self.label, "accepted")
        gateway.ack_seconds[self.op].observe((now_ns - self.recv_ns) / 1e9)
        self.client.wake()

    def failed(self, reason: str) -> None:
        if self.data is not None:
            return
        cmd = self.cmd
        reply = validation.reject(codes.INTERNAL_ERROR, self.op, cmd.client_order_id, reason)
        self.client.gateway.count_reject(reply, cmd.symbol, self.label)
        self.data = orjson.dumps(reply)
        self.client.wake()


class Client:
    """One WebSocket connection: its session and its ordered outbox."""

    __slots__ = ("account", "cells", "closing", "dirty", "gateway", "session", "ws")

    def __init__(self, gateway: Gateway, ws: ServerConnection, session: Session) -> None:
        self.gateway, self.ws, self.session = gateway, ws, session
        self.account: str | None = None  # the account it is registered under for execution reports
        self.cells: deque[bytes | PendingOrder] = deque()
        self.dirty = False
        self.closing = False

    def on_text(self, data: str) -> None:
        """One text frame of this connection (called synchronously, from data_received or recv)."""
        if self.closing or self.gateway.stopping:
            return  # not answered, not queued: a close frame is on its way
        try:
            self.gateway.on_text(self, data)
        except Exception:  # a bug must not kill the transport callback; the client learns it is closed
            log.exception("message handling failed")
            self.close(CloseCode.INTERNAL_ERROR, "internal error")
            return
        reason = self.session.close_reason
        if reason is not None:
            self.close(CloseCode.POLICY_VIOLATION, reason)

    def close(self, code: int, reason: str) -> None:
        """Send what is ready, then close with a reason; later messages are ignored."""
        if not self.closing:
            self.closing = True
            self.flush()
            self.gateway.close_later(self.ws, code, reason)

    def push(self, data: bytes) -> None:
        self.cells.append(data)
        self.wake()

    def wake(self) -> None:
        if not self.dirty:
            self.dirty = True
            self.gateway.schedule_flush(self)

    def flush(self) -> None:
        """Write every ready message at the head of the outbox in one socket write."""
        self.dirty = False
        ws, cells = self.ws, self.cells
        protocol = ws.protocol
        if protocol.state is not State.OPEN:
            cells.clear()
            return
        sent = 0
        while cells:
            item = cells[0]
            if type(item) is PendingOrder:
                pending = item.data
                if pending is None:
                    break  # Redis has not answered yet: later messages wait behind this ack
                data = pending
            else:
                data = item  # type: ignore[assignment]
            cells.popleft()
            protocol.send_text(data)  # already UTF-8 JSON: no re-encoding
            sent += 1
        if not sent:
            return
        # As websockets.broadcast() does, but one write for all frames instead of one per frame.
        # (data_to_send() holds no end-of-stream marker: the connection is OPEN and we only sent text.)
        transport = ws.transport
        transport.write(b"".join(protocol.data_to_send()))
        if transport.get_write_buffer_size() > MAX_WRITE_BUFFER and not self.closing:
            self.closing = True
            self.gateway.close_later(ws, CloseCode.POLICY_VIOLATION, SLOW_CLIENT_REASON)


class Gateway:
    """The WebSocket server, its appender, the lag watcher and the execution-report router."""

    def __init__(
        self,
        instruments: Mapping[str, Instrument],
        redis_url: str,
        auth: Authenticator | None = None,
        *,
        max_lag: int = 50_000,
        rate_limit: float = 5_000.0,
        max_frame: int = 16_384,
        max_backlog: int = MAX_BACKLOG,
        max_bad: int = MAX_BAD_MESSAGES,
    ) -> None:
        self.instruments = dict(instruments)
        self.redis_url = redis_url
        self.auth = auth or Authenticator()
        self.max_lag = max_lag
        self.rate_limit = rate_limit
        self.max_frame = max_frame
        self.max_backlog = max_backlog
        self.max_bad = max_bad
        self.appender = Appender(redis_url)
        # Polls and registration time out; the subscriber blocks by design, so it has its own client.
        self.redis: aioredis.Redis = aioredis.Redis.from_url(
            redis_url, socket_timeout=REDIS_TIMEOUT, socket_connect_timeout=REDIS_TIMEOUT
        )
        self._subscriber: aioredis.Redis = aioredis.Redis.from_url(
            redis_url, socket_connect_timeout=REDIS_TIMEOUT, health_check_interval=30
        )
        self.clients: set[Client] = set()
        self.by_account: dict[str, set[Client]] = {}
        self.lag: dict[str, int] = dict.fromkeys(self.instruments, 0)  # polled, plus our own appends since
        self.overloaded: set[str] = set()
        self.stopping = False
        self.exec_subscribed = asyncio.Event()
        self._dirty: list[Client] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._closers: set[asyncio.Task[None]] = set()
        self._server: Server | None = None
        self._loop = asyncio.get_running_loop()
        self._order_counts: dict[tuple[str, str, str], int] = {}
        self.ack_seconds = {op: GATEWAY_ACK_SECONDS.labels(op) for op in validation.ORDER_OPS}

    # Lifecycle --------------------------------------------------------------------------------
    async def start(self, host: str, port: int) -> int:
        """Listen (SO_REUSEPORT: several gateway processes may share the port); returns the port."""
        self.appender.start()
        self._tasks.append(self._loop.create_task(self._watch_lag(), name="lag-watcher"))
        self._tasks.append(self._loop.create_task(self._route_executions(), name="exec-router"))
        self._server = await serve(
            self._handle,
            host,
            port,
            reuse_port=True,
            max_size=self.max_frame,
            max_queue=128,
            compression=None,  # deflate costs more CPU than these small messages save in bytes
            process_request=_health,
            server_header=None,
            create_connection=GatewayConnection,
            close_timeout=CLOSE_TIMEOUT,
        )
        bound = int(self._server.sockets[0].getsockname()[1])
        log.info(
            "gateway listening on %s:%d (%d symbols, %s mode)",
            host,
            bound,
            len(self.instruments),
            "open" if self.auth.open_mode else "api-key",
        )
        return bound

    async def stop(self, timeout: float = 10.0) -> None:
        """Stop accepting, append and ack what was already accepted, then close every connection.

        Bounded by `timeout` in total; connections still open at the deadline are aborted.
        """
        if self.stopping:
            return
        self.stopping = True
        started = self._loop.time()
        deadline = started + timeout
        server = self._server
        if server is not None:
            server.server.close()  # no new connections; open ones stay until their acks are out
        try:
            async with asyncio.timeout_at(deadline):
                await self.appender.close()
        except TimeoutError:
            log.error("pending appends did not finish within %.1f s", timeout)
        self._flush()
        log.debug("appends drained after %.3f s", self._loop.time() - started)
        if server is not None:
            server.close(code=CloseCode.GOING_AWAY, reason=SHUTDOWN_REASON)
            try:
                async with asyncio.timeout_at(max(deadline, self._loop.time() + 1.0)):
                    await server.wait_closed()
            except TimeoutError:
                log.warning("%d connections did not close in time; aborting them", len(self.clients))
                for client in list(self.clients):
                    client.ws.transport.abort()
        log.debug("connections closed after %.3f s", self._loop.time() - started)
        for task in [*self._tasks, *self._closers]:
            task.cancel()
        await asyncio.gather(*self._tasks, *self._closers, return_exceptions=True)
        self.publish_counts()
        await self.redis.aclose()
        await self._subscriber.aclose()
        log.debug("stopped after %.3f s", self._loop.time() - started)

    # Connections ------------------------------------------------------------------------------
    async def _handle(self, ws: ServerConnection) -> None:
        session = Session(
            self.auth, self.instruments, self.rate_limit, time.monotonic(), max_bad=self.max_bad
        )
        client = Client(self, ws, session)
        self.clients.add(client)
        CONNECTIONS.labels("gateway").inc()
        try:
            if isinstance(ws, GatewayConnection):
                ws.on_text = client.on_text  # from now on text frames are handled as they arrive
            while True:  # what the fast path leaves: binary frames, fragmented messages
                data = await ws.recv()
                if type(data) is not str:
                    client.flush()
                    await ws.close(CloseCode.UNSUPPORTED_DATA, "text frames only")
                    return
                client.on_text(data)
        except ConnectionClosed:
            pass
        finally:
            if isinstance(ws, GatewayConnection):
                ws.on_text = None
            self.clients.discard(client)
            self._register(client, None)
            CONNECTIONS.labels("gateway").dec()

    def on_text(self, client: Client, data: str) -> None:
        """One text frame: answer it, or submit its command to the appender. Never blocks."""
        recv_ns = time.time_ns()
        msg = validation.decode(data)
        result = client.session.handle(msg, time.monotonic())
        if type(result) is dict:
            kind = result["type"]
            if kind == "reject":
                self.count_reject(result, *_labels(msg, self.instruments))
            elif kind == "authenticated":
                self._register(client, result["account"])
            client.push(orjson.dumps(result))
            return
        cmd: Command = result  # type: ignore[assignment]
        symbol = cmd[0]
        if type(cmd) is NewOrder:
            op, label = validation.NEW, cmd.type
            # Cancels pass even when overloaded: they relieve the book, and the matcher needs them.
            lag = self.lag.get(symbol, 0)
            if lag > self.max_lag or self.appender.backlog >= self.max_backlog:
                reply = validation.reject(codes.OVERLOADED, op, cmd.client_order_id)
                self.count_reject(reply, symbol, label)
                client.push(orjson.dumps(reply))
                return
            # Counted when admitted, not when appended: a burst meets the bound where single orders do.
            self._set_lag(symbol, lag + 1)
        else:
            op = label = msg["op"]  # type: ignore[index]  # a command comes from a decoded message
        pending = PendingOrder(client, cmd, op, label, recv_ns)
        client.cells.append(pending)
        self.appender.submit(symbol, stream.encode(cmd, recv_ns), pending)

    def _register(self, client: Client, account: str | None) -> None:
        """(Re)file the connection under the account whose execution reports it receives."""
        if client.account == account:
            return
        if client.account is not None:
            peers = self.by_account.get(client.account)
            if peers is not None:
                peers.discard(client)
                if not peers:
                    del self.by_account[client.account]
        client.account = account
        if account is not None:
            self.by_account.setdefault(account, set()).add(client)

    # Output -----------------------------------------------------------------------------------
    def schedule_flush(self, client: Client) -> None:
        if not self._dirty:
            self._loop.call_soon(self._flush)
        self._dirty.append(client)

    def _flush(self) -> None:
        dirty, self._dirty = self._dirty, []
        for client in dirty:
            try:
                client.flush()
            except Exception:  # one broken transport must not starve the others
                log.exception("write to a client failed")

    def close_later(self, ws: ServerConnection, code: int, reason: str) -> None:
        task = self._loop.create_task(ws.close(code, reason))
        self._closers.add(task)
        task.add_done_callback(self._closers.discard)

    # Execution reports ------------------------------------------------------------------------
    async def _route_executions(self) -> None:
        """Every exec channel -> the connections of each line's account on this instance."""
        channels = [keys.exec_channel(s) for s in self.instruments]
        sent = FEED_SEND_SECONDS.labels("exec")
        while True:
            pubsub = self._subscriber.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(*channels)
                self.exec_subscribed.set()
                while True:
                    message = await pubsub.get_message(timeout=None)
                    if message is not None and message["type"] == "message":
                        published_ns = self.deliver(message["data"])
                        if published_ns:
                            sent.observe(max(0, time.time_ns() - published_ns) / 1e9)
            except (RedisError, OSError) as exc:
                self.exec_subscribed.clear()
                REDIS_ERRORS.labels("subscribe").inc()
                log.warning(
                    "execution report subscription lost (%s); reports published meanwhile are lost", exc
                )
                await asyncio.sleep(0.5)
            finally:
                with contextlib.suppress(RedisError, OSError):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]

    def deliver(self, payload: bytes) -> int:
        """Route one exec payload; returns its publish time (ns, 0 if unknown)."""
        published_ns, lines = unframe(payload)
        by_account = self.by_account
        for line in lines:
            if not line:
                continue
            account, body = split_exec_line(line)
            clients = by_account.get(account)
            if clients:
                for client in clients:
                    client.push(body)
        return published_ns

    # Backpressure -----------------------------------------------------------------------------
    async def _watch_lag(self) -> None:
        """Matcher lag per symbol = appended counter - applied (progress hash), every 50 ms."""
        symbols = list(self.instruments)
        failing = False
        while True:
            try:
                pipe = self.redis.pipeline(transaction=False)
                for s in symbols:
                    pipe.get(keys.appended(s))
                    pipe.hget(keys.progress(s), "applied")
                values = await pipe.execute()
                REDIS_ROUNDTRIPS.labels("lag").inc()
                for i, s in enumerate(symbols):
                    self._set_lag(s, int(values[2 * i] or 0) - int(values[2 * i + 1] or 0))
                failing = False
            except (RedisError, OSError, ValueError) as exc:
                REDIS_ERRORS.labels("lag").inc()
                if not failing:  # log the first failure of a streak only
                    log.warning("cannot read the matcher lag: %s", exc)
                failing = True
            self.publish_counts()
            await asyncio.sleep(LAG_POLL_SECONDS)

    def _set_lag(self, symbol: str, lag: int) -> None:
        self.lag[symbol] = lag
        if lag > self.max_lag:
            if symbol not in self.overloaded:
                self.overloaded.add(symbol)
                log.warning(
                    "%s: matcher lag %d > %d, new orders are rejected (OVERLOADED)", symbol, lag, self.max_lag
                )
        elif symbol in self.overloaded:
            self.overloaded.discard(symbol)
            log.info("%s: matcher lag back to %d, accepting orders", symbol, lag)

    # Metrics ----------------------------------------------------------------------------------
    def count_order(self, symbol: str, label: str, result: str) -> None:
        # A plain dict increment per order; publish_counts() moves the sums into Prometheus
        # (its Counter.inc takes a lock and costs more than the rest of the ack).
        key = (symbol, label, result)
        counts = self._order_counts
        counts[key] = counts.get(key, 0) + 1

    def publish_counts(self) -> None:
        counts, self._order_counts = self._order_counts, {}
        for labels, n in counts.items():
            ORDERS.labels(*labels).inc(n)

    def count_reject(self, reply: Mapping[str, Any], symbol: str | None, label: str | None) -> None:
        REJECTS.labels(reply["code"], "gateway").inc()
        if symbol is not None and label is not None:
            self.count_order(symbol, label, "rejected")


def _labels(
    msg: Mapping[str, Any] | None, instruments: Mapping[str, Instrument]
) -> tuple[str | None, str | None]:
    """Bounded (symbol, type) labels of a rejected order message; (None, None) if it is no order."""
    if msg is None or msg.get("op") not in validation.ORDER_OPS:
        return None, None
    symbol = msg.get("symbol")
    op = msg["op"]
    if op != validation.NEW:
        label = op
    else:
        otype = msg.get("type", "limit")
        # The ioc / fok shorthands are limit orders, as accepted ones are counted.
        label = _ORDER_TYPES.get(otype, "invalid") if type(otype) is str else "invalid"
    return (symbol if type(symbol) is str and symbol in instruments else "unknown"), label


def _health(connection: ServerConnection, request: Request) -> Response | None:
    """Plain HTTP GET /healthz answers 200 (load balancers, compose health checks)."""
    if request.path == "/healthz" and "Upgrade" not in request.headers:
        return connection.respond(HTTPStatus.OK, "OK\n")
    return None


# Entry point ------------------------------------------------------------------------------------
async def _serve(
    args: argparse.Namespace, instruments: dict[str, Instrument], auth: Authenticator, metrics_port: int
) -> None:
    gateway = Gateway(
        instruments,
        args.redis_url,
        auth,
        max_lag=args.max_lag,
        rate_limit=args.rate_limit,
        max_frame=args.max_frame,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    port = await gateway.start(args.host, args.port)
    instance = args.instance or metrics.instance_name("gateway")
    endpoint = orjson.dumps(
        {"ws": f"{args.host}:{port}", "metrics": f"{socket.gethostname()}:{metrics_port}"}
    )
    with contextlib.suppress(RedisError, OSError):
        await gateway.redis.hset(keys.instances("gateway"), instance, endpoint)
    quiet_gc()
    await stop.wait()
    log.info("shutting down")
    with contextlib.suppress(RedisError, OSError):
        await gateway.redis.hdel(keys.instances("gateway"), instance)
    await gateway.stop()
    log.info("stopped")


def run(args: argparse.Namespace) -> int:
    """`cme gateway`: serve until SIGTERM / SIGINT, then exit 0."""
    logging.basicConfig(
        level=str(args.log_level).upper(),
        format="%(asctime)s %(levelname)s %(name)s[%(process)d] %(message)s",
    )
    try:
        instruments = load_instruments(args.instruments)
        auth = Authenticator(load_api_keys(args.api_keys) if args.api_keys else None)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.error("bad configuration: %s", exc)
        return 2
    metrics_port = metrics.serve("gateway", args.metrics_port, args.instance)
    aio.run(_serve(args, instruments, auth, metrics_port))
    return 0
