"""Scenario tests for the order types beyond plain limit and market orders: stops, GTD, icebergs and
quote quantity (services/matcher/engine.py, docs/protocol.md "More order types").

One spec, several implementations, as in test_rules.py: every scenario runs against the engine (in
the build this process imported; `make test` runs both) and the naive reference model of
tests/core/reference.py. The conventions are test_rules.py's: seq = 1, 2, 3, ...; ts = 1000 + seq;
prices around 10_000 ticks.
"""

from __future__ import annotations

import pytest

from services.matcher.engine import Engine
from services.matcher.snapshot import restore, snapshot, state_hash
from shared import codes
from shared.commands import (
    BUY,
    GTC,
    GTD,
    IOC,
    LIMIT,
    MARKET,
    SELL,
    STOP_LIMIT,
    STOP_MARKET,
    STP_CANCEL_TAKER,
    Amend,
    Cancel,
    NewOrder,
    Tick,
)
from shared.events import Event
from shared.instruments import FEE_DENOM, default_instruments
from tests.core.test_rules import (
    MAKER_RATE,
    TAKER_RATE,
    Ex,
    S,
    accepted,
    book,
    cancelled,
    lim,
    rejected,
    trade,
)


@pytest.fixture(params=["engine", "reference"])
def ex(request: pytest.FixtureRequest) -> Ex:
    return Ex(request.param)


def stop_lim(account: str, side: str, stop: int, price: int, qty: int, cid: str | None = None,
             tif: str = GTC) -> NewOrder:  # fmt: skip
    return NewOrder(S, account, side, STOP_LIMIT, tif, price, qty, cid, False, STP_CANCEL_TAKER, stop)


def stop_mkt(account: str, side: str, stop: int, qty: int, cid: str | None = None) -> NewOrder:
    return NewOrder(S, account, side, STOP_MARKET, IOC, None, qty, cid, False, STP_CANCEL_TAKER, stop)


def gtd(account: str, side: str, price: int, qty: int, expire: int, display: int | None = None) -> NewOrder:
    return NewOrder(
        S, account, side, LIMIT, GTD, price, qty, None, False, STP_CANCEL_TAKER, None, expire, display
    )


def ice(account: str, side: str, price: int, qty: int, display: int, cid: str | None = None) -> NewOrder:
    return NewOrder(
        S, account, side, LIMIT, GTC, price, qty, cid, False, STP_CANCEL_TAKER, None, None, display
    )


def quote_mkt(account: str, side: str, quote: int) -> NewOrder:
    return NewOrder(
        S, account, side, MARKET, IOC, None, None, None, False, STP_CANCEL_TAKER, None, None, None, quote
    )


def triggered(oid: int, account: str, side: str, otype: str, tif: str, price: int | None, stop: int, qty: int,
              cid: str | None = None) -> Event:  # fmt: skip
    return ("triggered", S, oid, account, cid, side, otype, tif, price, stop, qty)


def at(event: Event, ts: int) -> Event:
    """A trade of a triggered stop: it happens at the triggering command's ts, not 1000 + its id."""
    return (*event[:-1], ts)


def print_price(ex: Ex, price: int) -> None:
    """Make `price` the last trade price with two orders of their own (seq +2)."""
    ex(lim("maker", SELL, price, 20))
    out = ex(lim("taker", BUY, price, 20))
    assert out[1][0] == "trade" and out[1][3] == price


