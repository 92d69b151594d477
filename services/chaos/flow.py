"""The soak's traders: seeded order messages, and WebSocket clients that survive their gateway.

`OrderFlow` makes one account's messages from its own seeded generator, so the sequence of messages
is the same for a seed whatever the faults do (only their outcomes differ): passive and crossing
limits around a fixed mid, cancels of the account's own earlier limits by client order id (some
already filled: those end in an UNKNOWN_ORDER reject from the matcher, which is part of the flow),
market, IOC and FOK orders.

`Trader` sends its flow at a steady rate over one connection at a time. When the connection ends (its
gateway was killed, stalled past a timeout, restarted) it connects again, to either gateway, and
resumes its execution reports with `executions` from the last exec_id it saw per symbol. It records
every ack, every gateway reject, every report as it arrived (live) and every report a resume
returned; messages sent on a connection that died before they were answered have an unknown outcome
(they may or may not be on the stream) and are counted as such.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from cme_client import Connection, Message, ProtocolError

from shared import codes
from shared.instruments import Instrument

MID_TICKS = 3_000_000  # 30000.00 at tick 0.01
RESUME_LIMIT = 1000  # reports per `executions` answer
ANSWER_TIMEOUT = 10.0  # seconds to wait for an `executions` answer before giving up on the connection
CONNECT_TIMEOUT = 3.0
RESUME_PATIENCE = 30.0  # seconds an `executions` request is retried while the gateway cannot read Redis


class OrderFlow:
    """One account's seeded messages over the given instruments."""

    def __init__(self, seed: int, account: str, instruments: list[Instrument]) -> None:
        self.rng = random.Random(f"{seed}:{account}")
        self.account = account
        self.instruments = instruments
        self.n = 0
        self.resting: dict[str, list[str]] = {inst.symbol: [] for inst in instruments}  # cids sent as gtc

    def next(self) -> Message:
        rng = self.rng
        self.n += 1
        cid = f"{self.account}-{self.n}"
        inst = rng.choice(self.instruments)
        own = self.resting[inst.symbol]
        side = rng.choice(("buy", "sell"))
        sign = 1 if side == "buy" else -1
        r = rng.random()
        if r < 0.20 and own:
            target = own.pop(rng.randrange(len(own)))
            return {"op": "cancel", "symbol": inst.symbol, "client_order_id": target}
        msg: Message = {"op": "new", "symbol": inst.symbol, "side": side, "client_order_id": cid}
        if r < 0.70:  # passive: on its own side of the mid
            msg |= {"type": "limit", "price": inst.price_str(MID_TICKS - sign * rng.randint(1, 15))}
            msg["quantity"] = inst.qty_str(rng.randint(1, 400))
            own.append(cid)
        elif r < 0.85:  # crossing: through the mid, into whatever rests on the other side
            msg |= {"type": "limit", "price": inst.price_str(MID_TICKS + sign * rng.randint(0, 10))}
            msg["quantity"] = inst.qty_str(rng.randint(1, 800))
            own.append(cid)
        elif r < 0.90:
            msg |= {"type": "market", "quantity": inst.qty_str(rng.randint(1, 600))}
        else:
            tif = "ioc" if r < 0.95 else "fok"
            msg |= {
                "type": "limit",
                "tif": tif,
                "price": inst.price_str(MID_TICKS + sign * rng.randint(0, 6)),
            }
            msg["quantity"] = inst.qty_str(rng.randint(1, 600))
        return msg


def is_report(m: Message) -> bool:
    """What the matcher says to the account: execution reports, balance and funding messages and its
    rejects (which name a symbol; the gateway's own rejects do not). All carry exec ids."""
    kind = m.get("type")
    return kind in _MATCHER_MESSAGES or (kind == "reject" and "symbol" in m)


_MATCHER_MESSAGES = frozenset(("execution", "balance", "funded"))


@dataclass
class TraderStats:
    sent: Counter[str] = field(default_factory=Counter)  # by op
    acks: Counter[str] = field(default_factory=Counter)  # by op
    gateway_rejects: Counter[str] = field(default_factory=Counter)  # by code
    unknown: int = 0  # sent on a connection that died before answering
    connects: int = 0
    resumes: int = 0  # `executions` requests sent
    failed_resumes: int = 0


