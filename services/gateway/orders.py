"""order_status and open_orders, answered from the order read model the matcher keeps in Redis
(services.matcher.readmodel), never through the matcher's stream.

Read your writes: a connection may ask about an order it was acked a moment ago, before the matcher
applied it. So a query first waits until the symbol's progress (the last entry the matcher committed)
has reached the newest entry this connection appended there; from then on the model holds everything
the connection could have been told.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from typing import Final, cast

import redis.asyncio as aioredis

from shared import codes, keys
from shared.ids import entry_to_seq, parse_order_id

CATCH_UP_SECONDS: Final = 5.0  # longest wait for the matcher to apply what this connection appended
_POLL: Final = 0.002


async def caught_up(redis: aioredis.Redis, symbol: str, seq: int, timeout: float = CATCH_UP_SECONDS) -> bool:
    """Wait until the matcher has committed the symbol's entry `seq` (0: nothing to wait for)."""
    if not seq:
        return True
    deadline = time.monotonic() + timeout
    delay = _POLL
    while True:
        last = await redis.hget(keys.progress(symbol), "last_id")
        if last is not None and entry_to_seq(cast(bytes, last)) >= seq:
            return True
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(delay)  # a poll with backoff: no event tells a gateway what was committed
        delay = min(delay * 2, 0.05)


def _join(static: bytes, state: bytes) -> bytes:
    """An open order's two fields as one JSON object (the state is a fragment without braces)."""
    return static[:-1] + b"," + state + b"}"


async def order_status(
    redis: aioredis.Redis, symbol: str, account: str, order_id: str | None, client_order_id: str | None
) -> bytes | str:
    """The order message (bytes), or the reject code UNKNOWN_ORDER."""
    if order_id is None:
        found = await redis.hget(keys.client_order_ids(symbol, account), client_order_id or "")
        if found is None:
            return codes.UNKNOWN_ORDER
        order_id = cast(bytes, found).decode()
    elif parse_order_id(order_id) is None:
        return codes.UNKNOWN_ORDER
    pipe = redis.pipeline(transaction=False)
    pipe.hmget(keys.open_orders(symbol, account), f"{order_id}:s", f"{order_id}:d")
    pipe.hget(keys.closed_orders(symbol, account), order_id)
    (static, state), closed = await pipe.execute()
    if static is not None and state is not None:
        body = _join(static, state)
    elif closed is not None:
        body = cast(bytes, closed)
    else:
        return codes.UNKNOWN_ORDER
    return b'{"type":"order",' + body[1:]


def open_from_hash(raw: dict[bytes, bytes]) -> list[tuple[int, bytes]]:
    """(seq, order JSON) of every open order in one open-orders hash."""
    out = []
    for name, static in raw.items():
        oid, _, part = name.partition(b":")
        if part == b"s":
            state = raw.get(oid + b":d")
            if state is not None:
                out.append((entry_to_seq(oid), _join(static, state)))
    return out


async def open_orders(redis: aioredis.Redis, symbols: Iterable[str], account: str) -> bytes:
    """The open_orders message: the account's open orders on these symbols, oldest first."""
    pipe = redis.pipeline(transaction=False)
    for symbol in symbols:
        pipe.hgetall(keys.open_orders(symbol, account))
    found: list[tuple[int, bytes]] = []
    for raw in cast(list[dict[bytes, bytes]], await pipe.execute()):
        found += open_from_hash(raw)
    found.sort()
    return b'{"type":"open_orders","orders":[' + b",".join(body for _, body in found) + b"]}"