# Stops ------------------------------------------------------------------------------------------
def test_a_buy_stop_waits_below_its_price_and_triggers_at_it(ex: Ex) -> None:
    print_price(ex, 10_000)
    assert ex(stop_lim("carol", BUY, 10_005, 10_010, 20, cid="s1")) == [
        accepted(3, "carol", BUY, 10_010, 20, cid="s1", otype=STOP_LIMIT)
    ]  # not in the book, not in L2: no book event
    assert ex.levels() == ([], [])
    print_price(ex, 10_004)  # below: nothing
    assert ex.state()["books"][S]["stops"] != []
    ex(lim("alice", SELL, 10_005, 30))
    assert ex(lim("bob", BUY, 10_005, 10)) == [
        accepted(7, "bob", BUY, 10_005, 10),
        trade(3, 10_005, 10, (6, "alice", None, 30, 20), (7, "bob", None, 10_005, 10, 0), BUY),
        book(6, [(SELL, 10_005, 20)], (None, 0, 10_005, 20)),
        triggered(3, "carol", BUY, LIMIT, GTC, 10_010, 10_005, 20, cid="s1"),
        at(trade(4, 10_005, 20, (6, "alice", None, 30, 0), (3, "carol", "s1", 10_010, 20, 0), BUY), 1007),
        book(7, [(SELL, 10_005, 0)], (None, 0, None, 0)),
    ]
    assert ex.state()["books"][S]["stops"] == []


def test_a_sell_stop_triggers_at_and_below_its_price_not_above(ex: Ex) -> None:
    print_price(ex, 10_000)
    ex(stop_mkt("carol", SELL, 9_995, 15, cid="s1"))  # seq 3
    print_price(ex, 9_996)  # above: nothing
    assert len(ex.state()["books"][S]["stops"]) == 1
    ex(lim("dave", BUY, 9_990, 50))  # seq 6: what the stop will sell to
    ex(lim("alice", BUY, 9_994, 20))  # seq 7
    out = ex(lim("bob", SELL, 9_994, 20))  # seq 8: trades below the stop price
    assert out[-3:] == [
        triggered(3, "carol", SELL, MARKET, IOC, None, 9_995, 15, cid="s1"),
        at(trade(4, 9_990, 15, (6, "dave", None, 50, 35), (3, "carol", "s1", None, 15, 0), SELL), 1008),
        book(8, [(BUY, 9_990, 35)], (9_990, 35, None, 0)),
    ]


def test_a_stop_whose_condition_holds_when_placed_triggers_at_once(ex: Ex) -> None:
    print_price(ex, 10_000)
    ex(lim("alice", SELL, 10_001, 40))  # seq 3
    assert ex(stop_lim("carol", BUY, 9_999, 10_001, 20)) == [
        accepted(4, "carol", BUY, 10_001, 20, otype=STOP_LIMIT),
        triggered(4, "carol", BUY, LIMIT, GTC, 10_001, 9_999, 20),
        trade(2, 10_001, 20, (3, "alice", None, 40, 20), (4, "carol", None, 10_001, 20, 0), BUY),
        book(4, [(SELL, 10_001, 20)], (None, 0, 10_001, 20)),
    ]


def test_a_stop_waits_while_there_is_no_last_trade_price(ex: Ex) -> None:
    ex(lim("alice", SELL, 10_001, 40))
    assert ex(stop_mkt("carol", BUY, 1, 20)) == [
        accepted(2, "carol", BUY, None, 20, otype=STOP_MARKET, tif=IOC)
    ]
    out = ex(lim("bob", BUY, 10_001, 10))  # the first trade: now it triggers
    assert out[3] == triggered(2, "carol", BUY, MARKET, IOC, None, 1, 20)
    assert out[4] == at(
        trade(2, 10_001, 20, (1, "alice", None, 40, 10), (2, "carol", None, None, 20, 0), BUY), 1003
    )


def test_a_sweep_triggers_a_stop_met_by_any_of_its_trades(ex: Ex) -> None:
    """A sell stop at 9_995 is met by the first trade (9_990) of a sweep that ends at 9_998."""
    print_price(ex, 10_000)
    ex(stop_mkt("carol", SELL, 9_995, 10))  # seq 3
    ex(lim("dave", SELL, 9_990, 20))  # seq 4
    ex(lim("dave", SELL, 9_998, 20))  # seq 5
    ex(lim("erin", BUY, 9_980, 30))  # seq 6: below both asks, it rests
    out = ex(lim("bob", BUY, 9_998, 40))  # seq 7: trades at 9_990 then 9_998
    assert [e[0] for e in out] == ["accepted", "trade", "trade", "book", "triggered", "trade", "book"]
    assert out[5][3] == 9_980 and out[5][12] == 3  # carol's stop sells to erin


