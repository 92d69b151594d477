"""A small asyncio WebSocket client for the end-to-end tests, plus a seeded wire-level order flow.

`WsClient` records every message a connection receives, in order, from a background reader, so a
test sends something and then awaits "the first message at or after mark m that matches", without
racing the reader or losing what arrived in between. It also records how the server closed the
connection (code and reason), for the bad-input tests.

`L2Book` rebuilds a book from l2_snapshot + l2_update messages keeping the price and quantity strings
exactly as received, and refuses a sequence gap. `WireFlow` makes seeded random order messages as a
client writes them (decimal strings, client order ids, cancels and amends by client order id, so a
flow can be sent pipelined without waiting for acks).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Callable, Iterable
from decimal import Decimal
from typing import Any

import orjson
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from services.wsclient import is_type

Message = dict[str, Any]
Predicate = Callable[[Message], bool]

DEFAULT_TIMEOUT = 15.0  # generous: the machine running the suite may be loaded


class WsClient:
    """One WebSocket connection with a reader task that keeps every JSON message it receives."""

    def __init__(self, ws: ClientConnection, url: str) -> None:
        self.ws = ws
        self.url = url
        self.messages: list[Message] = []
        self.close_code: int | None = None
        self.close_reason: str | None = None
        self.closed = asyncio.Event()
        self._changed = asyncio.Event()
        self._reader = asyncio.create_task(self._read())

    @classmethod
    async def connect(cls, url: str, *, timeout: float = 10.0, retry_for: float = 0.0) -> WsClient:
        """Connect; with retry_for > 0 keep retrying refused connections that long (a restarting server)."""
        deadline = time.monotonic() + retry_for
        while True:
            try:
                ws = await connect(
                    url, open_timeout=timeout, compression=None, proxy=None, max_size=None, max_queue=None
                )
                return cls(ws, url)
            except (OSError, TimeoutError, InvalidHandshake):  # refused, or closed by a dying server
                if time.monotonic() >= deadline:
                    raise
                await asyncio.sleep(0.1)

    async def _read(self) -> None:
        try:
            async for raw in self.ws:
                msg = orjson.loads(raw)
                if not isinstance(msg, dict):  # never valid: kept so that a test sees it
                    msg = {"type": "<not an object>", "raw": raw}
                self.messages.append(msg)
                self._changed.set()
        except ConnectionClosed:
            pass
        finally:
            self.close_code = self.ws.close_code
            self.close_reason = self.ws.close_reason
            self.closed.set()
            self._changed.set()

    # Sending ----------------------------------------------------------------------------------
    async def send(self, msg: Message) -> None:
        await self.ws.send(orjson.dumps(msg).decode())

    async def send_raw(self, data: str | bytes) -> None:
        """A text frame (str) or a binary frame (bytes), exactly as given."""
        await self.ws.send(data)

    # Receiving --------------------------------------------------------------------------------
    def mark(self) -> int:
        """Index of the next message to arrive (pass it as `start` to ignore older ones)."""
        return len(self.messages)

    def since(self, start: int = 0, pred: Predicate | None = None) -> list[Message]:
        return [m for m in self.messages[start:] if pred is None or pred(m)]

    async def wait_for(self, pred: Predicate, timeout: float = DEFAULT_TIMEOUT, start: int = 0) -> Message:
        """The first message at index >= start that matches; AssertionError if none comes in time."""
        found = await self.wait_count(pred, 1, timeout, start)
        return found[0]

    async def wait_count(
        self, pred: Predicate, n: int, timeout: float = DEFAULT_TIMEOUT, start: int = 0
    ) -> list[Message]:
        """The first n matching messages at index >= start (waits until there are n)."""
        deadline = time.monotonic() + timeout
        while True:
            found = self.since(start, pred)
            if len(found) >= n:
                return found[:n]
            if self.closed.is_set():
                raise AssertionError(
                    f"{self.url} closed ({self.close_code} {self.close_reason!r}) with {len(found)} of "
                    f"{n} expected messages; last received: {self.messages[-5:]}"
                )
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(
                    f"{self.url}: {len(found)} of {n} expected messages within {timeout:.0f} s; "
                    f"last received: {self.messages[-5:]}"
                )
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), left)

    async def request(self, msg: Message, pred: Predicate, timeout: float = DEFAULT_TIMEOUT) -> Message:
        """Send msg and return the first later message that matches."""
        start = self.mark()
        await self.send(msg)
        return await self.wait_for(pred, timeout, start)

    async def wait_closed(self, timeout: float = DEFAULT_TIMEOUT) -> tuple[int | None, str | None]:
        await asyncio.wait_for(self.closed.wait(), timeout)
        return self.close_code, self.close_reason

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.ws.close(), 5)
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self._reader


def is_answer(msg: Message) -> Predicate:
    """An ack or reject of this order message's op (and client order id, when it has one). The
    gateway's own answer to a message always comes before anything the matcher says about it."""
    op, cid = msg.get("op"), msg.get("client_order_id")

    def pred(m: Message) -> bool:
        if m.get("type") not in ("ack", "reject") or m.get("op") != op:
            return False
        return cid is None or m.get("client_order_id") == cid

    return pred


