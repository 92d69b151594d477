"""The benchmark's seeded order flow, shared by `cme bench core` and `cme bench e2e`.

Mix per command: about 60 % passive limits within 50 ticks of a random-walking mid, 15 % limits priced
through 1-3 levels of the other side, 20 % cancels of live orders, 5 % market / IOC / FOK. Order sizes are
drawn independently of the book (a crossing order through k levels has up to k x the passive size), so
the deep-book variant differs from the default in depth only, not in how much each order sweeps. Every
new order has a client order id, as real clients send them. To know which orders are live (for
cancels) and where the levels are (for crossing orders), the generator drives its own engine; the
benchmark then replays the recorded
commands into a fresh one, which gives exactly the same outcomes because the core is deterministic.

With order_types "all" (`cme bench core --order-types all`) the same mix also carries the other order
types: a fifth of the passive limits are GTD (expiring 0.1-5 s of flow time later) and another fifth
icebergs; 5 % of the commands place stops (half stop_limit, half stop_market) 3-30 ticks from the
mid, so trades keep triggering them; a third of the market orders give a quote quantity.
"""

from __future__ import annotations

import random
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Final

from services.matcher.book import BookSide
from services.matcher.engine import Engine
from shared.commands import (
    BUY,
    FOK,
    GTC,
    GTD,
    IOC,
    LIMIT,
    MARKET,
    SELL,
    STOP_LIMIT,
    STOP_MARKET,
    Cancel,
    Command,
    NewOrder,
)
from shared.instruments import Instrument

SYMBOL = "BTC-USDT"
START_MID = 3_000_000  # 30000.00 in ticks of 0.01
ACCOUNTS = tuple(f"acct{i:03d}" for i in range(50))
FUNDED_WHOLE_UNITS: Final = 10**7  # each account's balance of each asset when balances are on


def funding_units(scales: dict[str, int]) -> dict[str, int]:
    """With balances on, each account of the flow starts with ten million of each asset, in asset units
    (shared.instruments.asset_scales): far beyond what the flow trades, so no order is refused and the
    outcome is the one without balances, at the magnitudes a real venue holds (BTC in machine-size
    integers, USDT with its 15 places beyond 64 bits)."""
    return {asset: FUNDED_WHOLE_UNITS * 10**places for asset, places in scales.items()}


@dataclass(frozen=True)
class FlowConfig:
    commands: int = 1_000_000
    seed: int = 42
    deep: bool = False  # pre-load 20,000 resting orders on about 4,000 levels
    deep_orders: int = 20_000
    deep_levels: int = 4_000
    order_types: str = "plain"  # or "all": the flow includes stops, GTD, icebergs, quote quantity


ORDER_TYPES = ("plain", "all")


Step = tuple[Command, int]  # a command and its seq (= order id of a new order)