class Trader:
    """One account's connection (at a time) to the gateways, sending its flow at `rate` per second."""

    def __init__(self, account: str, flow: OrderFlow, urls: list[str], home: int) -> None:
        self.account = account
        self.flow = flow
        self.urls = urls
        self.home = home  # index of the gateway tried first
        self.stats = TraderStats()
        self.acked_new: set[tuple[str, str]] = set()  # (symbol, order id) of every acked new order
        self.repeated_acks: list[Message] = []  # acks naming an order id acked before
        self.live: list[Message] = []  # reports as delivered on the connections, in order
        self.resumed: list[Message] = []  # reports returned by `executions`
        self.resume_chains: list[list[int]] = []  # exec ids of each `executions` chain, for ordering checks
        self.conn: Connection | None = None
        self._cursor = 0
        self._unanswered = 0  # messages sent on the current connection not answered yet

    # Connection --------------------------------------------------------------------------------
    async def connect(self, stop: asyncio.Event | None = None) -> bool:
        """Connect (alternating gateways until one accepts), authenticate, resume the reports;
        False if `stop` was set first."""
        attempt = 0
        while stop is None or not stop.is_set():
            url = self.urls[(self.home + attempt) % len(self.urls)]
            attempt += 1
            try:
                conn = await Connection.open(url, timeout=CONNECT_TIMEOUT)
            except (OSError, TimeoutError):  # refused, or the upgrade failed (HandshakeError)
                await asyncio.sleep(0.1)
                continue
            try:
                await _login(conn, self.account)
            except (ConnectionError, TimeoutError, ProtocolError):
                await conn.close()
                await asyncio.sleep(0.1)
                continue
            self.conn, self._cursor, self._unanswered = conn, conn.mark(), 0
            self.stats.connects += 1
            if await self.catch_up():
                return True
            await self._drop()
        return False

    async def _drop(self) -> None:
        """The connection is gone (or useless): what it left unanswered has an unknown outcome."""
        if self.conn is None:
            return
        self.absorb()
        self.stats.unknown += self._unanswered
        self._unanswered = 0
        with contextlib.suppress(Exception):
            await self.conn.close()
        self.conn = None

    def absorb(self) -> None:
        """Take in what the current connection received since last time."""
        conn = self.conn
        if conn is None:
            return
        for m in conn.messages[self._cursor :]:
            kind = m.get("type")
            if kind == "ack":
                self.stats.acks[m.get("op") or "?"] += 1
                self._unanswered -= 1
                if m.get("op") == "new" and m.get("order_id"):
                    key = (m.get("symbol") or "", m["order_id"])  # entry ids are unique per stream only
                    if key in self.acked_new:
                        self.repeated_acks.append(m)
                    self.acked_new.add(key)
            elif kind == "reject" and "symbol" not in m and m.get("op") != "executions":
                self.stats.gateway_rejects[m.get("code") or "?"] += 1
                self._unanswered -= 1
            elif is_report(m):
                self.live.append(m)
        self._cursor = len(conn.messages)

    def last_exec_ids(self) -> dict[str, int]:
        """symbol -> the largest exec_id seen (live or resumed)."""
        out: dict[str, int] = {inst.symbol: 0 for inst in self.flow.instruments}
        for m in (*self.live, *self.resumed):
            exec_id = m.get("exec_id")
            if isinstance(exec_id, int) and exec_id > out.get(m["symbol"], 0):
                out[m["symbol"]] = exec_id
        return out

    async def catch_up(self) -> bool:
        """`executions` from the last exec_id seen, per symbol, until nothing more; False if the
        connection failed meanwhile."""
        conn = self.conn
        assert conn is not None
        self.absorb()
        for symbol, after in self.last_exec_ids().items():
            chain: list[int] = []
            self.resume_chains.append(chain)
            more = True
            while more:
                answer = await self._page(conn, symbol, after)
                if answer is None:
                    return False
                reports: list[Message] = answer.get("reports", [])
                self.resumed.extend(reports)
                chain.extend(r.get("exec_id", -1) for r in reports)
                more = bool(answer.get("more"))
                after = int(answer.get("next_after") or (reports[-1]["exec_id"] if reports else after))
        self.absorb()
        return True

    async def _page(self, conn: Connection, symbol: str, after: int) -> Message | None:
        """One `executions` answer; None if the connection failed. A reject for a transient reason
        (Redis down or restarting: INTERNAL_ERROR) is retried for RESUME_PATIENCE seconds."""
        request = {"op": "executions", "symbol": symbol, "after": after, "limit": RESUME_LIMIT}
        deadline = time.monotonic() + RESUME_PATIENCE
        while True:
            self.stats.resumes += 1
            try:
                answer = await conn.request(request, _executions_answer(symbol), ANSWER_TIMEOUT)
            except (ConnectionError, TimeoutError):
                self.stats.failed_resumes += 1
                return None
            if answer.get("type") == "executions":
                return answer
            self.stats.failed_resumes += 1
            if answer.get("code") != codes.INTERNAL_ERROR or time.monotonic() > deadline:
                raise ProtocolError(f"{self.account}: executions refused: {answer}")
            await asyncio.sleep(0.2)

    # Flow --------------------------------------------------------------------------------------
    async def run(self, rate: float, stop: asyncio.Event) -> None:
        """Send at `rate` messages per second until `stop`; reconnect whenever the connection ends."""
        interval = 1.0 / rate
        while not stop.is_set():
            if self.conn is None or not self.conn.ws.is_open:  # closed, or closing
                await self._drop()
                if not await self.connect(stop):
                    return
            conn = self.conn
            assert conn is not None
            next_at = time.monotonic()
            while not stop.is_set() and conn.ws.is_open:
                self.absorb()
                msg = self.flow.next()
                try:
                    await conn.send(msg)
                except ConnectionError:  # closing or closed: cme_client's Disconnected included
                    break  # this message may never have left: unknown, like the unanswered ones
                finally:
                    self.stats.sent[msg["op"]] += 1
                    self._unanswered += 1
                next_at += interval
                delay = next_at - time.monotonic()
                if delay > 0:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), delay)
                else:
                    next_at = time.monotonic()  # behind (a stall): no burst to catch up

    async def settle(self, timeout: float) -> None:
        """After the flow stopped: wait until the connection answered everything sent on it."""
        deadline = time.monotonic() + timeout
        while self.conn is not None and time.monotonic() < deadline:
            self.absorb()
            if self._unanswered <= 0:
                return
            if not self.conn.ws.is_open:
                break
            await asyncio.sleep(0.05)
        await self._drop()

    async def final_catch_up(self) -> None:
        """Every report that is still missing, over a fresh connection if need be."""
        for _ in range(5):
            if self.conn is None or not self.conn.ws.is_open:  # closed, or closing
                await self._drop()
                if await self.connect():
                    return  # connect() resumed already
            elif await self.catch_up():
                return
            else:
                await self._drop()
        raise RuntimeError(f"{self.account}: the final catch-up failed five times")

    async def close(self) -> None:
        if self.conn is not None:
            self.absorb()
            with contextlib.suppress(Exception):
                await self.conn.close()
            self.conn = None

    def reports_seen(self) -> int:
        return len(self.live) + len(self.resumed)


def _executions_answer(symbol: str) -> Any:
    def pred(m: Message) -> bool:
        kind = m.get("type")
        return (kind == "executions" and m.get("symbol") == symbol) or (
            kind == "reject" and m.get("op") == "executions"
        )

    return pred


async def _login(conn: Connection, account: str) -> None:
    """Authenticate an open connection; ProtocolError if the gateway refuses."""
    reply = await conn.request(
        {"op": "auth", "account": account},
        lambda m: m.get("type") in ("authenticated", "reject"),
        CONNECT_TIMEOUT,
    )
    if reply["type"] != "authenticated":
        raise ProtocolError(f"auth as {account!r} refused: {reply}")