# Sessions -------------------------------------------------------------------------------------
async def gateway_session(url: str, account: str, *, retry_for: float = 0.0) -> WsClient:
    conn = await WsClient.connect(url, retry_for=retry_for)
    reply = await conn.request(
        {"op": "auth", "account": account}, lambda m: m.get("type") in ("authenticated", "reject")
    )
    assert reply == {"type": "authenticated", "account": account}, reply
    return conn


async def place(conn: WsClient, msg: Message, timeout: float = DEFAULT_TIMEOUT) -> Message:
    """Send an order message (new, cancel or amend) and return the gateway's answer: its ack or its
    reject. One message at a time: the caller waits for it before sending the next."""
    start = conn.mark()
    await conn.send(msg)
    return await conn.wait_for(is_answer(msg), timeout, start)


async def subscribe(url: str, symbol: str, *, channel: str | None = None, retry_for: float = 0.0) -> WsClient:
    """A feed connection subscribed to one symbol (md: l2 by default; trades)."""
    conn = await WsClient.connect(url, retry_for=retry_for)
    msg: Message = {"op": "subscribe", "symbol": symbol}
    if channel is not None:
        msg["channel"] = channel
    reply = await conn.request(msg, lambda m: m.get("type") in ("subscribed", "reject"))
    assert reply.get("type") == "subscribed", reply
    return conn


async def l2_snapshot(md_url: str, symbol: str, *, retry_for: float = 0.0) -> Message:
    """A fresh l2_snapshot from a new subscription (subscribe, read the snapshot, close)."""
    conn = await subscribe(md_url, symbol, retry_for=retry_for)
    try:
        return await conn.wait_for(is_type("l2_snapshot", symbol=symbol))
    finally:
        await conn.close()


# Books ----------------------------------------------------------------------------------------
Levels = list[list[str]]


class L2Book:
    """One symbol's levels from l2_snapshot + l2_update messages, strings kept as received."""

    def __init__(self, snapshot: Message) -> None:
        self.symbol: str = snapshot["symbol"]
        self.seq = 0
        self.bids: dict[Decimal, list[str]] = {}
        self.asks: dict[Decimal, list[str]] = {}
        self.reset(snapshot)

    def reset(self, snapshot: Message) -> None:
        assert snapshot["type"] == "l2_snapshot" and snapshot["symbol"] == self.symbol, snapshot
        self.seq = int(snapshot["seq"])
        self.bids = {Decimal(p): [p, q] for p, q in snapshot["bids"]}
        self.asks = {Decimal(p): [p, q] for p, q in snapshot["asks"]}

    def apply(self, msg: Message) -> None:
        """Apply one l2 message of this symbol: an update must follow on by exactly one seq."""
        if msg.get("symbol") != self.symbol:
            return
        if msg["type"] == "l2_snapshot":
            self.reset(msg)
            return
        if msg["type"] != "l2_update":
            return
        seq = int(msg["seq"])
        assert seq == self.seq + 1, f"{self.symbol}: l2 seq {self.seq} -> {seq}"
        self.seq = seq
        for side, price, qty in msg["changes"]:
            levels = self.bids if side == "buy" else self.asks
            if Decimal(qty) == 0:
                assert Decimal(price) in levels, f"removing a level that is not there: {msg}"
                del levels[Decimal(price)]
            else:
                levels[Decimal(price)] = [price, qty]
        bbo = msg["bbo"]
        assert bbo["bid"] == self.best("buy") and bbo["ask"] == self.best("sell"), (msg, self.levels())

    def apply_all(self, messages: Iterable[Message]) -> None:
        for m in messages:
            self.apply(m)

    def best(self, side: str) -> list[str] | None:
        levels = self.bids if side == "buy" else self.asks
        if not levels:
            return None
        return levels[max(levels) if side == "buy" else min(levels)]

    def levels(self) -> tuple[Levels, Levels]:
        """(bids best first, asks best first) as [price, quantity] strings."""
        bids = [self.bids[p] for p in sorted(self.bids, reverse=True)]
        asks = [self.asks[p] for p in sorted(self.asks)]
        return bids, asks


def book_of(snapshot: Message) -> tuple[Levels, Levels]:
    return snapshot["bids"], snapshot["asks"]


