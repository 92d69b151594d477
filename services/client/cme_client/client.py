"""`Client`: the exchange's asyncio Python client. See docs/client.md for a tour.

One gateway connection carries the account's requests and its execution reports. The gateway
answers each connection's messages in the order they came (an ack waits for the order's durable
append, and later answers wait behind it), so answers are matched to requests first in, first out;
execution reports and the matcher's own rejects (both carry an exec_id) are not answers and go to
`execution_reports()`.

When the gateway connection drops, the client reconnects with exponential backoff, logs in again and
asks the gateway for every report it missed (`executions` from the last exec_id it saw on each
symbol), holding back live reports until that is done: each report reaches the iterator exactly
once, in exec_id order per symbol. Requests in flight when the connection dropped raise
`Disconnected`; their outcome shows in the reports that follow the reconnect.

Market data and trades each get their own connection per stream (`l2(symbol)`, `trades(symbol)`),
reconnected the same way; the L2 stream resubscribes on a sequence gap and rebuilds from the fresh
snapshot.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import ssl
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import AsyncIterator, Mapping
from decimal import Decimal
from typing import Any, Generic, Literal, Self, TypeVar

import orjson

from .book import L2Book
from .errors import ClientError, Disconnected, ProtocolError, Rejected
from .transport import WebSocket

Message = dict[str, Any]
Number = str | int | Decimal  # never float: money is exact
Side = Literal["buy", "sell"]
OrderType = Literal["limit", "market", "ioc", "fok", "stop_limit", "stop_market"]
TimeInForce = Literal["gtc", "ioc", "fok", "gtd"]
SelfTradePrevention = Literal["cancel_taker", "cancel_maker", "cancel_both"]

_ANSWERS = frozenset(
    (
        "authenticated",
        "ack",
        "reject",
        "pong",
        "executions",
        "balances",
        "order",
        "open_orders",
        "cancel_all_after",
    )
)
_BALANCE_MESSAGES = frozenset(("balance", "funded"))  # pushed by the venue, like execution reports
_FIRST_BACKOFF = 0.05
T = TypeVar("T")


def decimal_text(value: Number) -> str:
    """A price or quantity as the wire's decimal string. Floats are refused: 0.1 + 0.2 is not 0.3."""
    if isinstance(value, bool) or not isinstance(value, str | int | Decimal):
        raise TypeError(f"prices and quantities are str, int or Decimal, not {type(value).__name__}")
    if isinstance(value, Decimal):
        return format(value, "f")
    return str(value)


def _backoff(delay: float, cap: float) -> tuple[float, float]:
    """(this wait, the next delay): doubling up to cap, with jitter so that many clients of one
    restarted gateway do not come back in lockstep."""
    return delay * (0.5 + random.random()), min(cap, delay * 2)


class _End:
    """The end of a stream: a clean close (error None) or a permanent failure."""

    def __init__(self, error: BaseException | None = None) -> None:
        self.error = error


