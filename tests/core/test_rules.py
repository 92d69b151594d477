"""Scenario tests for the matching rules: exact event tuples for each rule of the core.

Default instruments: tick 0.01, lot 0.00001, min notional 0.01 = 100_000 ticks x lots, maker fee
0.10 % = 100_000 / 1e8 and taker fee 0.20 % = 200_000 / 1e8 per tick x lot. Prices here are around
10_000 ticks (100.00 USDT), so 10 lots already meet the minimum notional.
"""

from __future__ import annotations

import hashlib
from typing import Any

import pytest

from services.matcher.engine import Engine
from services.matcher.snapshot import snapshot, to_bytes
from shared import codes
from shared.commands import (
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
from shared.events import Event
from shared.instruments import default_instruments
from tests.core.reference import Reference

S = "BTC-USDT"
E = "ETH-USDT"
MAKER_RATE = 100_000
TAKER_RATE = 200_000


class Ex:
    """One implementation of the rules and a seq counter: seq (= the new order's id) is 1, 2, 3, ...;
    ts = 1000 + seq. The same scenarios run against the engine (in whichever build this process
    imported: `make test` runs this file with the compiled and the pure one) and against the naive
    reference model of tests/core/reference.py: one spec, several implementations."""

    def __init__(self, impl: str = "engine") -> None:
        self.impl = impl
        self.engine: Engine | Reference = (
            Engine(default_instruments().values())
            if impl == "engine"
            else Reference(list(default_instruments().values()))
        )
        self.seq = 0

    def __call__(self, cmd: Any) -> list[Event]:
        self.seq += 1
        return self.engine.apply(cmd, self.seq, 1000 + self.seq)

    def state(self) -> dict[str, Any]:
        """The whole state in snapshot form (services.matcher.snapshot)."""
        if isinstance(self.engine, Engine):
            return snapshot(self.engine)
        return self.engine.state()

    def hash(self) -> str:
        return hashlib.sha256(to_bytes(self.state())).hexdigest()

    def book_seq(self, symbol: str = S) -> int:
        seq: int = self.state()["books"][symbol]["book_seq"]
        return seq

    def levels(self, symbol: str = S) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        """(price, total) per level, best first, bids then asks."""
        book = self.state()["books"][symbol]
        bids, asks = ([(p, sum(o[4] for o in orders)) for p, orders in book[k]] for k in ("bids", "asks"))
        return bids, asks

    def queue(self, side: str, price: int, symbol: str = S) -> list[int]:
        """Order ids resting at one price, in time priority."""
        for p, orders in self.state()["books"][symbol]["bids" if side == BUY else "asks"]:
            if p == price:
                return [o[0] for o in orders]
        return []


def lim(
    account: str,
    side: str,
    price: int,
    qty: int,
    cid: str | None = None,
    tif: str = GTC,
    post_only: bool = False,
    stp: str = STP_CANCEL_TAKER,
    symbol: str = S,
) -> NewOrder:
    assert price * qty >= 100_000, "a test order below the minimum notional would be rejected"
    return NewOrder(symbol, account, side, LIMIT, tif, price, qty, cid, post_only, stp)


def mkt(
    account: str, side: str, qty: int, tif: str = IOC, cid: str | None = None, stp: str = STP_CANCEL_TAKER
) -> NewOrder:
    return NewOrder(S, account, side, MARKET, tif, None, qty, cid, False, stp)


def accepted(oid: int, account: str, side: str, price: int | None, qty: int, cid: str | None = None,
             otype: str = LIMIT, tif: str = GTC, symbol: str = S) -> Event:  # fmt: skip
    return ("accepted", symbol, oid, account, cid, side, otype, tif, price, qty)


def trade(
    tid: int,
    price: int,
    qty: int,
    maker: tuple[int, str, str | None, int, int],
    taker: tuple[int, str, str | None, int | None, int, int],
    aggressor: str,
    maker_fee: int | None = None,
    taker_fee: int | None = None,
    symbol: str = S,
) -> Event:
    """maker = (oid, account, cid, qty, leaves), taker = (oid, account, cid, limit, qty, leaves).

    The taker's oid is its seq, and ts = 1000 + seq in these tests.
    """
    m_fee = price * qty * MAKER_RATE if maker_fee is None else maker_fee
    t_fee = price * qty * TAKER_RATE if taker_fee is None else taker_fee
    return ("trade", symbol, tid, price, qty, aggressor, *maker, m_fee, *taker, t_fee, 1000 + taker[0])


def cancelled(oid: int, account: str, side: str, price: int | None, qty: int, leaves: int, reason: str,
              cid: str | None = None, symbol: str = S) -> Event:  # fmt: skip
    return ("cancelled", symbol, oid, account, cid, side, price, qty, leaves, reason)


def rejected(op: str, oid: int | None, account: str | None, code: str, cid: str | None = None,
             symbol: str | None = S) -> Event:  # fmt: skip
    return ("rejected", symbol, op, oid, account, cid, code)


def book(seq: int, changes: list[tuple[str, int, int]], bbo: tuple[int | None, int, int | None, int],
         symbol: str = S) -> Event:  # fmt: skip
    return ("book", symbol, seq, changes, bbo)


@pytest.fixture(params=["engine", "reference"])
def ex(request: pytest.FixtureRequest) -> Ex:
    return Ex(request.param)


# Resting orders and the book event --------------------------------------------------------------
def test_passive_limit_orders_rest_and_emit_one_book_event(ex: Ex) -> None:
    assert ex(lim("alice", BUY, 9_990, 25)) == [
        accepted(1, "alice", BUY, 9_990, 25),
        book(1, [(BUY, 9_990, 25)], (9_990, 25, None, 0)),
    ]
    assert ex(lim("bob", SELL, 10_010, 40, cid="b-1")) == [
        accepted(2, "bob", SELL, 10_010, 40, cid="b-1"),
        book(2, [(SELL, 10_010, 40)], (9_990, 25, 10_010, 40)),
    ]
    assert ex(lim("carol", BUY, 9_990, 15)) == [
        accepted(3, "carol", BUY, 9_990, 15),
        book(3, [(BUY, 9_990, 40)], (9_990, 40, 10_010, 40)),
    ]
    assert ex(lim("carol", BUY, 9_980, 15)) == [
        accepted(4, "carol", BUY, 9_980, 15),
        book(4, [(BUY, 9_980, 15)], (9_990, 40, 10_010, 40)),  # bbo unchanged, still one event
    ]
    assert ex.levels() == ([(9_990, 40), (9_980, 15)], [(10_010, 40)])


def test_book_seq_and_trade_ids_are_per_symbol(ex: Ex) -> None:
    ex(lim("alice", SELL, 10_000, 20))
    assert ex(lim("bob", SELL, 300_000, 20, symbol=E)) == [
        accepted(2, "bob", SELL, 300_000, 20, symbol=E),
        book(1, [(SELL, 300_000, 20)], (None, 0, 300_000, 20), symbol=E),
    ]
    assert ex(lim("carol", BUY, 300_000, 20, symbol=E))[1] == trade(
        1, 300_000, 20, (2, "bob", None, 20, 0), (3, "carol", None, 300_000, 20, 0), BUY, symbol=E
    )
    out = ex(lim("carol", BUY, 10_000, 20))
    assert out[1][2] == 1  # trade id 1 on BTC-USDT as well
    assert out[-1] == book(2, [(SELL, 10_000, 0)], (None, 0, None, 0))


# Price-time priority, no trade-through, partial fills -------------------------------------------
def test_trade_happens_at_the_makers_price_for_buyers_and_sellers(ex: Ex) -> None:
    ex(lim("alice", SELL, 10_000, 20))
    assert ex(lim("bob", BUY, 10_050, 20)) == [
        accepted(2, "bob", BUY, 10_050, 20),
        trade(1, 10_000, 20, (1, "alice", None, 20, 0), (2, "bob", None, 10_050, 20, 0), BUY,
              maker_fee=20_000_000_000, taker_fee=40_000_000_000),
        book(2, [(SELL, 10_000, 0)], (None, 0, None, 0)),
    ]  # fmt: skip
    ex(lim("alice", BUY, 10_000, 20))
    assert ex(lim("bob", SELL, 9_900, 20)) == [
        accepted(4, "bob", SELL, 9_900, 20),
        trade(2, 10_000, 20, (3, "alice", None, 20, 0), (4, "bob", None, 9_900, 20, 0), SELL),
        book(4, [(BUY, 10_000, 0)], (None, 0, None, 0)),
    ]


def test_no_trade_through_the_takers_limit(ex: Ex) -> None:
    ex(lim("alice", SELL, 10_000, 10))
    ex(lim("alice", SELL, 10_002, 50))
    out = ex(lim("bob", BUY, 10_001, 40))
    assert out == [
        accepted(3, "bob", BUY, 10_001, 40),
        trade(1, 10_000, 10, (1, "alice", None, 10, 0), (3, "bob", None, 10_001, 40, 30), BUY),
        book(3, [(SELL, 10_000, 0), (BUY, 10_001, 30)], (10_001, 30, 10_002, 50)),
    ]
    assert ex.levels() == ([(10_001, 30)], [(10_002, 50)])


def test_partial_fill_of_the_maker_leaves_it_first_in_line(ex: Ex) -> None:
    ex(lim("alice", SELL, 10_000, 50, cid="a1"))
    ex(lim("bob", SELL, 10_000, 10))
    assert ex(lim("carol", BUY, 10_000, 20, cid="c1")) == [
        accepted(3, "carol", BUY, 10_000, 20, cid="c1"),
        trade(1, 10_000, 20, (1, "alice", "a1", 50, 30), (3, "carol", "c1", 10_000, 20, 0), BUY),
        book(3, [(SELL, 10_000, 40)], (None, 0, 10_000, 40)),
    ]
    assert ex.queue(SELL, 10_000) == [1, 2]
    assert ex(lim("carol", BUY, 10_000, 35)) == [
        accepted(4, "carol", BUY, 10_000, 35),
        trade(2, 10_000, 30, (1, "alice", "a1", 50, 0), (4, "carol", None, 10_000, 35, 5), BUY),
        trade(3, 10_000, 5, (2, "bob", None, 10, 5), (4, "carol", None, 10_000, 35, 0), BUY),
        book(4, [(SELL, 10_000, 5)], (None, 0, 10_000, 5)),
    ]


def test_fifo_inside_a_level(ex: Ex) -> None:
    for account in ("alice", "bob", "carol"):
        ex(lim(account, BUY, 10_000, 20))
    assert ex(lim("dave", SELL, 9_999, 50)) == [
        accepted(4, "dave", SELL, 9_999, 50),
        trade(1, 10_000, 20, (1, "alice", None, 20, 0), (4, "dave", None, 9_999, 50, 30), SELL),
        trade(2, 10_000, 20, (2, "bob", None, 20, 0), (4, "dave", None, 9_999, 50, 10), SELL),
        trade(3, 10_000, 10, (3, "carol", None, 20, 10), (4, "dave", None, 9_999, 50, 0), SELL),
        book(4, [(BUY, 10_000, 10)], (10_000, 10, None, 0)),
    ]


def test_better_price_beats_earlier_time(ex: Ex) -> None:
    ex(lim("alice", SELL, 10_001, 20))
    ex(lim("bob", SELL, 10_000, 20))
    out = ex(lim("carol", BUY, 10_001, 20))
    assert out[1][6] == 2 and out[1][3] == 10_000  # bob, the better price, although later


def test_taker_remainder_rests_at_its_limit_after_partial_fill(ex: Ex) -> None:
    ex(lim("alice", SELL, 10_000, 15))
    assert ex(lim("bob", BUY, 10_003, 40, cid="b")) == [
        accepted(2, "bob", BUY, 10_003, 40, cid="b"),
        trade(1, 10_000, 15, (1, "alice", None, 15, 0), (2, "bob", "b", 10_003, 40, 25), BUY),
        book(2, [(SELL, 10_000, 0), (BUY, 10_003, 25)], (10_003, 25, None, 0)),
    ]
    # The rest is a normal resting order: cancellable by its client id, quantity = the original total.
    assert ex(Cancel(S, "bob", None, "b")) == [
        cancelled(2, "bob", BUY, 10_003, 40, 25, codes.REASON_USER, cid="b"),
        book(3, [(BUY, 10_003, 0)], (None, 0, None, 0)),
    ]


# Market orders ----------------------------------------------------------------------------------
def test_market_buy_sweeps_several_levels_with_exact_fees(ex: Ex) -> None:
    ex(lim("alice", SELL, 10_000, 30))
    ex(lim("bob", SELL, 10_001, 20, cid="b"))
    ex(lim("carol", SELL, 10_003, 40))
    ex(lim("carol", SELL, 10_100, 40))
    assert ex(mkt("dave", BUY, 80, cid="d")) == [
        ("accepted", S, 5, "dave", "d", BUY, MARKET, IOC, None, 80),
        ("trade", S, 1, 10_000, 30, BUY, 1, "alice", None, 30, 0, 30_000_000_000,
         5, "dave", "d", None, 80, 50, 60_000_000_000, 1005),
        ("trade", S, 2, 10_001, 20, BUY, 2, "bob", "b", 20, 0, 20_002_000_000,
         5, "dave", "d", None, 80, 30, 40_004_000_000, 1005),
        ("trade", S, 3, 10_003, 30, BUY, 3, "carol", None, 40, 10, 30_009_000_000,
         5, "dave", "d", None, 80, 0, 60_018_000_000, 1005),
        ("book", S, 5, [(SELL, 10_000, 0), (SELL, 10_001, 0), (SELL, 10_003, 10)],
         (None, 0, 10_003, 10)),
    ]  # fmt: skip
    assert ex.levels() == ([], [(10_003, 10), (10_100, 40)])


def test_market_remainder_is_cancelled_when_the_book_runs_dry(ex: Ex) -> None:
    ex(lim("alice", BUY, 10_000, 10))
    ex(lim("bob", BUY, 9_000, 20))
    assert ex(mkt("carol", SELL, 50)) == [
        ("accepted", S, 3, "carol", None, SELL, MARKET, IOC, None, 50),
        trade(1, 10_000, 10, (1, "alice", None, 10, 0), (3, "carol", None, None, 50, 40), SELL),
        trade(2, 9_000, 20, (2, "bob", None, 20, 0), (3, "carol", None, None, 50, 20), SELL),
        cancelled(3, "carol", SELL, None, 50, 20, codes.REASON_MARKET),
        book(3, [(BUY, 10_000, 0), (BUY, 9_000, 0)], (None, 0, None, 0)),
    ]


def test_market_order_on_an_empty_book(ex: Ex) -> None:
    before = ex.hash()
    assert ex(mkt("alice", BUY, 10)) == [
        ("accepted", S, 1, "alice", None, BUY, MARKET, IOC, None, 10),
        cancelled(1, "alice", BUY, None, 10, 10, codes.REASON_MARKET),
    ]
    assert ex(mkt("alice", BUY, 10, tif=FOK)) == [
        ("accepted", S, 2, "alice", None, BUY, MARKET, FOK, None, 10),
        cancelled(2, "alice", BUY, None, 10, 10, codes.REASON_FOK),
    ]
    assert ex.state()["books"] == Ex(ex.impl).state()["books"]
    assert ex.hash() != before  # only last_seq moved
    assert ex(lim("bob", BUY, 10_000, 10))[-1][2] == 1  # no book event was used up


def test_market_order_cannot_be_gtc(ex: Ex) -> None:
    assert ex(mkt("alice", BUY, 10, tif=GTC)) == [rejected("new", 1, "alice", codes.INVALID_TIF)]


# IOC ----------------------------------------------------------------------------------------------
def test_ioc_fills_what_it_can_and_never_rests(ex: Ex) -> None:
    ex(lim("alice", SELL, 10_000, 30))
    ex(lim("alice", SELL, 10_002, 40))
    assert ex(lim("bob", BUY, 10_001, 50, tif=IOC, cid="i")) == [
        accepted(3, "bob", BUY, 10_001, 50, cid="i", tif=IOC),
        trade(1, 10_000, 30, (1, "alice", None, 30, 0), (3, "bob", "i", 10_001, 50, 20), BUY),
        cancelled(3, "bob", BUY, 10_001, 50, 20, codes.REASON_IOC, cid="i"),
        book(3, [(SELL, 10_000, 0)], (None, 0, 10_002, 40)),
    ]
    assert ex(lim("bob", BUY, 10_001, 50, tif=IOC, cid="i")) == [  # cid "i" is free: never rested
        accepted(4, "bob", BUY, 10_001, 50, cid="i", tif=IOC),
        cancelled(4, "bob", BUY, 10_001, 50, 50, codes.REASON_IOC, cid="i"),
    ]
    assert ex.levels() == ([], [(10_002, 40)])


# FOK ----------------------------------------------------------------------------------------------
def test_fok_fills_completely_across_levels(ex: Ex) -> None:
    ex(lim("alice", SELL, 10_000, 30))
    ex(lim("bob", SELL, 10_001, 30))
    assert ex(lim("carol", BUY, 10_001, 45, tif=FOK)) == [
        accepted(3, "carol", BUY, 10_001, 45, tif=FOK),
        trade(1, 10_000, 30, (1, "alice", None, 30, 0), (3, "carol", None, 10_001, 45, 15), BUY),
        trade(2, 10_001, 15, (2, "bob", None, 30, 15), (3, "carol", None, 10_001, 45, 0), BUY),
        book(3, [(SELL, 10_000, 0), (SELL, 10_001, 15)], (None, 0, 10_001, 15)),
    ]


@pytest.mark.parametrize(
    ("cmd", "why"),
    [
        (lim("carol", BUY, 10_001, 61, tif=FOK), "one lot short"),
        (lim("carol", BUY, 10_000, 31, tif=FOK), "enough only beyond the limit"),
        (mkt("carol", BUY, 1_000, tif=FOK), "market FOK larger than the book"),
    ],
)
def test_fok_that_cannot_fill_leaves_the_book_untouched(ex: Ex, cmd: NewOrder, why: str) -> None:
    ex(lim("alice", SELL, 10_000, 30))
    ex(lim("bob", SELL, 10_001, 30))
    before = ex.state()["books"]
    out = ex(cmd)
    assert cmd.quantity is not None
    assert out == [
        ("accepted", S, 3, "carol", None, BUY, cmd.type, FOK, cmd.price, cmd.quantity),
        cancelled(3, "carol", BUY, cmd.price, cmd.quantity, cmd.quantity, codes.REASON_FOK),
    ], why
    assert ex.state()["books"] == before
    # Neither trade ids nor book_seq were consumed.
    assert ex(mkt("dave", BUY, 10))[1][2] == 1
    assert ex.book_seq() == 3


def test_fok_sell_exactly_the_book(ex: Ex) -> None:
    ex(lim("alice", BUY, 10_000, 30))
    ex(lim("bob", BUY, 9_999, 30))
    out = ex(lim("carol", SELL, 9_999, 60, tif=FOK))
    assert [e[0] for e in out] == ["accepted", "trade", "trade", "book"]
    assert out[-1] == book(3, [(BUY, 10_000, 0), (BUY, 9_999, 0)], (None, 0, None, 0))


# Post-only --------------------------------------------------------------------------------------
def test_post_only_rests_when_it_does_not_cross(ex: Ex) -> None:
    ex(lim("alice", SELL, 10_000, 30))
    assert ex(lim("bob", BUY, 9_999, 30, post_only=True)) == [
        accepted(2, "bob", BUY, 9_999, 30),
        book(2, [(BUY, 9_999, 30)], (9_999, 30, 10_000, 30)),
    ]


def test_post_only_that_would_take_is_rejected(ex: Ex) -> None:
    ex(lim("alice", SELL, 10_000, 30))
    before = ex.state()["books"]
    assert ex(lim("bob", BUY, 10_000, 30, cid="p", post_only=True)) == [
        rejected("new", 2, "bob", codes.WOULD_TAKE, cid="p")
    ]
    # Even against the account's own order (it would take, whatever STP would then do).
    assert ex(lim("alice", BUY, 10_005, 30, post_only=True, stp=STP_CANCEL_MAKER)) == [
        rejected("new", 3, "alice", codes.WOULD_TAKE)
    ]
    assert ex.state()["books"] == before


@pytest.mark.parametrize(
    "cmd",
    [
        lim("bob", BUY, 9_000, 30, tif=IOC, post_only=True),
        lim("bob", BUY, 9_000, 30, tif=FOK, post_only=True),
        NewOrder(S, "bob", BUY, MARKET, IOC, None, 30, None, True),
    ],
)
def test_post_only_needs_limit_gtc(ex: Ex, cmd: NewOrder) -> None:
    assert ex(cmd) == [rejected("new", 1, "bob", codes.INVALID_TIF)]


# Self-trade prevention --------------------------------------------------------------------------
def _stp_book(ex: Ex) -> None:
    """Asks at 10_000: bob 20 then alice 30 (a1); at 10_001: carol 10."""
    ex(lim("bob", SELL, 10_000, 20))
    ex(lim("alice", SELL, 10_000, 30, cid="a1"))
    ex(lim("carol", SELL, 10_001, 10))


def test_stp_cancel_taker_is_the_default(ex: Ex) -> None:
    _stp_book(ex)
    cmd = NewOrder(S, "alice", BUY, LIMIT, GTC, 10_001, 40)  # stp not given
    assert ex(cmd) == [
        accepted(4, "alice", BUY, 10_001, 40),
        trade(1, 10_000, 20, (1, "bob", None, 20, 0), (4, "alice", None, 10_001, 40, 20), BUY),
        cancelled(4, "alice", BUY, 10_001, 40, 20, codes.REASON_STP),
        book(4, [(SELL, 10_000, 30)], (None, 0, 10_000, 30)),
    ]
    assert ex.queue(SELL, 10_000) == [2]  # alice's resting order is untouched


def test_stp_cancel_maker_cancels_own_resting_orders_and_goes_on(ex: Ex) -> None:
    _stp_book(ex)
    assert ex(lim("alice", BUY, 10_001, 40, stp=STP_CANCEL_MAKER)) == [
        accepted(4, "alice", BUY, 10_001, 40),
        trade(1, 10_000, 20, (1, "bob", None, 20, 0), (4, "alice", None, 10_001, 40, 20), BUY),
        cancelled(2, "alice", SELL, 10_000, 30, 30, codes.REASON_STP, cid="a1"),
        trade(2, 10_001, 10, (3, "carol", None, 10, 0), (4, "alice", None, 10_001, 40, 10), BUY),
        book(4, [(SELL, 10_000, 0), (SELL, 10_001, 0), (BUY, 10_001, 10)], (10_001, 10, None, 0)),
    ]
    # The cancelled maker's client order id is free again.
    assert ex(lim("alice", SELL, 10_050, 10, cid="a1"))[0][0] == "accepted"


def test_stp_cancel_both(ex: Ex) -> None:
    _stp_book(ex)
    assert ex(lim("alice", BUY, 10_001, 40, stp=STP_CANCEL_BOTH)) == [
        accepted(4, "alice", BUY, 10_001, 40),
        trade(1, 10_000, 20, (1, "bob", None, 20, 0), (4, "alice", None, 10_001, 40, 20), BUY),
        cancelled(2, "alice", SELL, 10_000, 30, 30, codes.REASON_STP, cid="a1"),
        cancelled(4, "alice", BUY, 10_001, 40, 20, codes.REASON_STP),
        book(4, [(SELL, 10_000, 0)], (None, 0, 10_001, 10)),
    ]


def test_stp_taker_stopped_before_any_trade_changes_nothing(ex: Ex) -> None:
    ex(lim("alice", SELL, 10_000, 30))
    ex(lim("bob", SELL, 10_000, 30))
    before = ex.state()["books"]
    assert ex(lim("alice", BUY, 10_000, 30, tif=GTC)) == [
        accepted(3, "alice", BUY, 10_000, 30),
        cancelled(3, "alice", BUY, 10_000, 30, 30, codes.REASON_STP),
    ]
    assert ex(mkt("alice", BUY, 30)) == [
        ("accepted", S, 4, "alice", None, BUY, MARKET, IOC, None, 30),
        cancelled(4, "alice", BUY, None, 30, 30, codes.REASON_STP),
    ]
    assert ex.state()["books"] == before


def test_stp_does_not_apply_once_the_taker_is_filled(ex: Ex) -> None:
    ex(lim("bob", SELL, 10_000, 20))
    ex(lim("alice", SELL, 10_000, 30))
    out = ex(lim("alice", BUY, 10_000, 20, stp=STP_CANCEL_BOTH))
    assert [e[0] for e in out] == ["accepted", "trade", "book"]
    assert ex.queue(SELL, 10_000) == [2]


def test_stp_cancel_maker_on_a_market_order_sweeping_own_levels(ex: Ex) -> None:
    ex(lim("alice", BUY, 10_000, 20))
    ex(lim("alice", BUY, 9_999, 20))
    ex(lim("bob", BUY, 9_998, 20))
    assert ex(mkt("alice", SELL, 30, stp=STP_CANCEL_MAKER)) == [
        ("accepted", S, 4, "alice", None, SELL, MARKET, IOC, None, 30),
        cancelled(1, "alice", BUY, 10_000, 20, 20, codes.REASON_STP),
        cancelled(2, "alice", BUY, 9_999, 20, 20, codes.REASON_STP),
        trade(1, 9_998, 20, (3, "bob", None, 20, 0), (4, "alice", None, None, 30, 10), SELL),
        cancelled(4, "alice", SELL, None, 30, 10, codes.REASON_MARKET),
        book(4, [(BUY, 10_000, 0), (BUY, 9_999, 0), (BUY, 9_998, 0)], (None, 0, None, 0)),
    ]


# FOK with self-trade prevention ------------------------------------------------------------------
@pytest.mark.parametrize("stp", [STP_CANCEL_TAKER, STP_CANCEL_BOTH])
def test_fok_blocked_by_own_order_does_nothing(ex: Ex, stp: str) -> None:
    _stp_book(ex)  # bob 20, alice 30 at 10_000; carol 10 at 10_001
    before = ex.state()["books"]
    assert ex(lim("alice", BUY, 10_001, 25, tif=FOK, stp=stp)) == [
        accepted(4, "alice", BUY, 10_001, 25, tif=FOK),
        cancelled(4, "alice", BUY, 10_001, 25, 25, codes.REASON_FOK),
    ]
    assert ex.state()["books"] == before


def test_fok_filled_before_reaching_own_order(ex: Ex) -> None:
    _stp_book(ex)
    out = ex(lim("alice", BUY, 10_001, 20, tif=FOK, stp=STP_CANCEL_TAKER))
    assert [e[0] for e in out] == ["accepted", "trade", "book"]


def test_fok_cancel_maker_skips_own_orders_when_counting(ex: Ex) -> None:
    _stp_book(ex)
    assert ex(lim("alice", BUY, 10_001, 30, tif=FOK, stp=STP_CANCEL_MAKER)) == [
        accepted(4, "alice", BUY, 10_001, 30, tif=FOK),
        trade(1, 10_000, 20, (1, "bob", None, 20, 0), (4, "alice", None, 10_001, 30, 10), BUY),
        cancelled(2, "alice", SELL, 10_000, 30, 30, codes.REASON_STP, cid="a1"),
        trade(2, 10_001, 10, (3, "carol", None, 10, 0), (4, "alice", None, 10_001, 30, 0), BUY),
        book(4, [(SELL, 10_000, 0), (SELL, 10_001, 0)], (None, 0, None, 0)),
    ]


def test_fok_cancel_maker_unfillable_keeps_own_orders(ex: Ex) -> None:
    _stp_book(ex)
    before = ex.state()["books"]
    # 60 lots rest up to 10_001, but 30 are alice's own: only 30 could fill.
    assert ex(lim("alice", BUY, 10_001, 31, tif=FOK, stp=STP_CANCEL_MAKER)) == [
        accepted(4, "alice", BUY, 10_001, 31, tif=FOK),
        cancelled(4, "alice", BUY, 10_001, 31, 31, codes.REASON_FOK),
    ]
    assert ex.state()["books"] == before


# Cancel -------------------------------------------------------------------------------------------
def test_cancel_by_order_id_and_by_client_order_id(ex: Ex) -> None:
    ex(lim("alice", BUY, 10_000, 10, cid="x"))
    ex(lim("alice", BUY, 10_000, 20, cid="y"))
    assert ex(Cancel(S, "alice", 1)) == [
        cancelled(1, "alice", BUY, 10_000, 10, 10, codes.REASON_USER, cid="x"),
        book(3, [(BUY, 10_000, 20)], (10_000, 20, None, 0)),
    ]
    assert ex(Cancel(S, "alice", None, "y")) == [
        cancelled(2, "alice", BUY, 10_000, 20, 20, codes.REASON_USER, cid="y"),
        book(4, [(BUY, 10_000, 0)], (None, 0, None, 0)),
    ]
    # Twice: the order is gone.
    assert ex(Cancel(S, "alice", 1)) == [rejected("cancel", 1, "alice", codes.UNKNOWN_ORDER)]
    assert ex(Cancel(S, "alice", None, "y")) == [
        rejected("cancel", None, "alice", codes.UNKNOWN_ORDER, cid="y")
    ]


def test_cancel_of_a_partially_filled_order_reports_its_leaves(ex: Ex) -> None:
    ex(lim("alice", SELL, 10_000, 50))
    ex(lim("bob", BUY, 10_000, 20))
    assert ex(Cancel(S, "alice", 1)) == [
        cancelled(1, "alice", SELL, 10_000, 50, 30, codes.REASON_USER),
        book(3, [(SELL, 10_000, 0)], (None, 0, None, 0)),
    ]


@pytest.mark.parametrize(
    "cmd",
    [
        Cancel(S, "mallory", 1),  # someone else's order id
        Cancel(S, "mallory", None, "x"),  # someone else's client order id
        Cancel(E, "alice", 1),  # right owner, wrong symbol
        Cancel(S, "alice", 99),  # never existed
        Cancel(S, "alice", 2),  # filled
        Cancel(S, "alice", 4),  # an IOC order: never rested
        Cancel(S, "alice", None, None),  # nothing to go by
        Cancel(S, "alice", 1.0),  # type: ignore[arg-type]  # equal to 1, but not an int
        Cancel(S, "alice", True),  # equal to 1, but a bool
    ],
)
def test_cancel_of_unknown_or_foreign_orders_is_rejected(ex: Ex, cmd: Cancel) -> None:
    ex(lim("alice", BUY, 9_000, 20, cid="x"))  # 1
    ex(lim("alice", BUY, 10_000, 10))  # 2
    ex(lim("bob", SELL, 10_000, 10))  # 3 fills 2
    ex(lim("alice", SELL, 11_000, 10, tif=IOC))  # 4 never rests
    before = ex.state()["books"]
    out = ex(cmd)
    assert out == [
        (
            "rejected",
            cmd.symbol,
            "cancel",
            cmd.order_id if type(cmd.order_id) is int else None,
            cmd.account,
            cmd.client_order_id,
            codes.UNKNOWN_ORDER,
        )
    ]
    assert ex.state()["books"] == before


def test_foreign_cancel_by_client_order_id_never_touches_the_other_accounts_order(ex: Ex) -> None:
    ex(lim("alice", BUY, 10_000, 10, cid="same"))
    ex(lim("bob", BUY, 10_000, 20, cid="same"))
    assert ex(Cancel(S, "bob", None, "same")) == [
        cancelled(2, "bob", BUY, 10_000, 20, 20, codes.REASON_USER, cid="same"),
        book(3, [(BUY, 10_000, 10)], (10_000, 10, None, 0)),
    ]
    assert ex.queue(BUY, 10_000) == [1]


# Client order ids ---------------------------------------------------------------------------------
def test_duplicate_client_order_id_among_open_orders(ex: Ex) -> None:
    ex(lim("alice", BUY, 10_000, 10, cid="dup"))
    before = ex.state()["books"]
    assert ex(lim("alice", SELL, 11_000, 10, cid="dup")) == [
        rejected("new", 2, "alice", codes.DUPLICATE_CLIENT_ORDER_ID, cid="dup")
    ]
    assert ex(mkt("alice", SELL, 10, cid="dup")) == [
        rejected("new", 3, "alice", codes.DUPLICATE_CLIENT_ORDER_ID, cid="dup")
    ]
    assert ex.state()["books"] == before
    # Another account may use the same string.
    assert ex(lim("bob", SELL, 11_000, 10, cid="dup"))[0] == accepted(4, "bob", SELL, 11_000, 10, cid="dup")


def test_client_order_id_is_reusable_once_the_order_is_done(ex: Ex) -> None:
    ex(lim("alice", BUY, 10_000, 10, cid="r"))
    ex(Cancel(S, "alice", 1))
    assert ex(lim("alice", BUY, 10_000, 10, cid="r"))[0][0] == "accepted"  # after a cancel
    ex(lim("bob", SELL, 10_000, 10))  # fills it
    assert ex(lim("alice", SELL, 10_100, 10, cid="r"))[0][0] == "accepted"  # after a fill
    ex(Amend(S, "alice", 5, None, 10_200, None))  # an amend keeps the cid taken
    assert ex(lim("alice", BUY, 9_000, 20, cid="r"))[0][6] == codes.DUPLICATE_CLIENT_ORDER_ID
    assert ex(Cancel(S, "alice", None, "r"))[0] == cancelled(
        5, "alice", SELL, 10_200, 10, 10, codes.REASON_USER, cid="r"
    )


def test_client_order_id_of_a_filled_taker_is_not_reserved(ex: Ex) -> None:
    ex(lim("bob", SELL, 10_000, 10))
    ex(lim("alice", BUY, 10_000, 10, cid="t"))
    assert ex(lim("alice", BUY, 9_000, 20, cid="t"))[0][0] == "accepted"


def test_client_order_id_uniqueness_is_per_symbol(ex: Ex) -> None:
    """docs/protocol.md: unique among the account's open orders *of the symbol*."""
    ex(lim("alice", BUY, 10_000, 10, cid="sym"))
    assert ex(lim("alice", BUY, 10_000, 10, cid="sym", symbol=E))[0][0] == "accepted"


# Amend --------------------------------------------------------------------------------------------
def _two_asks(ex: Ex) -> None:
    ex(lim("alice", SELL, 10_000, 30, cid="a"))  # 1
    ex(lim("bob", SELL, 10_000, 30))  # 2


def test_amend_quantity_down_keeps_time_priority(ex: Ex) -> None:
    _two_asks(ex)
    assert ex(Amend(S, "alice", 1, None, None, 20)) == [
        ("amended", S, 1, "alice", "a", SELL, 10_000, 20, 20),
        book(3, [(SELL, 10_000, 50)], (None, 0, 10_000, 50)),
    ]
    assert ex.queue(SELL, 10_000) == [1, 2]
    out = ex(lim("carol", BUY, 10_000, 20))
    assert out[1] == trade(1, 10_000, 20, (1, "alice", "a", 20, 0), (4, "carol", None, 10_000, 20, 0), BUY)


def test_amend_quantity_up_loses_time_priority(ex: Ex) -> None:
    _two_asks(ex)
    assert ex(Amend(S, "alice", None, "a", None, 40)) == [
        ("amended", S, 1, "alice", "a", SELL, 10_000, 40, 40),
        book(3, [(SELL, 10_000, 70)], (None, 0, 10_000, 70)),
    ]
    assert ex.queue(SELL, 10_000) == [2, 1]
    out = ex(lim("carol", BUY, 10_000, 20))
    assert out[1][6] == 2  # bob first now


def test_amend_price_change_loses_time_priority_even_when_moved_back(ex: Ex) -> None:
    _two_asks(ex)
    assert ex(Amend(S, "alice", 1, None, 10_001, None)) == [
        ("amended", S, 1, "alice", "a", SELL, 10_001, 30, 30),
        book(3, [(SELL, 10_000, 30), (SELL, 10_001, 30)], (None, 0, 10_000, 30)),
    ]
    assert ex(Amend(S, "alice", 1, None, 10_000, None)) == [
        ("amended", S, 1, "alice", "a", SELL, 10_000, 30, 30),
        book(4, [(SELL, 10_001, 0), (SELL, 10_000, 60)], (None, 0, 10_000, 60)),
    ]
    assert ex.queue(SELL, 10_000) == [2, 1]


def test_amend_to_the_same_values_changes_nothing_and_emits_no_book_event(ex: Ex) -> None:
    _two_asks(ex)
    assert ex(Amend(S, "alice", 1, None, 10_000, 30)) == [
        ("amended", S, 1, "alice", "a", SELL, 10_000, 30, 30)
    ]
    assert ex.queue(SELL, 10_000) == [1, 2]
    assert ex.book_seq() == 2


def test_amend_quantity_is_the_new_total_including_the_filled_part(ex: Ex) -> None:
    _two_asks(ex)
    ex(lim("carol", BUY, 10_000, 10))  # alice: 30 with 20 left
    assert ex(Amend(S, "alice", 1, None, None, 25)) == [
        ("amended", S, 1, "alice", "a", SELL, 10_000, 25, 15),
        book(4, [(SELL, 10_000, 45)], (None, 0, 10_000, 45)),
    ]
    assert ex.queue(SELL, 10_000) == [1, 2]
    assert ex(Amend(S, "alice", 1, None, 10_002, 40)) == [
        ("amended", S, 1, "alice", "a", SELL, 10_002, 40, 30),
        book(5, [(SELL, 10_000, 30), (SELL, 10_002, 30)], (None, 0, 10_000, 30)),
    ]
    out = ex(lim("dave", BUY, 10_002, 60))
    assert out[2] == trade(3, 10_002, 30, (1, "alice", "a", 40, 0), (6, "dave", None, 10_002, 60, 0), BUY)


@pytest.mark.parametrize(
    ("amend", "code"),
    [
        (Amend(S, "alice", 1, None, None, 10), codes.INVALID_QUANTITY),  # == filled
        (Amend(S, "alice", 1, None, None, 5), codes.INVALID_QUANTITY),  # < filled
        (Amend(S, "alice", 1, None, None, 0), codes.INVALID_QUANTITY),
        (Amend(S, "alice", 1, None, None, 1_000_000_001), codes.INVALID_QUANTITY),
        (Amend(S, "alice", 1, None, 9_999, None), codes.WOULD_TAKE),  # crosses bob's bid
        (Amend(S, "alice", 1, None, 9_990, None), codes.WOULD_TAKE),
        (Amend(S, "alice", 1, None, None, None), codes.INVALID_MESSAGE),
        (Amend(S, "alice", 1, None, 0, None), codes.INVALID_PRICE),
        (Amend(S, "alice", 1, None, 1_000_000_001, None), codes.INVALID_PRICE),
        (Amend(S, "alice", 1, None, 9, 11), codes.MIN_NOTIONAL),
        (Amend(S, "alice", None, "a", 9_999, None), codes.WOULD_TAKE),
    ],
)
def test_invalid_amends_are_rejected_with_the_orders_ids(ex: Ex, amend: Amend, code: str) -> None:
    ex(lim("alice", SELL, 10_000, 30, cid="a"))  # 1
    ex(lim("carol", BUY, 10_000, 10))  # 2: alice filled 10
    ex(lim("bob", BUY, 9_999, 20))  # 3
    before = ex.state()["books"]
    assert ex(amend) == [rejected("amend", 1, "alice", code, cid="a")]
    assert ex.state()["books"] == before


@pytest.mark.parametrize(
    "amend",
    [
        Amend(S, "mallory", 1, None, None, 20),
        Amend(S, "mallory", None, "a", None, 20),
        Amend(E, "alice", 1, None, None, 20),
        Amend(S, "alice", 42, None, None, 20),
        Amend(S, "alice", None, None, None, 20),
    ],
)
def test_amend_of_unknown_or_foreign_order(ex: Ex, amend: Amend) -> None:
    ex(lim("alice", SELL, 10_000, 30, cid="a"))
    before = ex.state()["books"]
    assert ex(amend) == [
        ("rejected", amend.symbol, "amend", amend.order_id, amend.account, amend.client_order_id,
         codes.UNKNOWN_ORDER)
    ]  # fmt: skip
    assert ex.state()["books"] == before


def test_amend_never_takes_even_against_own_orders(ex: Ex) -> None:
    ex(lim("alice", SELL, 10_000, 30))
    ex(lim("alice", BUY, 9_000, 30))
    assert ex(Amend(S, "alice", 2, None, 10_000, None)) == [rejected("amend", 2, "alice", codes.WOULD_TAKE)]


# Every reject code the core produces --------------------------------------------------------------
GOOD = lim("alice", BUY, 10_000, 20)


@pytest.mark.parametrize(
    ("cmd", "expected"),
    [
        (GOOD._replace(symbol="DOGE-USDT"),
         ("rejected", "DOGE-USDT", "new", 1, "alice", None, "UNKNOWN_SYMBOL")),
        (GOOD._replace(account=""), ("rejected", S, "new", 1, "", None, "INVALID_ACCOUNT")),
        (GOOD._replace(side="hold"), ("rejected", S, "new", 1, "alice", None, "INVALID_SIDE")),
        (GOOD._replace(type="stop"), ("rejected", S, "new", 1, "alice", None, "INVALID_TYPE")),
        (GOOD._replace(tif="day"), ("rejected", S, "new", 1, "alice", None, "INVALID_TIF")),
        (GOOD._replace(quantity=0), ("rejected", S, "new", 1, "alice", None, "INVALID_QUANTITY")),
        (GOOD._replace(quantity=1_000_000_001), ("rejected", S, "new", 1, "alice", None, "INVALID_QUANTITY")),
        (GOOD._replace(price=0), ("rejected", S, "new", 1, "alice", None, "INVALID_PRICE")),
        (GOOD._replace(price=1_000_000_001), ("rejected", S, "new", 1, "alice", None, "INVALID_PRICE")),
        (GOOD._replace(price=None), ("rejected", S, "new", 1, "alice", None, "INVALID_PRICE")),
        (mkt("alice", BUY, 10)._replace(price=10_000),
         ("rejected", S, "new", 1, "alice", None, "INVALID_PRICE")),
        (GOOD._replace(quantity=9), ("rejected", S, "new", 1, "alice", None, "MIN_NOTIONAL")),
        (GOOD._replace(client_order_id="x" * 37),
         ("rejected", S, "new", 1, "alice", "x" * 37, "INVALID_CLIENT_ORDER_ID")),
        (GOOD._replace(client_order_id=""),
         ("rejected", S, "new", 1, "alice", "", "INVALID_CLIENT_ORDER_ID")),
        (GOOD._replace(post_only=1),  # type: ignore[arg-type]
         ("rejected", S, "new", 1, "alice", None, "INVALID_MESSAGE")),
        (GOOD._replace(stp="cancel_newest"), ("rejected", S, "new", 1, "alice", None, "INVALID_STP")),
        (Cancel("DOGE-USDT", "alice", 7),
         ("rejected", "DOGE-USDT", "cancel", 7, "alice", None, "UNKNOWN_SYMBOL")),
        (Amend("DOGE-USDT", "alice", None, "c", 5),
         ("rejected", "DOGE-USDT", "amend", None, "alice", "c", "UNKNOWN_SYMBOL")),
        (Cancel(S, "alice", 7), ("rejected", S, "cancel", 7, "alice", None, "UNKNOWN_ORDER")),
        (Amend(S, "alice", 7, None, 5), ("rejected", S, "amend", 7, "alice", None, "UNKNOWN_ORDER")),
        (("NewOrder", S), ("rejected", None, "new", None, None, None, "UNKNOWN_OP")),
        (None, ("rejected", None, "new", None, None, None, "UNKNOWN_OP")),
    ],
)  # fmt: skip
def test_reject_codes(ex: Ex, cmd: Any, expected: Event) -> None:
    before = ex.state()["books"]
    assert ex(cmd) == [expected]
    assert ex.state()["books"] == before


def test_exactly_at_the_limits_is_accepted(ex: Ex) -> None:
    inst = default_instruments()[S]
    assert ex(lim("alice", BUY, 1, inst.min_notional_units))[0][0] == "accepted"  # 1 tick x 100_000 lots
    assert ex(lim("alice", BUY, 10_000, 10))[0][0] == "accepted"  # notional exactly 100_000
    assert ex(lim("alice", SELL, inst.max_price_ticks, inst.max_qty_lots))[0][0] == "accepted"
    assert ex(mkt("bob", SELL, inst.min_qty_lots))[0][0] == "accepted"  # no notional check on market
    assert ex(lim("alice", BUY, 10_000, 36, cid="x" * 36))[0][0] == "accepted"


# Garbage never raises and never changes state ----------------------------------------------------
NAN = float("nan")
COMMON_GARBAGE: list[Any] = [
    [],
    {},
    [1],
    {"k": "v"},
    NAN,
    float("inf"),
    -1.5,
    2**70,
    -(2**70),
    b"x",
    (1,),
    {1},
]

NEW_FIELD_GARBAGE: dict[str, tuple[str, list[Any]]] = {
    "symbol": (codes.UNKNOWN_SYMBOL, [None, "", "btc-usdt", "BTC-USDT ", 1, True, ["BTC-USDT"]]),
    "account": (codes.INVALID_ACCOUNT, [None, "", 1, True, False, ["alice"]]),
    "side": (codes.INVALID_SIDE, [None, "", "BUY", "b", 0, True, ["buy"]]),
    "type": (codes.INVALID_TYPE, [None, "", "LIMIT", "ioc", 1, True]),
    "tif": (codes.INVALID_TIF, [None, "", "GTC", "day", 1, True]),
    "price": (codes.INVALID_PRICE, [None, 0, -1, 10_000.0, "10000", True, False, 1_000_000_001]),
    "quantity": (codes.INVALID_QUANTITY, [None, 0, -20, 20.0, "20", True, False, 1_000_000_001]),
    "client_order_id": (codes.INVALID_CLIENT_ORDER_ID, ["", "y" * 37, 1, True, False]),
    "post_only": (codes.INVALID_MESSAGE, [None, 0, 1, "true", "false"]),
    "stp": (codes.INVALID_STP, [None, "", "CANCEL_TAKER", 0, True]),
}


def _garbage_cases() -> list[Any]:
    cases = []
    for name, (code, values) in NEW_FIELD_GARBAGE.items():
        for v in values + COMMON_GARBAGE:
            cases.append(pytest.param(name, v, code, id=f"{name}={v!r:.20}"))
    return cases


def _busy(ex: Ex) -> None:
    """A book with orders on both sides, client ids, a partial fill and an amend."""
    ex(lim("alice", BUY, 9_990, 30, cid="x"))
    ex(lim("bob", BUY, 9_995, 30))
    ex(lim("carol", SELL, 10_010, 30, cid="x"))
    ex(lim("dave", SELL, 10_005, 30))
    ex(lim("erin", BUY, 10_005, 10))
    ex(Amend(S, "alice", 1, None, None, 25))


@pytest.mark.parametrize(("name", "value", "code"), _garbage_cases())
def test_garbage_in_new_order_fields_is_rejected_without_side_effects(
    ex: Ex, name: str, value: Any, code: str
) -> None:
    _busy(ex)
    cmd = lim("zed", BUY, 10_010, 20, cid="z")._replace(**{name: value})
    before = ex.state()
    out = ex(cmd)
    assert len(out) == 1
    assert out[0][0] == "rejected" and out[0][2] == "new" and out[0][6] == code
    # Fields of the wrong type are dropped so the event always serialises.
    assert all(f is None or type(f) in (str, int) for f in out[0][1:6])
    after = ex.state()
    assert after["books"] == before["books"] and after["last_seq"] == ex.seq


def _cancel_amend_garbage_cases() -> list[Any]:
    cases = []
    garbage = [None, "", "1", 1.0, True, False, 0, -1, *COMMON_GARBAGE]
    for kind in ("cancel", "amend"):
        for name in ("symbol", "account", "order_id", "client_order_id"):
            for v in garbage:
                cases.append(pytest.param(kind, name, v, None, id=f"{kind}-{name}={v!r:.20}"))
    for name, code in (("price", codes.INVALID_PRICE), ("quantity", codes.INVALID_QUANTITY)):
        for v in [0, -1, 10_000.0, "10000", True, False, 2**70, *COMMON_GARBAGE]:
            cases.append(pytest.param("amend", name, v, code, id=f"amend-{name}={v!r:.20}"))
    return cases


@pytest.mark.parametrize(("kind", "name", "value", "code"), _cancel_amend_garbage_cases())
def test_garbage_in_cancel_and_amend_fields_is_rejected_without_side_effects(
    ex: Ex, kind: str, name: str, value: Any, code: str | None
) -> None:
    _busy(ex)
    base: Cancel | Amend
    if kind == "cancel":
        base = Cancel(S, "alice", 1, None)
    else:
        base = Amend(S, "alice", 1, None, 9_991, 26)
    if name == "client_order_id":
        base = base._replace(order_id=None)
    cmd = base._replace(**{name: value})
    before = ex.state()
    out = ex(cmd)
    assert len(out) == 1 and out[0][0] == "rejected" and out[0][2] == kind
    if code is not None:
        assert out[0][6] == code
    elif name == "symbol":
        assert out[0][6] == codes.UNKNOWN_SYMBOL
    else:
        assert out[0][6] == codes.UNKNOWN_ORDER
    assert all(f is None or type(f) in (str, int) for f in out[0][1:6])
    after = ex.state()
    assert after["books"] == before["books"]


@pytest.mark.parametrize(
    "cmd", [None, 0, "NewOrder", b"", [], {}, ("BTC-USDT", "alice"), ["Cancel", S, "alice", 1], NAN, object()]
)
def test_things_that_are_not_commands(ex: Ex, cmd: Any) -> None:
    _busy(ex)
    before = ex.state()["books"]
    assert ex(cmd) == [("rejected", None, "new", None, None, None, codes.UNKNOWN_OP)]
    assert ex.state()["books"] == before


def test_non_increasing_seq_is_a_caller_bug_and_changes_nothing(ex: Ex) -> None:
    _busy(ex)
    before = ex.hash()
    with pytest.raises(ValueError):
        ex.engine.apply(GOOD, ex.seq, 0)
    with pytest.raises(ValueError):
        ex.engine.apply(GOOD, ex.seq - 3, 0)
    assert ex.hash() == before


def test_trades_carry_the_commands_ts(ex: Ex) -> None:
    ex(lim("alice", SELL, 10_000, 10))
    out = ex.engine.apply(lim("bob", BUY, 10_000, 10), 50, 1_717_171_717_000_123)
    assert out[1][19] == 1_717_171_717_000_123
    assert out[0][2] == 50  # seq is the order id, gaps allowed


# Rules the gateway also enforces -------------------------------------------------------------
def test_account_longer_than_64_characters_is_rejected(ex: Ex) -> None:
    assert ex(lim("a" * 65, BUY, 10_000, 10)) == [rejected("new", 1, "a" * 65, codes.INVALID_ACCOUNT)]


@pytest.mark.parametrize("cid", ["\x00", "a\nb", "tab\there", "\x7f"])
def test_client_order_id_with_control_characters_is_rejected(ex: Ex, cid: str) -> None:
    assert ex(lim("alice", BUY, 10_000, 10, cid=cid)) == [
        rejected("new", 1, "alice", codes.INVALID_CLIENT_ORDER_ID, cid=cid)
    ]