# Flows ----------------------------------------------------------------------------------------
def price_text(ticks: int) -> str:
    """Ticks of 0.01 as the wire's decimal string."""
    return f"{ticks // 100}.{ticks % 100:02d}"


def qty_text(lots: int) -> str:
    """Lots of 0.00001 as the wire's decimal string."""
    return f"{lots // 100_000}.{lots % 100_000:05d}"


class WireFlow:
    """Seeded random order messages for several accounts around a mid price.

    Passive and crossing limits, market, IOC, FOK and post-only orders, cancels and amends of the
    account's own earlier resting orders by client order id (some already filled or cancelled by
    then: those get UNKNOWN_ORDER from the matcher, which is part of the flow). Every message carries
    a client order id unique within the flow."""

    def __init__(self, seed: int, symbols: tuple[str, ...], mid: int = 3_000_000, tag: str = "f") -> None:
        self.rng = random.Random(seed)
        self.symbols = symbols
        self.mid = mid
        self.tag = tag
        self.n = 0
        self.resting: dict[tuple[str, str], list[str]] = {}  # (account, symbol) -> cids sent as gtc

    def next(self, account: str) -> Message:
        rng = self.rng
        self.n += 1
        cid = f"{self.tag}{self.n}"
        symbol = rng.choice(self.symbols)
        side = rng.choice(("buy", "sell"))
        own = self.resting.setdefault((account, symbol), [])
        r = rng.random()
        base: Message = {"symbol": symbol, "side": side}
        if r < 0.55:
            price = self.mid + rng.randint(-12, 12)
            msg = {"op": "new", **base, "type": "limit", "price": price_text(price)}
            msg["quantity"] = qty_text(rng.randint(1, 400))
            if rng.random() < 0.1:
                msg["post_only"] = True
            own.append(cid)
        elif r < 0.63:
            msg = {"op": "new", **base, "type": "market", "quantity": qty_text(rng.randint(1, 600))}
        elif r < 0.71:
            price = self.mid + rng.randint(-4, 4)
            tif = rng.choice(("ioc", "fok"))
            msg = {"op": "new", **base, "type": "limit", "tif": tif, "price": price_text(price)}
            msg["quantity"] = qty_text(rng.randint(1, 600))
        elif r < 0.93 and own:
            target = own.pop(rng.randrange(len(own)))
            return {"op": "cancel", "symbol": symbol, "client_order_id": target}
        elif own:
            target = rng.choice(own)
            msg = {"op": "amend", "symbol": symbol, "client_order_id": target}
            if rng.random() < 0.5:
                msg["price"] = price_text(self.mid + rng.randint(-12, 12))
            msg["quantity"] = qty_text(rng.randint(1, 500))
            return msg
        else:
            msg = {"op": "new", **base, "type": "limit", "price": price_text(self.mid)}
            msg["quantity"] = qty_text(rng.randint(1, 100))
            own.append(cid)
        msg["client_order_id"] = cid
        return msg


class FlowClient:
    """One account's connection sending a share of a flow, pipelined (not waiting for acks), and
    keeping what it sent in order, for matching its acks afterwards."""

    def __init__(self, conn: WsClient, account: str) -> None:
        self.conn = conn
        self.account = account
        self.sent: list[Message] = []

    async def send(self, msg: Message) -> None:
        self.sent.append(msg)
        await self.conn.send(msg)

    def answers(self) -> list[Message]:
        """The gateway's direct answers (acks and gateway rejects), in order; one per message sent."""
        return [
            m
            for m in self.conn.messages
            if m.get("type") == "ack" or (m.get("type") == "reject" and "symbol" not in m)
        ]

    async def wait_answered(self, timeout: float = 30.0) -> list[tuple[Message, Message]]:
        """(message sent, its answer) pairs, once every sent message has its answer.

        The gateway answers each connection's messages in the order they came (the ack of an order
        waits for its append, and later answers wait behind it), so the n-th answer is the n-th
        message's. The pairing is checked by op and client order id."""
        deadline = time.monotonic() + timeout
        while len(self.answers()) < len(self.sent):
            if time.monotonic() > deadline or self.conn.closed.is_set():
                raise AssertionError(
                    f"{self.account}: {len(self.answers())} answers for {len(self.sent)} messages "
                    f"(closed: {self.conn.close_code} {self.conn.close_reason!r})"
                )
            await asyncio.sleep(0.05)
        pairs = list(zip(self.sent, self.answers(), strict=True))
        for sent, answer in pairs:
            assert answer.get("op") == sent["op"], (sent, answer)
            assert answer.get("client_order_id") == sent.get("client_order_id"), (sent, answer)
        return pairs
