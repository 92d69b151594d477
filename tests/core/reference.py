"""A deliberately naive reference model of the matching core, for differential testing.

Nothing here is fast and nothing is clever: every symbol keeps one plain list of resting orders,
every question ("what is the best ask?", "what is the total at this price?") is answered by scanning
or sorting that list again, FOK is decided by running the match on a deep copy and looking at the
result, and time priority is an explicit number (the seq of the command that put the order at the
back of its level). It shares no code with services.matcher.book / engine; it only uses the command
and event constants, the reject codes and the instrument specs.

It emits the same event tuples as the engine (see services/matcher/events.py), so a random command
stream can be compared event by event.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, TypeGuard

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
    Amend,
    Cancel,
    NewOrder,
)
from services.matcher.events import ACCEPTED, AMENDED, BOOK, CANCELLED, REJECTED, TRADE
from shared import codes
from shared.instruments import Instrument

MAX_CID_LEN = 36
MAX_ACCOUNT_LEN = 64
Event = tuple[Any, ...]


@dataclass
class RefOrder:
    oid: int
    account: str
    cid: str | None
    side: str
    price: int
    qty: int
    leaves: int
    prio: int  # seq of the command that put it at the back of its level; smaller = earlier


@dataclass
class RefBook:
    inst: Instrument
    resting: list[RefOrder] = field(default_factory=list)
    trade_seq: int = 0
    book_seq: int = 0

    # Queries: all O(n), recomputed every time -------------------------------------------------
    def side_orders(self, side: str) -> list[RefOrder]:
        """Resting orders of one side in matching order: best price first, then earliest."""
        orders = [o for o in self.resting if o.side == side]
        if side == BUY:
            orders.sort(key=lambda o: (-o.price, o.prio))
        else:
            orders.sort(key=lambda o: (o.price, o.prio))
        return orders

    def total(self, side: str, price: int) -> int:
        return sum(o.leaves for o in self.resting if o.side == side and o.price == price)

    def best_price(self, side: str) -> int | None:
        prices = [o.price for o in self.resting if o.side == side]
        if not prices:
            return None
        return max(prices) if side == BUY else min(prices)

    def bbo(self) -> tuple[int | None, int, int | None, int]:
        bid = self.best_price(BUY)
        ask = self.best_price(SELL)
        return (
            bid,
            0 if bid is None else self.total(BUY, bid),
            ask,
            0 if ask is None else self.total(SELL, ask),
        )

    def levels(self, side: str) -> list[list[Any]]:
        """Like snapshot()'s per-side dump: [[price, [[oid, account, cid, qty, leaves], ...]], ...]."""
        out: list[list[Any]] = []
        for o in self.side_orders(side):
            if not out or out[-1][0] != o.price:
                out.append([o.price, []])
            out[-1][1].append([o.oid, o.account, o.cid, o.qty, o.leaves])
        return out

    def find(self, account: Any, order_id: Any, cid: Any) -> RefOrder | None:
        """The caller's resting order by id (if an id is given at all), else by client order id."""
        if type(account) is not str:
            return None
        if order_id is not None:
            if type(order_id) is not int:
                return None
            hits = [o for o in self.resting if o.oid == order_id and o.account == account]
        elif type(cid) is str:
            hits = [o for o in self.resting if o.cid == cid and o.account == account]
        else:
            return None
        assert len(hits) <= 1
        return hits[0] if hits else None

    def clone(self) -> RefBook:
        return RefBook(self.inst, [copy.copy(o) for o in self.resting], self.trade_seq, self.book_seq)

    def remove(self, order: RefOrder) -> None:
        self.resting = [o for o in self.resting if o is not order]


def _text(value: Any) -> str | None:
    return value if type(value) is str else None


def _rejected(symbol: Any, op: str, order_id: Any, account: Any, cid: Any, code: str) -> Event:
    return (
        REJECTED,
        _text(symbol),
        op,
        order_id if type(order_id) is int and -(2**63) <= order_id < 2**63 else None,
        _text(account),
        _text(cid),
        code,
    )


def _is_int(value: Any) -> TypeGuard[int]:
    return type(value) is int  # bool is not a quantity or a price


