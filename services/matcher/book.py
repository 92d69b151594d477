"""Order book state: per side a ladder of price levels, each level a FIFO queue of resting orders.

The layout is chosen for CPython speed, because the core must apply about a million commands a second:

- A resting order is a flat list ``[order_id, account, client_order_id, side, price, quantity, leaves]``
  and with balances on ``funds`` after them (the ``O_*`` constants name the slots; ``funds`` is the
  ledger's, opaque here, and absent without balances, where it would cost 8 bytes an order). Lists are
  about five times cheaper to create than objects with ``__slots__`` and ``__init__``, and creating
  one is on the path of every new order.
- Each side keeps ``levels`` (key -> Level) and a binary heap of keys with the best level at ``heap[0]``.
  A key is the price for asks and minus the price for bids, so on both sides "better" means "smaller"
  and one matching loop serves both.
- A level's queue is a list read from ``head``: taking the oldest order moves ``head`` on, and the
  matching loop cuts the entries before it off in bulk once they outnumber the rest. (A list, not a
  deque: the compiled build appends to and indexes a list inline; deque methods are generic calls.)
- Cancels are lazy and O(1): the order's leaves drop to 0 and it stays in its level's queue until it
  reaches the head. A level is compacted when dead entries outnumber live ones.
- The heap is lazy too: an emptied level leaves its key behind and in ``stale``, stale keys are popped
  when they reach the top, and the heap is rebuilt when stale keys outnumber live ones. A level that
  comes back at a stale key takes that key over instead of pushing it again, so a key is in the heap
  at most once (levels that empty and come back below the top cost set operations, not heap pushes).
  Invariants: ``heap[0]``, when the heap is not empty, is the key of a live level; the heap holds
  exactly the keys of ``levels`` and of ``stale``, each once.

The order types beyond plain limit and market orders keep their extra state beside the book, so a
plain order pays nothing for them:

- An iceberg's record holds only its shown part in ``leaves`` (what L2 and the level total see);
  ``icebergs`` maps its id to ``[display_quantity, hidden]``, the reserve that refills it.
- Untriggered stops are not in the book at all: ``stops`` maps id -> stop record (``S_*`` slots) in
  the order they were placed (ids rise); their client order ids are in ``cids`` like any open
  order's, so uniqueness holds across both.
- GTD orders: ``gtd`` maps id -> expire_time, ``expiries`` is a heap of (expire_time, id). Both are
  lazy: an entry whose order has gone (filled, cancelled) is dropped when it reaches the top.
"""

from __future__ import annotations

from collections.abc import Iterator
from heapq import heapify, heappop, heappush
from typing import TYPE_CHECKING, Any, Final

from shared.commands import BUY
from shared.instruments import Instrument

# Final aliases: the compiled build keeps a Final in a C static, where an imported name is looked up
# in the module's dict at each call (a new level and a dropped one call them).
_heappush: Final = heappush
_heappop: Final = heappop

if TYPE_CHECKING:  # the ledger's types only: balances.py needs nothing of the book
    from services.matcher.balances import Market

# The slots of an order and of a stop, as Final literals: the compiled build indexes with constants
# (a name bound by unpacking would be looked up in the module's dict at every use).
O_ID: Final = 0
O_ACCOUNT: Final = 1
O_CID: Final = 2
O_SIDE: Final = 3
O_PRICE: Final = 4
O_QTY: Final = 5
O_LEAVES: Final = 6
O_FUNDS: Final = 7  # balances on only: the owner's balances on this market (balances.Funds) or None
Order = list[Any]  # see O_* for the slots
S_ID: Final = 0
S_ACCOUNT: Final = 1
S_CID: Final = 2
S_SIDE: Final = 3
S_TYPE: Final = 4
S_TIF: Final = 5
S_PRICE: Final = 6
S_QTY: Final = 7
S_STOP: Final = 8
S_STP: Final = 9
Stop = list[Any]  # an untriggered stop order; see S_* for the slots

# (bid price|None, bid total, ask price|None, ask total). Typed as a tuple of any length so that the
# compiled build keeps it as the one tuple object the book events share: a fixed-length tuple type
# is a C struct of native ints there, boxed into a new tuple (and new ints) at every read.
Bbo = tuple[Any, ...]