def test_stops_trigger_in_the_order_they_were_placed_and_cascade(ex: Ex) -> None:
    print_price(ex, 10_000)
    ex(lim("m1", SELL, 10_002, 10))  # seq 3
    ex(lim("m2", SELL, 10_004, 10))  # seq 4
    ex(stop_mkt("s2", BUY, 10_002, 10, cid="later"))  # seq 5: met by the first stop's trade only
    ex(stop_mkt("s1b", BUY, 10_001, 5))  # seq 6
    ex(stop_mkt("s1a", BUY, 10_001, 5))  # seq 7
    ex(lim("m0", SELL, 10_001, 10))  # seq 8
    out = ex(lim("bob", BUY, 10_001, 10))  # seq 9: trades at 10_001 -> s1b then s1a; s1b's trades -> s2
    kinds = [(e[0], e[2]) for e in out if e[0] in ("triggered", "trade")]
    assert kinds == [
        ("trade", 2),  # bob takes m0
        ("triggered", 6),
        ("trade", 3),  # s1b takes 5 of m1 at 10_002
        ("triggered", 7),
        ("trade", 4),  # s1a takes the other 5 of m1
        ("triggered", 5),  # wave 2: met by 10_002 of wave 1 (placed first, but not met by 10_001)
        ("trade", 5),  # s2 takes m2 at 10_004
    ]
    assert ex.state()["books"][S]["stops"] == [] and ex.levels() == ([], [])
    assert out.count(("book", *out[-1][1:])) == 1  # every order brings its own book event
    books = [e for e in out if e[0] == "book"]
    assert [e[2] for e in books] == list(range(books[0][2], books[0][2] + len(books)))


def test_a_cascade_runs_to_its_end_and_each_stop_triggers_once(ex: Ex) -> None:
    """Ten buy stops one tick apart, each one's fill reaching the next one's price: ten waves from one
    command. The cascade is bounded because a stop leaves `stops` when it triggers."""
    print_price(ex, 10_000)
    for i in range(10):
        ex(lim("m", SELL, 10_001 + i, 11))
    for i in range(10):
        ex(stop_mkt(f"b{i}", BUY, 10_001 + i, 11))
    out = ex(lim("x", BUY, 10_001, 10))
    fired = [e[2] for e in out if e[0] == "triggered"]
    assert fired == list(range(13, 23))  # in the order placed, one wave each
    assert ex.state()["books"][S]["stops"] == []
    assert ex.levels() == ([], [])  # 10 + 10 x 11 = 120 lots bought, 110 offered: the last one unfilled
    assert out[-2] == cancelled(22, "b9", BUY, None, 11, 10, codes.REASON_MARKET)  # then its book event


def test_cancel_before_trigger_and_amend_of_a_stop(ex: Ex) -> None:
    print_price(ex, 10_000)
    ex(stop_lim("carol", BUY, 10_005, 10_010, 20, cid="s1"))  # seq 3
    ex(stop_mkt("carol", SELL, 9_000, 30))  # seq 4
    assert ex(Amend(S, "carol", 3, None, 10_020)) == [
        rejected("amend", 3, "carol", codes.NOT_AMENDABLE, "s1")
    ]
    assert ex(Amend(S, "carol", None, "s1", None, 10)) == [
        rejected("amend", 3, "carol", codes.NOT_AMENDABLE, "s1")
    ]
    assert ex(Cancel(S, "bob", 3)) == [rejected("cancel", 3, "bob", codes.UNKNOWN_ORDER)]
    assert ex(Cancel(S, "carol", None, "s1")) == [
        cancelled(3, "carol", BUY, 10_010, 20, 20, codes.REASON_USER, "s1")
    ]
    assert ex(Cancel(S, "carol", 4)) == [cancelled(4, "carol", SELL, None, 30, 30, codes.REASON_USER)]
    assert ex(Cancel(S, "carol", 4)) == [rejected("cancel", 4, "carol", codes.UNKNOWN_ORDER)]
    print_price(ex, 10_005)  # would have triggered s1
    assert ex.state()["books"][S]["stops"] == []
    # the client order id is free again, and it was not while the stop waited
    ex(stop_lim("carol", BUY, 10_050, 10_060, 20, cid="s2"))
    assert ex(lim("carol", SELL, 10_100, 20, cid="s2"))[0][-1] == codes.DUPLICATE_CLIENT_ORDER_ID
    assert ex(lim("carol", SELL, 10_100, 20, cid="s1"))[0][0] == "accepted"


