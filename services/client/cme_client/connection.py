"""`Connection`: the low-level, recording WebSocket connection (tools, tests, scripted scenarios).

It keeps every message the server sends, in order, so a caller sends something and then awaits
"the first message at or after mark m that matches", without racing a reader or losing what
arrived in between. It also keeps how the server closed the connection (code and reason).
`Client` is the higher-level API; `Connection` is for callers that want to see the wire.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import orjson

from .errors import Disconnected, Rejected
from .transport import HandshakeError, WebSocket

Message = dict[str, Any]
Predicate = Callable[[Message], bool]

DEFAULT_TIMEOUT = 10.0


def is_type(kind: str, **fields: Any) -> Predicate:
    """A predicate: the message's type is `kind` and every given field equals its value."""

    def pred(m: Message) -> bool:
        return m.get("type") == kind and all(m.get(k) == v for k, v in fields.items())

    return pred


class Connection:
    """One WebSocket connection whose every JSON message is recorded in `messages`.

    A text frame that is not a JSON object is recorded too, as {"type": "<not an object>" or
    "<not json>", "raw": text}, so that a caller sees the server break the protocol.
    A timeout of None means `default_timeout` (a class attribute: a test suite may raise it)."""

    default_timeout: float = DEFAULT_TIMEOUT

    def __init__(self, ws: WebSocket, url: str) -> None:
        self.ws = ws
        self.url = url
        self.messages: list[Message] = []
        self.closed = asyncio.Event()
        self._changed = asyncio.Event()
        ws.on_text = self._on_text
        ws.on_close = self._on_close

    @classmethod
    async def open(
        cls,
        url: str,
        *,
        timeout: float | None = None,
        retry_for: float = 0.0,
        subprotocols: Sequence[str] = (),
    ) -> Connection:
        """Connect; with retry_for > 0 keep retrying refused connections that long (a server
        that is starting or restarting). OSError or TimeoutError when it cannot."""
        deadline = time.monotonic() + retry_for
        while True:
            try:
                ws = await WebSocket.connect(
                    url, _ignore, timeout=timeout or cls.default_timeout, subprotocols=subprotocols
                )
                return cls(ws, url)
            except (OSError, TimeoutError):  # refused, or upgraded by nobody (a dying server)
                if time.monotonic() >= deadline:
                    raise
                await asyncio.sleep(0.1)

    # the reader -------------------------------------------------------------------------------
    def _on_text(self, data: bytes | bytearray) -> None:
        try:
            msg = orjson.loads(data)
        except orjson.JSONDecodeError:
            msg = {"type": "<not json>", "raw": bytes(data).decode(errors="replace")}
        if not isinstance(msg, dict):
            msg = {"type": "<not an object>", "raw": bytes(data).decode(errors="replace")}
        self.messages.append(msg)
        self._changed.set()

    def _on_close(self) -> None:
        self.closed.set()
        self._changed.set()

    @property
    def close_code(self) -> int | None:
        """The close code once the connection has ended (1006: ended without a close frame)."""
        return self.ws.close_code

    @property
    def close_reason(self) -> str | None:
        return self.ws.close_reason if self.ws.close_code is not None else None

    @property
    def closed_reason(self) -> str | None:
        """None while open; else "<code> <reason>"."""
        if self.ws.close_code is None:
            return None
        return f"{self.ws.close_code} {self.ws.close_reason}".strip()

    # sending ----------------------------------------------------------------------------------
    async def send(self, msg: Mapping[str, Any]) -> None:
        """Send one JSON message. ConnectionError if the connection is closed."""
        self.ws.send_text(orjson.dumps(msg))
        await self.ws.drain()

    async def send_raw(self, data: str | bytes) -> None:
        """A text frame (str, sent as UTF-8) or a binary frame (bytes), exactly as given."""
        if isinstance(data, str):
            self.ws.send_text(data.encode())
        else:
            self.ws.send_binary(data)
        await self.ws.drain()

    # receiving --------------------------------------------------------------------------------
    def mark(self) -> int:
        """The index of the next message to arrive: pass it as `start` to ignore older ones."""
        return len(self.messages)

    def since(self, start: int = 0, pred: Predicate | None = None) -> list[Message]:
        return [m for m in self.messages[start:] if pred is None or pred(m)]

    async def wait_for(self, pred: Predicate, timeout: float | None = None, start: int = 0) -> Message:
        """The first message at index >= start that matches. TimeoutError if none comes in time,
        Disconnected if the connection ends first."""
        return (await self.wait_count(pred, 1, timeout, start))[0]

    async def wait_count(
        self, pred: Predicate, n: int, timeout: float | None = None, start: int = 0
    ) -> list[Message]:
        """The first n matching messages at index >= start, once there are n of them."""
        timeout = self.default_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        found: list[Message] = []
        i = start
        while True:
            while i < len(self.messages) and len(found) < n:
                if pred(self.messages[i]):
                    found.append(self.messages[i])
                i += 1
            if len(found) >= n:
                return found
            if self.closed.is_set():
                raise Disconnected(
                    f"{self.url} closed ({self.closed_reason}) with {len(found)} of {n} expected "
                    f"messages; last received: {self.messages[-5:]}"
                )
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(
                    f"{self.url}: {len(found)} of {n} expected messages within {timeout:.1f} s; "
                    f"last received: {self.messages[-5:]}"
                )
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), left)

    async def request(self, msg: Mapping[str, Any], pred: Predicate, timeout: float | None = None) -> Message:
        """Send msg and return the first later message that matches."""
        start = self.mark()
        await self.send(msg)
        return await self.wait_for(pred, timeout, start)

    async def wait_closed(self, timeout: float | None = None) -> tuple[int | None, str | None]:
        """(close code, reason) once the server has ended the connection."""
        await asyncio.wait_for(self.closed.wait(), self.default_timeout if timeout is None else timeout)
        return self.close_code, self.close_reason

    async def close(self) -> None:
        """The closing handshake; never raises."""
        with contextlib.suppress(Exception):
            await self.ws.close()


