"""The order gateway: WebSocket connections in, stream appends out, execution reports back.

Per message the work is synchronous (decode, session rules, validation, submit to the appender), so a
connection never waits for Redis between two of its messages; acks are written when the batched append
returns. Everything a connection is sent goes through its outbox, written once per event-loop tick
(one socket write for many messages) and in order: a reply waits behind an earlier order's pending
ack, so on the connection that placed an order its ack always comes before its execution reports.

An order's way: the frame is parsed and decoded by shared/wsserver.py (Connection.on_ws_frame), then
Client.on_text -> Gateway.on_text (session rules, validation) -> a PendingOrder in the outbox and
Appender.submit -> PendingOrder.appended (the ack, once Redis answered) -> Client.flush (the write).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import socket
import time
from collections import OrderedDict, deque
from collections.abc import Coroutine, Iterable, Mapping, Sequence
from typing import Any, Final

import orjson
import redis.asyncio as aioredis
from redis.exceptions import NoPermissionError, RedisError

from services.gateway import executions, orders, seed, validation
from services.gateway.appender import Appender, Waiter
from services.gateway.safety import SafetySwitches
from services.gateway.sessions import (
    MAX_BAD_MESSAGES,
    Authenticator,
    LoginThrottle,
    Session,
    load_api_keys,
)
from services.gateway.validation import (
    BalancesQuery,
    ExecutionsQuery,
    OpenOrdersQuery,
    OrderCommand,
    OrderStatusQuery,
    Submission,
)
from shared import aio, codes, keys, logs, metrics, stream, wsguard, wsserver
from shared.commands import Grant, NewOrder
from shared.gcpolicy import quiet_gc
from shared.ids import entry_to_seq, seq_to_entry
from shared.instruments import Instrument, asset_scales, load_instruments
from shared.metrics import (
    CONNECTIONS,
    GATEWAY_ACK_SECONDS,
    ORDERS,
    REDIS_ERRORS,
    REDIS_ROUNDTRIPS,
    REJECTS,
)
from shared.resp import client_options
from shared.wire import split_exec_line, unframe

log = logging.getLogger("gateway")
_HANDLING_FAILED = wsguard.Throttled(log)

LAG_POLL_SECONDS: Final = 0.05
LEASE_POLL_EVERY: Final = 20  # lag polls per read of the matcher leases (about once a second)
REDIS_TIMEOUT: Final = 5.0
CLOSE_TIMEOUT: Final = 3.0  # seconds a peer has to answer our close frame before the TCP connection is cut
MAX_BACKLOG: Final = 100_000  # orders waiting for Redis in this process before OVERLOADED
MAX_WRITE_BUFFER: Final = 8 << 20  # bytes a client may leave unread before it is dropped
SLOW_CLIENT_REASON: Final = "client too slow: send buffer full"
SHUTDOWN_REASON: Final = "server shutting down"
AUTH_TIMEOUT: Final = 10.0  # seconds from connect to a successful auth
AUTH_TIMEOUT_REASON: Final = "authentication timeout"
_ORDER_TYPES: Final = {"limit": "limit", "market": "market", "ioc": "limit", "fok": "limit"}
# The session's non-order answers.
_REQUESTS: Final = frozenset((ExecutionsQuery, BalancesQuery, Submission, OrderStatusQuery, OpenOrdersQuery))
MAX_GRANTED_MEMO: Final = 100_000  # accounts this process remembers as granted by the faucet


class PendingOrder:
    """A command on its way to the stream: an outbox cell until Redis answers, then its ack or reject."""

    __slots__ = ("client", "cmd", "data", "label", "op", "recv_ns")

    def __init__(self, client: Client, cmd: OrderCommand, op: str, label: str, recv_ns: int) -> None:
        self.client, self.cmd, self.op, self.label, self.recv_ns = client, cmd, op, label, recv_ns
        self.data: bytes | None = None

    def appended(self, entry_id: str, now_ns: int) -> None:
        self.client.append_done()
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
        self.client.appended[cmd.symbol] = entry_id
        gateway = self.client.gateway
        gateway.count_order(cmd.symbol, self.label, "accepted")
        gateway.ack_seconds[self.op].observe((now_ns - self.recv_ns) / 1e9)
        self.client.wake()

    def failed(self, reason: str) -> None:
        self.client.append_done()
        if self.data is not None:
            return
        cmd = self.cmd
        reply = validation.reject(codes.INTERNAL_ERROR, self.op, cmd.client_order_id, reason)
        self.client.gateway.count_reject(reply, cmd.symbol, self.label)
        self.data = orjson.dumps(reply)
        self.client.wake()


class SeedPendingOrder(PendingOrder):
    """A seed order (services.gateway.seed) on its way: the same append and metrics, the seed's answers.

    The answer replaces the normal one before the outbox is flushed (wake() only schedules it): the
    seed path is not the hot path, and this keeps the normal one free of a branch."""

    __slots__ = ()

    def appended(self, entry_id: str, now_ns: int) -> None:
        if self.data is None:
            super().appended(entry_id, now_ns)
            self.data = seed.accepted(entry_id)

    def failed(self, reason: str) -> None:
        if self.data is None:
            super().failed(reason)
            self.data = seed.rejected(validation.reject(codes.INTERNAL_ERROR, validation.NEW, None, reason))


class PendingSubmission:
    """A deposit / withdraw / cancel_all on its way: an outbox cell until every one of its commands is
    appended (then its ack), or until the first failure (then a reject: the outcome is unknown)."""

    __slots__ = ("client", "data", "remaining", "request")

    def __init__(self, client: Client, request: Submission) -> None:
        self.client, self.request = client, request
        self.remaining = len(request.entries)
        self.data: bytes | None = None if self.remaining else orjson.dumps(request.ack)

    def appended(self, entry_id: str, now_ns: int) -> None:
        self.client.append_done()
        # Answers come back in submission order: this one is for entries[done].
        symbol = self.request.entries[len(self.request.entries) - self.remaining][0]
        self.client.appended[symbol] = entry_id
        self.remaining -= 1
        if self.remaining == 0 and self.data is None:
            self.data = orjson.dumps(self.request.ack)
            self.client.wake()

    def failed(self, reason: str) -> None:
        self.client.append_done()
        if self.data is not None:
            return
        reply = validation.reject(codes.INTERNAL_ERROR, self.request.op, reason=reason)
        if "request_id" in self.request.ack:
            reply["request_id"] = self.request.ack["request_id"]
        self.client.gateway.count_reject(reply, None, None)
        self.data = orjson.dumps(reply)
        self.client.wake()


class FaucetGrant:
    """The waiter of a faucet Grant: the account is remembered as granted once the grant is appended."""

    __slots__ = ("account", "client", "gateway", "symbol")

    def __init__(self, gateway: Gateway, account: str, client: Client, symbol: str) -> None:
        self.gateway, self.account, self.client, self.symbol = gateway, account, client, symbol

    def appended(self, entry_id: str, now_ns: int) -> None:
        self.client.append_done()
        self.gateway.remember_grant(self.account)
        self.client.appended[self.symbol] = entry_id  # a balances query waits for the grant too

    def failed(self, reason: str) -> None:
        self.client.append_done()
        log.warning(
            "faucet grant of %s not appended (sent again at its next login): %s", self.account, reason
        )


class PendingReply:
    """An outbox cell for a reply that needs a Redis read: later messages wait behind it, in order."""

    __slots__ = ("client", "data")

    def __init__(self, client: Client) -> None:
        self.client = client
        self.data: bytes | None = None

    def done(self, data: bytes) -> None:
        self.data = data
        self.client.wake()


class Client:
    """One WebSocket connection: its session and its ordered outbox (the wsserver.Handler of it)."""

    __slots__ = (
        "_barriers",
        "account",
        "appended",
        "cells",
        "closing",
        "completed",
        "deadline",
        "dirty",
        "gateway",
        "seed",
        "session",
        "submitted",
        "ws",
    )

    def __init__(self, gateway: Gateway, ws: wsserver.Connection, session: Session) -> None:
        self.gateway, self.ws, self.session = gateway, ws, session
        self.account: str | None = None  # the account it is registered under for execution reports
        self.cells: deque[bytes | PendingOrder | PendingReply | PendingSubmission] = deque()
        self.dirty = False
        self.closing = False
        # symbol -> the newest entry this connection appended there (acked): what a query waits for
        self.appended: dict[str, str] = {}
        # Appends submitted and answered: a query waits until what was submitted before it is answered
        # (the appender answers in submission order), so it knows every entry id it must wait for.
        self.submitted = self.completed = 0
        self._barriers: list[tuple[int, asyncio.Future[None]]] = []
        # It sent a valid seed order: the seed's dialect has no auth message (each order names its
        # account), so such a connection is exempt from the auth deadline, as an authenticated one is.
        self.seed = False
        self.deadline: asyncio.TimerHandle | None = None  # the auth deadline

    def submit(self, symbol: str, entry: bytes, waiter: Waiter) -> None:
        self.submitted += 1
        self.gateway.appender.submit(symbol, entry, waiter)

    def append_done(self) -> None:
        self.completed += 1
        if self._barriers:
            done = self.completed
            for n, fut in self._barriers:
                if n <= done and not fut.done():
                    fut.set_result(None)
            self._barriers = [b for b in self._barriers if b[0] > done]

    async def appends_answered(self, n: int) -> None:
        """Until the first n appends of this connection are answered (appended or failed)."""
        if self.completed < n:
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._barriers.append((n, fut))
            await fut

    def on_text(self, data: str) -> None:
        """One text message of this connection (called synchronously, from the socket read)."""
        if self.closing or self.gateway.stopping:
            return  # not answered, not queued: a close frame is on its way
        try:
            self.gateway.on_text(self, data)
        except Exception as exc:
            # Input that makes handling fail (a lone surrogate orjson cannot re-encode, say) is invalid
            # input like any other: a reject, counted as a bad message, never a 1011 or a traceback.
            _HANDLING_FAILED.warning("a message could not be handled: %s: %.200s", type(exc).__name__, exc)
            log.debug("message handling failed", exc_info=True)
            self.push(orjson.dumps(self.session.handle(None, time.monotonic())))
        reason = self.session.close_reason
        if reason is not None:
            self.close(wsserver.POLICY_VIOLATION, reason)

    def on_binary(self, data: bytes) -> None:
        self.close(wsserver.UNSUPPORTED_DATA, "text frames only")

    def on_closed(self) -> None:
        self.gateway.disconnected(self)

    def auth_expired(self) -> None:
        if self.account is None and not self.seed and self.session.admin is None:
            self.close(wsserver.POLICY_VIOLATION, AUTH_TIMEOUT_REASON)

    def close(self, code: int, reason: str) -> None:
        """Send what is ready, then close with a reason; later messages are ignored."""
        if not self.closing:
            self.closing = True
            self.flush()
            self.ws.close(code, reason)

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
        if not ws.open:
            cells.clear()
            return
        ready: list[bytes] = []
        while cells:
            item = cells[0]
            if isinstance(item, bytes):
                data = item
            else:  # a PendingOrder, PendingReply or PendingSubmission
                pending = item.data
                if pending is None:
                    break  # Redis has not answered yet: later messages wait behind this ack
                data = pending
            cells.popleft()
            ready.append(data)  # already UTF-8 JSON: no re-encoding
        if not ready:
            return
        ws.send_texts(ready)  # one socket write for all of them
        if ws.transport.get_write_buffer_size() > MAX_WRITE_BUFFER and not self.closing:
            self.closing = True
            ws.close(wsserver.POLICY_VIOLATION, SLOW_CLIENT_REASON)


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
        policy: wsguard.Policy | None = None,
        auth_timeout: float = AUTH_TIMEOUT,
        seed_symbol: str = seed.DEFAULT_SYMBOL,
        risk: bool = False,
        faucet: Sequence[tuple[str, int]] = (),
    ) -> None:
        """risk: the venue keeps balances (the matcher runs with --risk on): funding and the
        balances query are served, else answered BALANCES_DISABLED and no faucet is sent.
        faucet: (asset, units) every account is granted at its first login (validation.parse_faucet)."""
        self.instruments = dict(instruments)
        self.scales = asset_scales(self.instruments.values())
        self.risk = risk
        self.faucet = [[asset, units] for asset, units in faucet] if risk else []
        self.granted: OrderedDict[str, None] = OrderedDict()  # accounts whose grant is on the stream
        self.seed_symbol = seed_symbol  # what the seed's orders trade (they name no symbol)
        self.redis_url = redis_url
        self.auth = auth or Authenticator()
        self.login_throttle = LoginThrottle()
        self.max_lag = max_lag
        self.rate_limit = rate_limit
        self.max_frame = max_frame
        self.max_backlog = max_backlog
        self.max_bad = max_bad
        self.policy = policy or wsguard.Policy()
        self.guard = wsguard.Guard(self.policy, "gateway")
        self.auth_timeout = auth_timeout  # 0: no deadline
        # One matcher applies every stream in entry-id order when balances are on: ids from the venue clock.
        self.appender = Appender(redis_url, id_clock=risk)
        # Polls and registration time out; the subscriber blocks by design, so it has its own client.
        self.redis: aioredis.Redis = aioredis.Redis.from_url(redis_url, **client_options(REDIS_TIMEOUT))
        self._subscriber: aioredis.Redis = aioredis.Redis.from_url(
            redis_url, **client_options(REDIS_TIMEOUT, blocking=True)
        )
        self.clients: set[Client] = set()
        self.by_account: dict[str, set[Client]] = {}
        self.lag: dict[str, int] = dict.fromkeys(self.instruments, 0)  # polled, plus our own appends since
        self.admitted: dict[str, int] = dict.fromkeys(self.instruments, 0)  # new orders admitted, ever
        self.overloaded: set[str] = set()
        self.stopping = False
        # Health (/healthz, /readyz): kept by the lag watcher, read by the HTTP hooks.
        self.redis_problem: str | None = None  # the lag watcher's last Redis error, while it lasts
        self.lag_read = False  # the lag has been read from Redis at least once
        self.no_matcher: list[str] = list(self.instruments)  # symbols no matcher holds the lease of
        # Reports reach the account's connections exactly once, through pub/sub or the exec log.
        self.exec_router = executions.ExecRouter(
            self.redis, self._subscriber, self.instruments, self.push_exec
        )
        self.exec_subscribed = self.exec_router.subscribed
        # Cancel on disconnect and the dead man's switch: state in Redis, swept by every gateway.
        self.safety = SafetySwitches(self.redis, self.appender, self.instruments)
        self._dirty: list[Client] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._closers: set[asyncio.Task[None]] = set()
        self._server: wsserver.Server | None = None
        self._loop = asyncio.get_running_loop()
        self._order_counts: dict[tuple[str, str, str], int] = {}
        self.ack_seconds = {op: GATEWAY_ACK_SECONDS.labels(op) for op in validation.ORDER_OPS}

    # Lifecycle --------------------------------------------------------------------------------
    async def start(self, host: str, port: int) -> int:
        """Listen (SO_REUSEPORT: several gateway processes may share the port); returns the port."""
        self.appender.start()
        self.safety.start()
        self._tasks.append(self._loop.create_task(self._watch_lag(), name="lag-watcher"))
        self._tasks.append(self._loop.create_task(metrics.HEARTBEAT.run(), name="heartbeat"))
        metrics.HEALTH.source = self
        self._tasks.append(self._loop.create_task(self.exec_router.run(), name="exec-router"))
        self._server = await wsserver.serve(  # SO_REUSEPORT, no compression, the guard's limits
            self._connect,
            host,
            port,
            guard=self.guard,
            max_size=self.max_frame,
            close_timeout=CLOSE_TIMEOUT,
            process_request=self._health_request,
            select_subprotocol=seed.select_subprotocol,  # offering none still connects
        )
        bound = self._server.port
        log.info(
            "gateway listening on %s:%d (%d symbols, %s mode, balances %s, faucet %s)",
            host,
            bound,
            len(self.instruments),
            "open" if self.auth.open_mode else "api-key",
            "on" if self.risk else "off",
            ",".join(f"{asset}={units}" for asset, units in self.faucet) or "none",
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
            server.stop_accepting()  # no new connections; open ones stay until their acks are out
        try:
            async with asyncio.timeout_at(deadline):
                await self.safety.stop()  # a shutdown ends every leased connection: cancels go out now
                await self.appender.close()
        except TimeoutError:
            log.error("pending appends did not finish within %.1f s", timeout)
        self._flush()
        log.debug("appends drained after %.3f s", self._loop.time() - started)
        if server is not None:
            server.close(wsserver.GOING_AWAY, SHUTDOWN_REASON)
            try:
                async with asyncio.timeout_at(max(deadline, self._loop.time() + 1.0)):
                    await server.wait_closed()
            except TimeoutError:
                log.warning("%d connections did not close in time; aborting them", len(server.connections))
                for conn in list(server.connections):
                    conn.transport.abort()
        log.debug("connections closed after %.3f s", self._loop.time() - started)
        await aio.cancel_until_done([*self._tasks, *self._closers])  # the exec router's read may need two
        self.publish_counts()
        if metrics.HEALTH.source is self:
            metrics.HEALTH.source = metrics.AlwaysHealthy()
        await self.redis.aclose()
        await self._subscriber.aclose()
        log.debug("stopped after %.3f s", self._loop.time() - started)

    # Connections ------------------------------------------------------------------------------
    def _connect(self, ws: wsserver.Connection) -> Client:
        """A connection past its handshake: its session; its messages go to Client.on_text."""
        log.info("connection from %s", _address(ws))
        session = Session(
            self.auth,
            self.instruments,
            self.rate_limit,
            time.monotonic(),
            max_bad=self.max_bad,
            throttle=self.login_throttle,  # failed logins count per IP across connections
            peer=ws.peer_ip,
            balances=self.scales if self.risk else None,
        )
        client = Client(self, ws, session)
        self.clients.add(client)
        if self.auth_timeout > 0:
            client.deadline = self._loop.call_at(ws.accepted_at + self.auth_timeout, client.auth_expired)
        CONNECTIONS.labels("gateway").inc()
        return client

    def disconnected(self, client: Client) -> None:
        ws = client.ws
        if client.deadline is not None:
            client.deadline.cancel()
        self.clients.discard(client)
        log.info(
            "connection from %s closed (account %s): %s %s",
            _address(ws),
            client.account or "-",
            ws.close_code,
            ws.close_reason,
        )
        self._register(client, None)
        self.safety.release(client)
        CONNECTIONS.labels("gateway").dec()

    def on_text(self, client: Client, data: str) -> None:
        """One text frame: answer it, or submit its command to the appender. Never blocks."""
        recv_ns = time.time_ns()
        msg = validation.decode(data)
        if msg is not None and seed.is_seed(msg):
            self._on_seed(client, msg, recv_ns)
            return
        result = client.session.handle(msg, time.monotonic())
        if type(result) is dict:
            kind = result["type"]
            if kind == "reject":
                self.count_reject(result, *_labels(msg, self.instruments))
            elif kind == "authenticated":
                account = result.get("account")  # None: an admin session
                self._register(client, account)
                if account is not None:
                    self.grant(account, client)
                if self._lease(client, result):
                    return
            client.push(orjson.dumps(result))
            return
        if type(result) is validation.DeadManRequest:
            self._arm(client, result)
            return
        if type(result) in _REQUESTS:
            self._on_request(client, result, recv_ns)  # type: ignore[arg-type]
            return
        cmd: OrderCommand = result  # type: ignore[assignment]
        symbol = cmd[0]
        if type(cmd) is NewOrder:
            op, label = validation.NEW, cmd.type
            # Cancels pass even when overloaded: they relieve the book, and the matcher needs them.
            if not self._admit(symbol):
                reply = validation.reject(codes.OVERLOADED, op, cmd.client_order_id)
                self.count_reject(reply, symbol, label)
                client.push(orjson.dumps(reply))
                return
        else:
            op = label = msg["op"]  # type: ignore[index]  # a command comes from a decoded message
        pending = PendingOrder(client, cmd, op, label, recv_ns)
        client.cells.append(pending)
        client.submit(symbol, stream.encode(cmd, recv_ns), pending)

    def _on_request(
        self,
        client: Client,
        request: ExecutionsQuery | BalancesQuery | Submission | OrderStatusQuery | OpenOrdersQuery,
        recv_ns: int,
    ) -> None:
        """A query answered from Redis, or commands to append then ack, in the outbox's order."""
        if type(request) is Submission:
            pending = PendingSubmission(client, request)
            client.cells.append(pending)
            if pending.data is not None:  # nothing to append (no instruments)
                client.wake()
            for symbol, cmd in request.entries:
                client.submit(symbol, stream.encode(cmd, recv_ns, self.scales), pending)
            return
        cell = PendingReply(client)
        client.cells.append(cell)
        if type(request) is ExecutionsQuery:
            task = self._loop.create_task(self._answer_executions(cell, request))
        elif type(request) is BalancesQuery:
            task = self._loop.create_task(self._answer_balances(cell, client, client.submitted, request))
        else:
            assert type(request) is OrderStatusQuery or type(request) is OpenOrdersQuery
            task = self._loop.create_task(self._answer_orders(cell, client, client.submitted, request))
        self._closers.add(task)
        task.add_done_callback(self._closers.discard)

    def grant(self, account: str, client: Client) -> None:
        """The faucet's Grant for an account not granted yet, on the first instrument's stream. The
        appender keeps submission order, so the connection's later orders land after it; the core
        grants once per account ever, so a grant this process forgot and sends again is harmless."""
        if not self.faucet or account in self.granted:
            return
        entry = stream.encode(Grant(account, self.faucet), time.time_ns(), self.scales)
        symbol = next(iter(self.instruments))
        client.submit(symbol, entry, FaucetGrant(self, account, client, symbol))

    def remember_grant(self, account: str) -> None:
        granted = self.granted
        granted[account] = None
        if len(granted) > MAX_GRANTED_MEMO:
            granted.popitem(last=False)

    def _admit(self, symbol: str) -> bool:
        """Room for one more new order of the symbol (else OVERLOADED); if so it counts in the lag."""
        lag = self.lag.get(symbol, 0)
        if lag > self.max_lag or self.appender.backlog >= self.max_backlog:
            return False
        # Counted when admitted, not when appended: a burst meets the bound where single orders do.
        self._set_lag(symbol, lag + 1)
        self.admitted[symbol] += 1
        return True

    def _on_seed(self, client: Client, msg: validation.Message, recv_ns: int) -> None:
        """A seed order (services.gateway.seed): the normal new order's path, answered in the seed's
        words. The connection is never registered under the order's account: a seed client reads
        only its order's answer, so the protocol's execution reports are not sent to it."""
        result = seed.handle(client.session, msg, self.seed_symbol, time.monotonic())
        symbol = self.seed_symbol if self.seed_symbol in self.instruments else "unknown"
        if type(result) is dict:
            self.count_reject(result, symbol, seed.label(msg))
            client.push(seed.rejected(result))
            return
        cmd: NewOrder = result  # type: ignore[assignment]
        client.seed = True
        symbol = cmd.symbol
        if not self._admit(symbol):
            reply = validation.reject(codes.OVERLOADED, validation.NEW)
            self.count_reject(reply, symbol, cmd.type)
            client.push(seed.rejected(reply))
            return
        self.grant(cmd.account, client)  # the seed has no login: the faucet funds its first order's account
        pending = SeedPendingOrder(client, cmd, validation.NEW, cmd.type, recv_ns)
        client.cells.append(pending)
        client.submit(symbol, stream.encode(cmd, recv_ns), pending)

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
            log.info("connection from %s authenticated as %s", _address(client.ws), account)

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

    # Execution reports ------------------------------------------------------------------------
    def deliver(self, payload: bytes) -> int:
        """Route one exec payload that carries no exec ids; returns its publish time (ns, 0 if unknown)."""
        published_ns, lines = unframe(payload)
        for line in lines:
            if line:
                self.push_exec(line)
        return published_ns

    def push_exec(self, line: bytes) -> None:
        """One exec line `<account> <json>` to every connection of that account on this instance."""
        account, body = split_exec_line(line)
        clients = self.by_account.get(account)
        if clients:
            for client in clients:
                client.push(body)

    async def _answer_executions(self, cell: PendingReply, query: ExecutionsQuery) -> None:
        try:
            cell.done(await executions.answer(self.exec_router.log, query))
        except (RedisError, OSError) as exc:
            REDIS_ERRORS.labels("execlog").inc()
            reply = validation.reject(codes.INTERNAL_ERROR, validation.EXECUTIONS, None, f"Redis: {exc}")
            cell.done(orjson.dumps(reply))

    async def _caught_up(self, client: Client, submitted: int, symbols: Iterable[str] | None) -> str | None:
        """Wait until the matcher committed what this connection appended (on these symbols; None:
        all) before the query: read your writes. None, or the reason it did not in time."""
        await client.appends_answered(submitted)
        appended = dict(client.appended)
        for symbol in appended if symbols is None else symbols:
            entry = appended.get(symbol)
            if entry is not None and not await orders.caught_up(self.redis, symbol, entry_to_seq(entry)):
                return f"the matcher has not applied {symbol} up to {entry} yet; retry"
        return None

    async def _answer_orders(
        self, cell: PendingReply, client: Client, submitted: int, query: OrderStatusQuery | OpenOrdersQuery
    ) -> None:
        """From the order read model (services.gateway.orders), once it holds what this connection
        appended."""
        op = validation.ORDER_STATUS if type(query) is OrderStatusQuery else validation.OPEN_ORDERS
        try:
            symbols = (query.symbol,) if type(query) is OrderStatusQuery else query.symbols  # type: ignore[union-attr]
            late = await self._caught_up(client, submitted, symbols)
            if late is not None:
                cell.done(orjson.dumps(validation.reject(codes.OVERLOADED, op, None, late)))
            elif type(query) is OrderStatusQuery:
                found = await orders.order_status(
                    self.redis, query.symbol, query.account, query.order_id, query.client_order_id
                )
                if isinstance(found, str):
                    reply = validation.reject(found, op, query.client_order_id)
                    reply["order_id"] = query.order_id
                    cell.done(orjson.dumps(reply))
                else:
                    cell.done(found)
            else:
                cell.done(await orders.open_orders(self.redis, symbols, query.account))
        except (RedisError, OSError) as exc:
            REDIS_ERRORS.labels("orders").inc()
            cell.done(orjson.dumps(validation.reject(codes.INTERNAL_ERROR, op, None, f"Redis: {exc}")))

    async def _answer_balances(
        self, cell: PendingReply, client: Client, submitted: int, query: BalancesQuery
    ) -> None:
        """HGETALL of the matcher's read model, written in the commit that publishes each balance
        line: the answer is never older than a balance message this connection already got, nor than
        a deposit or order it was acked."""
        try:
            late = await self._caught_up(client, submitted, None)
            if late is not None:
                cell.done(orjson.dumps(validation.reject(codes.OVERLOADED, validation.BALANCES, None, late)))
                return
            stored = await self.redis.hgetall(keys.balances(query.account))
            cell.done(orjson.dumps(validation.balances_reply(query.account, stored, self.scales)))
        except (RedisError, OSError) as exc:
            REDIS_ERRORS.labels("balances").inc()
            cell.done(
                orjson.dumps(
                    validation.reject(codes.INTERNAL_ERROR, validation.BALANCES, None, f"Redis: {exc}")
                )
            )
        except ValueError as exc:  # a value the matcher did not write
            log.error("malformed balance of %s in Redis: %s", query.account, exc)
            reply = validation.reject(
                codes.INTERNAL_ERROR, validation.BALANCES, None, "malformed balance record"
            )
            cell.done(orjson.dumps(reply))

    # Cancel on disconnect and the dead man's switch (services.gateway.safety) -------------------
    def _lease(self, client: Client, reply: Mapping[str, Any]) -> bool:
        """After a login: lease the connection if it asked for cancel on disconnect (then the reply
        waits for the lease to be in Redis: True), else end the lease of an earlier login."""
        account = reply.get("account")
        if account is None or not reply.get(validation.CANCEL_ON_DISCONNECT):
            self.safety.release(client)
            return False
        cell = PendingReply(client)
        client.cells.append(cell)
        self._background(self._answer_lease(client, cell, account, orjson.dumps(reply)))
        return True

    async def _answer_lease(self, client: Client, cell: PendingReply, account: str, reply: bytes) -> None:
        try:
            await self.safety.register(client, account)
        except (RedisError, OSError) as exc:
            # Fail closed: a client that asked for the guarantee must not trade without it.
            REDIS_ERRORS.labels("safety").inc()
            cell.done(orjson.dumps(validation.reject(codes.INTERNAL_ERROR, "auth", None, f"Redis: {exc}")))
            self.safety.release(client)
            client.close(wsserver.INTERNAL_ERROR, "cancel on disconnect unavailable")
            return
        cell.done(reply)

    def _arm(self, client: Client, request: validation.DeadManRequest) -> None:
        cell = PendingReply(client)
        client.cells.append(cell)
        self._background(self._answer_arm(cell, request))

    async def _answer_arm(self, cell: PendingReply, request: validation.DeadManRequest) -> None:
        try:
            deadline = await self.safety.arm(request.account, request.timeout_ms)
        except (RedisError, OSError) as exc:
            REDIS_ERRORS.labels("safety").inc()
            reply = validation.reject(
                codes.INTERNAL_ERROR, validation.CANCEL_ALL_AFTER, None, f"Redis: {exc}"
            )
            cell.done(orjson.dumps(reply))
            return
        cell.done(orjson.dumps({"type": validation.CANCEL_ALL_AFTER, "deadline": deadline}))

    def _background(self, job: Coroutine[Any, Any, None]) -> None:
        task = self._loop.create_task(job)
        self._closers.add(task)
        task.add_done_callback(self._closers.discard)

    # Backpressure -----------------------------------------------------------------------------
    async def _watch_lag(self) -> None:
        """Matcher lag per symbol = appended counter - applied (progress hash), every 50 ms."""
        symbols = list(self.instruments)
        failing = False
        polls = 0
        while True:
            try:
                pipe = self.redis.pipeline(transaction=False)
                for s in symbols:
                    pipe.get(keys.appended(s))
                    pipe.hget(keys.progress(s), "applied")
                before = dict(self.admitted)
                values = await pipe.execute()
                REDIS_ROUNDTRIPS.labels("lag").inc()
                for i, s in enumerate(symbols):
                    # Orders admitted while the poll was on its way are not in its answer yet: without
                    # them a burst could pass the bound by as many orders as one round trip admits.
                    since = self.admitted[s] - before[s]
                    self._set_lag(s, int(values[2 * i] or 0) - int(values[2 * i + 1] or 0) + since)
                if failing:
                    log.info("matcher lag readable again")
                failing = False
                self.redis_problem = None
                self.lag_read = True
                if polls % LEASE_POLL_EVERY == 0:
                    await self._read_leases(symbols)
                polls += 1
            except (RedisError, OSError, ValueError) as exc:
                REDIS_ERRORS.labels("lag").inc()
                if not failing:  # log the first failure of a streak only
                    log.warning("cannot read the matcher lag: %s", exc)
                failing = True
                self.redis_problem = f"{type(exc).__name__}: {exc}"
                polls = 0  # read the leases again as soon as Redis answers
            self.publish_counts()
            await asyncio.sleep(LAG_POLL_SECONDS)

    async def _read_leases(self, symbols: list[str]) -> None:
        """Which symbols a matcher holds the lease of (it renews it while alive), for health."""
        try:
            pipe = self.redis.pipeline(transaction=False)  # one GET per key: each symbol has its slot
            for s in symbols:
                pipe.get(keys.matcher_lease(s))
            held = await pipe.execute()
        except NoPermissionError:  # an ACL file from before this check: no matcher check, say so once
            if self.no_matcher:
                log.warning("the gateway's Redis user may not read matcher leases: health ignores them")
            self.no_matcher = []
            return
        self.no_matcher = [s for s, value in zip(symbols, held, strict=True) if value is None]

    # Health -----------------------------------------------------------------------------------
    def problem(self) -> str | None:
        """Why orders cannot flow now: the reason /healthz gives with its 503."""
        if self.redis_problem is not None:
            return f"Redis unreachable: {self.redis_problem}"
        if self.no_matcher:  # never started, or died and no standby took over: orders would not be matched
            return f"matcher unreachable: no matcher holds the lease of {', '.join(self.no_matcher)}"
        behind = sorted(self.overloaded)
        if behind:
            lags = ", ".join(f"{s} {self.lag.get(s, 0)}" for s in behind)
            return f"matcher behind by more than {self.max_lag} entries: {lags}"
        return None

    def unready(self) -> str | None:
        """/readyz: the problems, or what the gateway still waits for before it is worth a client."""
        problem = self.problem()
        if problem is not None:
            return problem
        if not self.lag_read:
            return "starting: the matcher lag has not been read from Redis yet"
        if not self.exec_subscribed.is_set():
            return "execution reports not subscribed yet"
        return None

    def _health_request(self, request: wsserver.Request) -> wsserver.HttpResponse | None:
        return _health(request, self)

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
    if msg is None:
        return None, None
    op = msg.get("op")
    # A JSON object or array as "op" is unhashable: test the type before the set lookup.
    if type(op) is not str or op not in validation.ORDER_OPS:
        return None, None
    symbol = msg.get("symbol")
    if op != validation.NEW:
        label = op
    else:
        otype = msg.get("type", "limit")
        # The ioc / fok shorthands are limit orders, as accepted ones are counted.
        label = _ORDER_TYPES.get(otype, "invalid") if type(otype) is str else "invalid"
    return (symbol if type(symbol) is str and symbol in instruments else "unknown"), label


