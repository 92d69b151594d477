"""A deliberately naive reference model of the matching core, for differential testing.

Nothing here is fast and nothing is clever: every symbol keeps one plain list of resting orders,
every question ("what is the best ask?", "what is the total at this price?") is answered by scanning
or sorting that list again, FOK is decided by running the match on a deep copy and looking at the
result, and time priority is an explicit number (the seq of the command that put the order at the
back of its level). It shares no code with services.matcher.book / engine; it only uses the command
and event constants, the reject codes and the instrument specs.

It emits the same event tuples as the engine (see shared/events.py), so a random command
stream can be compared event by event.

The other order types are modelled as naively: untriggered stops are a list scanned after every
command with trades; GTD orders are found by scanning for expire_time <= ts before each command; an
iceberg is a resting order with a `hidden` reserve; and a quote-quantity market order finds its lot
count by binary search over dry runs of the match on a copy of the book (the engine walks the book
once instead).

With balances (``Reference(instruments, risk=True)``, docs/protocol.md "Accounts, balances and
pre-trade risk") the model keeps, per account and asset, only what the account OWNS (``owned``:
deposits, withdrawals and trade settlements move it). What is held is never tracked: ``held()``
sums, from scratch, what the account's open orders need (resting orders with their hidden reserves,
untriggered stop_limits, and the stops of a trigger wave not applied yet), and available is owned
minus held. So holds, releases and "a buyer gets back the difference to its limit" are written
nowhere: they follow from the orders that are open. A market buy's cost comes from a dry run of the
match on a copy of the book. The model emits no `balance` events; its balances are compared as state.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeGuard

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
    Amend,
    Cancel,
    CancelAll,
    Deposit,
    NewOrder,
    Tick,
    Withdraw,
)
from shared.events import ACCEPTED, AMENDED, BOOK, CANCELLED, FUNDED, REJECTED, TRADE, TRIGGERED
from shared.instruments import FEE_DENOM, Instrument, asset_scales, scale_of

MAX_CID_LEN = 36
MAX_ACCOUNT_LEN = 64
MAX_REQUEST_ID_LEN = 64
FEES = "_fees"
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
    prio: int  # when it was put at the back of its level (a counter that only rises); smaller = earlier
    display: int | None = None  # an iceberg's display quantity; leaves is then its shown part
    hidden: int = 0  # an iceberg's reserve
    expire: int | None = None  # a GTD order's expire_time


@dataclass
class RefBook:
    inst: Instrument
    resting: list[RefOrder] = field(default_factory=list)
    trade_seq: int = 0
    book_seq: int = 0
    last_price: int | None = None
    stops: list[list[Any]] = field(default_factory=list)  # [oid, account, cid, side, type, tif, price,
    # qty, stop_price, stp] in the order placed, as the engine's snapshot lists them
    pending: list[list[Any]] = field(default_factory=list)  # a trigger wave's stops not applied yet

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

    def find_stop(self, account: Any, order_id: Any, cid: Any) -> list[Any] | None:
        if type(account) is not str:
            return None
        if order_id is not None:
            hits = [s for s in self.stops if type(order_id) is int and s[0] == order_id and s[1] == account]
        elif type(cid) is str:
            hits = [s for s in self.stops if s[2] == cid and s[1] == account]
        else:
            return None
        return hits[0] if hits else None

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


def _valid_account(value: Any) -> TypeGuard[str]:
    return type(value) is str and 1 <= len(value) <= MAX_ACCOUNT_LEN


def _is_int(value: Any) -> TypeGuard[int]:
    return type(value) is int  # bool is not a quantity or a price


@dataclass(frozen=True)
class Units:
    """One instrument's assets and its factors from ticks and lots to asset units (the contract's
    formulas, written out again from the tick and lot sizes)."""

    base: str
    quote: str
    bf: int  # base units per lot
    qn: int  # quote units per tick x lot
    rate: int  # the higher fee rate: what a priced buy holds for
    taker_rate: int

    @staticmethod
    def of(inst: Instrument, scales: dict[str, int]) -> Units:
        pm, pk = scale_of(inst.tick_size)
        qm, qk = scale_of(inst.lot_size)
        base, quote = inst.symbol.split("-")
        bf = qm * 10 ** (scales[base] - qk)
        qn = pm * qm * 10 ** (scales[quote] - pk - qk)
        return Units(base, quote, bf, qn, max(inst.maker_rate, inst.taker_rate), inst.taker_rate)

    def quote_units(self, fee_units: int) -> int:
        """Fee units (tick x lot / FEE_DENOM) as quote units: always whole, or the scale is wrong."""
        units, rest = divmod(fee_units * self.qn, FEE_DENOM)
        assert not rest, f"{fee_units} fee units are no whole number of quote units"
        return units

    def buy_hold(self, price: int, lots: int) -> int:
        return self.quote_units(price * lots * (FEE_DENOM + self.rate))

    def sell_hold(self, lots: int) -> int:
        return lots * self.bf

    def need(self, side: str, price: int | None, lots: int) -> tuple[str, int]:
        """(asset, amount) an open order of `lots` needs held; a market buy (no price) needs nothing."""
        if side == SELL:
            return self.base, self.sell_hold(lots)
        return self.quote, 0 if price is None else self.buy_hold(price, lots)


class Reference:
    def __init__(self, instruments: list[Instrument], risk: bool = False) -> None:
        self.books: dict[str, RefBook] = {i.symbol: RefBook(i) for i in instruments}
        self.last_seq = 0
        self.clock = 0  # time priority: rises each time an order goes to the back of a level
        self.risk = risk
        self.scales = asset_scales(instruments)
        self.units = {i.symbol: Units.of(i, self.scales) for i in instruments} if risk else {}
        self.owned: dict[tuple[str, str], int] = {}  # (account, asset) -> available + held

    # Balances: owned is tracked, held is recomputed from the open orders every time ------------
    def _needs(self) -> Iterator[tuple[str, str, int]]:
        """(account, asset, amount) that each open order needs held."""
        for symbol, book in self.books.items():
            u = self.units[symbol]
            for o in book.resting:
                yield (o.account, *u.need(o.side, o.price, o.leaves + o.hidden))
            for s in book.stops + book.pending:
                if s[4] == STOP_LIMIT:  # a stop_market holds nothing until it triggers
                    yield (s[1], *u.need(s[3], s[6], s[7]))

    def held(self, account: str, asset: str) -> int:
        return sum(amount for a, s, amount in self._needs() if (a, s) == (account, asset))

    def available(self, account: str, asset: str) -> int:
        return self.owned.get((account, asset), 0) - self.held(account, asset)

    def move(self, account: str, asset: str, amount: int) -> None:
        self.owned[account, asset] = self.owned.get((account, asset), 0) + amount

    def balances(self) -> dict[str, dict[str, list[int]]]:
        """account -> asset -> [available, held], the [0, 0] pairs left out."""
        held: dict[tuple[str, str], int] = {}
        for account, asset, amount in self._needs():
            held[account, asset] = held.get((account, asset), 0) + amount
        out: dict[str, dict[str, list[int]]] = {}
        for pair in sorted(set(self.owned) | set(held)):
            h = held.get(pair, 0)
            avail = self.owned.get(pair, 0) - h
            if avail or h:
                out.setdefault(pair[0], {})[pair[1]] = [avail, h]
        return out

    def _settle(self, symbol: str, trades: list[Event]) -> None:
        """Move what each trade moves: the lots from seller to buyer, notional and fees the other way."""
        u = self.units[symbol]
        for e in trades:
            price, fill, aggressor = e[3], e[4], e[5]
            maker, maker_fee, taker, taker_fee = e[7], e[11], e[13], e[18]
            buyer, seller = (taker, maker) if aggressor == BUY else (maker, taker)
            buyer_fee, seller_fee = (taker_fee, maker_fee) if aggressor == BUY else (maker_fee, taker_fee)
            notional = price * fill * FEE_DENOM
            self.move(buyer, u.base, fill * u.bf)
            self.move(seller, u.base, -fill * u.bf)
            self.move(buyer, u.quote, -u.quote_units(notional + buyer_fee))
            self.move(seller, u.quote, u.quote_units(notional - seller_fee))
            self.move(FEES, u.quote, u.quote_units(maker_fee + taker_fee))

    def _funds_code(self, book: RefBook, cmd: NewOrder) -> str | None:
        """INSUFFICIENT_FUNDS if the account cannot afford a valid order (a market order by quantity,
        after a quote order's lots are counted), None if it can."""
        symbol, account, side, _, _, price, qty, _, _, _ = cmd[:10]
        assert qty is not None
        u = self.units[symbol]
        if side == BUY and price is None:  # a market buy: the exact cost of its fills, by a dry run
            trades: list[Event] = []
            _match(book.clone(), cmd, 0, 0, trades, self.prio)
            asset = u.quote
            need = sum(
                u.quote_units(e[3] * e[4] * (FEE_DENOM + u.taker_rate)) for e in trades if e[0] == TRADE
            )
        else:
            asset, need = u.need(side, price, qty)
        return None if self.available(account, asset) >= need else codes.INSUFFICIENT_FUNDS

    def _fund(self, cmd: Deposit | Withdraw) -> list[Event]:
        account, asset, amount, request_id = cmd
        op = "deposit" if type(cmd) is Deposit else "withdraw"
        if not self.risk:
            return [_rejected(None, op, None, account, request_id, codes.BALANCES_DISABLED)]
        code: str | None = None
        if not _valid_account(account) or (
            account.startswith("_") and not (op == "withdraw" and account == FEES)
        ):
            code = codes.INVALID_ACCOUNT
        elif request_id is not None and (
            type(request_id) is not str or not 1 <= len(request_id) <= MAX_REQUEST_ID_LEN
        ):
            return [_rejected(None, op, None, account, None, codes.INVALID_MESSAGE)]
        elif type(asset) is not str or asset not in self.scales:
            code = codes.UNKNOWN_ASSET
        elif not _is_int(amount) or not 0 < amount < 2**96:
            code = codes.INVALID_AMOUNT
        elif op == "withdraw" and amount > self.available(account, asset):
            code = codes.INSUFFICIENT_FUNDS
        if code is not None:
            return [_rejected(None, op, None, account, request_id, code)]
        self.move(account, asset, amount if op == "deposit" else -amount)
        return [(FUNDED, None, op, account, asset, amount, request_id)]

    def _cancel_all(self, cmd: CancelAll) -> list[Event]:
        symbol, account, reason = cmd
        if symbol is not None and self.book_for(symbol) is None:
            return [_rejected(symbol, "cancel_all", None, account, None, codes.UNKNOWN_SYMBOL)]
        if type(account) is not str or not 1 <= len(account) <= MAX_ACCOUNT_LEN:
            return [_rejected(symbol, "cancel_all", None, account, None, codes.INVALID_ACCOUNT)]
        if type(reason) is not str or reason not in (
            codes.REASON_USER,
            codes.REASON_DISCONNECT,
            codes.REASON_DEAD_MAN,
        ):
            return [_rejected(symbol, "cancel_all", None, account, None, codes.INVALID_MESSAGE)]
        out: list[Event] = []
        for sym, book in self.books.items():
            if symbol is not None and sym != symbol:
                continue
            mine: list[tuple[int, Any]] = [(o.oid, o) for o in book.resting if o.account == account]
            mine += [(s[0], s) for s in book.stops if s[1] == account]
            touched: list[tuple[str, int]] = []
            for _, item in sorted(mine, key=lambda pair: pair[0]):
                if isinstance(item, RefOrder):
                    book.remove(item)
                    out.append((CANCELLED, sym, item.oid, account, item.cid, item.side, item.price, item.qty,
                                item.leaves + item.hidden, reason))  # fmt: skip
                    if (item.side, item.price) not in touched:
                        touched.append((item.side, item.price))
                else:
                    book.stops = [s for s in book.stops if s is not item]
                    oid, _, cid, side, _, _, price, qty, _, _ = item
                    out.append((CANCELLED, sym, oid, account, cid, side, price, qty, qty, reason))
            if touched:
                book.book_seq += 1
                changes = [(side, price, book.total(side, price)) for side, price in touched]
                out.append((BOOK, sym, book.book_seq, changes, book.bbo()))
        return out

    def prio(self) -> int:
        self.clock += 1
        return self.clock

    def book_for(self, symbol: Any) -> RefBook | None:
        if type(symbol) is not str:
            return None
        return self.books.get(symbol)

    def apply(self, cmd: Any, seq: int, ts: int) -> list[Event]:
        if seq <= self.last_seq:
            raise ValueError("seq must rise")
        self.last_seq = seq
        kind = type(cmd)
        book = self.book_for(cmd[0]) if kind in (NewOrder, Cancel, Amend, Tick, CancelAll) else None
        out = self._expire(book, ts) if book is not None else []
        if kind is NewOrder:
            events = self._new(cmd, seq, ts)
            prices = [e[3] for e in events if e[0] == TRADE]
            if book is not None and prices and cmd[3] not in (STOP_LIMIT, STOP_MARKET):
                self._run_stops(book, events, min(prices), max(prices), ts)
        elif kind is Cancel:
            events = self._cancel(cmd)
        elif kind is Amend:
            events = self._amend(cmd)
        elif kind is Tick:
            events = []
        elif kind is CancelAll:
            events = self._cancel_all(cmd)
        elif kind is Deposit or kind is Withdraw:
            events = self._fund(cmd)
        else:
            events = [_rejected(None, "new", None, None, None, codes.UNKNOWN_OP)]
        return out + events

    def next_expiry(self, symbol: str) -> int | None:
        times = [o.expire for o in self.books[symbol].resting if o.expire is not None]
        return min(times) if times else None

    def _expire(self, book: RefBook, ts: int) -> list[Event]:
        due = sorted(
            (o for o in book.resting if o.expire is not None and o.expire <= ts),
            key=lambda o: (o.expire, o.oid),
        )
        out: list[Event] = []
        touched: list[tuple[str, int]] = []
        for o in due:
            book.remove(o)
            out.append((CANCELLED, book.inst.symbol, o.oid, o.account, o.cid, o.side, o.price, o.qty,
                        o.leaves + o.hidden, codes.REASON_EXPIRED))  # fmt: skip
            if (o.side, o.price) not in touched:
                touched.append((o.side, o.price))
        if touched:
            book.book_seq += 1
            changes = [(side, price, book.total(side, price)) for side, price in touched]
            out.append((BOOK, book.inst.symbol, book.book_seq, changes, book.bbo()))
        return out

    def _run_stops(self, book: RefBook, out: list[Event], lo: int, hi: int, ts: int) -> None:
        """Waves: the stops met by [lo, hi] trigger in the order placed; their trades make the next."""
        while True:
            wave = [s for s in book.stops if (hi >= s[8] if s[3] == BUY else lo <= s[8])]
            if not wave:
                return
            book.stops = [s for s in book.stops if not any(s is w for w in wave)]
            book.pending = list(wave)  # a stop_limit holds until it is applied as an order
            prices: list[int] = []
            for stop in wave:
                oid, account, cid, side, otype, tif, price, qty, stop_price, stp = stop
                book.pending.remove(stop)
                kind = LIMIT if otype == STOP_LIMIT else MARKET
                out.append(
                    (TRIGGERED, book.inst.symbol, oid, account, cid, side, kind, tif, price, stop_price, qty)
                )
                events = self._new(
                    NewOrder(book.inst.symbol, account, side, kind, tif, price, qty, cid, False, stp), oid, ts
                )
                if events[0][0] == REJECTED:  # only a stop_market's funds are checked at its trigger
                    assert otype == STOP_MARKET and events[0][6] == codes.INSUFFICIENT_FUNDS, events
                    out.append((CANCELLED, book.inst.symbol, oid, account, cid, side, price, qty, qty,
                                codes.REASON_FUNDS))  # fmt: skip
                    continue
                assert events[0][0] == ACCEPTED
                out += events[1:]
                prices += [e[3] for e in events if e[0] == TRADE]
            if not prices:
                return
            lo, hi = min(prices), max(prices)

    def state(self) -> dict[str, Any]:
        """The same shape as services.matcher.snapshot.snapshot(); with balances on, "balances" leaves
        out the [0, 0] pairs (compare it with the engine's minus those)."""
        extra = {"balances": self.balances(), "asset_scales": self.scales} if self.risk else {}
        return extra | {
            "version": 4,
            "last_seq": self.last_seq,
            "books": {
                s: {
                    "trade_seq": b.trade_seq,
                    "book_seq": b.book_seq,
                    "bids": b.levels(BUY),
                    "asks": b.levels(SELL),
                    "last_price": b.last_price,
                    "stops": [list(s) for s in b.stops],
                    "icebergs": sorted(
                        [o.oid, o.display, o.hidden] for o in b.resting if o.display is not None
                    ),
                    "gtd": sorted([o.oid, o.expire] for o in b.resting if o.expire is not None),
                }
                for s, b in self.books.items()
            },
        }

    # New orders -------------------------------------------------------------------------------
    @staticmethod
    def _validate_new(book: RefBook, cmd: NewOrder, ts: int) -> str | None:
        _, account, side, otype, tif, price, qty, cid, post_only, stp, stop, expire, display, quote = cmd
        inst = book.inst
        if type(account) is not str or not 1 <= len(account) <= MAX_ACCOUNT_LEN:
            return codes.INVALID_ACCOUNT
        if side not in (BUY, SELL):
            return codes.INVALID_SIDE
        tifs = {
            LIMIT: (GTC, IOC, FOK, GTD),
            MARKET: (IOC, FOK),
            STOP_LIMIT: (GTC, IOC, FOK),
            STOP_MARKET: (IOC,),
        }
        if type(otype) is not str or otype not in tifs:
            return codes.INVALID_TYPE
        if type(tif) is not str or tif not in tifs[otype] or (quote is not None and tif != IOC):
            return codes.INVALID_TIF
        if quote is not None:
            if otype != MARKET or qty is not None or not _is_int(quote) or quote < 1:
                return codes.INVALID_QUANTITY
            if quote > inst.max_price_ticks * inst.max_qty_lots:
                return codes.INVALID_QUANTITY
            if quote < inst.min_notional_units:
                return codes.MIN_NOTIONAL
        elif not _is_int(qty) or qty < inst.min_qty_lots or qty > inst.max_qty_lots:
            return codes.INVALID_QUANTITY
        if otype in (LIMIT, STOP_LIMIT):
            if not _is_int(price) or price <= 0 or price > inst.max_price_ticks:
                return codes.INVALID_PRICE
            assert qty is not None
            if price * qty < inst.min_notional_units:
                return codes.MIN_NOTIONAL
        elif price is not None:
            return codes.INVALID_PRICE
        is_stop = otype in (STOP_LIMIT, STOP_MARKET)
        if is_stop != (stop is not None) or (
            stop is not None and (not _is_int(stop) or not 0 < stop <= inst.max_price_ticks)
        ):
            return codes.INVALID_STOP_PRICE
        if (tif == GTD) != (expire is not None) or (
            expire is not None and (not _is_int(expire) or not ts < expire < 2**63)
        ):
            return codes.INVALID_EXPIRE_TIME
        if display is not None and (
            otype != LIMIT
            or tif not in (GTC, GTD)
            or not _is_int(display)
            or qty is None
            or not inst.min_qty_lots <= display < qty
        ):
            return codes.INVALID_DISPLAY_QUANTITY
        if cid is not None and (
            type(cid) is not str or not 1 <= len(cid) <= MAX_CID_LEN or not cid.isprintable()
        ):
            return codes.INVALID_CLIENT_ORDER_ID
        if post_only is True:
            if otype != LIMIT or tif not in (GTC, GTD):
                return codes.INVALID_TIF
        elif post_only is not False:
            return codes.INVALID_MESSAGE
        if type(stp) is not str or stp not in (STP_CANCEL_TAKER, STP_CANCEL_MAKER, STP_CANCEL_BOTH):
            return codes.INVALID_STP
        if cid is not None and (
            any(o.account == account and o.cid == cid for o in book.resting)
            or any(s[1] == account and s[2] == cid for s in book.stops)
        ):
            return codes.DUPLICATE_CLIENT_ORDER_ID
        return None

    def _new(self, cmd: NewOrder, seq: int, ts: int) -> list[Event]:
        symbol, account, side, otype, tif, price, qty, cid, post_only, stp, stop, expire, display, quote = cmd
        book = self.book_for(symbol)
        if book is None:
            return [_rejected(symbol, "new", seq, account, cid, codes.UNKNOWN_SYMBOL)]
        code = self._validate_new(book, cmd, ts)
        if code is None and self.risk and account.startswith("_"):  # the venue's accounts never trade
            code = codes.INVALID_ACCOUNT
        if code is not None:
            return [_rejected(symbol, "new", seq, account, cid, code)]
        if otype in (STOP_LIMIT, STOP_MARKET):
            if self.risk and otype == STOP_LIMIT:  # a stop_market is checked when it triggers
                code = self._funds_code(book, NewOrder(symbol, account, side, LIMIT, tif, price, qty))
                if code is not None:
                    return [_rejected(symbol, "new", seq, account, cid, code)]
            book.stops.append([seq, account, cid, side, otype, tif, price, qty, stop, stp])
            out: list[Event] = [(ACCEPTED, symbol, seq, account, cid, side, otype, tif, price, qty)]
            if book.last_price is not None:
                self._run_stops(book, out, book.last_price, book.last_price, ts)
            return out
        if quote is not None:
            if self.risk and side == BUY:  # a quote buy must be able to spend its whole budget
                u = self.units[symbol]
                if self.available(account, u.quote) < u.quote_units(quote * FEE_DENOM):
                    return [_rejected(symbol, "new", seq, account, cid, codes.INSUFFICIENT_FUNDS)]
            lots = _quote_lots(book, cmd, self.prio)
            if lots < book.inst.min_qty_lots:
                return [
                    (ACCEPTED, symbol, seq, account, cid, side, MARKET, tif, None, 0),
                    (CANCELLED, symbol, seq, account, cid, side, None, 0, 0, codes.REASON_MARKET),
                ]
            cmd = NewOrder(symbol, account, side, MARKET, IOC, None, lots, cid, False, stp)
            qty = lots
        assert qty is not None

        opp_side = SELL if side == BUY else BUY
        if post_only and _makers(book, side, price):
            return [_rejected(symbol, "new", seq, account, cid, codes.WOULD_TAKE)]
        if self.risk:
            code = self._funds_code(book, cmd)
            if code is not None:
                return [_rejected(symbol, "new", seq, account, cid, code)]
        out = [(ACCEPTED, symbol, seq, account, cid, side, otype, tif, price, qty)]

        if tif == FOK:
            leaves, _, _ = _match(book.clone(), cmd, seq, ts, [], self.prio)
            if leaves:  # it would not fill completely: nothing happens at all
                out.append((CANCELLED, symbol, seq, account, cid, side, price, qty, qty, codes.REASON_FOK))
                return out

        before = {p: book.total(opp_side, p) for p in {o.price for o in book.resting if o.side == opp_side}}
        first = len(out)
        leaves, stopped, touched = _match(book, cmd, seq, ts, out, self.prio)
        if self.risk:
            self._settle(symbol, [e for e in out[first:] if e[0] == TRADE])
        # an iceberg's refill can leave a level's total as it was: no change to tell then
        changes = [
            (opp_side, p, book.total(opp_side, p)) for p in touched if book.total(opp_side, p) != before[p]
        ]
        if leaves:
            reason: str | None
            if stopped:
                reason = codes.REASON_STP
            elif tif in (GTC, GTD):
                assert price is not None  # a limit order
                order = RefOrder(seq, account, cid, side, price, qty, leaves, self.prio(), expire=expire)
                if display is not None and display < leaves:
                    order.display, order.leaves, order.hidden = display, display, leaves - display
                book.resting.append(order)
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
            stop = book.find_stop(account, order_id, cid)
            if stop is None:
                return [_rejected(symbol, "cancel", order_id, account, cid, codes.UNKNOWN_ORDER)]
            book.stops.remove(stop)
            oid, _, s_cid, side, _, _, price, qty, _, _ = stop
            return [(CANCELLED, symbol, oid, account, s_cid, side, price, qty, qty, codes.REASON_USER)]
        book.remove(order)
        book.book_seq += 1
        return [
            (CANCELLED, symbol, order.oid, order.account, order.cid, order.side, order.price, order.qty,
             order.leaves + order.hidden, codes.REASON_USER),
            (BOOK, symbol, book.book_seq, [(order.side, order.price, book.total(order.side, order.price))],
             book.bbo()),
        ]  # fmt: skip

    def _amend(self, cmd: Amend) -> list[Event]:
        symbol, account, order_id, cid, new_price, new_qty = cmd
        book = self.book_for(symbol)
        if book is None:
            return [_rejected(symbol, "amend", order_id, account, cid, codes.UNKNOWN_SYMBOL)]
        stop = book.find_stop(account, order_id, cid)
        if stop is not None:
            return [_rejected(symbol, "amend", stop[0], account, stop[2], codes.NOT_AMENDABLE)]
        order = book.find(account, order_id, cid)
        if order is None:
            return [_rejected(symbol, "amend", order_id, account, cid, codes.UNKNOWN_ORDER)]
        if order.display is not None:
            return [_rejected(symbol, "amend", order.oid, account, order.cid, codes.NOT_AMENDABLE)]
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
        elif self.risk:  # the hold follows the new price and quantity
            u = self.units[symbol]
            asset, old_need = u.need(order.side, order.price, order.leaves)
            _, new_need = u.need(order.side, price, qty - filled)
            if new_need - old_need > self.available(account, asset):
                code = codes.INSUFFICIENT_FUNDS
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
            order.prio = self.prio()  # to the back of its (new) level
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


def _match(
    book: RefBook, cmd: NewOrder, seq: int, ts: int, out: list[Event], prio: Callable[[], int]
) -> tuple[int, bool, list[int]]:
    """Trade the incoming order against the book; return (leaves, stopped by STP, touched prices).
    The best maker is looked up again before every fill, so an iceberg refilled at the back of its
    level (prio() is later than everyone's) is met again only after the rest of its level."""
    symbol, account, side, _, _, price, qty, cid, _, stp = cmd[:10]
    inst = book.inst
    assert qty is not None  # a quote-quantity order is matched with its lot count
    leaves = qty
    stopped = False
    touched: list[int] = []
    opp_side = SELL if side == BUY else BUY
    while leaves:
        makers = _makers(book, side, price)
        if not makers:
            break
        maker = makers[0]
        if maker.price not in touched:
            touched.append(maker.price)
        if maker.account == account:  # self-trade prevention
            if stp == STP_CANCEL_TAKER:
                stopped = True
                break
            book.remove(maker)
            out.append(
                (CANCELLED, symbol, maker.oid, maker.account, maker.cid, opp_side, maker.price, maker.qty,
                 maker.leaves + maker.hidden, codes.REASON_STP)
            )  # fmt: skip
            if stp == STP_CANCEL_BOTH:
                stopped = True
                break
            continue
        fill = min(leaves, maker.leaves)
        maker.leaves -= fill
        leaves -= fill
        book.trade_seq += 1
        book.last_price = maker.price
        out.append(
            (TRADE, symbol, book.trade_seq, maker.price, fill, side,
             maker.oid, maker.account, maker.cid, maker.qty, maker.leaves + maker.hidden,
             maker.price * fill * inst.maker_rate,
             seq, account, cid, price, qty, leaves,
             maker.price * fill * inst.taker_rate, ts)
        )  # fmt: skip
        if maker.leaves == 0:
            if maker.hidden:
                assert maker.display is not None
                maker.leaves = min(maker.display, maker.hidden)
                maker.hidden -= maker.leaves
                maker.prio = prio()
            else:
                book.remove(maker)
    return leaves, stopped, touched


def _quote_lots(book: RefBook, cmd: NewOrder, prio: Callable[[], int]) -> int:
    """The most whole lots a quote-quantity market order can fill within its budget: binary search
    over dry runs of the match (on copies of the book) with a quantity of n lots."""
    symbol, account, side, _, _, _, _, cid, _, stp, _, _, _, quote = cmd
    rate = book.inst.taker_rate
    assert quote is not None

    def affordable(n: int) -> bool:
        trades: list[Event] = []
        order = NewOrder(symbol, account, side, MARKET, IOC, None, n, cid, False, stp)
        leaves, _, _ = _match(book.clone(), order, 0, 0, trades, prio)
        notional = sum(e[3] * e[4] for e in trades if e[0] == TRADE)
        within = notional * (FEE_DENOM + rate) <= quote * FEE_DENOM if side == BUY else notional <= quote
        return leaves == 0 and within

    opp_side = SELL if side == BUY else BUY
    lo, hi = (
        0,
        min(book.inst.max_qty_lots, sum(o.leaves + o.hidden for o in book.resting if o.side == opp_side)),
    )
    while lo < hi:  # affordable(lo) holds (0 lots cost nothing); find the largest such
        mid = (lo + hi + 1) // 2
        if affordable(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo
