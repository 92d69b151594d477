"""Balances in the core (Engine(risk=True)): one scenario per rule and per way an order frees its hold.

Every amount is an exact integer of asset units worked out by hand. With the default instruments
(tick 0.01, lot 0.00001, fees 0.1% maker / 0.2% taker, fee denominator 1e8) BTC and ETH have 5 places
(a unit is one lot) and USDT 10 places (2 + 5 + 3: the fee rates need 3, so one tick x lot, 1e-7 USDT,
is 1,000 units and every fee a whole number of units). So
below, `n * USDT` is n USDT and `n * BTC` n BTC; a buy holds price x quantity x 1.002 (the higher fee
rate) and a trade of 1 BTC at 50,000 USDT costs the buyer 50,000 plus its fee of 50 (maker) or 100
(taker) USDT, and pays the seller 50,000 minus its fee.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest

from services.matcher.engine import Engine
from services.matcher.snapshot import snapshot
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
    STP_CANCEL_MAKER,
    STP_CANCEL_TAKER,
    Amend,
    Cancel,
    CancelAll,
    Command,
    Deposit,
    NewOrder,
    Tick,
    Withdraw,
)
from shared.events import BALANCE, BOOK, Event
from shared.instruments import Instrument, default_instruments

S, E = "BTC-USDT", "ETH-USDT"
USDT = 10**10  # units per USDT
BTC = ETH = 10**5  # units (= lots) per BTC or ETH
P = 5_000_000  # 50,000.00 USDT in ticks
ONE = 100_000  # 1 BTC in lots


class Venue:
    """An engine with balances and a running seq; ts is 0 unless given."""

    def __init__(self, risk: bool = True, instruments: list[Instrument] | None = None) -> None:
        self.engine = Engine(instruments or default_instruments().values(), risk=risk)
        self.seq = 0

    def __call__(self, cmd: Command | Tick, ts: int = 0) -> list[Event]:
        self.seq += 1
        return self.engine.apply(cmd, self.seq, ts)

    def bal(self, account: str, asset: str) -> tuple[int, int]:
        """(available, held); a pair never touched is (0, 0)."""
        assert self.engine.ledger is not None
        got = self.engine.ledger.balances().get(account, {}).get(asset, [0, 0])
        return got[0], got[1]

    def fund(self, account: str, **amounts: int) -> None:
        for asset, amount in amounts.items():
            assert self(Deposit(account, asset, amount))[0][0] == "funded"


def core(events: list[Event]) -> list[Event]:
    """The events minus the `balance` ones."""
    return [e for e in events if e[0] != BALANCE]


def balances(events: list[Event]) -> dict[tuple[str, str], tuple[int, int]]:
    return {(e[2], e[3]): (e[4], e[5]) for e in events if e[0] == BALANCE}


def limit(account: str, side: str, price: int, qty: int, tif: str = GTC, **kw: Any) -> NewOrder:
    return NewOrder(S, account, side, LIMIT, tif, price, qty, **kw)


def market(account: str, side: str, qty: int | None, **kw: Any) -> NewOrder:
    return NewOrder(S, account, side, MARKET, IOC, None, qty, **kw)


def rejected(events: list[Event]) -> str:
    assert len(events) == 1 and events[0][0] == "rejected", events
    code: str = events[0][6]
    return code


# Units and fees ---------------------------------------------------------------------------------
def test_default_scales_and_the_exact_amounts_of_one_trade() -> None:
    """1 BTC at 50,000.00: notional 5e6 ticks x 1e5 lots x 1,000 = 5e14 units = 50,000 USDT; the maker
    fee in the trade is 5e11 x 100,000 = 5e16 fee units (1e-15 USDT) = 50 USDT, the taker fee 100."""
    v = Venue()
    assert v.engine.ledger is not None
    assert v.engine.ledger.scales == {"BTC": 5, "ETH": 5, "USDT": 10}
    v.fund("s", BTC=ONE)
    v.fund("b", USDT=60_000 * USDT)
    assert v(limit("s", SELL, P, ONE))[0][0] == "accepted"
    assert v.bal("s", "BTC") == (0, ONE)
    events = v(limit("b", BUY, P, ONE))  # the buyer takes
    trade = next(e for e in events if e[0] == "trade")
    assert trade[11] == 50_000_000_000_000_000  # maker fee in fee units
    assert trade[18] == 100_000_000_000_000_000
    assert [e[0] for e in events] == ["accepted", "trade", BOOK] + [BALANCE] * 5
    assert balances(events) == {
        ("b", "USDT"): (9_900 * USDT, 0),  # 60,000 - 50,000 - 100
        ("b", "BTC"): (ONE, 0),
        ("s", "BTC"): (0, 0),
        ("s", "USDT"): (49_950 * USDT, 0),  # 50,000 - 50
        ("_fees", "USDT"): (150 * USDT, 0),
    }
    assert all(e[1] == S for e in events if e[0] == BALANCE)


def test_a_buy_holds_price_times_quantity_at_the_higher_fee_rate() -> None:
    """0.5 BTC at 50,100.00 holds 25,050 x 1.002 = 25,100.1 USDT = 5,010,000 x 50,000 x 1,002 units; a
    sell holds its quantity of base."""
    v = Venue()
    v.fund("b", USDT=30_000 * USDT)
    v.fund("s", BTC=ONE)
    v(limit("b", BUY, 5_010_000, ONE // 2))
    assert v.bal("b", "USDT") == (30_000 * USDT - 251_001_000_000_000, 251_001_000_000_000)
    v(limit("s", SELL, 6_000_000, 30_000))
    assert v.bal("s", "BTC") == (70_000, 30_000)


def test_fill_as_maker_releases_the_hold_and_pays_the_maker_fee() -> None:
    v = Venue()
    v.fund("b", USDT=60_000 * USDT)
    v.fund("s", BTC=ONE)
    v(limit("b", BUY, P, ONE))
    assert v.bal("b", "USDT") == (9_900 * USDT, 50_100 * USDT)
    v(limit("s", SELL, P, ONE))  # the seller takes: 0.2% fee for it, 0.1% for the resting buyer
    assert v.bal("b", "USDT") == (9_950 * USDT, 0)  # 60,000 - 50,000 - 50
    assert v.bal("b", "BTC") == (ONE, 0)
    assert v.bal("s", "USDT") == (49_900 * USDT, 0)  # 50,000 - 100
    assert v.bal("s", "BTC") == (0, 0)
    assert v.bal("_fees", "USDT") == (150 * USDT, 0)


def test_a_taker_buy_filled_below_its_limit_gets_the_difference_back() -> None:
    """Limit 50,000 held 50,100; the fill at 49,000 costs 49,000 + 98 (0.2%)."""
    v = Venue()
    v.fund("b", USDT=60_000 * USDT)
    v.fund("s", BTC=ONE)
    v(limit("s", SELL, 4_900_000, ONE))
    v(limit("b", BUY, P, ONE))
    assert v.bal("b", "USDT") == (10_902 * USDT, 0)  # 60,000 - 49,098
    assert v.bal("s", "USDT") == (48_951 * USDT, 0)  # 49,000 - 49
    assert v.bal("_fees", "USDT") == (147 * USDT, 0)


def test_partial_fill_then_cancel() -> None:
    v = Venue()
    v.fund("b", USDT=60_000 * USDT)
    v.fund("s", BTC=ONE)
    v(limit("b", BUY, P, ONE))
    oid = v.seq
    v(limit("s", SELL, P, 40_000))  # 0.4 BTC: the buyer pays 20,000 + 20 as maker
    # 0.6 BTC still rests and holds 30,000 x 1.002 = 30,060
    assert v.bal("b", "USDT") == (60_000 * USDT - 20_020 * USDT - 30_060 * USDT, 30_060 * USDT)
    events = v(Cancel(S, "b", oid))
    assert core(events)[0][8] == 60_000  # leaves
    assert balances(events) == {("b", "USDT"): (39_980 * USDT, 0)}


@pytest.mark.parametrize(("otype", "reason"), [(LIMIT, codes.REASON_IOC), (MARKET, codes.REASON_MARKET)])
def test_an_ioc_or_market_buy_remainder_holds_nothing_afterwards(otype: str, reason: str) -> None:
    """0.4 BTC on offer; a 1 BTC IOC limit or market buy pays 20,000 + 40 (0.2%), the rest ends."""
    v = Venue()
    v.fund("b", USDT=60_000 * USDT)
    v.fund("s", BTC=ONE)
    v(limit("s", SELL, P, 40_000))
    order = limit("b", BUY, P, ONE, IOC) if otype == LIMIT else market("b", BUY, ONE)
    events = v(order)
    assert core(events)[-2][9] == reason and core(events)[-2][8] == 60_000
    assert v.bal("b", "USDT") == (39_960 * USDT, 0)
    assert v.bal("b", "BTC") == (40_000, 0)


def test_a_market_sell_remainder_gives_the_base_back() -> None:
    v = Venue()
    v.fund("b", USDT=60_000 * USDT)
    v.fund("s", BTC=ONE)
    v(limit("b", BUY, P, 40_000))
    events = v(market("s", SELL, ONE))
    assert core(events)[-2][9] == codes.REASON_MARKET
    assert v.bal("s", "BTC") == (60_000, 0)
    assert v.bal("s", "USDT") == (19_960 * USDT, 0)  # 20,000 - 40


def test_a_killed_fok_changes_no_balance() -> None:
    v = Venue()
    v.fund("b", USDT=60_000 * USDT)
    v.fund("s", BTC=ONE)
    v(limit("s", SELL, P, 40_000))
    before = snapshot(v.engine)
    events = v(limit("b", BUY, P, ONE, FOK))
    assert core(events)[-1][9] == codes.REASON_FOK
    assert {k: v for k, v in snapshot(v.engine).items() if k != "last_seq"} == {
        k: v for k, v in before.items() if k != "last_seq"
    }


def test_self_trade_prevention_releases_the_cancelled_taker_and_the_cancelled_maker() -> None:
    v = Venue()
    v.fund("a", USDT=60_000 * USDT, BTC=ONE)
    v(limit("a", SELL, P, 40_000))
    events = v(limit("a", BUY, P, ONE, stp=STP_CANCEL_TAKER))  # stopped at once: nothing traded
    assert core(events)[-1][9] == codes.REASON_STP
    assert v.bal("a", "USDT") == (60_000 * USDT, 0)
    assert v.bal("a", "BTC") == (60_000, 40_000)  # its resting sell still holds
    events = v(limit("a", BUY, P, ONE, stp=STP_CANCEL_MAKER))  # the sell goes, the buy rests
    assert [e[9] for e in core(events) if e[0] == "cancelled"] == [codes.REASON_STP]
    assert v.bal("a", "BTC") == (ONE, 0)
    assert v.bal("a", "USDT") == (9_900 * USDT, 50_100 * USDT)


def test_amend_down_and_up_moves_the_hold() -> None:
    v = Venue()
    v.fund("b", USDT=60_000 * USDT)
    v(limit("b", BUY, P, ONE))
    oid = v.seq
    assert core(v(Amend(S, "b", oid, None, None, ONE // 2)))[0][0] == "amended"  # 0.5 at 50,000: 25,050
    assert v.bal("b", "USDT") == (34_950 * USDT, 25_050 * USDT)
    v(Amend(S, "b", oid, None, 5_010_000, None))  # 0.5 BTC at 50,100: 25,100.1
    assert v.bal("b", "USDT") == (60_000 * USDT - 25_100_100 * 10**7, 25_100_100 * 10**7)
    v(Amend(S, "b", oid, None, P, ONE))  # back to 1 BTC at 50,000
    assert v.bal("b", "USDT") == (9_900 * USDT, 50_100 * USDT)


def test_amend_of_a_partly_filled_order_holds_for_the_new_quantity_minus_the_filled() -> None:
    v = Venue()
    v.fund("b", USDT=60_000 * USDT)
    v.fund("s", BTC=ONE)
    v(limit("b", BUY, P, ONE))
    oid = v.seq
    v(limit("s", SELL, P, 40_000))  # 0.4 filled (the buyer paid 20,020), 0.6 left
    assert (
        core(v(Amend(S, "b", oid, None, None, 50_000)))[0][0] == "amended"
    )  # total 0.5: 0.1 left, holding 5,010
    assert v.bal("b", "USDT") == (60_000 * USDT - 20_020 * USDT - 5_010 * USDT, 5_010 * USDT)


@pytest.mark.parametrize("side", [BUY, SELL])
def test_amend_up_beyond_available_is_rejected_and_changes_nothing(side: str) -> None:
    v = Venue()
    v.fund("a", USDT=60_000 * USDT, BTC=3 * ONE // 2)
    v(limit("a", side, P, ONE))  # a buy leaves 9,900 USDT available, a sell 0.5 BTC
    before = snapshot(v.engine)
    events = v(Amend(S, "a", 3, None, None, 2 * ONE))
    assert events == [("rejected", S, "amend", 3, "a", None, codes.INSUFFICIENT_FUNDS)]
    assert {k: x for k, x in snapshot(v.engine).items() if k != "last_seq"} == {
        k: x for k, x in before.items() if k != "last_seq"
    }


def test_gtd_expiry_by_tick_releases_the_hold() -> None:
    v = Venue()
    v.fund("b", USDT=60_000 * USDT)
    v(NewOrder(S, "b", BUY, LIMIT, GTD, P, ONE, expire_time=1_000), ts=10)
    assert v.bal("b", "USDT") == (9_900 * USDT, 50_100 * USDT)
    assert v(Tick(S), ts=999) == []
    events = v(Tick(S), ts=1_000)
    assert core(events)[0][9] == codes.REASON_EXPIRED
    assert balances(events) == {("b", "USDT"): (60_000 * USDT, 0)}
    assert events[-1][1] == S


def test_a_resting_order_and_a_cancel_end_with_their_one_balance_event() -> None:
    v = Venue()
    v.fund("b", USDT=60_000 * USDT)
    placed = v(limit("b", BUY, P, ONE))
    assert [e[0] for e in placed] == ["accepted", BOOK, BALANCE]
    assert placed[-1] == (BALANCE, S, "b", "USDT", 9_900 * USDT, 50_100 * USDT)
    cancelled = v(Cancel(S, "b", placed[0][2]))
    assert [e[0] for e in cancelled] == ["cancelled", BOOK, BALANCE]
    assert cancelled[-1] == (BALANCE, S, "b", "USDT", 60_000 * USDT, 0)
    # The next command that touches the same balance lists it again.
    assert v(limit("b", BUY, P, ONE))[-1] == placed[-1]


@pytest.mark.parametrize("same_asset", [True, False])
def test_an_expiry_then_a_resting_order_list_every_balance_after_every_other_event(same_asset: bool) -> None:
    v = Venue()
    v.fund("b", USDT=120_000 * USDT, BTC=2 * ONE)
    v(NewOrder(S, "b", BUY, LIMIT, GTD, P, ONE, expire_time=1_000), ts=10)
    order = limit("b", BUY, P - 100, ONE) if same_asset else limit("b", SELL, 2 * P, ONE)
    events = v(order, ts=1_000)
    kinds = [e[0] for e in events]
    assert kinds[:2] == ["cancelled", BOOK] and kinds[2:4] == ["accepted", BOOK]
    assert all(k == BALANCE for k in kinds[4:]) and len(kinds) == (5 if same_asset else 6)
    assert balances(events) == {
        ("b", "USDT"): (v.bal("b", "USDT")),
        **({} if same_asset else {("b", "BTC"): v.bal("b", "BTC")}),
    }


@pytest.mark.parametrize(("side", "asset", "held"), [(BUY, "USDT", 50_100 * USDT), (SELL, "BTC", ONE)])
def test_a_stop_limit_holds_at_placement_and_releases_on_cancel(side: str, asset: str, held: int) -> None:
    v = Venue()
    v.fund("a", USDT=60_000 * USDT, BTC=ONE)
    total = v.bal("a", asset)[0]
    events = v(NewOrder(S, "a", side, STOP_LIMIT, GTC, P, ONE, stop_price=P))
    assert core(events)[0][0] == "accepted"
    assert v.bal("a", asset) == (total - held, held)
    events = v(Cancel(S, "a", v.seq))
    assert core(events) == [("cancelled", S, v.seq - 1, "a", None, side, P, ONE, ONE, codes.REASON_USER)]
    assert v.bal("a", asset) == (total, 0)


def test_a_stop_limit_without_the_funds_is_rejected_at_placement() -> None:
    v = Venue()
    v.fund("a", USDT=50_099 * USDT)
    events = v(NewOrder(S, "a", BUY, STOP_LIMIT, GTC, P, ONE, stop_price=P))
    assert events == [("rejected", S, "new", 2, "a", None, codes.INSUFFICIENT_FUNDS)]


def test_a_triggered_stop_limit_carries_its_hold_over() -> None:
    """A buy stop_limit at 49,000 holds 49,000 x 1.002 = 49,098 from placement; with nothing else
    available it still rests once triggered."""
    v = Venue()
    v.fund("a", USDT=49_098 * USDT)
    v.fund("s", BTC=ONE)
    v.fund("b", USDT=60_000 * USDT)
    v(NewOrder(S, "a", BUY, STOP_LIMIT, GTC, 4_900_000, ONE, stop_price=P))
    assert v.bal("a", "USDT") == (0, 49_098 * USDT)
    v(limit("s", SELL, P, 10_000))
    events = v(limit("b", BUY, P, 10_000))  # a trade at 50,000 triggers it
    assert "triggered" in [e[0] for e in events]
    assert v.bal("a", "USDT") == (0, 49_098 * USDT)
    assert v.engine.book(S).depth(5)[0] == [(4_900_000, ONE)]


@pytest.mark.parametrize("side", [BUY, SELL])
def test_a_stop_market_that_cannot_pay_when_triggered_is_cancelled(side: str) -> None:
    v = Venue()
    v.fund("s", BTC=ONE)
    v.fund("b", USDT=200_000 * USDT)
    v(limit("s", SELL, P, ONE))
    v(limit("b", BUY, 4_900_000, ONE))  # liquidity on both sides for the stop once it triggers
    stop = v.seq + 1
    events = v(NewOrder(S, "x", side, STOP_MARKET, IOC, None, 1_000, stop_price=P))
    assert events == [("accepted", S, stop, "x", None, side, STOP_MARKET, IOC, None, 1_000)]  # nothing held
    events = v(limit("b", BUY, P, 10_000))  # trades at 50,000: the stop triggers, "x" has nothing
    i = [e[0] for e in events].index("triggered")
    assert events[i : i + 2] == [
        ("triggered", S, stop, "x", None, side, MARKET, IOC, None, P, 1_000),
        ("cancelled", S, stop, "x", None, side, None, 1_000, 1_000, codes.REASON_FUNDS),
    ]
    assert [e for e in events[i + 2 :] if e[0] != BALANCE] == []
    assert "x" not in {e[2] for e in events if e[0] == BALANCE}
    assert not v.engine.book(S).stops


def test_a_stop_market_that_can_pay_when_triggered_trades() -> None:
    v = Venue()
    v.fund("s", BTC=ONE)
    v.fund("b", USDT=200_000 * USDT)
    v.fund("x", USDT=501 * USDT)  # 0.01 BTC at 50,000 x 1.002 = 501
    v(limit("s", SELL, P, ONE))
    v(NewOrder(S, "x", BUY, STOP_MARKET, IOC, None, 1_000, stop_price=P))
    v(limit("b", BUY, P, 10_000))
    assert v.bal("x", "USDT") == (0, 0)
    assert v.bal("x", "BTC") == (1_000, 0)


def test_an_iceberg_holds_its_whole_quantity_and_frees_it_all() -> None:
    v = Venue()
    v.fund("a", USDT=60_000 * USDT, BTC=ONE)
    v(limit("a", BUY, P, ONE, display_quantity=10_000))
    v(NewOrder(S, "a", SELL, LIMIT, GTC, 6_000_000, ONE, display_quantity=10_000))
    assert v.bal("a", "USDT") == (9_900 * USDT, 50_100 * USDT)  # not 5,010: the reserve too
    assert v.bal("a", "BTC") == (0, ONE)
    v(CancelAll(S, "a"))
    assert v.bal("a", "USDT") == (60_000 * USDT, 0)
    assert v.bal("a", "BTC") == (ONE, 0)


def test_a_quote_quantity_buy_needs_its_whole_budget() -> None:
    """A budget of 10,000 USDT is 10,000 / (0.01 x 0.00001) = 1e11 ticks x lots, needing 1e14 units
    available. At 50,000 (x 1.002) it buys floor(1e19 / 5.01e14) = 19,960 lots for 9,999.96 USDT."""
    v = Venue()
    v.fund("s", BTC=ONE)
    v(limit("s", SELL, P, ONE))
    v.fund("b", USDT=10_000 * USDT - 1)
    order = NewOrder(S, "b", BUY, MARKET, IOC, None, None, quote_quantity=10**11)
    assert rejected(v(order)) == codes.INSUFFICIENT_FUNDS  # though the fills would cost less
    v.fund("b", USDT=1)
    events = v(order)
    assert [e[4] for e in events if e[0] == "trade"] == [19_960]
    assert v.bal("b", "USDT") == (4 * 10**8, 0)  # 0.04 USDT left
    assert v.bal("b", "BTC") == (19_960, 0)


def test_a_quote_quantity_sell_holds_the_lots_it_computes() -> None:
    """10,000 USDT at a 50,000 bid is 1e11 / 5e6 = 20,000 lots of BTC to sell."""
    v = Venue()
    v.fund("b", USDT=60_000 * USDT)
    v(limit("b", BUY, P, ONE))
    order = NewOrder(S, "s", SELL, MARKET, IOC, None, None, quote_quantity=10**11)
    v.fund("s", BTC=19_999)
    assert rejected(v(order)) == codes.INSUFFICIENT_FUNDS
    v.fund("s", BTC=1)
    assert [e[4] for e in v(order) if e[0] == "trade"] == [20_000]
    assert v.bal("s", "BTC") == (0, 0)


def test_a_market_buy_is_checked_against_the_cost_of_its_real_fills() -> None:
    """0.1 BTC at 50,000 and 0.1 at 60,000: a market buy of 1 BTC fills 0.2 for (5,000 + 6,000) x
    1.002 = 11,022 USDT, and needs exactly that."""
    v = Venue()
    v.fund("s", BTC=ONE)
    v(limit("s", SELL, P, 10_000))
    v(limit("s", SELL, 6_000_000, 10_000))
    v.fund("b", USDT=11_022 * USDT - 1)
    assert rejected(v(market("b", BUY, ONE))) == codes.INSUFFICIENT_FUNDS
    v.fund("b", USDT=1)
    events = v(market("b", BUY, ONE))
    assert sum(e[4] for e in events if e[0] == "trade") == 20_000
    assert v.bal("b", "USDT") == (0, 0)
    assert v.bal("b", "BTC") == (20_000, 0)


def test_a_market_buy_that_could_pay_at_the_highest_price_skips_the_walk_with_the_same_outcome() -> None:
    """With enough to pay the whole quantity at the instrument's highest price (10,000,000 USDT x
    1.002 per BTC), a market buy is accepted without walking the book; one unit less and the walk
    decides, against the real fills. Both settle the same trade: the bound changes no outcome."""
    qty = 1_000  # 0.01 BTC: at most 100,200 USDT at the highest price
    bound = 100_200 * USDT
    outcomes = []
    for have in (bound, bound - 1):
        v = Venue()
        v.fund("s", BTC=ONE)
        v(limit("s", SELL, P, qty))
        v.fund("b", USDT=have)
        events = v(market("b", BUY, qty))
        assert [e[4] for e in events if e[0] == "trade"] == [qty]
        outcomes.append((v.bal("b", "USDT")[0] - have, v.bal("b", "BTC"), v.bal("s", "USDT")))
    assert outcomes[0] == outcomes[1] == (-501 * USDT, (qty, 0), (4_995 * USDT // 10, 0))  # 500 - 0.5
    v = Venue()  # short of the bound and of the book's cost: refused
    v.fund("s", BTC=ONE)
    v(limit("s", SELL, P, qty))
    v.fund("b", USDT=501 * USDT - 1)
    assert rejected(v(market("b", BUY, qty))) == codes.INSUFFICIENT_FUNDS


def test_fees_of_fills_on_two_markets_in_one_command_go_to_each_quote() -> None:
    """No command fills on two books today (a command's stops are on its own), but the ledger keeps
    each market's fees apart if one did: each goes to the fee account's balance of its own quote."""
    insts = [Instrument("BTC-USDT"), Instrument("ETH-BTC")]
    v = Venue(instruments=insts)
    ledger = v.engine.ledger
    assert ledger is not None
    rich = {asset: [10**20, 0] for asset in ledger.scales}
    ledger.set_balances({"m": rich, "t": rich})
    fees = []
    for inst in insts:
        m = ledger.markets[inst.symbol]
        ledger.fill(m, 100, 10, ledger.pair(m, "m"), False, "t", None)  # the maker sells 10 lots at 100 ticks
        ledger.settle_taker(m, True, 100, 10)
        fees.append(100 * 10 * m.fee_q)
    out: list[Event] = []
    ledger.flush(None, out)
    credited = {e[3]: e[4] for e in out if e[2] == "_fees"}
    assert credited == {"USDT": fees[0], "BTC": fees[1]} and all(fees)


def test_a_market_buy_cost_skips_its_own_orders_under_cancel_maker() -> None:
    """Its own 0.1 at 50,000 is cancelled (cancel_maker), so it pays only for the 0.1 at 60,000."""
    v = Venue()
    v.fund("s", BTC=ONE)
    v.fund("b", BTC=10_000, USDT=6_012 * USDT)  # 6,000 x 1.002
    v(limit("b", SELL, P, 10_000))
    v(limit("s", SELL, 6_000_000, 10_000))
    events = v(market("b", BUY, 10_000, stp=STP_CANCEL_MAKER))
    assert [e[3] for e in events if e[0] == "trade"] == [6_000_000]
    assert v.bal("b", "USDT") == (0, 0)
    assert v.bal("b", "BTC") == (20_000, 0)


# Funding ----------------------------------------------------------------------------------------
def test_deposit_and_withdraw_events() -> None:
    v = Venue()
    assert v(Deposit("a", "USDT", 5 * USDT, "r1")) == [
        ("funded", None, "deposit", "a", "USDT", 5 * USDT, "r1"),
        (BALANCE, None, "a", "USDT", 5 * USDT, 0),
    ]
    assert v(Withdraw("a", "USDT", 2 * USDT)) == [
        ("funded", None, "withdraw", "a", "USDT", 2 * USDT, None),
        (BALANCE, None, "a", "USDT", 3 * USDT, 0),
    ]


@pytest.mark.parametrize(
    ("cmd", "code"),
    [
        (Deposit("", "USDT", 1), codes.INVALID_ACCOUNT),
        (Deposit("a" * 65, "USDT", 1), codes.INVALID_ACCOUNT),
        (Deposit(7, "USDT", 1), codes.INVALID_ACCOUNT),  # type: ignore[arg-type]
        (Deposit("_fees", "USDT", 1), codes.INVALID_ACCOUNT),
        (Deposit("_x", "USDT", 1), codes.INVALID_ACCOUNT),
        (Withdraw("_x", "USDT", 1), codes.INVALID_ACCOUNT),
        (Deposit("a", "XRP", 1), codes.UNKNOWN_ASSET),
        (Deposit("a", "usdt", 1), codes.UNKNOWN_ASSET),
        (Deposit("a", "USDT", 0), codes.INVALID_AMOUNT),
        (Deposit("a", "USDT", -1), codes.INVALID_AMOUNT),
        (Deposit("a", "USDT", 2**96), codes.INVALID_AMOUNT),
        (Deposit("a", "USDT", True), codes.INVALID_AMOUNT),
        (Deposit("a", "USDT", 1.0), codes.INVALID_AMOUNT),  # type: ignore[arg-type]
        (Deposit("a", "USDT", "1"), codes.INVALID_AMOUNT),  # type: ignore[arg-type]
        (Withdraw("a", "USDT", 0), codes.INVALID_AMOUNT),
        (Withdraw("a", "USDT", 100 * USDT + 1), codes.INSUFFICIENT_FUNDS),
        (Withdraw("a", "BTC", 1), codes.INSUFFICIENT_FUNDS),
        (Withdraw("_fees", "USDT", 1), codes.INSUFFICIENT_FUNDS),
    ],
)
def test_funding_validation(cmd: Deposit | Withdraw, code: str) -> None:
    v = Venue()
    v.fund("a", USDT=100 * USDT)
    before = snapshot(v.engine)["balances"]
    op = "deposit" if type(cmd) is Deposit else "withdraw"
    account = cmd.account if type(cmd.account) is str else None
    assert v(cmd) == [("rejected", None, op, None, account, None, code)]
    assert snapshot(v.engine)["balances"] == before


def test_the_largest_deposit_is_just_below_2_to_the_96() -> None:
    v = Venue()
    assert v(Deposit("a", "USDT", 2**96 - 1))[0][0] == "funded"


def test_held_funds_cannot_be_withdrawn() -> None:
    v = Venue()
    v.fund("b", USDT=60_000 * USDT)
    v(limit("b", BUY, P, ONE))  # 9,900 available, 50,100 held
    assert rejected(v(Withdraw("b", "USDT", 9_900 * USDT + 1))) == codes.INSUFFICIENT_FUNDS
    assert v(Withdraw("b", "USDT", 9_900 * USDT))[0][0] == "funded"
    assert v.bal("b", "USDT") == (0, 50_100 * USDT)


def test_fees_can_be_withdrawn_from_the_venue_account() -> None:
    v = Venue()
    v.fund("b", USDT=60_000 * USDT)
    v.fund("s", BTC=ONE)
    v(limit("s", SELL, P, ONE))
    v(limit("b", BUY, P, ONE))
    assert v.bal("_fees", "USDT") == (150 * USDT, 0)
    assert rejected(v(Withdraw("_fees", "USDT", 150 * USDT + 1))) == codes.INSUFFICIENT_FUNDS
    assert v(Withdraw("_fees", "USDT", 150 * USDT)) == [
        ("funded", None, "withdraw", "_fees", "USDT", 150 * USDT, None),
        (BALANCE, None, "_fees", "USDT", 0, 0),
    ]


@pytest.mark.parametrize(
    "order",
    [
        limit("_fees", BUY, P, 10),
        limit("_x", SELL, P, 10),
        market("_fees", BUY, 10),
        market("_fees", SELL, None, quote_quantity=10**8),
        NewOrder(S, "_fees", BUY, LIMIT, GTD, P, 10, expire_time=10**6),
        limit("_fees", BUY, P, 20, display_quantity=10),
        NewOrder(S, "_fees", SELL, STOP_LIMIT, GTC, P, 10, stop_price=P),
        NewOrder(S, "_fees", BUY, STOP_MARKET, IOC, None, 10, stop_price=P),
    ],
)
def test_reserved_accounts_cannot_place_orders(order: NewOrder) -> None:
    v = Venue()
    assert rejected(v(order)) == codes.INVALID_ACCOUNT


@pytest.mark.parametrize("rests", [True, False])
@pytest.mark.parametrize("side", [BUY, SELL])
def test_a_reserved_account_with_both_assets_cannot_trade_them(rests: bool, side: str) -> None:
    """The fee account may come to hold a market's base too (as the quote of another market): the
    engine checks the name only of an account that Ledger.funds gives nothing, so funds must never
    give a reserved one anything, whether the order would rest or take."""
    v = Venue()
    ledger = v.engine.ledger
    assert ledger is not None
    rich = {"BTC": [10**15, 0], "USDT": [10**20, 0]}
    ledger.set_balances({"_fees": rich, "s": rich, "b": rich})
    v(limit("s", SELL, P, ONE))
    v(limit("b", BUY, P - 10, ONE))
    price = (P + 5 if side == SELL else P - 15) if rests else (P - 10 if side == SELL else P)
    assert rejected(v(limit("_fees", side, price, 10))) == codes.INVALID_ACCOUNT
    assert v.bal("_fees", "BTC") == (10**15, 0) and v.bal("_fees", "USDT") == (10**20, 0)
    assert ledger.funds(ledger.markets[S], "_fees") is None


def test_reserved_account_and_post_only_give_the_same_code_on_every_path() -> None:
    """A post-only order from "_fees" that would take: a plain GTC and a GTD one (which the engine
    routes through the other order types) must be refused with the same code: the reserved name is
    refused first, whatever the book (WOULD_TAKE depends on the book)."""
    v = Venue()
    v.fund("s", BTC=ONE)
    v(limit("s", SELL, P, ONE))
    gtc = rejected(v(limit("_fees", BUY, P, 10, post_only=True)))
    gtd = rejected(v(NewOrder(S, "_fees", BUY, LIMIT, GTD, P, 10, post_only=True, expire_time=10**6)))
    assert gtc == gtd == codes.INVALID_ACCOUNT


def test_an_order_without_funds_is_rejected_after_the_other_checks() -> None:
    v = Venue()
    assert rejected(v(limit("a", BUY, 0, 10))) == codes.INVALID_PRICE
    assert rejected(v(limit("a", BUY, P, 10))) == codes.INSUFFICIENT_FUNDS
    assert rejected(v(limit("a", SELL, P, 10))) == codes.INSUFFICIENT_FUNDS
    assert v.bal("a", "USDT") == (0, 0) and "a" not in v.engine.ledger.balances()  # type: ignore[union-attr]


# Mass cancel --------------------------------------------------------------------------------------
def _mass_cancel_book(v: Venue) -> None:
    """After 4 funding commands (Ticks with risk off): a has a BTC bid (5), an ETH ask (6), a BTC
    stop_limit (7) and a BTC ask (8); b a BTC bid (9)."""
    if v.engine.ledger is not None:
        v.fund("a", USDT=60_000 * USDT, BTC=ONE, ETH=ONE)
        v.fund("b", USDT=60_000 * USDT)
    else:
        for _ in range(4):
            v(Tick(S))
    v(limit("a", BUY, 4_000_000, 10_000, client_order_id="c1"))
    v(NewOrder(E, "a", SELL, LIMIT, GTC, 300_000, 10_000))
    v(NewOrder(S, "a", BUY, STOP_LIMIT, GTC, P, 10_000, stop_price=P))
    v(limit("a", SELL, 7_000_000, 10_000))
    v(limit("b", BUY, 4_000_000, 10_000))


@pytest.mark.parametrize("risk", [True, False])
def test_cancel_all_on_one_symbol(risk: bool) -> None:
    v = Venue(risk)
    _mass_cancel_book(v)
    events = v(CancelAll(S, "a", codes.REASON_DISCONNECT))
    r = codes.REASON_DISCONNECT
    assert core(events) == [
        ("cancelled", S, 5, "a", "c1", BUY, 4_000_000, 10_000, 10_000, r),
        ("cancelled", S, 7, "a", None, BUY, P, 10_000, 10_000, r),
        ("cancelled", S, 8, "a", None, SELL, 7_000_000, 10_000, 10_000, r),
        (BOOK, S, 4, [(BUY, 4_000_000, 10_000), (SELL, 7_000_000, 0)], (4_000_000, 10_000, None, 0)),
    ]
    if risk:
        assert v.bal("a", "USDT") == (60_000 * USDT, 0)
        assert v.bal("a", "BTC") == (ONE, 0)
        assert v.bal("a", "ETH") == (ONE - 10_000, 10_000)  # its ETH ask stays
        assert all(e[1] == S for e in events if e[0] == BALANCE)
    else:
        assert BALANCE not in [e[0] for e in events]
    assert v(CancelAll(S, "a")) == []  # nothing left there


@pytest.mark.parametrize("risk", [True, False])
def test_cancel_all_on_every_symbol_goes_book_by_book(risk: bool) -> None:
    v = Venue(risk)
    _mass_cancel_book(v)
    events = v(CancelAll(None, "a", codes.REASON_DEAD_MAN))
    r = codes.REASON_DEAD_MAN
    assert core(events) == [
        ("cancelled", S, 5, "a", "c1", BUY, 4_000_000, 10_000, 10_000, r),
        ("cancelled", S, 7, "a", None, BUY, P, 10_000, 10_000, r),
        ("cancelled", S, 8, "a", None, SELL, 7_000_000, 10_000, 10_000, r),
        (BOOK, S, 4, [(BUY, 4_000_000, 10_000), (SELL, 7_000_000, 0)], (4_000_000, 10_000, None, 0)),
        ("cancelled", E, 6, "a", None, SELL, 300_000, 10_000, 10_000, r),
        (BOOK, E, 2, [(SELL, 300_000, 0)], (None, 0, None, 0)),
    ]
    if risk:
        assert {k for k in balances(events)} == {("a", "USDT"), ("a", "BTC"), ("a", "ETH")}
        assert all(e[1] is None for e in events if e[0] == BALANCE)
        assert v.bal("a", "ETH") == (ONE, 0)
    assert len(v.engine.book(S).orders) == 1  # b's bid


@pytest.mark.parametrize(
    ("cmd", "code"),
    [
        (CancelAll("NOPE-USDT", "a"), codes.UNKNOWN_SYMBOL),
        (CancelAll(S, "a", "bored"), codes.INVALID_MESSAGE),
        (CancelAll(None, "a", None), codes.INVALID_MESSAGE),  # type: ignore[arg-type]
        (CancelAll(S, ""), codes.INVALID_ACCOUNT),
    ],
)
@pytest.mark.parametrize("risk", [True, False])
def test_cancel_all_rejects(cmd: CancelAll, code: str, risk: bool) -> None:
    v = Venue(risk)
    _mass_cancel_book(v)
    symbol = cmd.symbol if type(cmd.symbol) is str else None
    account = cmd.account
    assert v(cmd) == [("rejected", symbol, "cancel_all", None, account, None, code)]
    assert len(v.engine.book(S).orders) == 3 and len(v.engine.book(S).stops) == 1


# Risk off -----------------------------------------------------------------------------------------
def test_risk_off_ignores_balances() -> None:
    v = Venue(risk=False)
    assert v.engine.ledger is None
    assert v(Deposit("a", "USDT", 1, "r1")) == [
        ("rejected", None, "deposit", None, "a", "r1", codes.BALANCES_DISABLED)
    ]
    assert v(Withdraw("a", "USDT", 1)) == [
        ("rejected", None, "withdraw", None, "a", None, codes.BALANCES_DISABLED)
    ]
    events = v(limit("a", BUY, P, ONE)) + v(limit("_fees", SELL, P, ONE))  # no funds, any account
    assert [e[0] for e in events] == ["accepted", BOOK, "accepted", "trade", BOOK]
    assert "balances" not in snapshot(v.engine)


def test_negative_fee_rates_are_refused_with_balances() -> None:
    rebate = Instrument(S, maker_fee=Decimal("-0.0001"))
    Engine([rebate])  # fine without balances
    with pytest.raises(ValueError):
        Engine([rebate], risk=True)
