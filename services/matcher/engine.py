"""The matching engine: ``apply(command, seq, ts) -> events``. Pure and deterministic.

No clock, no I/O, no randomness: time (``ts``), the sequence number (``seq``, which is also the new
order's id) and every other input come from the caller, so the same commands give the same events,
byte for byte. That is what makes crash recovery by replay exact.

Rules: strict price-time priority, no trade-through, market orders sweep until filled or the book is
empty, IOC never rests, FOK fills completely or leaves the book untouched, post-only never takes,
an account never trades with itself (self-trade prevention), client order ids are unique among an
account's open orders. Invalid input becomes a ``rejected`` event; the book is then untouched.

More order types (docs/protocol.md "More order types"):
- Stops (stop_limit, stop_market) wait outside the book. A buy stop triggers when a trade at or above
  its stop price happens after it was placed (a sell stop: at or below), or at once when placed if
  the last trade price already meets it (with no trade yet, it waits). The stops a command triggers
  are applied right after it, in the order they were placed; the stops their trades trigger form the
  next wave, and so on. Each stop triggers at most once (it leaves ``stops`` when it does), so a
  cascade ends after at most as many orders as there were stops: no loop is possible.
- GTD limits expire from the command's ts (time is an input): every command first expires the GTD
  orders of its symbol with expire_time <= ts; a ``Tick`` carries only time so expiries fire while no
  order arrives. ``next_expiry(symbol)`` tells the caller when a Tick is due.
- Icebergs show at most display_quantity; the shown part keeps its priority until it is filled, then
  the next part comes from the reserve at the back of the level. Trades report the whole remainder.
- A market order may give quote_quantity instead of quantity: it fills the whole lots whose notional
  (plus the taker fee, for a buy) stays within it. The lots are counted on the book as it stands (the
  same walk as FOK's), and the order is then an ordinary market order of that many lots.

The hot paths are written out inline on purpose (no helper calls per fill): this module is the
benchmark's inner loop.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from heapq import heappop, heappush
from typing import Any, Final

from services.matcher.balances import Funds, Ledger
from services.matcher.book import (
    MAX_KEY,
    O_ACCOUNT,
    O_CID,
    O_FUNDS,
    O_ID,
    O_LEAVES,
    O_PRICE,
    O_QTY,
    O_SIDE,
    S_ACCOUNT,
    S_CID,
    S_ID,
    S_SIDE,
    S_STOP,
    STALE_SLACK,
    BookSide,
    Order,
    OrderBook,
)
from shared import codes
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
    STP_CANCEL_BOTH,
    STP_CANCEL_MAKER,
    STP_CANCEL_TAKER,
    STP_MODES,
    Amend,
    Cancel,
    CancelAll,
    Command,
    Deposit,
    Grant,
    NewOrder,
    Tick,
    Withdraw,
)
from shared.events import ACCEPTED, AMENDED, BALANCE, BOOK, CANCELLED, REJECTED, TRADE, TRIGGERED, Event
from shared.ids import MAX_ACCOUNT, RESERVED_PREFIX
from shared.instruments import FEE_DENOM, Instrument

# The public core API (docs/core.md): Engine, the commands and the events. The major number changes
# when a name, a field or an event shape changes incompatibly; the minor one when something is added.
CORE_API_VERSION: Final = "1.3"

_MAX_CID: Final = 36
_INT64: Final = 1 << 63
_NO_CIDS: Final[dict[str, Order]] = {}
_STOP_TYPES: Final = (STOP_LIMIT, STOP_MARKET)
# 'No expiry due': soonest's value with no GTD order. An upper bound of realistic times, kept unboxed
# in the compiled build like MAX_KEY (apply compares ts with soonest at every command); an expire_time
# beyond it only makes expiry checks run early, since soonest stays a lower bound.
NEVER: Final = MAX_KEY
# Called as a function: the compiled build then calls the method object directly instead of looking
# `isprintable` up on the string at every new order (a third of the check's cost).
_isprintable: Final = str.isprintable
# Per order type: the tifs it takes.
_TIFS: Final[dict[str, tuple[str, ...]]] = {
    LIMIT: (GTC, IOC, FOK, GTD),
    MARKET: (IOC, FOK),
    STOP_LIMIT: (GTC, IOC, FOK),
    STOP_MARKET: (IOC,),
}

# Every valid (side, type, tif, stp) of a new order -> (is it a buy, is it a limit order, is it GTC).
# The flags spare the hot path comparisons of fields typed Any (generic calls in the compiled build).
_SHAPES: Final[dict[tuple[str, str, str, str], tuple[bool, bool, bool]]] = {
    (side, otype, tif, stp): (side == BUY, otype == LIMIT, tif == GTC)
    for side in (BUY, SELL)
    for otype, tifs in ((LIMIT, (GTC, IOC, FOK)), (MARKET, (IOC, FOK)))
    for tif in tifs
    for stp in STP_MODES
}


# A level a command changed, as the book event lists it: (side, price, new total). The price is
# typed Any so that the compiled build stores the level's own int object instead of boxing a new one.
Change = tuple[str, Any, int]

# The commands whose first field is a symbol.
_SYMBOLED: Final = (NewOrder, Cancel, Amend, Tick, CancelAll)
# Final aliases of imported names used at every command: the compiled build keeps a Final in a C
# static, where an imported name is a lookup in the module's dict at each use (~150 instructions).
_NEW_ORDER: Final = NewOrder
_CANCEL: Final = Cancel
_AMEND: Final = Amend
_TICK: Final = Tick
_RESERVED: Final = ord(RESERVED_PREFIX)  # one character: the prefix of the venue's own accounts


class Engine:
    """All books of one matcher. Feed it commands in stream order with strictly increasing seq.

    With ``risk=True`` the engine also keeps every account's balances (``ledger``, see balances.py):
    orders hold funds and are rejected INSUFFICIENT_FUNDS when they cannot, fills settle at once, and
    each command ends with a `balance` event per (account, asset) it touched."""

    def __init__(self, instruments: Iterable[Instrument], risk: bool = False) -> None:
        insts = list(instruments)
        self.ledger: Ledger | None = Ledger(insts) if risk else None
        markets = self.ledger.markets if self.ledger is not None else {}
        self.books: dict[str, OrderBook] = {i.symbol: OrderBook(i, markets.get(i.symbol)) for i in insts}
        self.last_seq = 0
        # Kept so that a plain command checks two ints instead of its book's extra state.
        self.n_stops = 0  # untriggered stops, all books
        self.soonest = NEVER  # no GTD order of any book expires before this (a lower bound)

    # ------------------------------------------------------------------------------------------
    def apply(self, cmd: Command | object, seq: int, ts: int) -> list[Event]:
        """Apply one command; return its events. seq must rise; ts is carried into trades.

        `cmd` is typed wider than Command on purpose: anything else is input to reject (UNKNOWN_OP),
        and a compiled build checks declared argument types before the body runs."""
        if seq <= self.last_seq:
            raise ValueError(f"seq {seq} is not after {self.last_seq}")  # caller bug, not user input
        self.last_seq = seq
        if ts >= self.soonest or self.n_stops:
            events = self._apply_slow(cmd, seq, ts)
        else:
            kind = type(cmd)
            if kind is _NEW_ORDER:
                events = self._new(cmd, seq, ts)  # type: ignore[arg-type]
            elif kind is _CANCEL:
                events = self._cancel(cmd)  # type: ignore[arg-type]
            elif kind is _AMEND:
                events = self._amend(cmd)  # type: ignore[arg-type]
            elif kind is _TICK:
                events = []
            else:
                events = self._other(cmd)
        ledger = self.ledger
        if ledger is not None and ledger.touched:
            fields: tuple[Any, ...] = cmd if type(cmd) in _SYMBOLED else (None,)  # type: ignore[assignment]
            ledger.flush(fields[0], events)
        return events

    def _other(self, cmd: object) -> list[Event]:
        """The rare commands: mass cancel and funding; anything else is rejected UNKNOWN_OP."""
        kind = type(cmd)
        if kind is CancelAll:
            return self._cancel_all(cmd)  # type: ignore[arg-type]
        if kind is Deposit or kind is Withdraw:
            fields: tuple[Any, ...] = cmd  # type: ignore[assignment]
            account, asset, amount, request_id = fields
            op = "deposit" if kind is Deposit else "withdraw"
            if self.ledger is None:
                return [_rejected(None, op, None, account, request_id, codes.BALANCES_DISABLED)]
            return [self.ledger.fund(op, account, asset, amount, request_id)]
        if kind is Grant:
            grant: tuple[Any, ...] = cmd  # type: ignore[assignment]
            account, amounts = grant
            if self.ledger is None:
                return [_rejected(None, "faucet", None, account, None, codes.BALANCES_DISABLED)]
            return self.ledger.grant(account, amounts)
        return [_rejected(None, "new", None, None, None, codes.UNKNOWN_OP)]

    def _apply_slow(self, cmd: object, seq: int, ts: int) -> list[Event]:
        """apply() when an expiry may be due or stops wait: expiries first, then the command, then
        the stops its trades trigger (see the module docstring)."""
        kind = type(cmd)
        fields: tuple[Any, ...] = cmd if kind in _SYMBOLED else ()  # type: ignore[assignment]
        symbol = fields[0] if fields else None
        book = self.books.get(symbol) if type(symbol) is str else None
        out: list[Event] = []
        if book is not None and book.expiries and book.expiries[0][0] <= ts:
            self._expire(book, ts, out)
            self.soonest = min((b.expiries[0][0] for b in self.books.values() if b.expiries), default=NEVER)
        if kind is _NEW_ORDER:
            traded = book.trade_seq if book is not None else 0
            events = self._new(cmd, seq, ts)  # type: ignore[arg-type]
            if book is not None and book.trade_seq != traded and book.stops and fields[3] not in _STOP_TYPES:
                prices = [e[3] for e in events if e[0] == TRADE]
                self._run_stops(book, events, min(prices), max(prices), ts)
        elif kind is _CANCEL:
            events = self._cancel(cmd)  # type: ignore[arg-type]
        elif kind is _AMEND:
            events = self._amend(cmd)  # type: ignore[arg-type]
        elif kind is _TICK:
            events = []
        else:
            events = self._other(cmd)
        if not out:
            return events
        out += events
        return out

    def _expire(self, book: OrderBook, ts: int, out: list[Event]) -> None:
        """Cancel (reason expired) every GTD order of `book` with expire_time <= ts, soonest first
        (ties by id), then one book event for all of them."""
        heap, gtd, symbol = book.expiries, book.gtd, book.symbol
        changes: dict[tuple[str, int], int] = {}
        while heap and heap[0][0] <= ts:
            expire, oid = heappop(heap)
            if gtd.get(oid) != expire:
                continue
            del gtd[oid]
            order = book.orders.get(oid)
            if order is None:  # filled or cancelled since
                continue
            side, price = order[O_SIDE], order[O_PRICE]
            rest = order[O_LEAVES]
            ice = book.icebergs.pop(oid, None) if book.icebergs else None
            if ice is not None:
                rest += ice[1]
            level = book.side_of(side).remove(order)
            book.unindex(order)
            changes[side, price] = level.total
            if self.ledger is not None:
                self._release(book, order[O_ACCOUNT], side, price, rest)
            out.append((CANCELLED, symbol, oid, order[O_ACCOUNT], order[O_CID], side, price, order[O_QTY],
                        rest, codes.REASON_EXPIRED))  # fmt: skip
        if changes:
            book.book_seq += 1
            moved = [(side, price, total) for (side, price), total in changes.items()]
            out.append((BOOK, symbol, book.book_seq, moved, book.refresh_bbo()))

    def next_expiry(self, symbol: str) -> int | None:
        """The earliest expire_time of a resting GTD order of `symbol` (None: none): a command with a
        ts at or after it expires that order. Pure: drops only entries of orders already gone."""
        book = self.books[symbol]
        heap, gtd = book.expiries, book.gtd
        while heap:
            expire, oid = heap[0]
            if gtd.get(oid) == expire and oid in book.orders:
                return expire
            heappop(heap)
            if gtd.get(oid) == expire:
                del gtd[oid]
        return None

    # New orders -------------------------------------------------------------------------------
    def _new(self, cmd: NewOrder, seq: int, ts: int) -> list[Event]:
        # The fields are untrusted input: typed Any, so that a compiled build checks them here
        # instead of raising TypeError on a field of the wrong type.
        fields: tuple[Any, ...] = cmd
        (symbol, account, side, otype, tif, price, qty, cid, post_only, stp,
         stop, expire, display, quote) = fields  # fmt: skip
        if stop is not None or expire is not None or display is not None or quote is not None:
            return self._new_special(cmd, seq, ts)
        # The common, valid order is checked with as few operations as possible: one dict lookup
        # covers symbol, side, type, tif (and market-not-GTC) and stp. Anything that fails a check
        # goes to _new_order_error, which re-checks in a fixed order to name the exact reject code.
        try:
            book = self.books[symbol]
            buy, is_limit, gtc = _SHAPES[side, otype, tif, stp]
        except (KeyError, TypeError):  # TypeError: an unhashable field
            return [_rejected(symbol, "new", seq, account, cid, _new_order_error(self.books, cmd, ts))]
        if (
            type(account) is not str
            or not 0 < len(account) <= MAX_ACCOUNT
            or (
                cid is not None
                and (type(cid) is not str or not 0 < len(cid) <= _MAX_CID or not _isprintable(cid))
            )
            or (post_only is not False and (post_only is not True or not gtc))
        ):
            return [_rejected(symbol, "new", seq, account, cid, _new_order_error(self.books, cmd, ts))]
        # `lots` and `ticks` are the quantity and price as native ints, for the checks and the
        # arithmetic: compared as fields typed Any, each bound would be boxed and compared generically.
        # A field that is no int gives 0, which the checks refuse (min_qty and a price are at least 1).
        # qty and price themselves are not narrowed by an `if` on their type: mypy would then type them
        # int, and the compiled build would box a new int wherever one is stored (the order, its
        # events). Left as the command's own objects, they are shared.
        lots: int = qty if type(qty) is int else 0
        ticks: int = price if type(price) is int else 0
        bad_numbers = not book.min_qty <= lots <= book.max_qty or (
            not 0 < ticks <= book.max_price or ticks * lots < book.min_notional
            if is_limit
            else price is not None
        )
        if bad_numbers:
            return [_rejected(symbol, "new", seq, account, cid, _new_order_error(self.books, cmd, ts))]
        by_cid = book.cids.get(account)
        if cid is not None and by_cid is not None and cid in by_cid:
            return [_rejected(symbol, "new", seq, account, cid, codes.DUPLICATE_CLIENT_ORDER_ID)]

        # On both sides a smaller key is a better price (see book.py); a market order has no limit.
        if buy:
            own, opp = book.bids, book.asks
            limit_key = MAX_KEY if price is None else ticks
        else:
            own, opp = book.asks, book.bids
            limit_key = MAX_KEY if price is None else -ticks
        heap = opp.heap
        rests = not heap or heap[0] > limit_key  # nothing to trade against
        ledger = self.ledger
        held: Event | None = None
        funds: Funds | None = None  # the account's balances here (balances on), kept by the order
        if ledger is not None:
            funds = ledger.funds(book.market, account)  # type: ignore[arg-type]
            # The venue's own never trade; Ledger.funds gives them none, so only an account without
            # funds here is checked.
            if funds is None and _reserved(account):
                return [_rejected(symbol, "new", seq, account, cid, codes.INVALID_ACCOUNT)]
        if post_only and not rests:
            return [_rejected(symbol, "new", seq, account, cid, codes.WOULD_TAKE)]
        if ledger is not None:
            if rests and gtc and not ledger.touched:  # its hold is the command's one balance change
                held = ledger.hold_single(book.market, funds, account, buy, ticks, lots, symbol)  # type: ignore[arg-type]
                if held is None:
                    return [_rejected(symbol, "new", seq, account, cid, codes.INSUFFICIENT_FUNDS)]
            else:
                code = self._hold_new(book, account, buy, price, qty, stp, funds)
                if code is not None:
                    return [_rejected(symbol, "new", seq, account, cid, code)]
        oid: Any = seq  # one int object for the order, its index and its events (else boxed at each)
        accepted = (ACCEPTED, symbol, oid, account, cid, side, otype, tif, price, qty)

        if rests:
            if not gtc:
                if self.ledger is not None:
                    self._release(book, account, side, price, lots)
                reason = codes.REASON_FOK if tif == FOK else _unfilled(otype)
                return [accepted, (CANCELLED, symbol, oid, account, cid, side, price, qty, qty, reason)]
            # The common case, a passive limit order joining the book: BookSide.add, OrderBook.index
            # and the best-bid/offer update written out, since this path is most of the flow.
            key = -limit_key
            level = own.levels.get(key)
            if level is None:
                level = own.new_level(key, price)
            # O_FUNDS only with balances: without, an order stays the seven slots it was (book.py)
            if ledger is None:
                order: Order = [oid, account, cid, side, level.price, qty, qty]
            else:
                order = [oid, account, cid, side, level.price, qty, qty, funds]
            level.orders.append(order)
            total = level.total = level.total + lots
            book.orders[oid] = order
            if cid is not None:
                if by_cid is None:
                    by_cid = book.cids[account] = {}
                by_cid[cid] = order
            book.book_seq += 1
            bbo = book.bbo
            if own.heap[0] == key:  # the order is at the best price of its side
                bbo = book.bbo = (
                    (level.price, total, bbo[2], bbo[3]) if buy else (bbo[0], bbo[1], level.price, total)
                )
            book_event = (BOOK, symbol, book.book_seq, [(side, level.price, total)], bbo)
            if held is not None:
                return [accepted, book_event, held]
            return [accepted, book_event]

        out: list[Event] = [accepted]
        if tif == FOK and not _fillable(opp, limit_key, account, stp, lots, book.icebergs):
            if self.ledger is not None:
                self._release(book, account, side, price, lots)
            out.append((CANCELLED, symbol, oid, account, cid, side, price, qty, qty, codes.REASON_FOK))
            return out

        if ledger is None:  # see the resting case
            order = [oid, account, cid, side, price, qty, qty]
        else:
            order = [oid, account, cid, side, price, qty, qty, funds]
        changes: list[Change] = []
        stopped = self._match(book, opp, order, limit_key, stp, ts, out, changes)
        leaves = order[O_LEAVES]
        if leaves:
            if stopped:
                reason = codes.REASON_STP
            elif gtc:
                level = own.add(order)
                book.index(order)
                changes.append((side, level.price, level.total))
                reason = ""
            else:
                reason = _unfilled(otype)
            if reason:
                if self.ledger is not None:
                    self._release(book, account, side, price, leaves)
                out.append((CANCELLED, symbol, oid, account, cid, side, price, qty, leaves, reason))
        if changes:
            book.book_seq += 1
            out.append((BOOK, symbol, book.book_seq, changes, book.refresh_bbo()))
        return out

    def _match(
        self,
        book: OrderBook,
        opp: BookSide,
        taker: Order,
        limit_key: int,
        stp: str,
        ts: int,
        out: list[Event],
        changes: list[Change],
    ) -> bool:
        """Trade the taker against `opp` best first. True if self-trade prevention stopped the taker."""
        symbol = book.symbol
        # The fees are typed Any, so their products are plain Python multiplications: the compiled
        # build takes a slow path (boxing both sides, ~800 instructions) for any native product with a
        # factor of 2**30 or more, which a notional (ticks x lots) mostly is at real magnitudes; the
        # result is boxed for the event anyway.
        maker_rate: Any = book.maker_rate
        taker_rate: Any = book.taker_rate
        # Typed locals: the compiled build compares and adds them natively (an Any goes the generic way).
        account: str
        t_leaves: int
        t_id, account, t_cid, t_side = taker[O_ID], taker[O_ACCOUNT], taker[O_CID], taker[O_SIDE]
        t_price, t_qty, t_leaves = taker[O_PRICE], taker[O_QTY], taker[O_LEAVES]
        levels, heap, opp_side = opp.levels, opp.heap, opp.side
        orders, cids, icebergs = book.orders, book.cids, book.icebergs
        append = out.append
        trade_seq = first_trade = book.trade_seq
        traded_at = 0
        stopped = False
        ledger = self.ledger
        market = book.market
        t_funds = taker[O_FUNDS] if market is not None else None
        entry_leaves = t_leaves
        taker_buys = t_side == BUY
        stamp: Any = ts  # one int object for all the trades (the compiled build would box ts per trade)
        # The heap again, typed as a list of objects: read through it, heap[0] is the heap's own int
        # object, which is also levels' key; read from a list[int], the compiled build would unbox it
        # and box a new one for levels[], whose lookup would then compare values, not identities.
        keys: list[Any] = heap
        while heap and heap[0] <= limit_key:
            key = keys[0]
            level = levels[key]
            q, head = level.orders, level.head  # the queue is q[head:] (see book.py)
            price = level.price  # the level's int object, which the events share
            ticks: int = price  # and as a native int, for the arithmetic
            total = before = level.total  # kept in a local while this level trades
            while True:
                maker = q[head]
                m_leaves: int = maker[O_LEAVES]
                if not m_leaves:  # lazily cancelled
                    head += 1
                    level.dead -= 1
                    continue
                m_account: str
                m_id, m_account, m_cid, m_qty = maker[O_ID], maker[O_ACCOUNT], maker[O_CID], maker[O_QTY]
                if m_account == account:
                    if stp == STP_CANCEL_TAKER:
                        stopped = True
                        break
                    head += 1
                    total -= m_leaves
                    maker[O_LEAVES] = 0
                    book.unindex(maker)
                    ice = icebergs.pop(m_id, None) if icebergs else None
                    if ice is not None:  # the whole order goes, its reserve too
                        m_leaves += ice[1]
                    if ledger is not None:
                        self._release(book, account, opp_side, price, m_leaves)
                    append((CANCELLED, symbol, m_id, account, m_cid, opp_side, price, m_qty, m_leaves,
                            codes.REASON_STP))  # fmt: skip
                    if stp == STP_CANCEL_BOTH:
                        stopped = True
                        break
                    if not total:
                        break
                    continue
                ice = icebergs.get(m_id) if icebergs else None
                if m_leaves <= t_leaves:  # the maker's (shown) quantity is filled
                    fill = m_leaves
                    head += 1
                    if ice is not None and ice[1]:  # an iceberg refills at the back of its level
                        m_rest = ice[1]
                        m_leaves = ice[0] if ice[0] < m_rest else m_rest
                        ice[1] = m_rest - m_leaves
                        q.append(maker)
                        total += m_leaves
                    else:  # it leaves the book
                        m_leaves = m_rest = 0
                        del orders[m_id]
                        if m_cid is not None:
                            del cids[m_account][m_cid]
                        if ice is not None:
                            del icebergs[m_id]
                else:
                    fill = t_leaves
                    m_leaves -= fill
                    m_rest = m_leaves if ice is None else m_leaves + ice[1]
                t_leaves -= fill
                maker[O_LEAVES] = m_leaves
                total -= fill
                notional: Any = ticks * fill  # see maker_rate
                trade_seq += 1
                traded_at = price
                if market is not None:
                    m_funds = maker[O_FUNDS]
                    if m_funds is None:  # its account had not both assets when it was placed
                        m_funds = maker[O_FUNDS] = ledger.pair(market, m_account)  # type: ignore[union-attr]
                    ledger.fill(market, ticks, fill, m_funds, not taker_buys, account, t_funds)  # type: ignore[union-attr]
                # fmt: off
                append((TRADE, symbol, trade_seq, price, fill, t_side,
                        m_id, m_account, m_cid, m_qty, m_rest, notional * maker_rate,
                        t_id, account, t_cid, t_price, t_qty, t_leaves, notional * taker_rate, stamp))
                # fmt: on
                if not t_leaves or not total:
                    break
            level.total, level.head = total, head
            if total != before:
                changes.append((opp_side, price, total))
            if not total:
                opp.drop(key)
            elif head > STALE_SLACK and head * 2 > len(q):  # cut off the taken entries (see book.py)
                del q[:head]
                level.head = 0
            if stopped or not t_leaves:
                break
        if trade_seq != first_trade:
            book.trade_seq = trade_seq
            book.last_price = traded_at
            if market is not None:
                ledger.settle_taker(market, taker_buys, t_price, entry_leaves - t_leaves)  # type: ignore[union-attr]
        taker[O_LEAVES] = t_leaves
        return stopped

    # Cancel and amend -------------------------------------------------------------------------
    def _cancel(self, cmd: Cancel) -> list[Event]:
        fields: tuple[Any, ...] = cmd  # untrusted input, see _new
        symbol, account, order_id, cid = fields
        book = self.books.get(symbol) if type(symbol) is str else None
        if book is None:
            return [_rejected(symbol, "cancel", order_id, account, cid, codes.UNKNOWN_SYMBOL)]
        # OrderBook.find written out: cancels are a fifth of the flow
        if type(order_id) is int:
            order = book.orders.get(order_id)
        elif order_id is None and type(cid) is str and type(account) is str:
            order = book.cids.get(account, _NO_CIDS).get(cid)
        else:
            order = None
        if order is None or order[O_ACCOUNT] != account or (self.n_stops and order[O_ID] in book.stops):
            stop = _find_stop(book, account, order_id, cid) if self.n_stops else None
            if stop is None:
                return [_rejected(symbol, "cancel", order_id, account, cid, codes.UNKNOWN_ORDER)]
            return [self._drop_stop(book, stop)]
        side: str = order[O_SIDE]
        price, leaves = order[O_PRICE], order[O_LEAVES]
        if book.icebergs:
            ice = book.icebergs.pop(order[O_ID], None)
            if ice is not None:
                leaves += ice[1]
        buy = side == BUY
        ledger = self.ledger
        released: Event | None = None
        if ledger is not None:
            if ledger.touched:  # expiries before it changed balances: the release joins them (flush)
                self._release(book, account, side, price, leaves)
            else:  # the command's one balance change
                released = ledger.release_single(
                    book.market,  # type: ignore[arg-type]
                    order[O_FUNDS],
                    account,
                    buy,
                    price,
                    leaves,
                    symbol,
                )
        bbo = book.bbo
        was_best = price == (bbo[0] if buy else bbo[2])
        level = (book.bids if buy else book.asks).remove(order)
        book.unindex(order)
        book.book_seq += 1
        total = level.total
        if was_best:
            if not total:
                bbo = book.refresh_bbo()
            elif buy:
                bbo = book.bbo = (price, total, bbo[2], bbo[3])
            else:
                bbo = book.bbo = (bbo[0], bbo[1], price, total)
        cancelled = (CANCELLED, symbol, order[O_ID], account, order[O_CID], side, price, order[O_QTY],
                     leaves, codes.REASON_USER)  # fmt: skip
        book_event = (BOOK, symbol, book.book_seq, [(side, price, total)], bbo)
        if released is not None:
            return [cancelled, book_event, released]
        return [cancelled, book_event]

    def _amend(self, cmd: Amend) -> list[Event]:
        fields: tuple[Any, ...] = cmd  # untrusted input, see _new
        symbol, account, order_id, cid, new_price, new_qty = fields
        book = self.books.get(symbol) if type(symbol) is str else None
        if book is None:
            return [_rejected(symbol, "amend", order_id, account, cid, codes.UNKNOWN_SYMBOL)]
        order = book.find(account, order_id, cid)
        if order is None or book.stops or book.icebergs:
            # Amending a stop or an iceberg would need rules of its own (re-check a stop's condition,
            # resize a reserve); cancel and replace says the same with the rules that exist.
            stop = _find_stop(book, account, order_id, cid)
            if stop is not None:
                return [_rejected(symbol, "amend", stop[S_ID], account, stop[S_CID], codes.NOT_AMENDABLE)]
            if order is not None and order[O_ID] in book.icebergs:
                return [_rejected(symbol, "amend", order[O_ID], account, order[O_CID], codes.NOT_AMENDABLE)]
            if order is None:
                return [_rejected(symbol, "amend", order_id, account, cid, codes.UNKNOWN_ORDER)]
        inst = book.inst
        price = order[O_PRICE] if new_price is None else new_price
        qty = order[O_QTY] if new_qty is None else new_qty
        filled = order[O_QTY] - order[O_LEAVES]
        side = order[O_SIDE]
        code = None
        if new_price is None and new_qty is None:
            code = codes.INVALID_MESSAGE
        elif type(price) is not int or not 0 < price <= inst.max_price_ticks:
            code = codes.INVALID_PRICE
        elif type(qty) is not int or not inst.min_qty_lots <= qty <= inst.max_qty_lots or qty <= filled:
            code = codes.INVALID_QUANTITY
        elif price * qty < inst.min_notional_units:
            code = codes.MIN_NOTIONAL
        else:
            opp = book.asks if side == BUY else book.bids
            limit_key = price if side == BUY else -price
            if opp.heap and opp.heap[0] <= limit_key:
                code = codes.WOULD_TAKE  # an amend never takes liquidity
        ledger = self.ledger
        market = book.market
        # The hold follows the new price and quantity.
        if code is None and ledger is not None and market is not None:
            buy = side == BUY
            need = market.hold_for(buy, price, qty - filled) - market.hold_for(
                buy, order[O_PRICE], order[O_LEAVES]
            )
            if need <= 0:
                ledger.release(market, account, buy, -need)
            elif not ledger.hold(market, account, buy, need):
                code = codes.INSUFFICIENT_FUNDS
        if code is not None:
            return [_rejected(symbol, "amend", order[O_ID], account, order[O_CID], code)]

        own = book.side_of(side)
        old_price = order[O_PRICE]
        if price == old_price and qty <= order[O_QTY]:  # shrinking in place keeps time priority
            level = own.levels[price * own.sign]
            delta = order[O_QTY] - qty
            order[O_QTY] = qty
            order[O_LEAVES] -= delta
            level.total -= delta
            changes = [(side, price, level.total)] if delta else []
            result = order
        else:  # re-queue at the back: a new record under the same id, the old one left dead
            old_level = own.remove(order)
            book.unindex(order)
            if ledger is None:  # see _new
                result = [order[O_ID], account, order[O_CID], side, price, qty, qty - filled]
            else:
                result = [order[O_ID], account, order[O_CID], side, price, qty, qty - filled, order[O_FUNDS]]
            level = own.add(result)
            book.index(result)
            changes = [(side, level.price, level.total)]
            if price != old_price:
                changes.insert(0, (side, old_level.price, old_level.total))
        out: list[Event] = [
            (
                AMENDED,
                symbol,
                result[O_ID],
                account,
                result[O_CID],
                side,
                result[O_PRICE],
                qty,
                result[O_LEAVES],
            )
        ]
        if changes:
            book.book_seq += 1
            out.append((BOOK, symbol, book.book_seq, changes, book.refresh_bbo()))
        return out

    # More order types -------------------------------------------------------------------------
    def _new_special(self, cmd: NewOrder, seq: int, ts: int) -> list[Event]:
        """A new order with a stop price, an expiry, a display quantity or a quote quantity."""
        fields: tuple[Any, ...] = cmd  # untrusted input, see _new
        symbol, account, side, otype, tif, price, qty, cid, post_only, stp, _, expire, display, quote = fields
        code = _check_new(self.books, cmd, ts)
        ledger = self.ledger
        if code is None and ledger is not None:
            if _reserved(account):
                code = codes.INVALID_ACCOUNT
            elif quote is not None and side == BUY:  # it must be able to spend its whole budget
                market = ledger.markets[symbol]
                if ledger.available(account, market.quote) < quote * market.notional:
                    code = codes.INSUFFICIENT_FUNDS
        if code is not None:
            return [_rejected(symbol, "new", seq, account, cid, code)]
        book = self.books[symbol]
        if otype in _STOP_TYPES:
            return self._place_stop(book, cmd, seq, ts)
        if quote is not None:
            return self._new_quote(book, cmd, seq, ts)
        # A GTD and/or iceberg limit: it matches as the GTC limit it is; what rests is then adjusted.
        plain = NewOrder(symbol, account, side, LIMIT, GTC, price, qty, cid, post_only, stp)
        out = self._new(plain, seq, ts)
        if tif == GTD and out[0][0] == ACCEPTED:
            out[0] = (*out[0][:7], GTD, *out[0][8:])
        order = book.orders.get(seq)
        if order is None:  # it did not rest
            return out
        if tif == GTD:
            book.gtd[seq] = expire
            heappush(book.expiries, (expire, seq))
            if expire < self.soonest:
                self.soonest = expire
        leaves = order[O_LEAVES]
        if display is not None and display < leaves:
            hidden = leaves - display
            order[O_LEAVES] = display
            own = book.side_of(side)
            level = own.levels[order[O_PRICE] * own.sign]
            level.total -= hidden
            book.icebergs[seq] = [display, hidden]
            # The book event of the order joining its level (last, or before the hold's balance
            # event): it shows what L2 sees.
            at = -2 if out[-1][0] == BALANCE else -1
            last = out[at]
            changes = [(s, p, level.total if (s, p) == (side, level.price) else t) for s, p, t in last[3]]
            out[at] = (BOOK, symbol, last[2], changes, book.refresh_bbo())
        return out

    def _new_quote(self, book: OrderBook, cmd: NewOrder, seq: int, ts: int) -> list[Event]:
        """A market order with quote_quantity: a market order of the whole lots its budget buys."""
        fields: tuple[Any, ...] = cmd  # checked by _check_new
        symbol, account, side, _, tif, _, _, cid, _, stp, _, _, _, quote = fields
        buy = side == BUY
        opp = book.asks if buy else book.bids
        lots = _quote_lots(opp, account, stp, quote, buy, book.taker_rate, book.icebergs)
        lots = min(lots, book.max_qty)
        if lots < book.min_qty:  # the budget buys nothing (or the book is empty)
            return [
                (ACCEPTED, symbol, seq, account, cid, side, MARKET, tif, None, 0),
                (CANCELLED, symbol, seq, account, cid, side, None, 0, 0, codes.REASON_MARKET),
            ]
        return self._new(NewOrder(symbol, account, side, MARKET, tif, None, lots, cid, False, stp), seq, ts)

    def _place_stop(self, book: OrderBook, cmd: NewOrder, seq: int, ts: int) -> list[Event]:
        fields: tuple[Any, ...] = cmd  # checked by _check_new
        symbol, account, side, otype, tif, price, qty, cid, _, stp, stop_price, _, _, _ = fields
        ledger = self.ledger
        market = book.market
        # A stop_market's funds are checked when it triggers.
        if ledger is not None and market is not None and otype == STOP_LIMIT:
            buy = side == BUY
            if not ledger.hold(market, account, buy, market.hold_for(buy, price, qty)):
                return [_rejected(symbol, "new", seq, account, cid, codes.INSUFFICIENT_FUNDS)]
        book.stops[seq] = stop = [seq, account, cid, side, otype, tif, price, qty, stop_price, stp]
        self.n_stops += 1
        if cid is not None:
            by_cid = book.cids.get(account)
            if by_cid is None:
                by_cid = book.cids[account] = {}
            by_cid[cid] = stop
        out: list[Event] = [(ACCEPTED, symbol, seq, account, cid, side, otype, tif, price, qty)]
        last = book.last_price
        if last is not None:  # its condition may hold already (no trade yet: it waits)
            self._run_stops(book, out, last, last, ts)
        return out

    def _run_stops(self, book: OrderBook, out: list[Event], lo: int, hi: int, ts: int) -> None:
        """Trigger and apply, in waves, the stops met by trades in [lo, hi] (see the module doc)."""
        stops, symbol = book.stops, book.symbol
        while stops:
            wave = [s for s in stops.values() if (hi >= s[S_STOP] if s[S_SIDE] == BUY else lo <= s[S_STOP])]
            if not wave:
                return
            for s in wave:  # all leave first: a triggered stop is an order now, whatever happens next
                del stops[s[S_ID]]
                if s[S_CID] is not None:
                    del book.cids[s[S_ACCOUNT]][s[S_CID]]
            self.n_stops -= len(wave)
            lo, hi = NEVER, -1
            for oid, account, cid, side, otype, tif, price, qty, stop_price, stp in wave:
                kind = LIMIT if otype == STOP_LIMIT else MARKET
                out.append((TRIGGERED, symbol, oid, account, cid, side, kind, tif, price, stop_price, qty))
                if self.ledger is not None and otype == STOP_LIMIT:
                    self._release(book, account, side, price, qty)  # the order takes the hold over
                order = NewOrder(symbol, account, side, kind, tif, price, qty, cid, False, stp)
                events = self._new(order, oid, ts)
                if events[0][0] != ACCEPTED:
                    # It was checked when placed; only a stop_market's funds are checked now.
                    assert events[0][6] == codes.INSUFFICIENT_FUNDS, events
                    out.append(
                        (CANCELLED, symbol, oid, account, cid, side, price, qty, qty, codes.REASON_FUNDS)
                    )
                    continue
                for e in events[1:]:
                    out.append(e)
                    if e[0] == TRADE:
                        lo, hi = min(lo, e[3]), max(hi, e[3])
            if hi < 0:
                return

    def _drop_stop(self, book: OrderBook, stop: list[Any], reason: str = codes.REASON_USER) -> Event:
        """Cancel an untriggered stop (it is not in the book: no book event)."""
        oid, account, cid, side, otype, _, price, qty, _, _ = stop
        del book.stops[oid]
        self.n_stops -= 1
        if cid is not None:
            del book.cids[account][cid]
        if self.ledger is not None and otype == STOP_LIMIT:
            self._release(book, account, side, price, qty)
        return (CANCELLED, book.symbol, oid, account, cid, side, price, qty, qty, reason)

    # Mass cancel and the ledger ---------------------------------------------------------------
    def _cancel_all(self, cmd: CancelAll) -> list[Event]:
        """Every open order of the account on the symbol (None: on every symbol), oldest first; then
        one book event per book whose levels changed."""
        fields: tuple[Any, ...] = cmd  # untrusted input, see _new
        symbol, account, reason = fields
        if symbol is not None and (type(symbol) is not str or symbol not in self.books):
            return [_rejected(symbol, "cancel_all", None, account, None, codes.UNKNOWN_SYMBOL)]
        if type(account) is not str or not 0 < len(account) <= MAX_ACCOUNT:
            return [_rejected(symbol, "cancel_all", None, account, None, codes.INVALID_ACCOUNT)]
        if type(reason) is not str or reason not in codes.MASS_CANCEL_REASONS:
            return [_rejected(symbol, "cancel_all", None, account, None, codes.INVALID_MESSAGE)]
        out: list[Event] = []
        for book in self.books.values() if symbol is None else (self.books[symbol],):
            ids = [oid for oid, order in book.orders.items() if order[O_ACCOUNT] == account]
            ids += [oid for oid, stop in book.stops.items() if stop[S_ACCOUNT] == account]
            changes: dict[tuple[str, int], int] = {}
            for oid in sorted(ids):
                stop = book.stops.get(oid)
                if stop is not None:
                    out.append(self._drop_stop(book, stop, reason))
                    continue
                order = book.orders[oid]
                side, price, rest = order[O_SIDE], order[O_PRICE], order[O_LEAVES]
                ice = book.icebergs.pop(oid, None) if book.icebergs else None
                if ice is not None:
                    rest += ice[1]
                level = book.side_of(side).remove(order)
                book.unindex(order)
                changes[side, price] = level.total
                if self.ledger is not None:
                    self._release(book, account, side, price, rest)
                out.append((CANCELLED, book.symbol, oid, account, order[O_CID], side, price, order[O_QTY],
                            rest, reason))  # fmt: skip
            if changes:
                book.book_seq += 1
                moved = [(side, price, total) for (side, price), total in changes.items()]
                out.append((BOOK, book.symbol, book.book_seq, moved, book.refresh_bbo()))
        return out

    def _hold_new(
        self,
        book: OrderBook,
        account: str,
        buy: bool,
        price: int | None,
        qty: int,
        stp: str,
        funds: Funds | None,
    ) -> str | None:
        """Hold what a valid new order needs, or the code it is rejected with (nothing held then).
        `funds`: the account's (Ledger.funds)."""
        ledger, market = self.ledger, book.market
        assert ledger is not None and market is not None
        if buy and price is None:  # a market buy holds nothing: it must afford what the book offers it now
            have = ledger.available(account, market.quote)
            # No fill is above the instrument's highest price: an account that could pay its whole
            # quantity there can pay any walk of the book, which is then not needed (a floor division
            # instead of a product, which would leave the compiled build's native range).
            if have // market.max_lot_cost >= qty:
                return None
            cost = _market_notional(book.asks, account, stp, qty, book.icebergs) * market.taker_cost
            return None if have >= cost else codes.INSUFFICIENT_FUNDS
        held = ledger.hold(market, account, buy, market.hold_for(buy, price, qty), funds)
        return None if held else codes.INSUFFICIENT_FUNDS

    def _release(self, book: OrderBook, account: str, side: str, price: int | None, lots: int) -> None:
        """Give back what `lots` of an order that ends without filling them held."""
        ledger, market = self.ledger, book.market
        assert ledger is not None and market is not None
        buy = side == BUY
        ledger.release(market, account, buy, market.hold_for(buy, price, lots))

    # Views ------------------------------------------------------------------------------------
    def book(self, symbol: str) -> OrderBook:
        return self.books[symbol]