class FlowGenerator:
    """Yields (command, seq) pairs; seqs start at 1 and rise by one."""

    def __init__(self, cfg: FlowConfig, instrument: Instrument | None = None) -> None:
        self.cfg = cfg
        self.rng = random.Random(cfg.seed)
        self.engine = Engine([instrument or Instrument(SYMBOL)])
        self.book = self.engine.books[SYMBOL]
        self.mid = START_MID
        self.seq = 0
        self.live: list[tuple[int, str]] = []  # (order id, account) of orders that may still rest

    def _step(self, cmd: Command) -> Step:
        self.seq += 1
        self.engine.apply(cmd, self.seq, self.seq)
        if type(cmd) is NewOrder and (self.seq in self.book.orders or self.seq in self.book.stops):
            self.live.append((self.seq, cmd.account))
        return cmd, self.seq

    def _new(self, side: str, otype: str, tif: str, price: int | None, qty: int) -> NewOrder:
        return NewOrder(SYMBOL, self.rng.choice(ACCOUNTS), side, otype, tif, price, qty, f"c{self.seq + 1}")

    def preload(self) -> Iterator[Step]:
        """The deep book: deep_orders resting orders spread over deep_levels levels around the mid."""
        per_side = self.cfg.deep_levels // 2
        for i in range(self.cfg.deep_orders):
            side = BUY if i % 2 == 0 else SELL
            distance = 1 + (i // 2) % per_side
            price = self.mid - distance if side == BUY else self.mid + distance
            yield self._step(self._new(side, LIMIT, GTC, price, self.rng.randint(1, 1000)))

    def flow(self) -> Iterator[Step]:
        rng = self.rng
        more = self.cfg.order_types == "all"
        for _ in range(self.cfg.commands):
            if rng.random() < 0.5:
                self.mid += rng.choice((-1, 1))
            r = rng.random()
            if more and r < 0.05:
                yield self._step(self._stop())
            elif more and r < 0.60:
                yield self._step(self._passive_more())
            elif r < 0.60:
                yield self._step(self._passive())
            elif r < 0.75:
                yield self._step(self._crossing())
            elif r < 0.95:
                yield self._step(self._cancel())
            else:
                yield self._step(self._aggressive())

    def _best(self, side: BookSide) -> int | None:
        level = side.best()
        return level.price if level else None

    def _passive(self) -> NewOrder:
        side = self.rng.choice((BUY, SELL))
        offset = self.rng.randint(1, 50)
        if side == BUY:
            ask = self._best(self.book.asks)
            price = self.mid - offset
            if ask is not None and price >= ask:
                price = ask - 1
        else:
            bid = self._best(self.book.bids)
            price = self.mid + offset
            if bid is not None and price <= bid:
                price = bid + 1
        return self._new(side, LIMIT, GTC, price, self.rng.randint(1, 1000))

    def _passive_more(self) -> NewOrder:
        """A passive limit; a fifth of them GTD and a fifth icebergs."""
        order = self._passive()
        r = self.rng.random()
        if r < 0.2:
            return order._replace(tif=GTD, expire_time=self.seq + 1 + self.rng.randint(100, 5000))
        if r < 0.4 and order.quantity is not None and order.quantity >= 20:
            return order._replace(display_quantity=order.quantity // self.rng.randint(2, 10))
        return order

    def _stop(self) -> NewOrder:
        side = self.rng.choice((BUY, SELL))
        distance = self.rng.randint(3, 30)
        stop_price = self.mid + distance if side == BUY else self.mid - distance
        qty = self.rng.randint(1, 1000)
        if self.rng.random() < 0.5:
            limit = stop_price + 5 if side == BUY else stop_price - 5
            return self._new(side, STOP_LIMIT, GTC, limit, qty)._replace(stop_price=stop_price)
        return self._new(side, STOP_MARKET, IOC, None, qty)._replace(stop_price=stop_price)

    def _crossing(self) -> NewOrder:
        side = self.rng.choice((BUY, SELL))
        opposite = self.book.asks if side == BUY else self.book.bids
        depth = self.rng.randint(1, 3)
        levels = []
        for level in opposite.iter_levels():
            levels.append(level)
            if len(levels) == depth:
                break
        if not levels:  # nothing to cross: rest at the mid instead
            return self._new(side, LIMIT, GTC, self.mid, self.rng.randint(1, 1000))
        qty = self.rng.randint(1, 1000 * len(levels))
        return self._new(side, LIMIT, GTC, levels[-1].price, qty)

    def _cancel(self) -> Command:
        live, orders, stops = self.live, self.book.orders, self.book.stops
        while live:
            i = self.rng.randrange(len(live))
            oid, account = live[i]
            live[i] = live[-1]
            live.pop()
            if oid in orders or oid in stops:
                return Cancel(SYMBOL, account, oid)
        return self._passive()

    def _aggressive(self) -> NewOrder:
        side = self.rng.choice((BUY, SELL))
        qty = self.rng.randint(1, 3000)
        kind = self.rng.random()
        if kind < 0.4:
            if self.cfg.order_types == "all" and self.rng.random() < 1 / 3:
                quote = qty * self.mid  # ticks x lots: about qty lots' worth
                return self._new(side, MARKET, IOC, None, 0)._replace(quantity=None, quote_quantity=quote)
            return self._new(side, MARKET, IOC, None, qty)
        price = self.mid + 5 if side == BUY else self.mid - 5
        return self._new(side, LIMIT, IOC if kind < 0.8 else FOK, price, qty)


def generate(cfg: FlowConfig, progress: bool = False) -> tuple[list[Step], list[Step]]:
    """(preload steps, flow steps) for a config; deterministic for a seed."""
    gen = FlowGenerator(cfg)
    pre = list(gen.preload()) if cfg.deep else []
    steps: list[Step] = []
    every = max(1, cfg.commands // 20)
    for step in gen.flow():
        steps.append(step)
        if progress and len(steps) % every == 0:
            print(f"\r  generating flow: {len(steps) * 100 // cfg.commands:3d}%", end="", file=sys.stderr)
    if progress:
        print(file=sys.stderr)
    return pre, steps
