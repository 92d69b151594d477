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
from typing import Any

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

_MAX_CID = 36
_MAX_ACCOUNT = 64
_INT64 = 1 << 63


class Engine:
    """All books of one matcher. Feed it commands in stream order with strictly increasing seq."""

    def __init__(self, instruments: Iterable[Instrument]) -> None:
        self.books: dict[str, OrderBook] = {i.symbol: OrderBook(i) for i in instruments}
        self.last_seq = 0

    # ------------------------------------------------------------------------------------------
    def apply(self, cmd: Command, seq: int, ts: int) -> list[Event]:
        """Apply one command; return its events. seq must rise; ts is carried into trades."""
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
        symbol, account, side, otype, tif, price, qty, cid, post_only, stp = cmd
        book = self.books.get(symbol) if type(symbol) is str else None
        if book is None:
            return [_rejected(symbol, "new", seq, account, cid, codes.UNKNOWN_SYMBOL)]
        inst = book.inst
        code = None
        by_cid: dict[str, Order] | None = None
        if type(account) is not str or not 0 < len(account) <= _MAX_ACCOUNT:
            code = codes.INVALID_ACCOUNT
        elif side != BUY and side != SELL:
            code = codes.INVALID_SIDE
        elif otype != LIMIT and otype != MARKET:
            code = codes.INVALID_TYPE
        elif (tif != GTC and tif != IOC and tif != FOK) or (otype == MARKET and tif == GTC):
            code = codes.INVALID_TIF
        elif type(qty) is not int or not inst.min_qty_lots <= qty <= inst.max_qty_lots:
            code = codes.INVALID_QUANTITY
        elif (
            type(price) is not int or not 0 < price <= inst.max_price_ticks
            if otype == LIMIT
            else price is not None  # a market order takes no price
        ):
            code = codes.INVALID_PRICE
        elif otype == LIMIT and price * qty < inst.min_notional_units:  # type: ignore[operator]
            code = codes.MIN_NOTIONAL
        elif cid is not None and (
            type(cid) is not str or not 0 < len(cid) <= _MAX_CID or not cid.isprintable()
        ):
            code = codes.INVALID_CLIENT_ORDER_ID
        elif post_only is not False and (post_only is not True or otype != LIMIT or tif != GTC):
            code = codes.INVALID_TIF if post_only is True else codes.INVALID_MESSAGE
        elif type(stp) is not str or stp not in STP_MODES:
            code = codes.INVALID_STP
        elif cid is not None:
            by_cid = book.cids.get(account)
            if by_cid is not None and cid in by_cid:
                code = codes.DUPLICATE_CLIENT_ORDER_ID
        if code is not None:
            return [_rejected(symbol, "new", seq, account, cid, code)]

        if side == BUY:
            own, opp = book.bids, book.asks
            limit_key = price if price is not None else MAX_KEY
        else:
            own, opp = book.asks, book.bids
            limit_key = -price if price is not None else MAX_KEY
        heap = opp.heap
        crosses = heap and heap[0] <= limit_key
        if crosses and post_only:
            return [_rejected(symbol, "new", seq, account, cid, codes.WOULD_TAKE)]

        out: list[Event] = [(ACCEPTED, symbol, seq, account, cid, side, otype, tif, price, qty)]
        order: Order = [seq, account, cid, side, price, qty, qty]
        if not crosses:
            if tif != GTC:
                reason = codes.REASON_FOK if tif == FOK else _unfilled(otype)
                out.append((CANCELLED, symbol, seq, account, cid, side, price, qty, qty, reason))
                return out
            # The common case, a passive limit order joining the book: BookSide.add and
            # OrderBook.index written out, since this path is most of the flow.
            key = -limit_key
            level = own.levels.get(key)
            if level is None:
                level = own.new_level(key, price)  # type: ignore[arg-type]
            else:
                order[O_PRICE] = level.price
            level.orders.append(order)
            total = level.total = level.total + qty
            book.orders[seq] = order
            if cid is not None:
                if by_cid is None:
                    by_cid = book.cids[account] = {}
                by_cid[cid] = order
            book.book_seq += 1
            bbo = book.refresh_bbo() if own.heap[0] == key else book.bbo
            out.append((BOOK, symbol, book.book_seq, [(side, level.price, total)], bbo))
            return out

        if tif == FOK and not _fillable(opp, limit_key, account, stp, qty):
            out.append((CANCELLED, symbol, seq, account, cid, side, price, qty, qty, codes.REASON_FOK))
            return out

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
        inst = book.inst
        maker_rate, taker_rate = inst.maker_rate, inst.taker_rate
        t_id, account, t_cid, t_side, t_price, t_qty, t_leaves = taker
        levels, heap, opp_side = opp.levels, opp.heap, opp.side
        orders, cids = book.orders, book.cids
        trade_seq = book.trade_seq
        stopped = False
        while heap and heap[0] <= limit_key:
            key = heap[0]
            level = levels[key]
            q = level.orders
            price = level.price
            before = level.total
            while True:
                maker = q[0]
                m_id, m_account, m_cid, _, _, m_qty, m_leaves = maker
                if not m_leaves:  # lazily cancelled
                    q.popleft()
                    level.dead -= 1
                    continue
                if m_account == account:
                    if stp == STP_CANCEL_TAKER:
                        stopped = True
                        break
                    q.popleft()
                    level.total -= m_leaves
                    maker[O_LEAVES] = 0
                    book.unindex(maker)
                    out.append(
                        (
                            CANCELLED,
                            symbol,
                            m_id,
                            account,
                            m_cid,
                            opp_side,
                            price,
                            m_qty,
                            m_leaves,
                            codes.REASON_STP,
                        )
                    )
                    if stp == STP_CANCEL_BOTH:
                        stopped = True
                        break
                    if not level.total:
                        break
                    continue
                fill = m_leaves if m_leaves < t_leaves else t_leaves
                m_leaves -= fill
                t_leaves -= fill
                maker[O_LEAVES] = m_leaves
                level.total -= fill
                notional = price * fill
                trade_seq += 1
                out.append(
                    (
                        TRADE,
                        symbol,
                        trade_seq,
                        price,
                        fill,
                        t_side,
                        m_id,
                        m_account,
                        m_cid,
                        m_qty,
                        m_leaves,
                        notional * maker_rate,
                        t_id,
                        account,
                        t_cid,
                        t_price,
                        t_qty,
                        t_leaves,
                        notional * taker_rate,
                        ts,
                    )
                )
                if not m_leaves:
                    q.popleft()
                    del orders[m_id]
                    if m_cid is not None:
                        del cids[m_account][m_cid]
                if not t_leaves or not level.total:
                    break
            if level.total != before:
                changes.append((opp_side, price, level.total))
            if not level.total:
                opp.drop(key)
            if stopped or not t_leaves:
                break
        book.trade_seq = trade_seq
        taker[O_LEAVES] = t_leaves
        return stopped

    # Cancel and amend -------------------------------------------------------------------------
    def _cancel(self, cmd: Cancel) -> list[Event]:
        symbol, account, order_id, cid = cmd
        book = self.books.get(symbol) if type(symbol) is str else None
        if book is None:
            return [_rejected(symbol, "cancel", order_id, account, cid, codes.UNKNOWN_SYMBOL)]
        order = book.find(account, order_id, cid)
        if order is None:
            return [_rejected(symbol, "cancel", order_id, account, cid, codes.UNKNOWN_ORDER)]
        side, price, leaves = order[O_SIDE], order[O_PRICE], order[O_LEAVES]
        own = book.bids if side == BUY else book.asks
        was_best = own.heap[0] == price * own.sign
        level = own.remove(order)
        book.unindex(order)
        book.book_seq += 1
        return [
            (
                CANCELLED,
                symbol,
                order[O_ID],
                account,
                order[O_CID],
                side,
                price,
                order[O_QTY],
                leaves,
                codes.REASON_USER,
            ),
            (
                BOOK,
                symbol,
                book.book_seq,
                [(side, price, level.total)],
                book.refresh_bbo() if was_best else book.bbo,
            ),
        ]

    def _amend(self, cmd: Amend) -> list[Event]:
        symbol, account, order_id, cid, new_price, new_qty = cmd
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
        for maker in level.live_orders():
            if maker[O_ACCOUNT] == account:
                if stp == STP_CANCEL_MAKER:
                    continue  # it would be cancelled and matching would go on
                return False  # the taker would be stopped here
            got += maker[O_LEAVES]
            if got >= qty:
                return True
    return False