def _rejected(symbol: Any, op: str, order_id: Any, account: Any, cid: Any, code: str) -> Event:
    """A rejected event; fields of the wrong type are dropped so the event always serialises."""
    return (
        REJECTED,
        symbol if type(symbol) is str else None,
        op,
        order_id if type(order_id) is int and -_INT64 <= order_id < _INT64 else None,
        account if type(account) is str else None,
        cid if type(cid) is str else None,
        code,
    )


def _reserved(account: str) -> bool:
    """One of the venue's own accounts (a valid, so non-empty, account name). ord(s[0]) is inline in
    the compiled build, where startswith is a library call (~100 instructions at every order)."""
    return ord(account[0]) == _RESERVED


def _unfilled(otype: str) -> str:
    return codes.REASON_MARKET if otype == MARKET else codes.REASON_IOC


def _reachable(
    opp: BookSide,
    account: str,
    stp: str,
    icebergs: dict[int, list[int]],
    limit_key: int = MAX_KEY,
    enough: int = -1,
) -> Iterator[tuple[int, int]]:
    """(price, lots a taker can get there) per level of `opp` up to limit_key, best first,
    walking the book as _match would: self-trade prevention skips (cancel_maker) or stops at the
    account's own orders, and an iceberg's reserve, which refills behind its level, counts only when
    the whole level is passed. The walk ends with the first level where the taker is stopped, or,
    given `enough` lots, where that many are reachable in all (the rest of a deep level is not read)."""
    got = 0
    for level in opp.iter_levels(limit_key):
        avail = hidden = 0
        for maker in level.queue():
            leaves = maker[O_LEAVES]
            if not leaves:  # lazily cancelled
                continue
            if maker[O_ACCOUNT] == account:
                if stp == STP_CANCEL_MAKER:
                    continue  # it would be cancelled and matching would go on
                yield level.price, avail  # the taker would be stopped here
                return
            avail += leaves
            if got + avail >= enough >= 0:
                yield level.price, avail
                return
            if icebergs:
                ice = icebergs.get(maker[O_ID])
                if ice is not None:
                    hidden += ice[1]
        got += avail + hidden
        yield level.price, avail + hidden