# Beyond any price key: the limit of a market order. The largest int the compiled build keeps unboxed
# (its native ints are 63-bit tagged): at 1 << 62 every compare with it took the slow path.
MAX_KEY: Final = (1 << 62) - 1
STALE_SLACK: Final = 64


class Level:
    """All resting orders at one price, oldest first. ``total`` is the sum of their leaves.

    ``price`` is typed Any on purpose: it is the one int object that every order and event at this
    level refers to. As a native int field the compiled build would box a new one at each read, which
    costs an allocation per event and 28 bytes per resting order."""

    __slots__ = ("dead", "head", "orders", "price", "total")

    def __init__(self, price: Any) -> None:
        self.price = price
        self.total = 0
        self.orders: list[Order] = []  # the queue is orders[head:]; what is before head is done with
        self.head = 0
        self.dead = 0  # cancelled entries still in the queue

    def queue(self) -> list[Order]:
        """The queue, oldest first, cancelled entries included."""
        return self.orders[self.head :]

    def live_orders(self) -> Iterator[Order]:
        return (o for o in self.queue() if o[O_LEAVES])


class BookSide:
    """One side of the book: levels by key and a heap of keys, best first."""

    __slots__ = ("heap", "levels", "side", "sign", "stale")

    def __init__(self, side: str) -> None:
        self.side = side
        self.sign = -1 if side == BUY else 1
        self.levels: dict[int, Level] = {}
        self.heap: list[int] = []
        self.stale: set[int] = set()  # keys in the heap whose level has gone

    def add(self, order: Order) -> Level:
        """Append a resting order at the back of its price level, creating the level if needed."""
        key = order[O_PRICE] * self.sign
        level = self.levels.get(key)
        if level is None:
            level = self.new_level(key, order[O_PRICE])
        else:
            order[O_PRICE] = level.price  # one shared int per level instead of one per order
        level.orders.append(order)
        leaves: int = order[O_LEAVES]  # typed: the compiled build then adds natively, not generically
        level.total += leaves
        return level

    def new_level(self, key: Any, price: Any) -> Level:
        # key is typed Any so that the compiled build boxes it once, at the call, rather than once
        # for each of the dict, the stale set and the heap.
        level = self.levels[key] = Level(price)
        stale = self.stale
        if key in stale:
            stale.remove(key)  # its key is in the heap already
        else:
            _heappush(self.heap, key)
        return level

    def remove(self, order: Order) -> Level:
        """Take a resting order out of its level in O(1); drops the level when it empties."""
        key = order[O_PRICE] * self.sign
        level = self.levels[key]
        leaves: int = order[O_LEAVES]  # typed, as in add
        level.total -= leaves
        order[O_LEAVES] = 0
        if level.total == 0:
            self.drop(key)
        else:
            level.dead += 1
            if level.dead > STALE_SLACK and level.dead * 2 > len(level.orders) - level.head:
                level.orders = list(level.live_orders())
                level.head = level.dead = 0
        return level

    def drop(self, key: int) -> None:
        """Forget an empty level and keep heap[0] live."""
        levels, heap, stale = self.levels, self.heap, self.stale
        del levels[key]
        if heap[0] == key:
            _heappop(heap)
            while heap and heap[0] in stale:
                stale.remove(_heappop(heap))
        else:
            stale.add(key)
            if len(stale) > len(levels) + STALE_SLACK:
                self.rebuild_heap()

    def rebuild_heap(self) -> None:
        # In place: the matching loop holds the heap in a local while it drops levels.
        heap = self.heap
        heap[:] = self.levels
        heapify(heap)
        self.stale.clear()

    def best(self) -> Level | None:
        # The heap typed as a list of objects, so that heap[0] is the heap's own int object, which is
        # also levels' key (see new_level): read from a list[int], the compiled build would unbox it and
        # box a new one, and the lookup would then compare values instead of matching identity.
        heap: list[Any] = self.heap
        return self.levels[heap[0]] if heap else None

    def iter_levels(self, limit_key: int = MAX_KEY) -> Iterator[Level]:
        """Levels best first, up to limit_key, without consuming the heap.

        Near the top the book is dense, so walking key by key is cheapest; after a run of empty keys we
        sort the remaining keys once instead.
        """
        levels = self.levels
        if not levels:
            return
        key = self.heap[0]
        remaining = len(levels)
        misses = 0
        while key <= limit_key and remaining:
            level = levels.get(key)
            key += 1
            if level is None:
                misses += 1
                if misses > STALE_SLACK:
                    break
                continue
            misses = 0
            remaining -= 1
            yield level
        else:
            return
        for k in sorted(k for k in levels if key <= k <= limit_key):
            yield levels[k]


