"""The two reference engines of `cme bench peers`, written small on purpose (stdlib only).

SeedBook, the seed-style baseline: the design of the project's proof of concept. Float prices and
quantities, dict price -> PriceLevel (a deque and a float volume), the other side's prices re-sorted
with sorted() for every incoming order, float fees per fill. It shows what the obvious design costs.

TightBook, the tight pure-Python reference: about the fastest plain CPython gets. Integer ticks and lots,
one sorted list of price keys per side kept with bisect (best level last, so it pops in O(1)), dict
key -> [deque, volume, live orders], dict oid -> order for O(1) cancels (the order is marked dead and
dropped when it reaches the front of its level), integer fees, trades as tuples, no events.

Both take the same calls: limit(oid, side, price, qty, tif), market(oid, side, qty) and cancel(oid).
side 0 = buy, 1 = sell; tif 0 GTC, 1 IOC, 2 FOK; a market order is IOC. limit and market return the
trades, each with the maker's oid second and the quantity fourth.
"""

from __future__ import annotations

from bisect import bisect_left, insort
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Final

BUY: Final = 0
SELL: Final = 1
GTC: Final = 0
IOC: Final = 1
FOK: Final = 2

MAKER_FEE: Final = 0.001
TAKER_FEE: Final = 0.002
MAKER_FEE_BPS: Final = 10  # the tight engine's fees: exact integers in 1e-4 of price x quantity
TAKER_FEE_BPS: Final = 20


@dataclass
class SeedOrder:
    order_id: int
    side: int
    price: float
    quantity: float
    remaining: float


@dataclass
class SeedTrade:
    taker_order_id: int
    maker_order_id: int
    price: float
    quantity: float
    value: float
    maker_fee: float
    taker_fee: float


@dataclass
class PriceLevel:
    price: float
    orders: deque[SeedOrder] = field(default_factory=deque)
    volume: float = 0.0


class SeedBook:
    def __init__(self) -> None:
        self.bids: dict[float, PriceLevel] = {}
        self.asks: dict[float, PriceLevel] = {}
        self.orders: dict[int, SeedOrder] = {}

    def limit(self, oid: int, side: int, price: int, qty: int, tif: int = GTC) -> list[SeedTrade]:
        return self._submit(oid, side, float(price), float(qty), tif, False)

    def market(self, oid: int, side: int, qty: int) -> list[SeedTrade]:
        return self._submit(oid, side, 0.0, float(qty), IOC, True)

    def _submit(
        self, oid: int, side: int, price: float, qty: float, tif: int, is_market: bool
    ) -> list[SeedTrade]:
        order = SeedOrder(oid, side, price, qty, qty)
        trades: list[SeedTrade] = []
        if side == BUY:
            opposite = self.asks
            prices = sorted(opposite.keys())
        else:
            opposite = self.bids
            prices = sorted(opposite.keys(), reverse=True)

        # The limit test is written out in both loops, as the PoC had it: a helper call per level
        # would make the baseline slower than the design it stands for.
        if tif == FOK:
            available = 0.0
            for p in prices:
                if not is_market and ((side == BUY and p > price) or (side == SELL and p < price)):
                    break
                available += opposite[p].volume
                if available >= qty:
                    break
            if available < qty:
                return trades

        for p in prices:
            if order.remaining <= 0:
                break
            if not is_market and ((side == BUY and p > price) or (side == SELL and p < price)):
                break
            level = opposite[p]
            while level.orders and order.remaining > 0:
                maker = level.orders[0]
                fill = min(order.remaining, maker.remaining)
                value = fill * p
                trades.append(
                    SeedTrade(oid, maker.order_id, p, fill, value, value * MAKER_FEE, value * TAKER_FEE)
                )
                maker.remaining -= fill
                order.remaining -= fill
                level.volume -= fill
                if maker.remaining <= 0:
                    level.orders.popleft()
                    del self.orders[maker.order_id]
            if not level.orders:
                del opposite[p]

        if order.remaining > 0 and tif == GTC and not is_market:
            own = self.bids if side == BUY else self.asks
            own_level = own.get(price)
            if own_level is None:
                own_level = own[price] = PriceLevel(price)
            own_level.orders.append(order)
            own_level.volume += order.remaining
            self.orders[oid] = order
        return trades

    def cancel(self, oid: int) -> bool:
        order = self.orders.pop(oid, None)
        if order is None:
            return False
        own = self.bids if order.side == BUY else self.asks
        level = own[order.price]
        level.orders.remove(order)
        level.volume -= order.remaining
        if not level.orders:
            del own[order.price]
        return True