def test_stop_orders_are_validated(ex: Ex) -> None:
    bad = [
        (NewOrder(S, "a", BUY, STOP_LIMIT, GTC, 10_000, 20), codes.INVALID_STOP_PRICE),
        (stop_lim("a", BUY, 0, 10_000, 20), codes.INVALID_STOP_PRICE),
        (stop_lim("a", BUY, "1", 10_000, 20), codes.INVALID_STOP_PRICE),  # type: ignore[arg-type]
        (lim("a", BUY, 10_000, 20)._replace(stop_price=10_000), codes.INVALID_STOP_PRICE),
        (stop_mkt("a", BUY, 10_000, 20)._replace(tif=GTC), codes.INVALID_TIF),
        (stop_lim("a", BUY, 10_000, 10_000, 20, tif=GTD), codes.INVALID_TIF),
        (stop_mkt("a", BUY, 10_000, 20)._replace(price=10_000), codes.INVALID_PRICE),
        (stop_lim("a", BUY, 10_000, 10_000, 20)._replace(post_only=True), codes.INVALID_TIF),
    ]
    for cmd, code in bad:
        out = ex(cmd)
        assert out == [rejected("new", ex.seq, "a", code)], cmd


# Good till date ---------------------------------------------------------------------------------
def test_gtd_expires_at_its_time_not_before(ex: Ex) -> None:
    assert ex(gtd("alice", BUY, 9_990, 20, 1004)) == [  # ts 1001
        accepted(1, "alice", BUY, 9_990, 20, tif=GTD),
        book(1, [(BUY, 9_990, 20)], (9_990, 20, None, 0)),
    ]
    assert ex(Tick(S)) == []  # ts 1002: before
    assert ex(lim("bob", SELL, 10_010, 20)) == [  # ts 1003: before
        accepted(3, "bob", SELL, 10_010, 20),
        book(2, [(SELL, 10_010, 20)], (9_990, 20, 10_010, 20)),
    ]
    assert ex(Tick(S)) == [  # ts 1004: at expire_time
        cancelled(1, "alice", BUY, 9_990, 20, 20, codes.REASON_EXPIRED),
        book(3, [(BUY, 9_990, 0)], (None, 0, 10_010, 20)),
    ]
    assert ex(Tick(S)) == []  # after: nothing left


def test_expiries_come_before_the_command_at_that_time(ex: Ex) -> None:
    ex(gtd("alice", SELL, 10_000, 20, 1003))  # seq 1
    ex(gtd("carol", SELL, 10_000, 20, 1003))  # seq 2
    assert ex(lim("bob", BUY, 10_000, 20)) == [  # ts 1003: both expired first, so nothing to buy
        cancelled(1, "alice", SELL, 10_000, 20, 20, codes.REASON_EXPIRED),
        cancelled(2, "carol", SELL, 10_000, 20, 20, codes.REASON_EXPIRED),
        book(3, [(SELL, 10_000, 0)], (None, 0, None, 0)),
        accepted(3, "bob", BUY, 10_000, 20),
        book(4, [(BUY, 10_000, 20)], (10_000, 20, None, 0)),
    ]