class OrderBook:
    """One symbol's book and the counters that make its output sequences."""

    __slots__ = (
        "asks",
        "bbo",
        "bids",
        "book_seq",
        "cids",
        "expiries",
        "gtd",
        "icebergs",
        "inst",
        "last_price",
        "maker_rate",
        "market",
        "max_price",
        "max_qty",
        "min_notional",
        "min_qty",
        "orders",
        "stops",
        "symbol",
        "taker_rate",
        "trade_seq",
    )

    def __init__(self, inst: Instrument, market: Market | None = None) -> None:
        self.inst = inst
        self.market = market  # the ledger's view of the instrument, with balances on (balances.py)
        self.symbol = inst.symbol
        # The instrument's integer limits, copied here: one attribute read each on the hot path.
        self.min_qty = inst.min_qty_lots
        self.max_qty = inst.max_qty_lots
        self.max_price = inst.max_price_ticks
        self.min_notional = inst.min_notional_units
        self.maker_rate = inst.maker_rate
        self.taker_rate = inst.taker_rate
        self.bids = BookSide(BUY)
        self.asks = BookSide("sell")
        self.orders: dict[int, Order] = {}  # order id -> resting order
        self.cids: dict[str, dict[str, Order]] = {}  # account -> client order id -> resting order
        self.trade_seq = 0
        self.book_seq = 0
        # (bid price|None, bid total, ask price|None, ask total); the engine refreshes it whenever a
        # command touches a best level, so most commands reuse it instead of recomputing.
        self.bbo: Bbo = (None, 0, None, 0)
        self.last_price: int | None = None  # of the last trade: what stops trigger on
        self.stops: dict[int, Stop] = {}
        self.icebergs: dict[int, list[int]] = {}  # id -> [display_quantity, hidden]
        self.gtd: dict[int, int] = {}  # id -> expire_time
        self.expiries: list[tuple[int, int]] = []  # heap of (expire_time, id)

    def side_of(self, side: str) -> BookSide:
        return self.bids if side == BUY else self.asks

    def refresh_bbo(self) -> Bbo:
        bid, ask = self.bids.best(), self.asks.best()
        self.bbo = (
            bid.price if bid else None,
            bid.total if bid else 0,
            ask.price if ask else None,
            ask.total if ask else 0,
        )
        return self.bbo

    def find(self, account: Any, order_id: Any, cid: Any) -> Order | None:
        """The caller's resting order by id, else by client order id; None if unknown or someone else's.
        The fields are untrusted command input: a value of the wrong type names no order."""
        if order_id is not None:
            order = self.orders.get(order_id) if type(order_id) is int else None
        elif type(cid) is str and type(account) is str:
            order = self.cids.get(account, {}).get(cid)
        else:
            return None
        if order is None or order[O_ACCOUNT] != account:
            return None
        return order

    def index(self, order: Order) -> None:
        self.orders[order[O_ID]] = order
        cid = order[O_CID]
        if cid is not None:
            by_cid = self.cids.get(order[O_ACCOUNT])
            if by_cid is None:
                by_cid = self.cids[order[O_ACCOUNT]] = {}
            by_cid[cid] = order

    def unindex(self, order: Order) -> None:
        # An account's (possibly empty) cid dict is kept: accounts come back, and dropping and
        # re-creating it would cost an allocation on the hot path.
        del self.orders[order[O_ID]]
        if order[O_CID] is not None:
            del self.cids[order[O_ACCOUNT]][order[O_CID]]

    def depth(self, n: int) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        """Top n levels per side as (price, total), best first."""
        out = []
        for side in (self.bids, self.asks):
            rows: list[tuple[int, int]] = []
            for level in side.iter_levels():
                if len(rows) >= n:
                    break
                rows.append((level.price, level.total))
            out.append(rows)
        return out[0], out[1]
