"""Test-only helpers over the client library (cme_client): one order message and its answer, book
levels of a snapshot, and a seeded wire-level order flow.

`WireFlow` makes seeded random order messages as a client writes them (decimal strings, client
order ids, cancels and amends by client order id, so a flow can be sent pipelined without waiting
for acks); `FlowClient` sends one account's share of it on a recording `cme_client.Connection`
and pairs every message with the gateway's answer.
"""

from __future__ import annotations

import asyncio
import random
import time

from cme_client import Connection, Message, is_answer

# The machine running the suite may be loaded: every wait of a recording connection is generous.
Connection.default_timeout = 15.0

Levels = list[list[str]]


async def place(conn: Connection, msg: Message, timeout: float | None = None) -> Message:
    """Send an order message (new, cancel or amend) and return the gateway's answer: its ack or its
    reject. One message at a time: the caller waits for it before sending the next."""
    start = conn.mark()
    await conn.send(msg)
    return await conn.wait_for(is_answer(msg), timeout, start)


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

    def __init__(self, conn: Connection, account: str) -> None:
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
