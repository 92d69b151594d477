"""`cme demo`: the seed's client scenario against a running stack, narrated, in well under a minute.

0. both accounts' balances after the faucet (a venue with `--risk off` answers BALANCES_DISABLED:
the balance checks are skipped); 1. a maker rests two asks and a bid, and what they need moves from
available to held; 2. a taker's market buy sweeps both ask levels (trades with maker and taker fees,
execution reports, L2 updates, and the settlement: the base moves, the taker pays notional + fee, the
maker receives notional - fee, to the last digit); 3. an FOK that cannot fill is cancelled with a
reason; 4. restart check: with a `cme up` stack.json in --data-dir, the matcher is killed with SIGKILL,
the supervisor restarts it, and the book must come back unchanged and still trade; without one, a
fresh snapshot must equal the book rebuilt from the updates; 5. the maker's last order is cancelled,
and neither account holds anything any more.

Accounts carry a random suffix, so reruns never collide on client order ids. Every step is checked;
the exit code is 0 only if all checks pass.

The two accounts trade through the client library (cme_client.Client); the feeds are read with its
recording Connection, so that the narration can show the wire's l2_update and trade messages.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import time
import traceback
import uuid
from collections.abc import AsyncIterator
from decimal import ROUND_FLOOR, Decimal
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import orjson
from cme_client import (
    Client,
    Connection,
    L2Book,
    Message,
    Predicate,
    Rejected,
    is_type,
    l2_snapshot,
    subscribe,
)

from shared import codes
from shared.instruments import Instrument, default_instruments

STEP_TIMEOUT = 10.0
FAUCET_WAIT = 3.0  # how long a new account's faucet grant may take to show (a venue may have none)
RESTART_TIMEOUT = 30.0  # supervisor backoff + matcher start + checkpoint replay
REFERENCE_PRICE = {"BTC": Decimal(30000), "ETH": Decimal(2000)}  # where to build a book on an empty one
TERMINAL = ("filled", "cancelled", "rejected")
ZERO = Decimal(0)
ASK_QTY = Decimal("0.8")  # the maker's two asks together
ASK2_QTY = Decimal("0.3")  # the upper ask
BID_QTY = Decimal("0.2")
SWEEP_QTY = ASK_QTY  # the taker's market buy takes both asks
FOK_QTY = Decimal("0.5")  # more than BID_QTY: it cannot fill
Funds = dict[str, dict[str, Decimal]]  # asset -> {"available": ..., "held": ...}


class DemoFailed(RuntimeError):
    pass


class Account:
    """A demo account: its cme_client.Client, every execution report it was sent and every balance
    message (`funded`, `balance`), in order."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.reports: list[Message] = []
        self.funding: list[Message] = []
        self._changed = asyncio.Event()
        self._tasks = [
            asyncio.create_task(self._collect(client.execution_reports(), self.reports)),
            asyncio.create_task(self._collect(client.balance_updates(), self.funding)),
        ]

    async def _collect(self, source: AsyncIterator[Message], into: list[Message]) -> None:
        async for m in source:
            into.append(m)
            self._changed.set()

    async def wait(
        self, pred: Predicate, want: int = 1, timeout: float = STEP_TIMEOUT, funding: bool = False
    ) -> list[Message]:
        """The first `want` reports (balance messages, with `funding`) that match; TimeoutError if
        they do not come in time."""
        deadline = time.monotonic() + timeout
        source = self.funding if funding else self.reports
        while len(found := [m for m in source if pred(m)]) < want:
            self._changed.clear()
            await asyncio.wait_for(self._changed.wait(), max(0.0, deadline - time.monotonic()))
        return found[:want]

    async def close(self) -> None:
        await self.client.close()
        await asyncio.gather(*self._tasks)


def same_levels(a: Message, b: Message) -> bool:
    """Two books show the same levels (compared as decimals; seq ignored)."""

    def norm(levels: list[list[str]]) -> list[tuple[Decimal, Decimal]]:
        return [(Decimal(p), Decimal(q)) for p, q in levels]

    return norm(a["bids"]) == norm(b["bids"]) and norm(a["asks"]) == norm(b["asks"])