class Client:
    """An account's session on the exchange.

    >>> async with Client("ws://127.0.0.1:8000", account="alice") as client:
    ...     ack = await client.place("BTC-USDT", "buy", "0.5", price="30000.00")

    `account` logs in in open mode; `api_key` when the venue has API keys; `admin_key` as the
    venue's operator (funding and balances of any account, no orders). `cancel_on_disconnect`: the
    venue cancels all the account's open orders when this connection ends. `md_url` and
    `trades_url` are the feeds, needed only for `l2()` and `trades()`. With `reconnect` (the
    default) a dropped gateway connection is reopened and missed reports are fetched; `resume_from`
    ({symbol: exec_id}, e.g. a saved `last_exec_ids`) resumes after this process's own restart.
    `timeout` bounds each request's wait for its answer and each connection attempt.
    """

    def __init__(
        self,
        gateway_url: str,
        md_url: str | None = None,
        trades_url: str | None = None,
        *,
        account: str | None = None,
        api_key: str | None = None,
        admin_key: str | None = None,
        cancel_on_disconnect: bool = False,
        reconnect: bool = True,
        resume_from: Mapping[str, int] | None = None,
        timeout: float = 10.0,
        max_backoff: float = 5.0,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        if sum(x is not None for x in (account, api_key, admin_key)) != 1:
            raise ValueError("give exactly one of account (open mode), api_key and admin_key")
        self.gateway_url, self.md_url, self.trades_url = gateway_url, md_url, trades_url
        self.account: str | None = account  # the gateway's word once logged in
        if admin_key is not None:
            self._auth: Message = {"op": "auth", "admin_key": admin_key}
        elif api_key is not None:
            self._auth = {"op": "auth", "api_key": api_key}
        else:
            self._auth = {"op": "auth", "account": account}
        if cancel_on_disconnect:
            self._auth["cancel_on_disconnect"] = True
        self.reconnect = reconnect
        self.timeout = timeout
        self.max_backoff = max_backoff
        self.ssl_context = ssl_context
        self.reconnects = 0  # successful reconnects so far
        self._ws: WebSocket | None = None
        self._pending: deque[asyncio.Future[Message]] = deque()
        self._ready = asyncio.Event()
        self._closing = False
        self._failed: BaseException | None = None
        self._reconnect_task: asyncio.Task[None] | None = None
        self._reports: asyncio.Queue[Message | _End] = asyncio.Queue()
        self._balances: asyncio.Queue[Message | _End] = asyncio.Queue()
        self._last: dict[str, int] = dict(resume_from or {})  # symbol -> last exec_id delivered
        self._resume_first = bool(resume_from)
        # Symbols this session placed orders on before seeing any report there, with those orders'
        # client order ids: a resume on such a symbol must not replay the account's older history.
        self._own: dict[str, set[str]] = {}
        self._held: list[Message] | None = None  # live reports held back while a resume runs
        self._cid_prefix = f"cme-{os.urandom(4).hex()}-"
        self._cid_n = 0
        self._streams: set[_FeedStream[Any]] = set()

    # Lifecycle --------------------------------------------------------------------------------
    async def connect(self) -> Client:
        """Connect and log in (and resume, with `resume_from`). Rejected if the login is refused."""
        if self._ws is not None:
            return self
        if self._resume_first:
            self._held = []
        await self._open()
        if self._resume_first:
            await self._resume()
        self._ready.set()
        return self

    async def close(self) -> None:
        """Close every connection; iterators end, requests still waiting raise Disconnected."""
        self._closing = True
        if self._reconnect_task is not None:
            self._reconnect_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reconnect_task
        for stream in list(self._streams):
            await stream.aclose()
        ws, self._ws = self._ws, None
        if ws is not None:
            await ws.close()
        self._fail_pending(Disconnected("the client was closed"))
        self._reports.put_nowait(_End())
        self._balances.put_nowait(_End())
        self._ready.set()  # wakes waiters, which then see _closing

    async def __aenter__(self) -> Client:
        return await self.connect()

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    @property
    def connected(self) -> bool:
        return self._ready.is_set() and self._ws is not None and not self._closing

    @property
    def last_exec_ids(self) -> dict[str, int]:
        """{symbol: last exec_id delivered}: save it to resume after a restart (`resume_from`)."""
        return dict(self._last)

    # Orders -----------------------------------------------------------------------------------
    async def place(
        self,
        symbol: str,
        side: Side,
        quantity: Number | None,
        price: Number | None = None,
        *,
        type: OrderType | None = None,
        tif: TimeInForce | None = None,
        post_only: bool | None = None,
        stp: SelfTradePrevention | None = None,
        client_order_id: str | None = None,
        stop_price: Number | None = None,
        expire_time: int | None = None,
        display_quantity: Number | None = None,
        quote_quantity: Number | None = None,
    ) -> Message:
        """Place an order; returns the ack once the order is durably queued, or raises Rejected.

        `type` defaults to limit when a price is given, else market; `tif` to the venue's default
        (gtc for limit, ioc for market). Without `client_order_id` one is generated (the ack and
        every report carry it). What happens next arrives in `execution_reports()`. The other order
        types: `type="stop_limit"` / `"stop_market"` with `stop_price`; `tif="gtd"` with `expire_time`
        (ms since the epoch); an iceberg with `display_quantity`; a market order by `quote_quantity`
        (pass quantity=None)."""
        cid = client_order_id if client_order_id is not None else self._next_cid()
        msg: Message = {"op": "new", "symbol": symbol, "side": side}
        msg["type"] = type or ("limit" if price is not None else "market")
        if tif is not None:
            msg["tif"] = tif
        if price is not None:
            msg["price"] = decimal_text(price)
        if quantity is not None:
            msg["quantity"] = decimal_text(quantity)
        if stop_price is not None:
            msg["stop_price"] = decimal_text(stop_price)
        if expire_time is not None:
            msg["expire_time"] = expire_time
        if display_quantity is not None:
            msg["display_quantity"] = decimal_text(display_quantity)
        if quote_quantity is not None:
            msg["quote_quantity"] = decimal_text(quote_quantity)
        if post_only is not None:
            msg["post_only"] = post_only
        if stp is not None:
            msg["stp"] = stp
        msg["client_order_id"] = cid
        if symbol not in self._last:
            self._own.setdefault(symbol, set()).add(cid)
        return await self._order_request(msg)

    async def cancel(
        self, symbol: str, order_id: str | None = None, *, client_order_id: str | None = None
    ) -> Message:
        """Ask to cancel an open order (by order_id or client_order_id); returns the ack. The result is
        a `cancelled` execution report, or the matcher's UNKNOWN_ORDER reject, in execution_reports()."""
        return await self._order_request(
            {"op": "cancel", "symbol": symbol, **_target(order_id, client_order_id)}
        )

    async def amend(
        self,
        symbol: str,
        order_id: str | None = None,
        *,
        client_order_id: str | None = None,
        price: Number | None = None,
        quantity: Number | None = None,
    ) -> Message:
        """Change an open order's price and/or total quantity; returns the ack. The result is an
        `amended` report, or the matcher's reject (WOULD_TAKE, INVALID_QUANTITY), in the reports."""
        msg: Message = {"op": "amend", "symbol": symbol, **_target(order_id, client_order_id)}
        if price is not None:
            msg["price"] = decimal_text(price)
        if quantity is not None:
            msg["quantity"] = decimal_text(quantity)
        return await self._order_request(msg)

    async def cancel_all(self, symbol: str | None = None) -> Message:
        """Cancel every open order of the account (on `symbol`, or everywhere); returns the ack. Each
        order's `cancelled` report (reason `user`) follows in execution_reports()."""
        msg: Message = {"op": "cancel_all"}
        if symbol is not None:
            msg["symbol"] = symbol
        return await self._order_request(msg)

    async def cancel_all_after(self, timeout_ms: int) -> int:
        """Arm (or renew) the dead man's switch: unless called again within `timeout_ms`, the venue
        cancels all the account's open orders. 0 turns it off. Returns the deadline (ms, 0: off)."""
        answer = await self._answer({"op": "cancel_all_after", "timeout_ms": timeout_ms}, "cancel_all_after")
        return int(answer["deadline"])

    async def order_status(
        self, symbol: str, order_id: str | None = None, *, client_order_id: str | None = None
    ) -> Message:
        """An open order, or one closed recently, of the account; raises Rejected (UNKNOWN_ORDER)."""
        return await self._answer(
            {"op": "order_status", "symbol": symbol, **_target(order_id, client_order_id)}, "order"
        )

    async def open_orders(self, symbol: str | None = None, *, account: str | None = None) -> list[Message]:
        """The account's open orders (on `symbol`, or everywhere), oldest first (an admin names one)."""
        msg: Message = {"op": "open_orders"}
        if symbol is not None:
            msg["symbol"] = symbol
        if account is not None:
            msg["account"] = account
        answer = await self._answer(msg, "open_orders")
        return list(answer["orders"])

    async def balances(self, account: str | None = None) -> dict[str, dict[str, Decimal]]:
        """{asset: {"available": Decimal, "held": Decimal}} of this account (an admin names one)."""
        msg: Message = {"op": "balances"}
        if account is not None:
            msg["account"] = account
        answer = await self._answer(msg, "balances")
        return {
            asset: {k: Decimal(v) for k, v in amounts.items()}
            for asset, amounts in answer["balances"].items()
        }

    async def deposit(
        self, asset: str, amount: Number, *, account: str | None = None, request_id: str | None = None
    ) -> Message:
        """Credit the account (an admin names it); returns the ack. The new balance follows as a
        `balance` message in balance_updates()."""
        return await self._order_request(_funding("deposit", asset, amount, account, request_id))

    async def withdraw(
        self, asset: str, amount: Number, *, account: str | None = None, request_id: str | None = None
    ) -> Message:
        """Debit the account; returns the ack. Refused beyond `available`: a `reject` with code
        INSUFFICIENT_FUNDS follows in balance_updates()."""
        return await self._order_request(_funding("withdraw", asset, amount, account, request_id))

    async def executions(self, symbol: str, after: int = 0, *, limit: int | None = None) -> list[Message]:
        """Every report of the account on `symbol` with exec_id > after, in order (all pages)."""
        return await self._fetch(symbol, after, limit, await self._wait_ready())

    async def ping(self) -> float:
        """Round-trip time to the gateway, in seconds."""
        t0 = time.perf_counter()
        await self._request({"op": "ping", "id": 1})
        return time.perf_counter() - t0

    # Streams ----------------------------------------------------------------------------------
    async def execution_reports(self) -> AsyncIterator[Message]:
        """Every execution report and matcher reject of the account, exactly once, from the
        moment the client connected (reports are buffered until read). One consumer at a time.
        Ends when the client is closed; raises Disconnected if it cannot reconnect."""
        while True:
            item = await self._reports.get()
            if isinstance(item, _End):
                self._reports.put_nowait(item)  # a later iterator ends too
                if item.error is not None:
                    raise Disconnected(f"the gateway connection is gone: {item.error}") from item.error
                return
            yield item

    async def balance_updates(self) -> AsyncIterator[Message]:
        """Every `balance` and `funded` message of the account (and the rejects of its withdrawals),
        from the moment the client connected. One consumer at a time; ends when the client is closed."""
        while True:
            item = await self._balances.get()
            if isinstance(item, _End):
                self._balances.put_nowait(item)
                return
            yield item

    def l2(self, symbol: str) -> L2Stream:
        """An async iterator that yields the local L2Book of `symbol` after each change."""
        stream = L2Stream(self._feed_url(self.md_url, "md_url"), symbol, self)
        self._streams.add(stream)
        return stream

    def trades(self, symbol: str) -> TradeStream:
        """An async iterator of `symbol`'s trades from now on, each once (by trade_id)."""
        stream = TradeStream(self._feed_url(self.trades_url, "trades_url"), symbol, self)
        self._streams.add(stream)
        return stream

    def candles(self, symbol: str, interval: str = "1m") -> CandleStream:
        """An async iterator of `symbol`'s candles of `interval` (1m, 5m, 15m, 1h, 1d): first every bar
        of the feed's candles_snapshot, oldest first, then each update of the current bar (and its
        final "closed": true). After a reconnect the new snapshot's bars come again: use open_time."""
        stream = CandleStream(self._feed_url(self.md_url, "md_url"), symbol, self, interval)
        self._streams.add(stream)
        return stream

    def _feed_url(self, url: str | None, name: str) -> str:
        if url is None:
            raise ValueError(f"this Client was made without {name}")
        return url

    # The gateway connection -------------------------------------------------------------------
    def _next_cid(self) -> str:
        self._cid_n += 1
        return f"{self._cid_prefix}{self._cid_n}"

    async def _order_request(self, msg: Message) -> Message:
        answer = await self._answer(msg, "ack")
        if answer.get("op") != msg["op"]:
            raise ProtocolError(f"{msg['op']} answered with {answer}")
        return answer

    async def _answer(self, msg: Message, kind: str) -> Message:
        answer = await self._request(msg)
        if answer.get("type") == "reject":
            raise Rejected(answer)
        if answer.get("type") != kind:
            raise ProtocolError(f"{msg['op']} answered with {answer}")
        return answer

    async def _request(self, msg: Message) -> Message:
        return await self._raw_request(msg, await self._wait_ready())

    async def _wait_ready(self) -> WebSocket:
        task = self._reconnect_task
        if not self._ready.is_set() and task is not None and not task.done():
            await asyncio.wait_for(self._ready.wait(), self.timeout)  # a reconnect in progress
        if self._failed is not None:
            raise Disconnected(f"the gateway connection is gone: {self._failed}") from self._failed
        if self._closing or self._ws is None or not self._ready.is_set():
            raise Disconnected("not connected")
        return self._ws

    async def _raw_request(self, msg: Message, ws: WebSocket) -> Message:
        fut: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        self._pending.append(fut)
        try:
            ws.send_text(orjson.dumps(msg))
        except ConnectionError as exc:
            with contextlib.suppress(ValueError):
                self._pending.remove(fut)
            raise Disconnected(str(exc)) from exc
        await ws.drain()
        return await asyncio.wait_for(fut, self.timeout)

    def _on_text(self, data: bytes | bytearray) -> None:
        m = orjson.loads(data)
        kind = m.get("type")
        if kind == "execution" or kind in _BALANCE_MESSAGES or (kind == "reject" and "exec_id" in m):
            if self._held is not None:
                self._held.append(m)
            else:
                self._deliver(m)
        elif kind in _ANSWERS and self._pending:
            fut = self._pending.popleft()  # a waiter that timed out still owns its answer's place
            if not fut.done():
                fut.set_result(m)

    def _deliver(self, m: Message) -> None:
        symbol, exec_id = m.get("symbol"), m.get("exec_id")
        if isinstance(symbol, str) and type(exec_id) is int:
            last = self._last.get(symbol)
            if last is not None and exec_id <= last:
                return  # already delivered (a resume overlaps the live reports)
            self._last[symbol] = exec_id
            self._own.pop(symbol, None)
        kind = m.get("type")
        if kind in _BALANCE_MESSAGES or (kind == "reject" and m.get("op") in _FUNDING_OPS):
            self._balances.put_nowait(m)
        else:
            self._reports.put_nowait(m)

    async def _open(self) -> None:
        ws = await WebSocket.connect(
            self.gateway_url, self._on_text, timeout=self.timeout, ssl_context=self.ssl_context
        )
        ws.on_close = lambda: self._on_lost(ws)
        self._ws = ws
        try:
            reply = await self._raw_request(self._auth, ws)
        except BaseException:
            ws.abort()
            raise
        if reply.get("type") != "authenticated":
            ws.abort()
            raise Rejected(reply)
        self.account = str(reply["account"]) if reply.get("account") is not None else None

    async def _resume(self) -> None:
        """Fetch what was missed on every symbol this session knows, then release the held reports."""
        ws = self._ws
        assert ws is not None and self._held is not None
        missed: list[Message] = []
        for symbol in sorted(self._last.keys() | self._own.keys()):
            last = self._last.get(symbol)
            reports = await self._fetch(symbol, last or 0, None, ws)
            if last is None:  # no report seen here yet: only this session's orders are "missed"
                own = self._own.get(symbol, set())
                reports = [r for r in reports if r.get("client_order_id") in own]
            missed.extend(reports)
        held, self._held = self._held, None
        for m in missed + held:
            self._deliver(m)

    async def _fetch(self, symbol: str, after: int, limit: int | None, ws: WebSocket) -> list[Message]:
        out: list[Message] = []
        while True:
            query: Message = {"op": "executions", "symbol": symbol, "after": after}
            if limit is not None:
                query["limit"] = limit
            answer = await self._raw_request(query, ws)
            if answer.get("type") != "executions":
                raise Rejected(answer)
            out.extend(answer["reports"])
            if not answer.get("more"):
                return out
            after = int(answer["next_after"])

    def _on_lost(self, ws: WebSocket) -> None:
        if ws is not self._ws:
            return
        was_ready = self._ready.is_set()
        self._ws = None
        self._ready.clear()
        self._fail_pending(Disconnected(f"gateway connection lost ({ws.close_code} {ws.close_reason})"))
        if self._closing or not was_ready:
            return  # a failed open or resume: whoever ran it handles the failure
        if self.reconnect:
            self._reconnect_task = asyncio.get_running_loop().create_task(self._reconnect_loop())
        else:
            self._fail(Disconnected(f"gateway connection lost ({ws.close_code} {ws.close_reason})"))

    async def _reconnect_loop(self) -> None:
        delay = _FIRST_BACKOFF
        while not self._closing:
            wait, delay = _backoff(delay, self.max_backoff)
            await asyncio.sleep(wait)
            self._held = []
            try:
                await self._open()
                await self._resume()
            except Rejected as exc:  # the login or the resume was refused: retrying cannot help
                self._fail(exc)
                return
            except (OSError, TimeoutError, ClientError):
                self._held = None
                ws, self._ws = self._ws, None
                if ws is not None:
                    ws.abort()
                continue
            self.reconnects += 1
            self._ready.set()
            return

    def _fail(self, exc: BaseException) -> None:
        self._failed = exc
        self._fail_pending(Disconnected(str(exc)))
        self._reports.put_nowait(_End(exc))
        self._ready.set()

    def _fail_pending(self, exc: Disconnected) -> None:
        pending, self._pending = self._pending, deque()
        for fut in pending:
            if not fut.done():
                fut.set_exception(exc)


_FUNDING_OPS = frozenset(("deposit", "withdraw", "faucet"))


def _funding(op: str, asset: str, amount: Number, account: str | None, request_id: str | None) -> Message:
    msg: Message = {"op": op, "asset": asset, "amount": decimal_text(amount)}
    if account is not None:
        msg["account"] = account
    if request_id is not None:
        msg["request_id"] = request_id
    return msg


def _target(order_id: str | None, client_order_id: str | None) -> Message:
    if (order_id is None) == (client_order_id is None):
        raise ValueError("give exactly one of order_id and client_order_id")
    return {"order_id": order_id} if order_id is not None else {"client_order_id": client_order_id}


# Feeds ----------------------------------------------------------------------------------------


class _Lost:
    """The feed connection dropped (a reconnect follows)."""


_LOST = _Lost()


class _FeedStream(ABC, Generic[T]):
    """One subscription on its own feed connection, reopened with backoff when it drops. The first
    connection's failure is raised to the consumer; later drops are retried until aclose()."""

    channel: str | None = None

    def __init__(self, url: str, symbol: str, client: Client) -> None:
        self.url, self.symbol, self._client = url, symbol, client
        self.reconnects = 0
        self._queue: asyncio.Queue[Message | _Lost | _End] = asyncio.Queue()
        self._ws: WebSocket | None = None
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._answered = asyncio.Event()  # the feed confirmed (or refused) the first subscription
        self._refusal: Message | None = None
        self._first_error: BaseException | None = None  # the first connection attempt's

    def __aiter__(self) -> _FeedStream[T]:
        return self

    async def start(self) -> Self:
        """Connect and subscribe now, and return once the feed has confirmed the subscription:
        what happens from here on will be yielded. (Iterating starts the stream too.) Raises what
        the first connection attempt raised, Rejected if the feed refused, or TimeoutError."""
        self._ensure_running()
        assert self._task is not None
        answered = asyncio.ensure_future(self._answered.wait())
        try:
            await asyncio.wait(
                {answered, self._task}, timeout=self._client.timeout, return_when="FIRST_COMPLETED"
            )
        finally:
            answered.cancel()
        if self._refusal is not None:
            raise Rejected(self._refusal)
        if self._answered.is_set():
            return self
        if self._first_error is not None:
            raise self._first_error
        raise TimeoutError(f"{self.url}: no answer to the subscription within {self._client.timeout} s")

    def _ensure_running(self) -> None:
        if self._task is None and not self._closing:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def __anext__(self) -> T:
        self._ensure_running()
        while True:
            item = await self._queue.get()
            if isinstance(item, _End):
                self._queue.put_nowait(item)
                if item.error is not None:
                    raise item.error
                raise StopAsyncIteration
            if isinstance(item, _Lost):
                self._on_lost()
                continue
            if item.get("type") == "reject":
                await self.aclose()
                raise Rejected(item)
            out = self._handle(item)
            if out is not None:
                return out

    @abstractmethod
    def _handle(self, msg: Message) -> T | None:
        """What the consumer gets for a message of the subscription, if anything."""

    def _on_lost(self) -> None:
        """Called in the consumer when the connection dropped, before the reconnect's messages."""

    def _subscribe_extra(self) -> Message:
        """More fields of the subscribe message (the candles' interval)."""
        return {}

    def _subscribe(self) -> None:
        msg: Message = {"op": "subscribe", "symbol": self.symbol}
        if self.channel is not None:
            msg["channel"] = self.channel
        msg.update(self._subscribe_extra())
        if self._ws is not None and self._ws.is_open:
            self._ws.send_text(orjson.dumps(msg))

    def _on_text(self, data: bytes | bytearray) -> None:
        m = orjson.loads(data)
        kind = m.get("type")
        if kind in ("subscribed", "reject") and not self._answered.is_set():
            self._refusal = m if kind == "reject" else None
            self._answered.set()
        if m.get("symbol") == self.symbol or kind == "reject":
            self._queue.put_nowait(m)

    async def _run(self) -> None:
        delay, connected_once = _FIRST_BACKOFF, False
        while not self._closing:
            try:
                ws = await WebSocket.connect(
                    self.url,
                    self._on_text,
                    timeout=self._client.timeout,
                    ssl_context=self._client.ssl_context,
                )
            except (OSError, TimeoutError) as exc:
                if not connected_once:
                    self._first_error = exc
                    self._queue.put_nowait(_End(exc))
                    return
                wait, delay = _backoff(delay, self._client.max_backoff)
                await asyncio.sleep(wait)
                continue
            if connected_once:
                self.reconnects += 1
            connected_once, delay = True, _FIRST_BACKOFF
            self._ws = ws
            self._subscribe()
            await asyncio.shield(ws.closed)
            self._ws = None
            if not self._closing:
                self._queue.put_nowait(_LOST)

    async def aclose(self) -> None:
        """Close the subscription's connection; the iterator ends."""
        self._closing = True
        self._client._streams.discard(self)
        task, self._task = self._task, None
        ws = self._ws
        if ws is not None:
            await ws.close()
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._queue.put_nowait(_End())


class L2Stream(_FeedStream[L2Book]):
    """Yields `book` (one L2Book, updated in place) after each snapshot or update applied.

    On a sequence gap or an update that does not fit, it resubscribes on the same connection (the
    feed answers with a fresh snapshot) and skips updates until that snapshot; `resyncs` counts
    those. After a dropped connection the new subscription's snapshot replaces the book."""

    channel = "l2"

    def __init__(self, url: str, symbol: str, client: Client) -> None:
        super().__init__(url, symbol, client)
        self.book = L2Book(symbol)
        self.resyncs = 0

    def _handle(self, msg: Message) -> L2Book | None:
        kind = msg.get("type")
        if kind == "l2_update" and not self.book.synced:
            return None  # sent before the snapshot we wait for
        if kind not in ("l2_snapshot", "l2_update"):
            return None
        try:
            self.book.apply(msg)
        except ProtocolError:
            self.resyncs += 1
            self.book.synced = False
            self._subscribe()
            return None
        return self.book

    def _on_lost(self) -> None:
        self.book.synced = False


class TradeStream(_FeedStream[Message]):
    """Yields trade messages in trade_id order; after a reconnect, trades already yielded are
    skipped (trades while disconnected are not replayed: the feed has no history yet)."""

    channel = None

    def __init__(self, url: str, symbol: str, client: Client) -> None:
        super().__init__(url, symbol, client)
        self.last_trade_id: int | None = None

    def _handle(self, msg: Message) -> Message | None:
        if msg.get("type") != "trade":
            return None
        trade_id = msg.get("trade_id")
        if type(trade_id) is int:
            if self.last_trade_id is not None and trade_id <= self.last_trade_id:
                return None
            self.last_trade_id = trade_id
        return msg


class CandleStream(_FeedStream[Message]):
    """Yields candle messages: the snapshot's bars, then live updates."""

    channel = "candles"

    def __init__(self, url: str, symbol: str, client: Client, interval: str) -> None:
        super().__init__(url, symbol, client)
        self.interval = interval
        self._pending: list[Message] = []

    def _subscribe_extra(self) -> Message:
        return {"interval": self.interval}

    async def __anext__(self) -> Message:
        if self._pending:  # the rest of a snapshot's bars, one per step
            return self._pending.pop(0)
        return await super().__anext__()

    def _handle(self, msg: Message) -> Message | None:
        if msg.get("interval") != self.interval:
            return None
        if msg.get("type") == "candles_snapshot":
            bars: list[Message] = list(msg.get("candles", []))
            if not bars:
                return None
            self._pending = bars[1:]
            return bars[0]
        return msg if msg.get("type") == "candle" else None