def _fillable(
    opp: BookSide, limit_key: int, account: str, stp: str, qty: int, icebergs: dict[int, list[int]]
) -> bool:
    """Could `qty` fill completely against `opp` up to limit_key, given self-trade prevention?"""
    got = 0
    for _, lots in _reachable(opp, account, stp, icebergs, limit_key, qty):
        got += lots
        if got >= qty:
            return True
    return False


def _market_notional(opp: BookSide, account: str, stp: str, qty: int, icebergs: dict[int, list[int]]) -> int:
    """Sum of price x lots of the fills a market order of `qty` gets against `opp` (ticks x lots)."""
    left, notional = qty, 0
    for price, lots in _reachable(opp, account, stp, icebergs, MAX_KEY, qty):
        take = lots if lots < left else left
        notional += price * take
        left -= take
        if not left:
            break
    return notional


def _quote_lots(
    opp: BookSide,
    account: str,
    stp: str,
    quote: int,
    buy: bool,
    taker_rate: int,
    icebergs: dict[int, list[int]],
) -> int:
    """How many whole lots a market order with this quote budget fills. A buy pays notional x (1 +
    taker rate) out of the budget, a sell needs only notional <= budget; all in integers (x FEE_DENOM)."""
    budget, mult = (quote * FEE_DENOM, FEE_DENOM + taker_rate) if buy else (quote, 1)
    lots = 0
    for price, avail in _reachable(opp, account, stp, icebergs):
        cost = price * mult
        affordable = budget // cost
        if affordable < avail:
            return lots + affordable
        lots += avail
        budget -= avail * cost
    return lots