def best_prices(book: L2Book) -> tuple[Decimal | None, Decimal | None]:
    bid, ask = book.best("buy"), book.best("sell")
    return (Decimal(bid[0]) if bid else None, Decimal(ask[0]) if ask else None)


def say(text: str = "") -> None:
    print(text, flush=True)


def amount(value: Decimal) -> str:
    """A balance as the wire writes it: plain digits, trailing zeros trimmed."""
    text = format(value, "f")
    return text.rstrip("0").rstrip(".") if "." in text else text


def signed(value: Decimal) -> str:
    return amount(value) if value < 0 else f"+{amount(value)}"


def moved(funds: Funds, changes: dict[str, tuple[Decimal, Decimal]]) -> Funds:
    """`funds` after adding (available, held) changes per asset."""
    out = {asset: dict(v) for asset, v in funds.items()}
    for asset, (available, held) in changes.items():
        out[asset]["available"] += available
        out[asset]["held"] += held
    return out


def choose_prices(
    bid: Decimal | None, ask: Decimal | None, tick: Decimal, reference: Decimal
) -> tuple[Decimal, Decimal, Decimal] | None:
    """(bid, ask1, ask2) strictly inside the current spread, so the demo's levels are the best ones and the
    market buy sweeps exactly them; None if the book's spread is too tight for three levels."""
    for step_ticks in (50, 10, 1):
        s = tick * step_ticks
        if bid is not None and ask is not None:
            center = ((bid + ask) / 2 / tick).to_integral_value(ROUND_FLOOR) * tick
        elif ask is not None:
            center = ask - 2 * s
        elif bid is not None:
            center = bid + 2 * s
        else:
            center = reference
        b, a1, a2 = center - s, center, center + s
        if b > 0 and (bid is None or b > bid) and (ask is None or a2 < ask):
            return b, a1, a2
    return None