def _ignore(_: bytes | bytearray) -> None:
    """The handler until the Connection takes over (nothing arrives before the upgrade completes)."""


# Sessions -----------------------------------------------------------------------------------


def is_answer(msg: Mapping[str, Any]) -> Predicate:
    """The gateway's own answer to an order message: its ack or its reject (same op, and the same
    client order id when it has one). The matcher's later rejects carry an exec_id; these do not."""
    op, cid = msg.get("op"), msg.get("client_order_id")

    def pred(m: Message) -> bool:
        if m.get("type") not in ("ack", "reject") or m.get("op") != op or "exec_id" in m:
            return False
        return cid is None or m.get("client_order_id") == cid

    return pred


async def gateway_session(
    url: str,
    account: str | None = None,
    *,
    api_key: str | None = None,
    timeout: float | None = None,
    retry_for: float = 0.0,
) -> Connection:
    """A gateway connection authenticated as `account` (open mode) or with `api_key`.
    Raises Rejected if the gateway refuses the login."""
    conn = await Connection.open(url, timeout=timeout, retry_for=retry_for)
    auth: Message = (
        {"op": "auth", "account": account} if api_key is None else {"op": "auth", "api_key": api_key}
    )
    try:
        reply = await conn.request(auth, lambda m: m.get("type") in ("authenticated", "reject"), timeout)
        if reply["type"] != "authenticated":
            raise Rejected(reply)
    except BaseException:
        await conn.close()
        raise
    return conn


async def subscribe(
    url: str,
    symbol: str,
    *,
    channel: str | None = None,
    depth: int | None = None,
    timeout: float | None = None,
    retry_for: float = 0.0,
) -> Connection:
    """A feed connection subscribed to one symbol (market data: l2 by default, or depth; trades).
    Returns once the feed has confirmed the subscription; Rejected if it refused it."""
    conn = await Connection.open(url, timeout=timeout, retry_for=retry_for)
    msg: Message = {"op": "subscribe", "symbol": symbol}
    if channel is not None:
        msg["channel"] = channel
    if depth is not None:
        msg["depth"] = depth
    try:
        reply = await conn.request(msg, lambda m: m.get("type") in ("subscribed", "reject"), timeout)
        if reply["type"] != "subscribed":
            raise Rejected(reply)
    except BaseException:
        await conn.close()
        raise
    return conn


async def l2_snapshot(
    md_url: str, symbol: str, *, timeout: float | None = None, retry_for: float = 0.0
) -> Message:
    """A fresh l2_snapshot of one symbol from a new subscription (subscribe, read it, close)."""
    conn = await subscribe(md_url, symbol, timeout=timeout, retry_for=retry_for)
    try:
        return await conn.wait_for(is_type("l2_snapshot", symbol=symbol), timeout)
    finally:
        await conn.close()


__all__ = [
    "Connection",
    "HandshakeError",
    "Message",
    "Predicate",
    "gateway_session",
    "is_answer",
    "is_type",
    "l2_snapshot",
    "subscribe",
]