class Reference:
    def __init__(self, instruments: list[Instrument]) -> None:
        self.books: dict[str, RefBook] = {i.symbol: RefBook(i) for i in instruments}
        self.last_seq = 0

    def book_for(self, symbol: Any) -> RefBook | None:
        if type(symbol) is not str:
            return None
        return self.books.get(symbol)

    def apply(self, cmd: Any, seq: int, ts: int) -> list[Event]:
        if seq <= self.last_seq:
            raise ValueError("seq must rise")
        self.last_seq = seq
        if type(cmd) is NewOrder:
            return self._new(cmd, seq, ts)
        if type(cmd) is Cancel:
            return self._cancel(cmd)
        if type(cmd) is Amend:
            return self._amend(cmd, seq)
        return [_rejected(None, "new", None, None, None, codes.UNKNOWN_OP)]

    def state(self) -> dict[str, Any]:
        """The same shape as services.matcher.snapshot.snapshot()."""
        return {
            "version": 1,
            "last_seq": self.last_seq,
            "books": {
                s: {
                    "trade_seq": b.trade_seq,
                    "book_seq": b.book_seq,
                    "bids": b.levels(BUY),
                    "asks": b.levels(SELL),
                }
                for s, b in self.books.items()
            },
        }

    # New orders -------------------------------------------------------------------------------
    @staticmethod
    def _validate_new(book: RefBook, cmd: NewOrder) -> str | None:
        _, account, side, otype, tif, price, qty, cid, post_only, stp = cmd
        inst = book.inst
        if type(account) is not str or not 1 <= len(account) <= MAX_ACCOUNT_LEN:
            return codes.INVALID_ACCOUNT
        if side not in (BUY, SELL):
            return codes.INVALID_SIDE
        if otype not in (LIMIT, MARKET):
            return codes.INVALID_TYPE
        if tif not in (GTC, IOC, FOK):
            return codes.INVALID_TIF
        if otype == MARKET and tif == GTC:
            return codes.INVALID_TIF
        if not _is_int(qty) or qty < inst.min_qty_lots or qty > inst.max_qty_lots:
            return codes.INVALID_QUANTITY
        if otype == LIMIT:
            if not _is_int(price) or price <= 0 or price > inst.max_price_ticks:
                return codes.INVALID_PRICE
            if price * qty < inst.min_notional_units:
                return codes.MIN_NOTIONAL
        elif price is not None:
            return codes.INVALID_PRICE
        if cid is not None and (
            type(cid) is not str or not 1 <= len(cid) <= MAX_CID_LEN or not cid.isprintable()
        ):
            return codes.INVALID_CLIENT_ORDER_ID
        if post_only is True:
            if otype != LIMIT or tif != GTC:
                return codes.INVALID_TIF
        elif post_only is not False:
            return codes.INVALID_MESSAGE
        if type(stp) is not str or stp not in (STP_CANCEL_TAKER, STP_CANCEL_MAKER, STP_CANCEL_BOTH):
            return codes.INVALID_STP
        if cid is not None and any(o.account == account and o.cid == cid for o in book.resting):
            return codes.DUPLICATE_CLIENT_ORDER_ID
        return None

    def _new(self, cmd: NewOrder, seq: int, ts: int) -> list[Event]:
        symbol, account, side, otype, tif, price, qty, cid, post_only, _ = cmd
        book = self.book_for(symbol)
        if book is None:
            return [_rejected(symbol, "new", seq, account, cid, codes.UNKNOWN_SYMBOL)]
        code = self._validate_new(book, cmd)
        if code is not None:
            return [_rejected(symbol, "new", seq, account, cid, code)]

        opp_side = SELL if side == BUY else BUY
        if post_only and _makers(book, side, price):
            return [_rejected(symbol, "new", seq, account, cid, codes.WOULD_TAKE)]
        out: list[Event] = [(ACCEPTED, symbol, seq, account, cid, side, otype, tif, price, qty)]

        if tif == FOK:
            leaves, _, _ = _match(book.clone(), cmd, seq, ts, [])
            if leaves:  # it would not fill completely: nothing happens at all
                out.append((CANCELLED, symbol, seq, account, cid, side, price, qty, qty, codes.REASON_FOK))
                return out

        leaves, stopped, touched = _match(book, cmd, seq, ts, out)
        changes = [(opp_side, p, book.total(opp_side, p)) for p in touched]
        if leaves:
            reason: str | None
            if stopped:
                reason = codes.REASON_STP
            elif tif == GTC:
                assert price is not None  # a limit order
                book.resting.append(RefOrder(seq, account, cid, side, price, qty, leaves, seq))
                changes.append((side, price, book.total(side, price)))
                reason = None
            elif otype == MARKET:
                reason = codes.REASON_MARKET
            else:
                reason = codes.REASON_IOC
            if reason is not None:
                out.append((CANCELLED, symbol, seq, account, cid, side, price, qty, leaves, reason))
        if changes:
            book.book_seq += 1
            out.append((BOOK, symbol, book.book_seq, changes, book.bbo()))
        return out

    # Cancel and amend -------------------------------------------------------------------------
    def _cancel(self, cmd: Cancel) -> list[Event]:
        symbol, account, order_id, cid = cmd
        book = self.book_for(symbol)
        if book is None:
            return [_rejected(symbol, "cancel", order_id, account, cid, codes.UNKNOWN_SYMBOL)]
        order = book.find(account, order_id, cid)
        if order is None:
            return [_rejected(symbol, "cancel", order_id, account, cid, codes.UNKNOWN_ORDER)]
        book.remove(order)
        book.book_seq += 1
        return [
            (CANCELLED, symbol, order.oid, order.account, order.cid, order.side, order.price, order.qty,
             order.leaves, codes.REASON_USER),
            (BOOK, symbol, book.book_seq, [(order.side, order.price, book.total(order.side, order.price))],
             book.bbo()),
        ]  # fmt: skip

    def _amend(self, cmd: Amend, seq: int) -> list[Event]:
        symbol, account, order_id, cid, new_price, new_qty = cmd
        book = self.book_for(symbol)
        if book is None:
            return [_rejected(symbol, "amend", order_id, account, cid, codes.UNKNOWN_SYMBOL)]
        order = book.find(account, order_id, cid)
        if order is None:
            return [_rejected(symbol, "amend", order_id, account, cid, codes.UNKNOWN_ORDER)]
        inst = book.inst
        price = order.price if new_price is None else new_price
        qty = order.qty if new_qty is None else new_qty
        filled = order.qty - order.leaves
        code: str | None = None
        if new_price is None and new_qty is None:
            code = codes.INVALID_MESSAGE
        elif not _is_int(price) or price <= 0 or price > inst.max_price_ticks:
            code = codes.INVALID_PRICE
        elif not _is_int(qty) or qty < inst.min_qty_lots or qty > inst.max_qty_lots or qty <= filled:
            code = codes.INVALID_QUANTITY
        elif price * qty < inst.min_notional_units:
            code = codes.MIN_NOTIONAL
        elif _makers(book, order.side, price):
            code = codes.WOULD_TAKE
        if code is not None:
            return [_rejected(symbol, "amend", order.oid, account, order.cid, code)]

        side = order.side
        old_price, old_qty = order.price, order.qty
        changes: list[tuple[str, int, int]] = []
        if price == old_price and qty <= old_qty:
            order.qty = qty
            order.leaves = qty - filled  # keeps its place in the queue
            if qty != old_qty:
                changes.append((side, price, book.total(side, price)))
        else:
            order.price = price
            order.qty = qty
            order.leaves = qty - filled
            order.prio = seq  # to the back of its (new) level
            if price != old_price:
                changes.append((side, old_price, book.total(side, old_price)))
            changes.append((side, price, book.total(side, price)))
        out: list[Event] = [
            (AMENDED, symbol, order.oid, order.account, order.cid, side, order.price, order.qty, order.leaves)
        ]
        if changes:
            book.book_seq += 1
            out.append((BOOK, symbol, book.book_seq, changes, book.bbo()))
        return out