def _health(request: wsserver.Request, source: metrics.HealthSource) -> wsserver.HttpResponse | None:
    """Plain HTTP GET /healthz and /readyz: 200, or 503 with the reason (load balancers, compose)."""
    if "Upgrade" in request.headers:
        return None
    answer = metrics.HEALTH.answer(request.path, source)
    if answer is None:
        return None
    status, body = answer
    return wsserver.HttpResponse(status, body.encode())


def _address(ws: wsserver.Connection) -> str:
    """host:port of the peer, for log lines."""
    peer = ws.remote_address
    return f"{peer[0]}:{peer[1]}" if peer else "?"


# Entry point ------------------------------------------------------------------------------------
async def _serve(
    args: argparse.Namespace,
    instruments: dict[str, Instrument],
    auth: Authenticator,
    faucet: list[tuple[str, int]],
    metrics_port: int,
) -> None:
    gateway = Gateway(
        instruments,
        args.redis_url,
        auth,
        max_lag=args.max_lag,
        rate_limit=args.rate_limit,
        max_frame=args.max_frame,
        policy=wsguard.Policy.from_args(args),
        auth_timeout=args.auth_timeout,
        seed_symbol=args.seed_symbol,
        risk=args.risk == "on",
        faucet=faucet,
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


def _faucet(
    spec: str | None, instruments: Mapping[str, Instrument], open_mode: bool
) -> list[tuple[str, int]]:
    """--faucet: given, it must name traded assets; not given, the default in open mode (its assets
    that no instrument trades left out), none with API keys."""
    scales = asset_scales(instruments.values())
    if spec is not None:
        return validation.parse_faucet(spec, scales)
    return validation.parse_faucet(validation.DEFAULT_FAUCET, scales, strict=False) if open_mode else []


def run(args: argparse.Namespace) -> int:
    """`cme gateway`: serve until SIGTERM / SIGINT, then exit 0."""
    logs.from_args("gateway", args)
    try:
        instruments = load_instruments(args.instruments)
        auth = Authenticator(
            load_api_keys(args.api_keys) if args.api_keys else None,
            load_api_keys(args.admin_keys) if args.admin_keys else None,
        )
        faucet = _faucet(args.faucet, instruments, auth.open_mode)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.error("bad configuration: %s", exc)
        return 2
    metrics_port = metrics.serve("gateway", args.metrics_port, args.instance, args.metrics_host)
    aio.run(_serve(args, instruments, auth, faucet, metrics_port))
    return 0