def test_a_gtd_order_partly_filled_expires_with_its_rest_and_a_filled_one_never(ex: Ex) -> None:
    ex(gtd("alice", SELL, 10_000, 30, 1010))  # seq 1
    ex(gtd("alice", SELL, 10_001, 20, 1010))  # seq 2
    ex(lim("bob", BUY, 10_001, 40))  # seq 3: #1 filled, 10 of #2
    assert ex.engine.next_expiry(S) == 1010
    ex(lim("bob", BUY, 10_001, 10))  # seq 4: #2 filled
    for _ in range(5):
        ex(Tick(S))  # ts up to 1009
    assert ex.levels() == ([], [])
    assert ex(Tick(S)) == []  # ts 1010: both gone already, nothing to expire
    assert ex.engine.next_expiry(S) is None


def test_gtd_validation_is_against_the_commands_time(ex: Ex) -> None:
    assert ex(gtd("a", BUY, 9_990, 20, 1001)) == [rejected("new", 1, "a", codes.INVALID_EXPIRE_TIME)]  # at ts
    assert ex(gtd("a", BUY, 9_990, 20, 1001)) == [rejected("new", 2, "a", codes.INVALID_EXPIRE_TIME)]  # past
    assert ex(gtd("a", BUY, 9_990, 20, 1100))[0][0] == "accepted"
    assert ex(lim("a", BUY, 9_990, 20, tif=GTD)) == [rejected("new", 4, "a", codes.INVALID_EXPIRE_TIME)]
    assert ex(lim("a", BUY, 9_990, 20)._replace(expire_time=2000)) == [
        rejected("new", 5, "a", codes.INVALID_EXPIRE_TIME)
    ]
    assert ex(gtd("a", BUY, 9_990, 20, 1 << 63)) == [rejected("new", 6, "a", codes.INVALID_EXPIRE_TIME)]


def test_gtd_expiry_replays_byte_for_byte_and_survives_a_snapshot() -> None:
    """The same commands at the same ts give the same events, expiries included; a snapshot taken
    while GTD orders rest restores them with their expiry."""
    cmds = [gtd("a", BUY, 9_990 - i, 20, 1003 + 2 * i) for i in range(6)] + [Tick(S) for _ in range(12)]
    instruments = default_instruments().values()

    def run(stop_at: int | None) -> list[Event]:
        engine, out = Engine(instruments), []
        for i, cmd in enumerate(cmds, 1):
            if i == stop_at:
                fresh = Engine(instruments)
                restore(fresh, snapshot(engine))
                assert state_hash(fresh) == state_hash(engine)
                engine = fresh
            out += engine.apply(cmd, i, 1000 + i)
        return out

    events = run(None)
    assert sum(e[0] == "cancelled" and e[-1] == codes.REASON_EXPIRED for e in events) == 6
    assert run(None) == events
    for stop_at in (3, 7, 10):
        assert run(stop_at) == events


# Icebergs ---------------------------------------------------------------------------------------
def test_an_iceberg_shows_its_display_quantity_only(ex: Ex) -> None:
    assert ex(ice("alice", SELL, 10_000, 100, 30, cid="i")) == [
        accepted(1, "alice", SELL, 10_000, 100, cid="i"),
        book(1, [(SELL, 10_000, 30)], (None, 0, 10_000, 30)),
    ]
    assert ex.levels() == ([], [(10_000, 30)])
    assert ex.state()["books"][S]["icebergs"] == [[1, 30, 70]]