def _acceptable(side: str, limit: int | None, maker_price: int) -> bool:
    """No trade-through: a buyer pays at most its limit, a seller gets at least its limit."""
    if limit is None:
        return True
    return maker_price <= limit if side == BUY else maker_price >= limit


def _makers(book: RefBook, side: str, limit: int | None) -> list[RefOrder]:
    """The resting orders an order of `side` with `limit` could trade with, in matching order."""
    opp_side = SELL if side == BUY else BUY
    return [m for m in book.side_orders(opp_side) if _acceptable(side, limit, m.price)]


def _match(book: RefBook, cmd: NewOrder, seq: int, ts: int, out: list[Event]) -> tuple[int, bool, list[int]]:
    """Trade the incoming order against the book; return (leaves, stopped by STP, touched prices)."""
    symbol, account, side, _, _, price, qty, cid, _, stp = cmd
    inst = book.inst
    leaves = qty
    stopped = False
    touched: list[int] = []
    opp_side = SELL if side == BUY else BUY
    for maker in _makers(book, side, price):
        if leaves == 0:
            break
        if maker.account == account:  # self-trade prevention
            if stp == STP_CANCEL_TAKER:
                stopped = True
                break
            book.remove(maker)
            out.append(
                (CANCELLED, symbol, maker.oid, maker.account, maker.cid, opp_side, maker.price, maker.qty,
                 maker.leaves, codes.REASON_STP)
            )  # fmt: skip
            if maker.price not in touched:
                touched.append(maker.price)
            if stp == STP_CANCEL_BOTH:
                stopped = True
                break
            continue
        fill = min(leaves, maker.leaves)
        maker.leaves -= fill
        leaves -= fill
        book.trade_seq += 1
        out.append(
            (TRADE, symbol, book.trade_seq, maker.price, fill, side,
             maker.oid, maker.account, maker.cid, maker.qty, maker.leaves,
             maker.price * fill * inst.maker_rate,
             seq, account, cid, price, qty, leaves,
             maker.price * fill * inst.taker_rate, ts)
        )  # fmt: skip
        if maker.price not in touched:
            touched.append(maker.price)
        if maker.leaves == 0:
            book.remove(maker)
    return leaves, stopped, touched