def read_stack(data_dir: Path, gateway_url: str) -> dict[str, Any] | None:
    """stack.json of a live `cme up` serving this gateway URL, or None."""
    try:
        state: dict[str, Any] = orjson.loads((data_dir / "stack.json").read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return None
    try:
        os.kill(int(state["supervisor_pid"]), 0)
    except (OSError, KeyError, ValueError, TypeError):
        return None  # left behind by a supervisor that was killed
    return state if same_endpoint(str(state.get("gateway", "")), gateway_url) else None


def same_endpoint(a: str, b: str) -> bool:
    """Two ws URLs of one local server (localhost and 127.0.0.1 are the same place)."""
    local = {"localhost", "127.0.0.1", "::1", "0.0.0.0"}
    ua, ub = urlsplit(a), urlsplit(b)
    hosts_match = ua.hostname == ub.hostname or {ua.hostname, ub.hostname} <= local
    return hosts_match and ua.port == ub.port


def matcher_pid(state: dict[str, Any]) -> int | None:
    for proc in state.get("processes", []):
        if proc.get("service") == "matcher" and proc.get("pid"):
            return int(proc["pid"])
    return None


class Demo:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.symbol: str = args.symbol
        self.inst = default_instruments().get(self.symbol) or Instrument(self.symbol)
        self.quote = self.inst.quote_asset
        self.base = self.inst.base_asset
        self.tag = uuid.uuid4().hex[:6]
        self.maker_account = f"maker-demo-{self.tag}"
        self.taker_account = f"taker-demo-{self.tag}"
        self.failures: list[str] = []
        self.cid_n = 0
        self.md: Connection | None = None
        self.trades: Connection | None = None
        self.maker: Account | None = None
        self.taker: Account | None = None
        self.book: L2Book | None = None
        self.md_applied = 0  # md messages the book has seen
        self.risk = False  # the venue keeps balances: the balance checks run
        self.funds_before: dict[str, Funds] = {}  # "maker" / "taker" -> balances before the first order
        self.funds_rest: Funds = {}  # the maker's, once its orders rest

    # --- small helpers ------------------------------------------------------------------------------
    def check(self, ok: bool, what: str) -> None:
        say(f"   {'ok  ' if ok else 'FAIL'} {what}")
        if not ok:
            self.failures.append(what)

    def cid(self, label: str) -> str:
        self.cid_n += 1
        return f"demo-{self.tag}-{self.cid_n}-{label}"

    def p(self, price: Decimal) -> str:
        return self.inst.price_str(self.inst.price_to_ticks(str(price)))

    def q(self, qty: Decimal) -> str:
        return self.inst.qty_str(self.inst.qty_to_lots(str(qty)))

    async def order(
        self, acct: Account, who: str, side: Any, qty: Decimal, price: Decimal | None = None, **kw: Any
    ) -> tuple[str, str]:
        """Place an order; returns (client_order_id, order_id) once acked. A reject fails the demo."""
        cid = self.cid(str(kw.get("type", "o")))
        p = None if price is None else self.p(price)
        try:
            ack = await acct.client.place(self.symbol, side, self.q(qty), p, client_order_id=cid, **kw)
        except Rejected as exc:
            raise DemoFailed(f"{who}'s {side} {self.q(qty)} @ {p} {kw} was rejected: {exc}") from exc
        return cid, str(ack["order_id"])

    async def final_report(self, acct: Account, cid: str, timeout: float = STEP_TIMEOUT) -> Message:
        def done(m: Message) -> bool:
            return m.get("client_order_id") == cid and m.get("status") in TERMINAL

        return (await acct.wait(done, 1, timeout))[0]

    def reports(self, acct: Account, cid: str) -> list[Message]:
        return [m for m in acct.reports if m.get("type") == "execution" and m.get("client_order_id") == cid]

    def show_exec(self, who: str, m: Message) -> None:
        line = (
            f"   exec   {who:<5} {m['status']:<16} filled {m.get('filled_quantity')} of {m.get('quantity')}"
        )
        if m.get("last_quantity"):
            line += f"  last {m['last_quantity']} @ {m['last_price']}"
            line += f"  fee {m['fee']} {self.quote} ({m['liquidity']})"
        if m.get("reason"):
            line += f"  reason: {m['reason']}"
        say(line)

    def show_trade(self, t: Message) -> None:
        say(
            f"   trade  #{t['trade_id']} {t['quantity']} @ {t['price']} aggressor {t['aggressor_side']}"
            f"  maker fee {t['maker_fee']} {self.quote}  taker fee {t['taker_fee']} {self.quote}"
        )

    def show_md(self, start: int) -> None:
        assert self.md is not None and self.book is not None
        for m in self.md.since(start, is_type("l2_update", symbol=self.symbol)):
            changes = ", ".join(f"{s} {p} -> {q}" for s, p, q in m["changes"])
            bbo = m.get("bbo") or {}
            bid, ask = bbo.get("bid"), bbo.get("ask")
            say(
                f"   md     l2_update seq {m['seq']}: {changes}   "
                f"(best bid {bid[0] if bid else '-'} / ask {ask[0] if ask else '-'})"
            )
        self.sync_book()

    def sync_book(self) -> None:
        """Apply the md messages the book has not seen yet."""
        assert self.md is not None and self.book is not None
        self.book.apply_all(self.md.messages[self.md_applied :])
        self.md_applied = len(self.md.messages)

    async def wait_count(self, conn: Connection, start: int, pred: Predicate, want: int) -> list[Message]:
        """The messages after `start` that match, once there are `want` of them (or at the timeout)."""
        deadline = time.monotonic() + STEP_TIMEOUT
        while (
            len(conn.since(start, pred)) < want and time.monotonic() < deadline and conn.closed_reason is None
        ):
            await asyncio.sleep(0.02)
        return conn.since(start, pred)

    async def settle_md(self, start: int, want: int) -> None:
        """Wait until the md feed delivered `want` l2_updates after `start`."""
        assert self.md is not None
        await self.wait_count(self.md, start, is_type("l2_update", symbol=self.symbol), want)

    async def funds(self, acct: Account) -> Funds:
        """The account's balances of the symbol's two assets (an asset it never had is zero). The
        gateway answers after the matcher applied what this connection sent (read your writes)."""
        got = await acct.client.balances()
        return {
            asset: dict(got.get(asset, {"available": ZERO, "held": ZERO}))
            for asset in (self.quote, self.base)
        }

    def show_funds(self, who: str, now: Funds, before: Funds | None = None) -> None:
        for asset in (self.quote, self.base):
            line = (
                f"   funds  {who:<5} {asset:<5} available {amount(now[asset]['available']):>24}"
                f"  held {amount(now[asset]['held']):>20}"
            )
            if before is not None:
                d_avail = now[asset]["available"] - before[asset]["available"]
                d_held = now[asset]["held"] - before[asset]["held"]
                line += (
                    f"   ({signed(d_avail)} / {signed(d_held)})" if d_avail or d_held else "   (unchanged)"
                )
            say(line)

    def check_funds(self, who: str, now: Funds, expected: Funds, what: str) -> None:
        self.check(now == expected, f"{who}: {what}")
        if now != expected:
            for asset in (self.quote, self.base):
                want, got = expected[asset], now[asset]
                say(
                    f"         {asset}: expected available {amount(want['available'])} held"
                    f" {amount(want['held'])}, got {amount(got['available'])} / {amount(got['held'])}"
                )

    def show_book(self) -> None:
        assert self.book is not None
        bids, asks = self.book.levels(3)

        def top(levels: list[list[str]]) -> str:
            return ", ".join(f"{q} @ {p}" for p, q in levels) or "-"

        say(f"   book   bids {top(bids)}  |  asks {top(asks)}")

    # --- the scenario -------------------------------------------------------------------------------
    async def connect(self) -> None:
        a = self.args
        self.md = await subscribe(a.md, self.symbol)
        snap = await self.md.wait_for(is_type("l2_snapshot", symbol=self.symbol), STEP_TIMEOUT)
        self.book = L2Book(snap)
        self.md_applied = self.md.mark()
        self.trades = await subscribe(a.trades, self.symbol)
        # reconnect=False: a demo that lost the gateway should say so, not wait for it to come back
        maker = await Client(a.gateway, account=self.maker_account, reconnect=False).connect()
        self.maker = Account(maker)
        taker = await Client(a.gateway, account=self.taker_account, reconnect=False).connect()
        self.taker = Account(taker)
        say(f"connected: accounts {self.maker_account} (maker) and {self.taker_account} (taker)")
        self.show_book()

    def plan(self) -> tuple[Decimal, Decimal, Decimal]:
        """The demo's bid and two asks, inside the current spread."""
        assert self.book is not None
        best_bid, best_ask = best_prices(self.book)
        ref = REFERENCE_PRICE.get(self.base, Decimal(100))
        prices = choose_prices(best_bid, best_ask, self.inst.tick_size, ref)
        if prices is None:
            raise DemoFailed(
                f"the {self.symbol} spread ({best_bid} / {best_ask}) is too tight; try another --symbol"
            )
        return prices

    @property
    def buy_rate(self) -> Decimal:
        """A resting buy may fill as maker or taker, so it holds at the higher fee rate."""
        return max(self.inst.maker_fee, self.inst.taker_fee)

    async def opening_funds(self, bid: Decimal, ask2: Decimal) -> None:
        assert self.maker and self.taker
        say("\n0. balances after the faucet (it funds an open-mode account at its first login)")
        try:
            maker = await self.funds(self.maker)
        except Rejected as exc:
            if exc.code != codes.BALANCES_DISABLED:
                raise DemoFailed(f"balances refused: {exc}") from exc
            say("   the venue keeps no balances (BALANCES_DISABLED: `--risk off`); balance checks skipped")
            return
        self.risk = True
        maker, taker = await asyncio.gather(
            self.after_faucet("maker", self.maker, maker),
            self.after_faucet("taker", self.taker, await self.funds(self.taker)),
        )
        # What the scenario spends at most: a venue started with `--faucet none` gets the rest deposited.
        needs = {
            "maker": (
                self.maker,
                maker,
                {self.quote: bid * BID_QTY * (1 + self.buy_rate), self.base: ASK_QTY},
            ),
            "taker": (
                self.taker,
                taker,
                {self.quote: ask2 * SWEEP_QTY * (1 + self.inst.taker_fee), self.base: FOK_QTY},
            ),
        }
        for who, (acct, funds, need) in needs.items():
            shortfalls = {a: want - funds[a]["available"] for a, want in need.items()}
            for asset, short in shortfalls.items():
                if short > 0:
                    try:
                        await acct.client.deposit(asset, amount(short))
                    except Rejected as exc:
                        raise DemoFailed(f"{who} has too little {asset} and cannot deposit: {exc}") from exc
                    say(f"   {who} deposits {amount(short)} {asset} (more than the faucet gave)")
            if any(short > 0 for short in shortfalls.values()):
                funds = await self.funds(acct)
            self.funds_before[who] = funds
            self.show_funds(who, funds)

    async def after_faucet(self, who: str, acct: Account, funds: Funds) -> Funds:
        """The account's balances once the faucet's grant is applied: the gateway appends it at the
        account's first login, so an answer right after the login may not show it yet; its `funded`
        lines (op "faucet") say when it is. A venue without a faucet sends none."""
        if any(v for amounts in funds.values() for v in amounts.values()):
            return funds  # a new account with a balance: the grant is already applied
        try:
            [grant] = await acct.wait(is_type("funded", op="faucet"), 1, FAUCET_WAIT, funding=True)
        except TimeoutError:
            say(f"   {who}: no faucet grant within {FAUCET_WAIT:.0f} s (a venue with `--faucet none`?)")
            return funds
        # One grant credits every faucet asset in one command: the balances after its first line show all.
        say(f"   {who}: faucet grant arrived (funded {grant['amount']} {grant['asset']}, ...)")
        return await self.funds(acct)

    async def check_holds(self, bid: Decimal) -> None:
        """The maker's resting orders hold what they may need: the sells their base, the bid its
        notional plus the higher fee."""
        assert self.maker
        if not self.risk:
            return
        before = self.funds_before["maker"]
        now = await self.funds(self.maker)
        self.show_funds("maker", now, before)
        bid_hold = bid * BID_QTY * (1 + self.buy_rate)
        expected = moved(before, {self.quote: (-bid_hold, bid_hold), self.base: (-ASK_QTY, ASK_QTY)})
        self.check_funds(
            "maker",
            now,
            expected,
            f"{amount(ASK_QTY)} {self.base} and {amount(bid_hold)} {self.quote}"
            f" (= {self.p(bid)} x {self.q(BID_QTY)} x (1 + {self.buy_rate})) moved from available to held",
        )
        self.funds_rest = now

    async def check_settlement(self, fills: list[Message]) -> None:
        """Each fill settled at once: the base went from the maker's hold to the taker, the taker paid
        notional + taker fee, the maker received notional - maker fee (Decimal, from the trades)."""
        assert self.maker and self.taker
        if not self.risk:
            return
        notional = sum((Decimal(t["price"]) * Decimal(t["quantity"]) for t in fills), ZERO)
        base = sum((Decimal(t["quantity"]) for t in fills), ZERO)
        taker_fee = sum((Decimal(t["taker_fee"]) for t in fills), ZERO)
        maker_fee = sum((Decimal(t["maker_fee"]) for t in fills), ZERO)
        paid, received = notional + taker_fee, notional - maker_fee
        say(
            f"   settle notional {amount(notional)} {self.quote} for {amount(base)} {self.base}:"
            f" taker pays {amount(paid)} (+ fee {amount(taker_fee)}),"
            f" maker receives {amount(received)} (- fee {amount(maker_fee)})"
        )
        taker, maker = await self.funds(self.taker), await self.funds(self.maker)
        self.show_funds("taker", taker, self.funds_before["taker"])
        self.show_funds("maker", maker, self.funds_rest)
        self.check_funds(
            "taker",
            taker,
            moved(self.funds_before["taker"], {self.quote: (-paid, ZERO), self.base: (base, ZERO)}),
            f"received {amount(base)} {self.base}, paid notional + fee = {amount(paid)} {self.quote}",
        )
        self.check_funds(
            "maker",
            maker,
            moved(self.funds_rest, {self.quote: (received, ZERO), self.base: (ZERO, -base)}),
            f"delivered {amount(base)} held {self.base}, received notional - fee = {amount(received)}"
            f" {self.quote}; the bid's hold is untouched",
        )

    async def check_released(self) -> None:
        """With every order ended, nothing is held that was not held before the demo."""
        if not self.risk:
            return
        for who, acct in (("maker", self.maker), ("taker", self.taker)):
            assert acct is not None
            now = await self.funds(acct)
            self.show_funds(who, now, self.funds_before[who])
            before = self.funds_before[who]
            self.check(
                all(now[a]["held"] == before[a]["held"] for a in (self.quote, self.base)),
                f"{who}: every hold released",
            )

    async def build_book(self, bid: Decimal, ask1: Decimal, ask2: Decimal) -> None:
        assert self.maker and self.md and self.book
        say("\n1. the maker builds a book")
        start = self.md.mark()
        for side, price, qty in (
            ("sell", ask1, ASK_QTY - ASK2_QTY),
            ("sell", ask2, ASK2_QTY),
            ("buy", bid, BID_QTY),
        ):
            cid, oid = await self.order(self.maker, "maker", side, qty, price, type="limit")
            [new] = await self.maker.wait(is_type("execution", client_order_id=cid))
            say(
                f"   maker  {side:<4} {self.q(qty)} @ {self.p(price)} limit gtc"
                f" -> ack {oid}, execution {new['status']}"
            )
            self.check(new["status"] == "new", f"{side} {self.p(price)} rests (status new)")
        await self.settle_md(start, 3)
        self.show_md(start)
        self.show_book()
        b, a = best_prices(self.book)
        self.check((b, a) == (bid, ask1), f"best bid / ask are now {self.p(bid)} / {self.p(ask1)}")
        await self.check_holds(bid)

    async def sweep(self, ask1: Decimal, ask2: Decimal) -> None:
        assert self.taker and self.maker and self.trades and self.md
        qty = SWEEP_QTY
        say(f"\n2. the taker's market buy of {self.q(qty)} sweeps both ask levels")
        md_start, tr_start = self.md.mark(), self.trades.mark()
        cid, oid = await self.order(self.taker, "taker", "buy", qty, type="market")
        say(f"   taker  buy  {self.q(qty)} market ioc -> ack {oid}")
        final = await self.final_report(self.taker, cid)
        for m in self.reports(self.taker, cid):
            self.show_exec("taker", m)
        self.check(final["status"] == "filled", "the market order is filled")
        fills = await self.wait_count(self.trades, tr_start, is_type("trade", taker_order_id=oid), 2)
        for t in fills:
            self.show_trade(t)
        self.check([Decimal(t["price"]) for t in fills] == [ask1, ask2], "two trades, best ask first")
        exact = all(
            Decimal(t["maker_fee"]) == Decimal(t["price"]) * Decimal(t["quantity"]) * self.inst.maker_fee
            and Decimal(t["taker_fee"]) == Decimal(t["price"]) * Decimal(t["quantity"]) * self.inst.taker_fee
            for t in fills
        )
        self.check(
            exact, f"fees exact: maker {self.inst.maker_fee}, taker {self.inst.taker_fee} of price x quantity"
        )
        # The maker's reports come on its own connection, maybe a moment after the taker's: wait for them.
        trade_ids = {t["trade_id"] for t in fills}
        maker_fills = await self.maker.wait(lambda m: m.get("trade_id") in trade_ids, 2)
        for m in maker_fills:
            self.show_exec("maker", m)
        self.check(
            len(maker_fills) == 2
            and all(m["liquidity"] == "maker" and m["status"] == "filled" for m in maker_fills),
            "the maker got both fills as maker",
        )
        await self.settle_md(md_start, 1)
        self.show_md(md_start)
        assert self.book is not None
        self.check(
            ask1 not in self.book.asks and ask2 not in self.book.asks,
            "both ask levels are gone from the book",
        )
        await self.check_settlement(fills)

    async def fok(self, bid: Decimal) -> None:
        assert self.taker
        qty = FOK_QTY
        say(f"\n3. an FOK sell of {self.q(qty)} at {self.p(bid)}: only 0.2 is bid there, so it cannot fill")
        cid, oid = await self.order(self.taker, "taker", "sell", qty, bid, type="limit", tif="fok")
        say(f"   taker  sell {self.q(qty)} @ {self.p(bid)} limit fok -> ack {oid}")
        final = await self.final_report(self.taker, cid)
        for m in self.reports(self.taker, cid):
            self.show_exec("taker", m)
        self.check(
            final["status"] == "cancelled" and bool(final.get("reason")),
            "cancelled with a reason, nothing traded",
        )
        self.check(Decimal(final.get("filled_quantity") or 0) == 0, "filled quantity is zero")

    async def restart_check(self, bid: Decimal) -> None:
        assert self.book and self.md
        a = self.args
        data_dir = Path(a.data_dir)
        state = read_stack(data_dir, a.gateway)
        before = await l2_snapshot(a.md, self.symbol, timeout=STEP_TIMEOUT)
        self.sync_book()
        bids, asks = self.book.levels()
        rebuilt = {"bids": bids, "asks": asks}
        # Killing someone's matcher is opt-in: without --restart-check only the reconnect check runs.
        pid = matcher_pid(state) if state and getattr(a, "restart_check", False) else None
        if state is None or pid is None:
            where = data_dir.resolve()
            why = "no --restart-check" if state else f"no `cme up` of this gateway in {where}"
            say(f"\n4. restart check: {why}; a reconnect check instead")
            self.check(
                same_levels(before, rebuilt), "a fresh snapshot equals the book rebuilt from the l2 updates"
            )
            return await self.trade_again(bid)
        say(f"\n4. restart check: SIGKILL the matcher (pid {pid}); the supervisor must restart it")
        self.check(same_levels(before, rebuilt), "the book rebuilt from l2 updates equals a fresh snapshot")
        t0 = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        new_pid = await self.wait_new_matcher(data_dir, pid)
        say(f"   matcher restarted as pid {new_pid} after {time.monotonic() - t0:.1f} s")
        # Resubscribe: a fresh view of everything the restarted matcher serves.
        for conn in (self.md, self.trades):
            if conn is not None:
                await conn.close()
        self.md = await subscribe(a.md, self.symbol, retry_for=RESTART_TIMEOUT)
        self.trades = await subscribe(a.trades, self.symbol, retry_for=RESTART_TIMEOUT)
        after = await self.md.wait_for(is_type("l2_snapshot", symbol=self.symbol), RESTART_TIMEOUT)
        self.book = L2Book(after)
        self.md_applied = self.md.messages.index(after) + 1
        self.show_book()
        self.check(same_levels(before, after), "the book after the restart is unchanged")
        await self.trade_again(bid)

    async def wait_new_matcher(self, data_dir: Path, old: int) -> int:
        deadline = time.monotonic() + RESTART_TIMEOUT
        while time.monotonic() < deadline:
            state = read_stack(data_dir, self.args.gateway)
            pid = matcher_pid(state) if state else None
            if pid and pid != old:
                return pid
            await asyncio.sleep(0.05)
        raise DemoFailed(f"the supervisor did not restart the matcher within {RESTART_TIMEOUT:.0f} s")

    async def trade_again(self, bid: Decimal) -> None:
        assert self.taker and self.trades
        qty = Decimal("0.1")
        say(f"   a new order must still trade: taker sells {self.q(qty)} @ {self.p(bid)} ioc")
        tr_start = self.trades.mark()
        cid, oid = await self.order(self.taker, "taker", "sell", qty, bid, type="limit", tif="ioc")
        final = await self.final_report(self.taker, cid, RESTART_TIMEOUT)
        self.show_exec("taker", final)
        trade = await self.trades.wait_for(is_type("trade", taker_order_id=oid), STEP_TIMEOUT, tr_start)
        self.show_trade(trade)
        self.check(final["status"] == "filled", "it trades against the maker's bid, which survived")

    def open_orders(self, acct: Account) -> list[str]:
        """Client order ids of this account's orders that were accepted and have not ended."""
        seen = dict.fromkeys(
            m["client_order_id"]
            for m in acct.reports
            if m.get("type") == "execution" and m.get("status") == "new"
        )
        return [cid for cid in seen if not any(r.get("status") in TERMINAL for r in self.reports(acct, cid))]

    async def cleanup(self) -> None:
        assert self.maker
        say("\n5. the maker cancels what is left")
        for cid in self.open_orders(self.maker):
            await self.maker.client.cancel(self.symbol, client_order_id=cid)
            final = await self.final_report(self.maker, cid)
            self.show_exec("maker", final)
            self.check(final["status"] == "cancelled", f"{cid} cancelled")
        await self.check_released()

    async def leave_no_orders(self) -> None:
        """After a failure: best-effort cancels, so a rerun does not meet the old orders in the book."""
        for acct in (self.maker, self.taker):
            if acct is None or not acct.client.connected:
                continue
            with contextlib.suppress(Exception):
                for cid in self.open_orders(acct):
                    await acct.client.cancel(self.symbol, client_order_id=cid)
                    await self.final_report(acct, cid, 2.0)

    async def close(self) -> None:
        for conn in (self.md, self.trades, self.maker, self.taker):
            if conn is not None:
                with contextlib.suppress(Exception):
                    await conn.close()

    async def play(self) -> int:
        t0 = time.monotonic()
        a = self.args
        say(f"cme demo: {self.symbol} on gateway {a.gateway}, md {a.md}, trades {a.trades}")
        try:
            await self.connect()
        except Exception as exc:  # refused, timed out, or not speaking the protocol
            await self.close()
            say(f"cannot use the stack ({type(exc).__name__}: {exc}); start it with `cme up` (or `make up`)")
            return 2
        try:
            bid, ask1, ask2 = self.plan()
            await self.opening_funds(bid, ask2)
            await self.build_book(bid, ask1, ask2)
            await self.sweep(ask1, ask2)
            await self.fok(bid)
            await self.restart_check(bid)
            await self.cleanup()
        except (DemoFailed, TimeoutError, ConnectionError) as exc:
            self.failures.append(str(exc))
            say(f"   FAIL {exc}")
        except Exception as exc:  # a bug or a protocol surprise: say so, with the traceback on stderr
            traceback.print_exc()
            self.failures.append(f"unexpected {type(exc).__name__}: {exc}")
            say(f"   FAIL unexpected {type(exc).__name__}: {exc}")
        finally:
            if self.failures:
                await self.leave_no_orders()
            await self.close()
        took = time.monotonic() - t0
        if self.failures:
            say(f"\ndemo FAILED ({len(self.failures)} problem(s), {took:.2f} s): " + "; ".join(self.failures))
            return 1
        say(f"\ndemo OK: every check passed in {took:.2f} s")
        return 0


def run(args: argparse.Namespace) -> int:
    return asyncio.run(Demo(args).play())