def _find_stop(book: OrderBook, account: Any, order_id: Any, cid: Any) -> list[Any] | None:
    """The caller's untriggered stop by id, else by client order id; None if there is none."""
    if order_id is not None:
        stop = book.stops.get(order_id) if type(order_id) is int else None
    elif type(cid) is str and type(account) is str:
        stop = book.cids.get(account, _NO_CIDS).get(cid)
        if stop is not None and stop[S_ID] not in book.stops:
            return None
    else:
        return None
    return stop if stop is not None and stop[S_ACCOUNT] == account else None


def _new_order_error(books: dict[str, OrderBook], cmd: NewOrder, ts: int) -> str:
    """The reject code of an order the fast check refused (it must have one)."""
    code = _check_new(books, cmd, ts)
    if code is None:
        raise AssertionError(f"no reject code for a valid order: {cmd!r}")  # the fast check disagrees
    return code


def _is_int(value: Any, lo: int, hi: int) -> bool:
    return type(value) is int and lo <= value <= hi


def _check_new(books: dict[str, OrderBook], cmd: NewOrder, ts: int) -> str | None:
    """The reject code of a new order (its first failing check, in a fixed order), None if valid."""
    fields: tuple[Any, ...] = cmd
    symbol, account, side, otype, tif, price, qty, cid, post_only, stp, stop, expire, display, quote = fields
    book = books.get(symbol) if type(symbol) is str else None
    if book is None:
        return codes.UNKNOWN_SYMBOL
    if type(account) is not str or not 0 < len(account) <= MAX_ACCOUNT:
        return codes.INVALID_ACCOUNT
    if side != BUY and side != SELL:
        return codes.INVALID_SIDE
    if type(otype) is not str or otype not in _TIFS:
        return codes.INVALID_TYPE
    if type(tif) is not str or tif not in _TIFS[otype] or (quote is not None and tif != IOC):
        return codes.INVALID_TIF
    if quote is not None:
        if otype != MARKET or qty is not None or not _is_int(quote, 1, book.max_price * book.max_qty):
            return codes.INVALID_QUANTITY
        if quote < book.min_notional:
            return codes.MIN_NOTIONAL
    elif not _is_int(qty, book.min_qty, book.max_qty):
        return codes.INVALID_QUANTITY
    if otype in (LIMIT, STOP_LIMIT):
        if not _is_int(price, 1, book.max_price):
            return codes.INVALID_PRICE
        if price * qty < book.min_notional:
            return codes.MIN_NOTIONAL
    elif price is not None:  # a market order takes no price
        return codes.INVALID_PRICE
    if (otype in _STOP_TYPES) != (stop is not None) or (
        stop is not None and not _is_int(stop, 1, book.max_price)
    ):
        return codes.INVALID_STOP_PRICE
    if (tif == GTD) != (expire is not None) or (
        expire is not None and not _is_int(expire, ts + 1, _INT64 - 1)
    ):
        return codes.INVALID_EXPIRE_TIME
    if display is not None and (
        otype != LIMIT or (tif != GTC and tif != GTD) or not _is_int(display, book.min_qty, qty - 1)
    ):
        return codes.INVALID_DISPLAY_QUANTITY
    if cid is not None and (type(cid) is not str or not 0 < len(cid) <= _MAX_CID or not cid.isprintable()):
        return codes.INVALID_CLIENT_ORDER_ID
    if post_only is not False and (post_only is not True or otype != LIMIT or (tif != GTC and tif != GTD)):
        return codes.INVALID_TIF if post_only is True else codes.INVALID_MESSAGE
    if type(stp) is not str or stp not in STP_MODES:
        return codes.INVALID_STP
    by_cid = book.cids.get(account)
    if cid is not None and by_cid is not None and cid in by_cid:
        return codes.DUPLICATE_CLIENT_ORDER_ID
    return None