# order = [oid, side, price, remaining] (remaining 0: cancelled, still in its level's deque)
# level = [deque of orders, volume, live orders]
# keys: a bid's key is its price, an ask's minus its price; both lists ascend, so the best is last.
_NO_LIMIT: Final = -(1 << 62)
Trade = tuple[int, int, int, int, int, int]  # taker oid, maker oid, price, qty, maker fee, taker fee


class TightBook:
    __slots__ = ("ask_keys", "ask_lv", "bid_keys", "bid_lv", "orders")

    def __init__(self) -> None:
        self.bid_keys: list[int] = []
        self.ask_keys: list[int] = []
        self.bid_lv: dict[int, list[Any]] = {}
        self.ask_lv: dict[int, list[Any]] = {}
        self.orders: dict[int, list[Any]] = {}

    def limit(self, oid: int, side: int, price: int, qty: int, tif: int = GTC) -> list[Trade]:
        if side == BUY:
            return self._match(oid, side, price, qty, tif, self.ask_keys, self.ask_lv, -price)
        return self._match(oid, side, price, qty, tif, self.bid_keys, self.bid_lv, price)

    def market(self, oid: int, side: int, qty: int) -> list[Trade]:
        if side == BUY:
            return self._match(oid, side, 0, qty, IOC, self.ask_keys, self.ask_lv, _NO_LIMIT)
        return self._match(oid, side, 0, qty, IOC, self.bid_keys, self.bid_lv, _NO_LIMIT)

    def _match(
        self,
        oid: int,
        side: int,
        price: int,
        qty: int,
        tif: int,
        keys: list[int],
        lv: dict[int, list[Any]],
        key_limit: int,
    ) -> list[Trade]:
        trades: list[Trade] = []
        if tif == FOK:
            avail = 0
            for i in range(len(keys) - 1, -1, -1):
                k = keys[i]
                if k < key_limit:
                    break
                avail += lv[k][1]
                if avail >= qty:
                    break
            if avail < qty:
                return trades
        remaining = qty
        orders = self.orders
        append = trades.append
        while remaining and keys:
            k = keys[-1]
            if k < key_limit:
                break
            level = lv[k]
            q = level[0]
            px = k if k > 0 else -k
            while remaining:
                o = q[0]
                oq = o[3]
                if not oq:
                    q.popleft()
                    continue
                if oq <= remaining:
                    fill = oq
                    remaining -= oq
                    o[3] = 0
                    q.popleft()
                    level[2] -= 1
                    del orders[o[0]]
                else:
                    fill = remaining
                    o[3] = oq - remaining
                    remaining = 0
                level[1] -= fill
                value = px * fill
                append((oid, o[0], px, fill, value * MAKER_FEE_BPS, value * TAKER_FEE_BPS))
                if not level[2]:
                    keys.pop()
                    del lv[k]
                    break
        if remaining and tif == GTC and key_limit != _NO_LIMIT:
            if side == BUY:
                key, own_keys, own_lv = price, self.bid_keys, self.bid_lv
            else:
                key, own_keys, own_lv = -price, self.ask_keys, self.ask_lv
            o = [oid, side, price, remaining]
            own_level = own_lv.get(key)
            if own_level is None:
                own_lv[key] = [deque((o,)), remaining, 1]
                insort(own_keys, key)
            else:
                own_level[0].append(o)
                own_level[1] += remaining
                own_level[2] += 1
            orders[oid] = o
        return trades

    def cancel(self, oid: int) -> bool:
        o = self.orders.pop(oid, None)
        if o is None:
            return False
        if o[1] == BUY:
            key, keys, lv = o[2], self.bid_keys, self.bid_lv
        else:
            key, keys, lv = -o[2], self.ask_keys, self.ask_lv
        level = lv[key]
        level[1] -= o[3]
        level[2] -= 1
        o[3] = 0
        if not level[2]:
            del lv[key]
            del keys[bisect_left(keys, key)]
        return True

    # Read by the flow generator, never on the timed path.
    def best_bid(self) -> int | None:
        return self.bid_keys[-1] if self.bid_keys else None

    def best_ask(self) -> int | None:
        return -self.ask_keys[-1] if self.ask_keys else None

    def top_levels(self, side: int, n: int) -> list[tuple[int, int]]:
        """(price, volume) of the n best levels of `side`, best first."""
        keys, lv = (self.bid_keys, self.bid_lv) if side == BUY else (self.ask_keys, self.ask_lv)
        return [(k if side == BUY else -k, lv[k][1]) for k in keys[: -n - 1 : -1]]
