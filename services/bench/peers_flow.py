"""The seeded order flow of `cme bench peers`, in a neutral form every engine's adapter can read.

The flow is the workplace's peer harness flow, op for op (same seed, same draws), so the figures compare
with the ones measured there. An op is a tuple of ints (kind, oid, side, price, qty, category):

    kind   LIMIT_GTC, LIMIT_IOC, LIMIT_FOK, MARKET (IOC) or CANCEL
    side   0 buy, 1 sell
    price  integer ticks (0 for a market order; for a cancel, the target's price)
    qty    integer lots (0 for a cancel)

Mix: 60 % passive GTC limits at mid -/+ U(1..50) ticks, clamped so they never cross; 15 % GTC limits
priced at the d-th opposing level (d ~ U(1..3)) with a quantity that reaches it (the rest may rest);
20 % cancels of a uniformly random live order; 5 % a market bucket: 60 % MARKET, 20 % IOC and 20 % FOK
limits at level d (about a third of the FOKs cannot fill and are killed). The mid starts at 10,000 ticks
and moves one tick with p = 0.25 per op. With prefill > 0 the first `prefill` ops are passive limits
51..2050 ticks away that are never cancelled: a deep book of about 20,000 orders on 3,900 levels.

To know which orders are live and where the levels are, the generator drives the tight reference engine
as it goes; every engine with the same rules then sees each cancel hit a live order.
"""

from __future__ import annotations

import random
from typing import Final

from services.bench.peers_ref import BUY, GTC, SELL, TightBook, Trade

LIMIT_GTC: Final = 0
LIMIT_IOC: Final = 1
LIMIT_FOK: Final = 2
MARKET: Final = 3
CANCEL: Final = 4
PASSIVE, CROSS, CANCELS, MARKETS, IOCS, FOKS = range(6)  # the category field
CATEGORIES: Final = ("passive", "cross", "cancel", "market", "ioc", "fok")  # their names

MID0: Final = 10_000
PREFILL_TICKS: Final = 2_000

Op = tuple[int, int, int, int, int, int]


class _Generator:
    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.eng = TightBook()
        self.live: list[int] = []  # live resting oids, removed by swapping with the last
        self.pos: dict[int, int] = {}  # oid -> its index in live
        self.info: dict[int, tuple[int, int]] = {}  # oid -> (side, price)
        self.mid = MID0

    def live_add(self, oid: int, side: int, price: int) -> None:
        self.pos[oid] = len(self.live)
        self.live.append(oid)
        self.info[oid] = (side, price)

    def live_remove(self, oid: int) -> None:
        i = self.pos.pop(oid)
        last = self.live.pop()
        if last != oid:
            self.live[i] = last
            self.pos[last] = i
        del self.info[oid]

    def after(self, oid: int, trades: list[Trade]) -> None:
        for t in trades:
            maker = t[1]
            if maker in self.pos and maker not in self.eng.orders:
                self.live_remove(maker)
        order = self.eng.orders.get(oid)
        if order is not None:
            self.live_add(oid, order[1], order[2])

    def passive(self, oid: int) -> Op:
        rng, eng = self.rng, self.eng
        side = BUY if rng.random() < 0.5 else SELL
        off = rng.randint(1, 50)
        qty = rng.randint(1, 100)
        if side == BUY:
            price = self.mid - off
            ask = eng.best_ask()
            if ask is not None and price >= ask:
                price = ask - 1
        else:
            price = self.mid + off
            bid = eng.best_bid()
            if bid is not None and price <= bid:
                price = bid + 1
        return (LIMIT_GTC, oid, side, price, qty, PASSIVE)

    def at_level(self, side: int, extra: int, scale: float = 1.0) -> tuple[int, int] | None:
        """The price of the d-th opposing level (d ~ U(1..3)) and a quantity that reaches into it."""
        levels = self.eng.top_levels(SELL if side == BUY else BUY, 3)
        if not levels:
            return None
        d = self.rng.randint(1, len(levels))
        before = sum(v for _, v in levels[: d - 1])
        hi = int((before + levels[d - 1][1]) * scale) + extra
        return levels[d - 1][0], self.rng.randint(before + 1, max(before + 1, hi))

    def market_bucket(self, oid: int) -> Op:
        rng = self.rng
        side = BUY if rng.random() < 0.5 else SELL
        u = rng.random()
        if u < 0.6:
            cap = sum(v for _, v in self.eng.top_levels(SELL if side == BUY else BUY, 3)) or 100
            return (MARKET, oid, side, 0, rng.randint(1, cap), MARKETS)
        fok = u >= 0.8
        lv = self.at_level(side, extra=0 if fok else 30, scale=1.5 if fok else 1.0)
        if lv is None:
            return self.passive(oid)
        return (LIMIT_FOK if fok else LIMIT_IOC, oid, side, lv[0], lv[1], FOKS if fok else IOCS)

    def next_op(self, oid: int) -> Op:
        rng = self.rng
        if rng.random() < 0.25:
            self.mid += 1 if rng.random() < 0.5 else -1
        r = rng.random()
        if r < 0.60:
            return self.passive(oid)
        if r < 0.75:
            side = BUY if rng.random() < 0.5 else SELL
            lv = self.at_level(side, extra=30)
            return self.passive(oid) if lv is None else (LIMIT_GTC, oid, side, lv[0], lv[1], CROSS)
        if r < 0.95:
            if not self.live:
                return self.passive(oid)
            victim = self.live[rng.randrange(len(self.live))]
            side, price = self.info[victim]
            return (CANCEL, victim, side, price, 0, CANCELS)
        return self.market_bucket(oid)


def generate(n: int, seed: int = 42, prefill: int = 0) -> list[Op]:
    """n ops in all, the first min(prefill, n) of them the deep book's far passive orders."""
    g = _Generator(seed)
    eng, rng = g.eng, g.rng
    ops: list[Op] = []
    next_oid = 1
    for j in range(min(prefill, n)):
        side = BUY if j % 2 == 0 else SELL
        off = rng.randint(51, 50 + PREFILL_TICKS)
        price = g.mid - off if side == BUY else g.mid + off
        op = (LIMIT_GTC, next_oid, side, price, rng.randint(1, 100), PASSIVE)
        eng.limit(next_oid, side, price, op[4], GTC)
        next_oid += 1
        ops.append(op)
    for _ in range(n - len(ops)):
        op = g.next_op(next_oid)
        kind = op[0]
        if kind == CANCEL:
            eng.cancel(op[1])
            g.live_remove(op[1])
        else:
            next_oid += 1
            if kind == MARKET:
                trades = eng.market(op[1], op[2], op[4])
            else:
                trades = eng.limit(op[1], op[2], op[3], op[4], kind)  # kinds 0-2 are the tifs
            g.after(op[1], trades)
        ops.append(op)
    return ops