def test_an_iceberg_keeps_priority_until_its_shown_part_fills_then_refills_at_the_back(ex: Ex) -> None:
    ex(ice("alice", SELL, 10_000, 100, 30))  # seq 1: shows 30, hides 70
    ex(lim("bob", SELL, 10_000, 20))  # seq 2
    out = ex(lim("carol", BUY, 10_000, 10))  # seq 3: alice first, her shown part partly filled
    assert out[1] == trade(1, 10_000, 10, (1, "alice", None, 100, 90), (3, "carol", None, 10_000, 10, 0), BUY)
    assert ex.queue(SELL, 10_000) == [1, 2]
    out = ex(lim("carol", BUY, 10_000, 30))  # seq 4: 20 fill alice's shown part; she refills behind bob
    assert out == [
        accepted(4, "carol", BUY, 10_000, 30),
        trade(2, 10_000, 20, (1, "alice", None, 100, 70), (4, "carol", None, 10_000, 30, 10), BUY),
        trade(3, 10_000, 10, (2, "bob", None, 20, 10), (4, "carol", None, 10_000, 30, 0), BUY),
    ]  # no book event: bob's 10 + alice's new 30 show the 40 the level showed before
    assert ex.levels() == ([], [(10_000, 40)])
    assert ex.queue(SELL, 10_000) == [2, 1]
    assert ex.state()["books"][S]["icebergs"] == [[1, 30, 40]]


def test_a_large_taker_eats_through_every_refill_and_the_last_part_is_smaller(ex: Ex) -> None:
    ex(ice("alice", SELL, 10_000, 70, 30))  # shows 30, then 30, then 10
    out = ex(lim("bob", BUY, 10_001, 100))
    fills = [(e[4], e[10]) for e in out if e[0] == "trade"]
    assert fills == [(30, 40), (30, 10), (10, 0)]  # real fills; maker_leaves is the whole rest
    assert out[-1] == book(2, [(SELL, 10_000, 0), (BUY, 10_001, 30)], (10_001, 30, None, 0))
    assert ex.state()["books"][S]["icebergs"] == []


def test_cancelling_or_expiring_an_iceberg_reports_its_whole_rest(ex: Ex) -> None:
    ex(ice("alice", SELL, 10_000, 100, 30))  # seq 1
    ex(lim("bob", BUY, 10_000, 10))  # seq 2
    assert ex(Cancel(S, "alice", 1)) == [
        cancelled(1, "alice", SELL, 10_000, 100, 90, codes.REASON_USER),
        book(3, [(SELL, 10_000, 0)], (None, 0, None, 0)),
    ]
    ex(gtd("carol", BUY, 9_000, 100, 1006, display=25))  # seq 4, ts 1004
    assert ex(Amend(S, "carol", 4, None, None, 50)) == [rejected("amend", 4, "carol", codes.NOT_AMENDABLE)]
    assert ex(Tick(S)) == [  # ts 1006
        cancelled(4, "carol", BUY, 9_000, 100, 100, codes.REASON_EXPIRED),
        book(5, [(BUY, 9_000, 0)], (None, 0, None, 0)),
    ]


def test_self_trade_prevention_cancels_a_whole_iceberg(ex: Ex) -> None:
    ex(ice("alice", SELL, 10_000, 100, 30))
    out = ex(lim("alice", BUY, 10_000, 10)._replace(stp="cancel_maker"))
    assert out[1] == cancelled(1, "alice", SELL, 10_000, 100, 100, codes.REASON_STP)
    assert ex.state()["books"][S]["icebergs"] == []


def test_fok_counts_an_icebergs_reserve(ex: Ex) -> None:
    ex(ice("alice", SELL, 10_000, 100, 30))
    out = ex(lim("bob", BUY, 10_000, 100, tif="fok"))
    assert [e[4] for e in out if e[0] == "trade"] == [30, 30, 30, 10]
    ex(ice("alice", SELL, 10_000, 100, 30))
    assert ex(lim("bob", BUY, 10_000, 101, tif="fok"))[-1][-1] == codes.REASON_FOK


def test_display_quantity_is_validated(ex: Ex) -> None:
    bad = [
        ice("a", SELL, 10_000, 100, 100),  # not below quantity
        ice("a", SELL, 10_000, 100, 0),
        ice("a", SELL, 10_000, 100, 30)._replace(tif=IOC),
        NewOrder(S, "a", SELL, MARKET, IOC, None, 100, None, False, STP_CANCEL_TAKER, None, None, 30),
    ]
    for cmd in bad:
        assert ex(cmd) == [rejected("new", ex.seq, "a", codes.INVALID_DISPLAY_QUANTITY)], cmd


