"""A small asyncio WebSocket client for the demo, the e2e tests and tools: not used by the services.

`Conn` keeps every message a connection receives, in order, so a caller can send a request and then
await "the first message after mark m that matches", without racing a reader or losing what
arrived in between. `L2Book` rebuilds a price-level book from l2_snapshot + l2_update messages and
checks the per-symbol sequence (protocol: seq rises by exactly one per update).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import orjson
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

Message = dict[str, Any]
Predicate = Callable[[Message], bool]


class ProtocolError(RuntimeError):
    """The server answered something other than what the protocol promises."""


class Conn:
    """One WebSocket connection with a background reader that records every JSON message."""

    def __init__(self, ws: ClientConnection, url: str) -> None:
        self.ws = ws
        self.url = url
        self.messages: list[Message] = []
        self.closed_reason: str | None = None
        self._changed = asyncio.Event()
        self._reader = asyncio.create_task(self._read())

    @classmethod
    async def open(cls, url: str, *, timeout: float = 5.0, retry_for: float = 0.0) -> Conn:
        """Connect; with retry_for > 0, keep retrying refused connections that long (a restarting server)."""
        deadline = time.monotonic() + retry_for
        while True:
            try:
                # No compression: messages are small, and deflate costs more CPU than it saves on loopback.
                ws = await connect(url, open_timeout=timeout, compression=None, proxy=None, max_queue=None)
                return cls(ws, url)
            except (OSError, TimeoutError):
                if time.monotonic() >= deadline:
                    raise
                await asyncio.sleep(0.1)

    async def _read(self) -> None:
        try:
            async for raw in self.ws:
                msg = orjson.loads(raw)
                if isinstance(msg, dict):
                    self.messages.append(msg)
                    self._changed.set()
        except ConnectionClosed as exc:
            self.closed_reason = str(exc)
        except orjson.JSONDecodeError as exc:  # not the protocol: stop here rather than hang the waiters
            self.closed_reason = f"server sent a message that is not JSON: {exc}"
            await self.ws.close()
        finally:
            if self.closed_reason is None:
                self.closed_reason = "closed"
            self._changed.set()

    def mark(self) -> int:
        """Index of the next message to arrive: pass it to wait_for/since to ignore older ones."""
        return len(self.messages)

    def since(self, mark: int, pred: Predicate | None = None) -> list[Message]:
        return [m for m in self.messages[mark:] if pred is None or pred(m)]

    async def send(self, msg: Message) -> None:
        await self.ws.send(orjson.dumps(msg).decode())

    async def wait_for(self, pred: Predicate, timeout: float = 5.0, start: int = 0) -> Message:
        """The first message at index >= start that matches; TimeoutError if none in time."""
        deadline = time.monotonic() + timeout
        i = start
        while True:
            while i < len(self.messages):
                if pred(self.messages[i]):
                    return self.messages[i]
                i += 1
            if self.closed_reason is not None:
                raise ConnectionError(f"{self.url} closed ({self.closed_reason}) while waiting")
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no matching message from {self.url} within {timeout:.1f} s")
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), left)

    async def request(self, msg: Message, pred: Predicate, timeout: float = 5.0) -> Message:
        """Send msg and wait for the first later message that matches."""
        start = self.mark()
        await self.send(msg)
        return await self.wait_for(pred, timeout, start)

    async def close(self) -> None:
        await self.ws.close()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self._reader


# --- helpers for the protocol's sessions and feeds -----------------------------------------------


def is_type(kind: str, **fields: Any) -> Predicate:
    """A predicate: message type is `kind` and every given field equals its value."""

    def pred(m: Message) -> bool:
        return m.get("type") == kind and all(m.get(k) == v for k, v in fields.items())

    return pred


async def authenticate(conn: Conn, account: str, timeout: float = 5.0) -> None:
    reply = await conn.request(
        {"op": "auth", "account": account},
        lambda m: m.get("type") in ("authenticated", "reject"),
        timeout,
    )
    if reply["type"] != "authenticated":
        raise ProtocolError(f"auth as {account!r} refused: {reply}")


async def gateway_session(url: str, account: str, timeout: float = 5.0, retry_for: float = 0.0) -> Conn:
    conn = await Conn.open(url, timeout=timeout, retry_for=retry_for)
    try:
        await authenticate(conn, account, timeout)
    except BaseException:
        await conn.close()
        raise
    return conn


async def subscribe(
    url: str, symbol: str, channel: str | None = None, timeout: float = 5.0, retry_for: float = 0.0
) -> Conn:
    conn = await Conn.open(url, timeout=timeout, retry_for=retry_for)
    msg: Message = {"op": "subscribe", "symbol": symbol}
    if channel:
        msg["channel"] = channel
    await conn.send(msg)
    return conn


async def l2_snapshot(md_url: str, symbol: str, timeout: float = 10.0, retry_for: float = 0.0) -> Message:
    """A fresh l2_snapshot of one symbol from the market-data feed (subscribe, read, close)."""
    conn = await subscribe(md_url, symbol, timeout=timeout, retry_for=retry_for)
    try:
        return await conn.wait_for(is_type("l2_snapshot", symbol=symbol), timeout)
    finally:
        await conn.close()


class L2Book:
    """Price levels of one symbol from an l2_snapshot and the l2_updates after it."""

    def __init__(self, snapshot: Message) -> None:
        self.symbol: str = snapshot["symbol"]
        self.seq: int = int(snapshot["seq"])
        self.bids: dict[Decimal, Decimal] = {Decimal(p): Decimal(q) for p, q in snapshot["bids"]}
        self.asks: dict[Decimal, Decimal] = {Decimal(p): Decimal(q) for p, q in snapshot["asks"]}

    def apply(self, update: Message) -> None:
        """Apply one l2_update; ProtocolError on a sequence gap (the caller should resubscribe)."""
        seq = int(update["seq"])
        if seq <= self.seq:
            return  # already contained in the snapshot
        if seq != self.seq + 1:
            raise ProtocolError(f"{self.symbol}: l2 seq gap {self.seq} -> {seq}")
        self.seq = seq
        for side, price, qty in update["changes"]:
            levels = self.bids if side == "buy" else self.asks
            p, q = Decimal(price), Decimal(qty)
            if q == 0:
                levels.pop(p, None)
            else:
                levels[p] = q

    def apply_all(self, messages: list[Message]) -> None:
        for m in messages:
            if m.get("type") == "l2_update" and m.get("symbol") == self.symbol:
                self.apply(m)

    def sides(self) -> tuple[list[tuple[Decimal, Decimal]], list[tuple[Decimal, Decimal]]]:
        """(bids best first, asks best first)."""
        return sorted(self.bids.items(), reverse=True), sorted(self.asks.items())

    def best(self) -> tuple[Decimal | None, Decimal | None]:
        return (max(self.bids) if self.bids else None, min(self.asks) if self.asks else None)


def same_levels(a: Message, b: Message) -> bool:
    """Two l2 snapshots show the same book (levels compared as decimals; seq ignored)."""

    def norm(levels: list[list[str]]) -> list[tuple[Decimal, Decimal]]:
        return [(Decimal(p), Decimal(q)) for p, q in levels]

    return norm(a["bids"]) == norm(b["bids"]) and norm(a["asks"]) == norm(b["asks"])


# --- plain sockets ----------------------------------------------------------------------------------


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    """Does something accept TCP connections on host:port?"""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_port(host: str, port: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if port_open(host, port):
            return True
        time.sleep(0.05)
    return False
