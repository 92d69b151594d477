"""The matching engine: ``apply(command, seq, ts) -> events``. Pure and deterministic.

No clock, no I/O, no randomness: time (``ts``), the sequence number (``seq``, which is also the new
order's id) and every other input come from the caller, so the same commands give the same events,
byte for byte. That is what makes crash recovery by replay exact.

Rules: strict price-time priority, no trade-through, market orders sweep until filled or the book is
empty, IOC never rests, FOK fills completely or leaves the book untouched, post-only never takes,
an account never trades with itself (self-trade prevention), client order ids are unique among an
account's open orders. Invalid input becomes a ``rejected`` event; the book is then untouched.

The hot paths are written out inline on purpose (no helper calls per fill): this module is the
benchmark's inner loop.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Final

from services.matcher.book import (
    MAX_KEY,
    O_ACCOUNT,
    O_CID,
    O_ID,
    O_LEAVES,
    O_PRICE,
    O_QTY,
    O_SIDE,
    BookSide,
    Order,
    OrderBook,
)
from services.matcher.commands import (
    BUY,
    FOK,
    GTC,
    IOC,
    LIMIT,
    MARKET,
    SELL,
    STP_CANCEL_BOTH,
    STP_CANCEL_MAKER,
    STP_CANCEL_TAKER,
    STP_MODES,
    Amend,
    Cancel,
    Command,
    NewOrder,
)
from services.matcher.events import ACCEPTED, AMENDED, BOOK, CANCELLED, REJECTED, TRADE, Event
from shared import codes
from shared.instruments import Instrument

# The public core API (docs/core.md): Engine, the commands and the events. The major number changes
# when a name, a field or an event shape changes incompatibly; the minor one when something is added.
CORE_API_VERSION: Final = "1.0"

_MAX_CID = 36
_MAX_ACCOUNT = 64
_INT64 = 1 << 63
_NO_CIDS: dict[str, Order] = {}

# Every valid (side, type, tif, stp) of a new order -> (is it a buy, is it a limit order).
_SHAPES: dict[tuple[str, str, str, str], tuple[bool, bool]] = {
    (side, otype, tif, stp): (side == BUY, otype == LIMIT)
    for side in (BUY, SELL)
    for otype, tifs in ((LIMIT, (GTC, IOC, FOK)), (MARKET, (IOC, FOK)))
    for tif in tifs
    for stp in STP_MODES
}


class Engine:
    """All books of one matcher. Feed it commands in stream order with strictly increasing seq."""

    def __init__(self, instruments: Iterable[Instrument]) -> None:
        self.books: dict[str, OrderBook] = {i.symbol: OrderBook(i) for i in instruments}
        self.last_seq = 0

    # ------------------------------------------------------------------------------------------
    def apply(self, cmd: Command | object, seq: int, ts: int) -> list[Event]:
        """Apply one command; return its events. seq must rise; ts is carried into trades.

        `cmd` is typed wider than Command on purpose: anything else is input to reject (UNKNOWN_OP),
        and a compiled build checks declared argument types before the body runs."""
        if seq <= self.last_seq:
            raise ValueError(f"seq {seq} is not after {self.last_seq}")  # caller bug, not user input
        self.last_seq = seq
        kind = type(cmd)
        if kind is NewOrder:
            return self._new(cmd, seq, ts)  # type: ignore[arg-type]
        if kind is Cancel:
            return self._cancel(cmd)  # type: ignore[arg-type]
        if kind is Amend:
            return self._amend(cmd)  # type: ignore[arg-type]
        return [_rejected(None, "new", None, None, None, codes.UNKNOWN_OP)]

    # New orders -------------------------------------------------------------------------------
    def _new(self, cmd: NewOrder, seq: int, ts: int) -> list[Event]:
        # The fields are untrusted input: typed Any, so that a compiled build checks them here
        # instead of raising TypeError on a field of the wrong type.
        fields: tuple[Any, ...] = cmd
        symbol, account, side, otype, tif, price, qty, cid, post_only, stp = fields
        # The common, valid order is checked with as few operations as possible: one dict lookup
        # covers symbol, side, type, tif (and market-not-GTC) and stp. Anything that fails a check
        # goes to _new_order_error, which re-checks in a fixed order to name the exact reject code.
        try:
            book = self.books[symbol]
            buy, is_limit = _SHAPES[side, otype, tif, stp]
        except (KeyError, TypeError):  # TypeError: an unhashable field
            return [_rejected(symbol, "new", seq, account, cid, _new_order_error(self.books, cmd))]
        if (
            type(account) is not str
            or not 0 < len(account) <= _MAX_ACCOUNT
            or type(qty) is not int
            or not book.min_qty <= qty <= book.max_qty
            or (
                type(price) is not int or not 0 < price <= book.max_price or price * qty < book.min_notional
                if is_limit
                else price is not None
            )
            or (
                cid is not None
                and (type(cid) is not str or not 0 < len(cid) <= _MAX_CID or not cid.isprintable())
            )
            or (post_only is not False and (post_only is not True or not is_limit or tif != GTC))
        ):
            return [_rejected(symbol, "new", seq, account, cid, _new_order_error(self.books, cmd))]
        by_cid = book.cids.get(account)
        if cid is not None and by_cid is not None and cid in by_cid:
            return [_rejected(symbol, "new", seq, account, cid, codes.DUPLICATE_CLIENT_ORDER_ID)]

        # On both sides a smaller key is a better price (see book.py); a market order has no limit.
        if buy:
            own, opp = book.bids, book.asks
            limit_key = MAX_KEY if price is None else price
        else:
            own, opp = book.asks, book.bids
            limit_key = MAX_KEY if price is None else -price
        heap = opp.heap
        accepted = (ACCEPTED, symbol, seq, account, cid, side, otype, tif, price, qty)

        if not heap or heap[0] > limit_key:  # nothing to trade against
            if tif != GTC:
                reason = codes.REASON_FOK if tif == FOK else _unfilled(otype)
                return [accepted, (CANCELLED, symbol, seq, account, cid, side, price, qty, qty, reason)]
            # The common case, a passive limit order joining the book: BookSide.add, OrderBook.index
            # and the best-bid/offer update written out, since this path is most of the flow.
            key = -limit_key
            level = own.levels.get(key)
            if level is None:
                level = own.new_level(key, price)
                order: Order = [seq, account, cid, side, price, qty, qty]
            else:
                order = [seq, account, cid, side, level.price, qty, qty]
            level.orders.append(order)
            total = level.total = level.total + qty
            book.orders[seq] = order
            if cid is not None:
                if by_cid is None:
                    by_cid = book.cids[account] = {}
                by_cid[cid] = order
            book.book_seq += 1
            bbo = book.bbo
            if own.heap[0] == key:  # the order is at the best price of its side
                bbo = book.bbo = (
                    (level.price, total, bbo[2], bbo[3]) if buy else (*bbo[:2], level.price, total)
                )
            return [accepted, (BOOK, symbol, book.book_seq, [(side, level.price, total)], bbo)]

        if post_only:
            return [_rejected(symbol, "new", seq, account, cid, codes.WOULD_TAKE)]
        out: list[Event] = [accepted]
        if tif == FOK and not _fillable(opp, limit_key, account, stp, qty):
            out.append((CANCELLED, symbol, seq, account, cid, side, price, qty, qty, codes.REASON_FOK))
            return out

        order = [seq, account, cid, side, price, qty, qty]
        changes: list[tuple[str, int, int]] = []
        stopped = self._match(book, opp, order, limit_key, stp, ts, out, changes)
        leaves = order[O_LEAVES]
        if leaves:
            if stopped:
                reason = codes.REASON_STP
            elif tif == GTC:
                level = own.add(order)
                book.index(order)
                changes.append((side, level.price, level.total))
                reason = ""
            else:
                reason = _unfilled(otype)
            if reason:
                out.append((CANCELLED, symbol, seq, account, cid, side, price, qty, leaves, reason))
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
        changes: list[tuple[str, int, int]],
    ) -> bool:
        """Trade the taker against `opp` best first. True if self-trade prevention stopped the taker."""
        symbol = book.symbol
        maker_rate, taker_rate = book.maker_rate, book.taker_rate
        t_id, account, t_cid, t_side, t_price, t_qty, t_leaves = taker
        levels, heap, opp_side = opp.levels, opp.heap, opp.side
        orders, cids = book.orders, book.cids
        append = out.append
        trade_seq = book.trade_seq
        stopped = False
        while heap and heap[0] <= limit_key:
            key = heap[0]
            level = levels[key]
            q = level.orders
            price = level.price
            total = before = level.total  # kept in a local while this level trades
            while True:
                maker = q[0]
                m_leaves = maker[O_LEAVES]
                if not m_leaves:  # lazily cancelled
                    q.popleft()
                    level.dead -= 1
                    continue
                m_id, m_account, m_cid, _, _, m_qty, _ = maker
                if m_account == account:
                    if stp == STP_CANCEL_TAKER:
                        stopped = True
                        break
                    q.popleft()
                    total -= m_leaves
                    maker[O_LEAVES] = 0
                    book.unindex(maker)
                    append((CANCELLED, symbol, m_id, account, m_cid, opp_side, price, m_qty, m_leaves,
                            codes.REASON_STP))  # fmt: skip
                    if stp == STP_CANCEL_BOTH:
                        stopped = True
                        break
                    if not total:
                        break
                    continue
                if m_leaves <= t_leaves:  # the maker is filled and leaves the book
                    fill = m_leaves
                    m_leaves = 0
                    q.popleft()
                    del orders[m_id]
                    if m_cid is not None:
                        del cids[m_account][m_cid]
                else:
                    fill = t_leaves
                    m_leaves -= fill
                t_leaves -= fill
                maker[O_LEAVES] = m_leaves
                total -= fill
                notional = price * fill
                trade_seq += 1
                # fmt: off
                append((TRADE, symbol, trade_seq, price, fill, t_side,
                        m_id, m_account, m_cid, m_qty, m_leaves, notional * maker_rate,
                        t_id, account, t_cid, t_price, t_qty, t_leaves, notional * taker_rate, ts))
                # fmt: on
                if not t_leaves or not total:
                    break
            level.total = total
            if total != before:
                changes.append((opp_side, price, total))
            if not total:
                opp.drop(key)
            if stopped or not t_leaves:
                break
        book.trade_seq = trade_seq
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
        if order is None or order[O_ACCOUNT] != account:
            return [_rejected(symbol, "cancel", order_id, account, cid, codes.UNKNOWN_ORDER)]
        side, price, leaves = order[O_SIDE], order[O_PRICE], order[O_LEAVES]
        own = book.bids if side == BUY else book.asks
        key = price * own.sign
        was_best = own.heap[0] == key
        level = own.remove(order)
        book.unindex(order)
        book.book_seq += 1
        total = level.total
        bbo = book.bbo
        if was_best:
            if not total:
                bbo = book.refresh_bbo()
            elif side == BUY:
                bbo = book.bbo = (price, total, bbo[2], bbo[3])
            else:
                bbo = book.bbo = (bbo[0], bbo[1], price, total)
        return [
            (CANCELLED, symbol, order[O_ID], account, order[O_CID], side, price, order[O_QTY], leaves,
             codes.REASON_USER),
            (BOOK, symbol, book.book_seq, [(side, price, total)], bbo),
        ]  # fmt: skip

    def _amend(self, cmd: Amend) -> list[Event]:
        fields: tuple[Any, ...] = cmd  # untrusted input, see _new
        symbol, account, order_id, cid, new_price, new_qty = fields
        book = self.books.get(symbol) if type(symbol) is str else None
        if book is None:
            return [_rejected(symbol, "amend", order_id, account, cid, codes.UNKNOWN_SYMBOL)]
        order = book.find(account, order_id, cid)
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
            result = [order[O_ID], account, order[O_CID], side, price, qty, qty - filled]
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


def _unfilled(otype: str) -> str:
    return codes.REASON_MARKET if otype == MARKET else codes.REASON_IOC


def _fillable(opp: BookSide, limit_key: int, account: str, stp: str, qty: int) -> bool:
    """Could `qty` fill completely against `opp` up to limit_key, given self-trade prevention?"""
    got = 0
    for level in opp.iter_levels(limit_key):
        for maker in level.orders:
            leaves = maker[O_LEAVES]
            if not leaves:  # lazily cancelled
                continue
            if maker[O_ACCOUNT] == account:
                if stp == STP_CANCEL_MAKER:
                    continue  # it would be cancelled and matching would go on
                return False  # the taker would be stopped here
            got += leaves
            if got >= qty:
                return True
    return False


def _new_order_error(books: dict[str, OrderBook], cmd: NewOrder) -> str:
    """The reject code of an invalid new order: its first failing check, in a fixed order."""
    fields: tuple[Any, ...] = cmd
    symbol, account, side, otype, tif, price, qty, cid, post_only, stp = fields
    book = books.get(symbol) if type(symbol) is str else None
    if book is None:
        return codes.UNKNOWN_SYMBOL
    if type(account) is not str or not 0 < len(account) <= _MAX_ACCOUNT:
        return codes.INVALID_ACCOUNT
    if side != BUY and side != SELL:
        return codes.INVALID_SIDE
    if otype != LIMIT and otype != MARKET:
        return codes.INVALID_TYPE
    if (tif != GTC and tif != IOC and tif != FOK) or (otype == MARKET and tif == GTC):
        return codes.INVALID_TIF
    if type(qty) is not int or not book.min_qty <= qty <= book.max_qty:
        return codes.INVALID_QUANTITY
    if otype == LIMIT:
        if type(price) is not int or not 0 < price <= book.max_price:
            return codes.INVALID_PRICE
        if price * qty < book.min_notional:
            return codes.MIN_NOTIONAL
    elif price is not None:  # a market order takes no price
        return codes.INVALID_PRICE
    if cid is not None and (type(cid) is not str or not 0 < len(cid) <= _MAX_CID or not cid.isprintable()):
        return codes.INVALID_CLIENT_ORDER_ID
    if post_only is not False and (post_only is not True or otype != LIMIT or tif != GTC):
        return codes.INVALID_TIF if post_only is True else codes.INVALID_MESSAGE
    if type(stp) is not str or stp not in STP_MODES:
        return codes.INVALID_STP
    by_cid = book.cids.get(account)
    if cid is not None and by_cid is not None and cid in by_cid:
        return codes.DUPLICATE_CLIENT_ORDER_ID
    raise AssertionError(f"no reject code for a valid order: {cmd!r}")  # the fast check disagrees