# Quote quantity ---------------------------------------------------------------------------------
def test_a_quote_quantity_buy_fills_whole_lots_within_notional_plus_fee(ex: Ex) -> None:
    ex(lim("alice", SELL, 10_000, 10))  # seq 1
    ex(lim("alice", SELL, 10_010, 100))  # seq 2
    # 10 lots at 10_000 cost 100_000 x 1.002 = 100_200; each next lot at 10_010 costs 10_030.02
    budget = 100_200 + 5 * 10_030 + 10_030  # 6 more lots would need 60_180.12: only 5 fit
    out = ex(quote_mkt("bob", BUY, budget))
    assert out[0] == accepted(3, "bob", BUY, None, 15, otype=MARKET, tif=IOC)
    assert [(e[3], e[4]) for e in out if e[0] == "trade"] == [(10_000, 10), (10_010, 5)]
    spent = sum(e[3] * e[4] * (FEE_DENOM + TAKER_RATE) for e in out if e[0] == "trade")
    assert spent <= budget * FEE_DENOM < spent + 10_010 * (FEE_DENOM + TAKER_RATE)
    assert out[-1] == book(3, [(SELL, 10_000, 0), (SELL, 10_010, 95)], (None, 0, 10_010, 95))


def test_a_quote_quantity_sell_needs_only_the_notional(ex: Ex) -> None:
    ex(lim("alice", BUY, 10_000, 50))
    out = ex(quote_mkt("bob", SELL, 10_000 * 20 + 9_999))  # just short of 21 lots
    assert out[0][-1] == 20 and out[1][4] == 20 and len(out) == 3
    assert out[1][11] == 10_000 * 20 * MAKER_RATE


def test_a_quote_quantity_that_buys_nothing_is_cancelled_unfilled(ex: Ex) -> None:
    assert ex(quote_mkt("bob", BUY, 100_000)) == [  # empty book
        accepted(1, "bob", BUY, None, 0, otype=MARKET, tif=IOC),
        cancelled(1, "bob", BUY, None, 0, 0, codes.REASON_MARKET),
    ]
    ex(lim("alice", SELL, 1_000_000, 1))  # one lot costs 1_002_000 with the fee
    assert ex(quote_mkt("bob", BUY, 1_001_999))[-1] == cancelled(
        3, "bob", BUY, None, 0, 0, codes.REASON_MARKET
    )
    assert ex(quote_mkt("bob", BUY, 1_002_000))[1][0] == "trade"


def test_quote_quantity_stops_where_self_trade_prevention_would(ex: Ex) -> None:
    ex(lim("alice", SELL, 10_000, 10))  # seq 1
    ex(lim("bob", SELL, 10_000, 10))  # seq 2: bob's own: the taker stops here
    ex(lim("carol", SELL, 10_000, 10))  # seq 3
    out = ex(quote_mkt("bob", BUY, 10**9))
    assert out[0][-1] == 10 and [e[0] for e in out] == ["accepted", "trade", "book"]


def test_quote_quantity_is_validated(ex: Ex) -> None:
    bad = [
        (quote_mkt("a", BUY, 99_999), codes.MIN_NOTIONAL),
        (quote_mkt("a", BUY, 0), codes.INVALID_QUANTITY),
        (quote_mkt("a", BUY, 10**6)._replace(quantity=10), codes.INVALID_QUANTITY),
        (quote_mkt("a", BUY, 10**6)._replace(tif="fok"), codes.INVALID_TIF),
        (
            lim("a", BUY, 10_000, 20, tif=IOC)._replace(quantity=None, quote_quantity=10**6),
            codes.INVALID_QUANTITY,
        ),
    ]
    for cmd, code in bad:
        assert ex(cmd) == [rejected("new", ex.seq, "a", code)], cmd
