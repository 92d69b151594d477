"""Property tests (hypothesis): invariants that must hold after any sequence of commands."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.matcher.engine import Engine
from services.matcher.snapshot import restore, snapshot, state_hash
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
    Command,
    NewOrder,
    Tick,
)
from shared.events import (
    B_BBO,
    B_CHANGES,
    B_SEQ,
    T_AGGRESSOR,
    T_MAKER_FEE,
    T_MAKER_LEAVES,
    T_MAKER_OID,
    T_MAKER_QTY,
    T_PRICE,
    T_QTY,
    T_TAKER_FEE,
    T_TAKER_LEAVES,
    T_TAKER_OID,
    T_TAKER_PRICE,
    T_TAKER_QTY,
    Event,
)
from shared.instruments import default_instruments
from tests.core.reference import Reference

S, E = "BTC-USDT", "ETH-USDT"
INSTRUMENTS = default_instruments()
ACCOUNTS = ("a", "b", "c")

PROPS = settings(
    max_examples=250,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

prices = st.one_of(
    st.integers(9_995, 10_005),
    st.integers(9_995, 10_005),
    st.sampled_from([5_000, 9_900, 10_100, 20_000, 1_000_000]),
)
accounts = st.sampled_from(ACCOUNTS)
cids = st.one_of(st.none(), st.sampled_from(["x", "y", "z"]))
stps = st.sampled_from([STP_CANCEL_TAKER, STP_CANCEL_MAKER, STP_CANCEL_BOTH])
symbols = st.sampled_from([S, S, S, E])
order_ids = st.integers(1, 70)


@st.composite
def new_orders(draw: st.DrawFn) -> NewOrder:
    otype = draw(st.sampled_from([LIMIT, LIMIT, LIMIT, MARKET]))
    if otype == MARKET:
        tif, price = draw(st.sampled_from([IOC, FOK])), None
    else:
        tif, price = draw(st.sampled_from([GTC, GTC, GTC, IOC, FOK])), draw(prices)
    post_only = otype == LIMIT and tif == GTC and draw(st.integers(0, 5)) == 0
    return NewOrder(
        draw(symbols),
        draw(accounts),
        draw(st.sampled_from([BUY, SELL])),
        otype,
        tif,
        price,
        draw(st.integers(10, 90)),
        draw(cids),
        post_only,
        draw(stps),
    )


cancels = st.builds(
    Cancel,
    symbols,
    accounts,
    st.one_of(order_ids, st.none()),
    cids,
)
amends = st.builds(
    Amend,
    symbols,
    accounts,
    st.one_of(order_ids, order_ids, st.none()),
    cids,
    st.one_of(st.none(), prices),
    st.one_of(st.none(), st.integers(1, 120)),
)
commands = st.lists(
    st.one_of(new_orders(), new_orders(), new_orders(), cancels, amends), min_size=1, max_size=60
)


@dataclass
class Step:
    cmd: Command
    seq: int
    events: list[Event]
    before: dict[str, Any]  # snapshot()["books"] before the command
    after: dict[str, Any]


def run(cmds: list[Command]) -> list[Step]:
    engine = Engine(INSTRUMENTS.values())
    steps = []
    before = snapshot(engine)["books"]
    for i, cmd in enumerate(cmds):
        seq = 2 * i + 1  # gaps are allowed
        events = engine.apply(cmd, seq, 10 * seq)
        after = snapshot(engine)["books"]
        steps.append(Step(cmd, seq, events, before, after))
        before = after
    return steps


def resting(books: dict[str, Any]) -> dict[int, tuple[str, str, int, int, int]]:
    """order id -> (symbol, side, price, qty, leaves) of every resting order."""
    out = {}
    for symbol, b in books.items():
        for side, key in ((BUY, "bids"), (SELL, "asks")):
            for price, orders in b[key]:
                for oid, _account, _cid, qty, leaves in orders:
                    out[oid] = (symbol, side, price, qty, leaves)
    return out


def of_kind(events: list[Event], kind: str) -> list[Event]:
    return [e for e in events if e[0] == kind]


# ------------------------------------------------------------------------------------------------
@PROPS
@given(commands)
def test_resting_book_is_never_crossed(cmds: list[Command]) -> None:
    for step in run(cmds):
        for b in step.after.values():
            if b["bids"] and b["asks"]:
                assert b["bids"][0][0] < b["asks"][0][0]
            # Levels are strictly ordered best first and never empty.
            assert [p for p, _ in b["bids"]] == sorted({p for p, _ in b["bids"]}, reverse=True)
            assert [p for p, _ in b["asks"]] == sorted({p for p, _ in b["asks"]})
            assert all(orders and all(o[4] > 0 for o in orders) for _, orders in b["bids"] + b["asks"])
        for ev in of_kind(step.events, "book"):
            bid, _, ask, _ = ev[B_BBO]
            assert bid is None or ask is None or bid < ask


@PROPS
@given(commands)
def test_quantity_is_conserved(cmds: list[Command]) -> None:
    """For every accepted order: quantity == filled + cancelled leaves + resting leaves."""
    qty: dict[int, int] = {}
    filled: dict[int, int] = defaultdict(int)
    gone: dict[int, int] = {}  # cancelled leaves
    steps = run(cmds)
    for step in steps:
        for ev in step.events:
            if ev[0] == "accepted":
                qty[ev[2]] = ev[9]
            elif ev[0] == "trade":
                for oid, total, leaves in (
                    (ev[T_MAKER_OID], ev[T_MAKER_QTY], ev[T_MAKER_LEAVES]),
                    (ev[T_TAKER_OID], ev[T_TAKER_QTY], ev[T_TAKER_LEAVES]),
                ):
                    filled[oid] += ev[T_QTY]
                    assert total == qty[oid]
                    assert leaves == total - filled[oid] >= 0  # each trade carries the order's new state
            elif ev[0] == "cancelled":
                oid = ev[2]
                assert oid not in gone
                assert ev[7] == qty[oid] and ev[8] == qty[oid] - filled[oid] > 0
                gone[oid] = ev[8]
            elif ev[0] == "amended":
                oid = ev[2]
                qty[oid] = ev[7]
                assert ev[8] == ev[7] - filled[oid] > 0
    final = resting(steps[-1].after) if steps else {}
    for oid, q in qty.items():
        rest = final[oid][4] if oid in final else 0
        assert oid not in gone or rest == 0
        assert q == filled[oid] + gone.get(oid, 0) + rest, oid
        if oid in final:
            assert final[oid][3] == q


@PROPS
@given(commands)
def test_level_totals_equal_the_sum_of_their_orders(cmds: list[Command]) -> None:
    engine = Engine(INSTRUMENTS.values())
    for i, cmd in enumerate(cmds, 1):
        engine.apply(cmd, i, i)
        books = snapshot(engine)["books"]
        for symbol, b in books.items():
            bids, asks = engine.book(symbol).depth(10_000)
            assert bids == [(p, sum(o[4] for o in orders)) for p, orders in b["bids"]]
            assert asks == [(p, sum(o[4] for o in orders)) for p, orders in b["asks"]]


@PROPS
@given(commands)
def test_fifo_inside_a_level(cmds: list[Command]) -> None:
    """Queues are in time priority, and makers at a price fill oldest first.

    Priority is tracked from the events alone: an order's time is the seq that accepted it, or the
    seq of an amend that increased its quantity or moved its price.
    """
    prio: dict[int, int] = {}
    for step in run(cmds):
        old = resting(step.before)
        for ev in step.events:
            if ev[0] == "accepted":
                prio[ev[2]] = step.seq
            elif ev[0] == "amended":
                _sym, _side, old_price, old_qty, _leaves = old[ev[2]]
                if ev[6] != old_price or ev[7] > old_qty:
                    prio[ev[2]] = step.seq
        # Trades within one command: at each price, makers in ascending priority, and every order
        # ahead of a filled maker at that price is gone (filled or cancelled) by the end of the command.
        new = resting(step.after)
        by_price: dict[tuple[str, int], list[int]] = defaultdict(list)
        for ev in of_kind(step.events, "trade"):
            by_price[(ev[1], ev[T_PRICE])].append(ev[T_MAKER_OID])
        for (symbol, price), makers in by_price.items():
            assert [prio[m] for m in makers] == sorted(prio[m] for m in makers)
            last = max(prio[m] for m in makers)
            for oid, (sym, _side, p, _q, _l) in old.items():
                if sym == symbol and p == price and prio[oid] < last:
                    assert oid not in new or oid == makers[-1]
        for b in step.after.values():
            for _, orders in b["bids"] + b["asks"]:
                times = [prio[o[0]] for o in orders]
                assert times == sorted(times)


@PROPS
@given(commands)
def test_fok_is_all_or_nothing(cmds: list[Command]) -> None:
    for step in run(cmds):
        cmd = step.cmd
        if not (type(cmd) is NewOrder and cmd.tif == FOK and step.events[0][0] == "accepted"):
            continue
        trades = [e for e in of_kind(step.events, "trade") if e[T_TAKER_OID] == step.seq]
        mine = [e for e in of_kind(step.events, "cancelled") if e[2] == step.seq]
        if trades:
            assert sum(t[T_QTY] for t in trades) == cmd.quantity
            assert trades[-1][T_TAKER_LEAVES] == 0 and not mine
        else:
            assert step.events == [
                step.events[0],
                ("cancelled", cmd.symbol, step.seq, cmd.account, cmd.client_order_id, cmd.side,
                 cmd.price, cmd.quantity, cmd.quantity, codes.REASON_FOK),
            ]  # fmt: skip
            assert step.after == step.before


@PROPS
@given(commands)
def test_ioc_and_market_orders_never_rest(cmds: list[Command]) -> None:
    for step in run(cmds):
        cmd = step.cmd
        if type(cmd) is not NewOrder or step.events[0][0] != "accepted":
            continue
        on_book = step.seq in resting(step.after)
        if cmd.tif in (IOC, FOK) or cmd.type == MARKET:
            assert not on_book
            filled = sum(e[T_QTY] for e in of_kind(step.events, "trade") if e[T_TAKER_OID] == step.seq)
            mine = [e for e in of_kind(step.events, "cancelled") if e[2] == step.seq]
            assert filled == cmd.quantity or (len(mine) == 1 and mine[0][8] == cmd.quantity - filled)


@PROPS
@given(commands)
def test_fees_are_exact_and_prices_never_trade_through(cmds: list[Command]) -> None:
    for step in run(cmds):
        before = resting(step.before)
        for ev in of_kind(step.events, "trade"):
            inst = INSTRUMENTS[ev[1]]
            notional = ev[T_PRICE] * ev[T_QTY]
            assert ev[T_MAKER_FEE] == notional * inst.maker_rate == notional * 100_000
            assert ev[T_TAKER_FEE] == notional * inst.taker_rate == notional * 200_000
            assert ev[T_PRICE] == before[ev[T_MAKER_OID]][2]  # the maker's price
            limit = ev[T_TAKER_PRICE]
            if limit is not None:
                assert ev[T_PRICE] <= limit if ev[T_AGGRESSOR] == BUY else ev[T_PRICE] >= limit
            assert ev[T_AGGRESSOR] == step.cmd.side  # type: ignore[union-attr]


@PROPS
@given(commands)
def test_book_seq_rises_by_one_per_book_event_and_the_book_event_is_last(cmds: list[Command]) -> None:
    book_seq = {S: 0, E: 0}
    trade_id = {S: 0, E: 0}
    for step in run(cmds):
        kinds = [e[0] for e in step.events]
        assert kinds.count("book") <= 1
        if "book" in kinds:
            assert kinds[-1] == "book"
            ev = step.events[-1]
            book_seq[ev[1]] += 1
            assert ev[B_SEQ] == book_seq[ev[1]]
        else:
            assert step.after == step.before  # no level changed, so no book event is fine
        for ev in of_kind(step.events, "trade"):
            trade_id[ev[1]] += 1
            assert ev[2] == trade_id[ev[1]]
        assert kinds[0] in ("accepted", "rejected", "cancelled", "amended")
        if kinds[0] == "rejected":
            assert len(kinds) == 1 and step.after == step.before


@PROPS
@given(commands)
def test_replaying_book_events_reproduces_the_levels(cmds: list[Command]) -> None:
    levels: dict[str, dict[tuple[str, int], int]] = {S: {}, E: {}}
    engine = Engine(INSTRUMENTS.values())
    for i, cmd in enumerate(cmds, 1):
        for ev in engine.apply(cmd, i, i):
            if ev[0] != "book":
                continue
            sub = levels[ev[1]]
            for side, price, total in ev[B_CHANGES]:
                if total:
                    sub[(side, price)] = total
                else:
                    assert (side, price) in sub
                    del sub[(side, price)]
            bids = sorted(((p, t) for (s, p), t in sub.items() if s == BUY), reverse=True)
            asks = sorted((p, t) for (s, p), t in sub.items() if s == SELL)
            assert ev[B_BBO] == (
                bids[0][0] if bids else None,
                bids[0][1] if bids else 0,
                asks[0][0] if asks else None,
                asks[0][1] if asks else 0,
            )
        for symbol, sub in levels.items():
            bids = sorted(((p, t) for (s, p), t in sub.items() if s == BUY), reverse=True)
            asks = sorted((p, t) for (s, p), t in sub.items() if s == SELL)
            assert engine.book(symbol).depth(10_000) == (bids, asks)


@PROPS
@given(commands)
def test_engine_agrees_with_the_reference_model(cmds: list[Command]) -> None:
    engine = Engine(INSTRUMENTS.values())
    ref = Reference(list(INSTRUMENTS.values()))
    for i, cmd in enumerate(cmds, 1):
        assert engine.apply(cmd, i, i) == ref.apply(cmd, i, i), (i, cmd)
    assert snapshot(engine) == ref.state()


@PROPS
@given(commands)
def test_post_only_orders_never_take(cmds: list[Command]) -> None:
    for step in run(cmds):
        cmd = step.cmd
        if type(cmd) is NewOrder and cmd.post_only is True:
            assert not [e for e in of_kind(step.events, "trade") if e[T_TAKER_OID] == step.seq]
            if step.events[0][0] == "accepted":
                assert step.seq in resting(step.after)


# Fuzzing: JSON-ish garbage in any field ---------------------------------------------------------
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=4,
)


def field(valid: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.one_of(valid, valid, json_values)


fuzz_new = st.builds(
    NewOrder,
    field(symbols),
    field(accounts),
    field(st.sampled_from([BUY, SELL])),
    field(st.sampled_from([LIMIT, MARKET])),
    field(st.sampled_from([GTC, IOC, FOK])),
    field(st.one_of(prices, st.none())),
    field(st.integers(1, 90)),
    field(cids),
    field(st.booleans()),
    field(stps),
    # garbage in the other order types' fields: see test_garbage_in_the_new_fields_...
    stop_price=st.none(),
    expire_time=st.none(),
    display_quantity=st.none(),
    quote_quantity=st.none(),
)
fuzz_cancel = st.builds(Cancel, field(symbols), field(accounts), field(order_ids), field(cids))
fuzz_amend = st.builds(
    Amend,
    field(symbols),
    field(accounts),
    field(order_ids),
    field(cids),
    field(st.one_of(st.none(), prices)),
    field(st.one_of(st.none(), st.integers(1, 120))),
)
fuzz_commands = st.lists(
    st.one_of(new_orders(), cancels, amends, fuzz_new, fuzz_cancel, fuzz_amend, json_values),
    min_size=1,
    max_size=40,
)


@PROPS
@given(fuzz_commands)
def test_garbage_never_raises_never_changes_state_and_matches_the_reference(cmds: list[Any]) -> None:
    engine = Engine(INSTRUMENTS.values())
    ref = Reference(list(INSTRUMENTS.values()))
    before = snapshot(engine)["books"]
    for i, cmd in enumerate(cmds, 1):
        events = engine.apply(cmd, i, i)
        assert events == ref.apply(cmd, i, i), (i, cmd)
        after = snapshot(engine)["books"]
        if events[0][0] == "rejected":
            assert len(events) == 1 and after == before
            assert all(f is None or type(f) in (str, int) for f in events[0][1:6])
        before = after
    assert snapshot(engine) == ref.state()


# The other order types (stops, GTD, icebergs, quote quantity): engine only --------------------
@st.composite
def more_orders(draw: st.DrawFn) -> NewOrder:
    side = draw(st.sampled_from([BUY, SELL]))
    qty = draw(st.integers(10, 90))
    kind = draw(st.sampled_from(["stop_limit", "stop_market", "gtd", "iceberg", "gtd_iceberg", "quote"]))
    base = NewOrder(
        draw(symbols), draw(accounts), side, LIMIT, GTC, draw(prices), qty, draw(cids), False, draw(stps)
    )
    if kind == "stop_limit":
        return base._replace(
            type=STOP_LIMIT, tif=draw(st.sampled_from([GTC, IOC, FOK])), stop_price=draw(prices)
        )
    if kind == "stop_market":
        return base._replace(type=STOP_MARKET, tif=IOC, price=None, stop_price=draw(prices))
    if kind == "quote":
        return base._replace(
            type=MARKET, tif=IOC, price=None, quantity=None, quote_quantity=draw(st.integers(10**5, 10**7))
        )
    display = draw(st.integers(1, qty - 1)) if kind != "gtd" else None
    if kind == "iceberg":
        return base._replace(display_quantity=display)
    # run() applies seq 2i+1 at ts 10 x seq: expiries land a few commands later
    return base._replace(tif=GTD, expire_time=draw(st.integers(1, 400)), display_quantity=display)


more_commands = st.lists(
    st.one_of(new_orders(), more_orders(), more_orders(), cancels, amends, st.builds(Tick, symbols)),
    min_size=1,
    max_size=60,
)


def _l2(books: dict[str, Any]) -> dict[tuple[str, str, int], int]:
    """(symbol, side, price) -> shown total, from the snapshot's resting orders."""
    out: dict[tuple[str, str, int], int] = defaultdict(int)
    for oid, (symbol, side, price, _qty, leaves) in resting(books).items():
        out[symbol, side, price] += leaves
        assert oid > 0
    return dict(out)


@PROPS
@given(more_commands)
def test_stops_and_hidden_reserves_never_show_in_l2(cmds: list[Command]) -> None:
    l2: dict[tuple[str, str, int], int] = {}
    for step in run(cmds):
        for e in of_kind(step.events, "book"):
            for side, price, total in e[B_CHANGES]:
                if total:
                    l2[e[1], side, price] = total
                else:
                    l2.pop((e[1], side, price), None)
        assert l2 == _l2(step.after)  # what L2 shows is the shown part of resting orders, nothing else
        for symbol, b in step.after.items():
            rest = resting({symbol: b})
            assert not {s[0] for s in b["stops"]} & set(rest)  # an untriggered stop never rests
            for oid, display, hidden in b["icebergs"]:
                assert 0 < rest[oid][4] <= display and hidden >= 0


@PROPS
@given(more_commands)
def test_every_lot_of_an_iceberg_is_filled_rests_or_is_cancelled(cmds: list[Command]) -> None:
    steps = run(cmds)
    icebergs = {
        step.seq: step.cmd.quantity
        for step in steps
        if type(step.cmd) is NewOrder
        and step.cmd.display_quantity is not None
        and step.events[0][0] == "accepted"
    }
    filled: dict[int, int] = defaultdict(int)
    gone: dict[int, int] = {}
    for step in steps:
        for e in step.events:
            if e[0] == "trade":
                filled[e[T_MAKER_OID]] += e[T_QTY]
                filled[e[T_TAKER_OID]] += e[T_QTY]
            elif e[0] == "cancelled":
                gone[e[2]] = e[8]
    final = steps[-1].after
    shown = {oid: r[4] for oid, r in resting(final).items()}
    hidden = {oid: h for b in final.values() for oid, _, h in b["icebergs"]}
    for oid, qty in icebergs.items():
        assert filled[oid] + shown.get(oid, 0) + hidden.get(oid, 0) + gone.get(oid, 0) == qty, oid


@PROPS
@given(more_commands, st.integers(0, 59))
def test_a_restored_snapshot_replays_the_other_order_types_byte_for_byte(
    cmds: list[Command], cut: int
) -> None:
    whole = [e for step in run(cmds) for e in step.events]
    engine = Engine(INSTRUMENTS.values())
    out: list[Event] = []
    for i, cmd in enumerate(cmds):
        if i == cut:
            fresh = Engine(INSTRUMENTS.values())
            restore(fresh, snapshot(engine))
            assert state_hash(fresh) == state_hash(engine)
            engine = fresh
        seq = 2 * i + 1
        out += engine.apply(cmd, seq, 10 * seq)
    assert out == whole


garbage_more = st.builds(
    NewOrder,
    symbols,
    accounts,
    st.sampled_from([BUY, SELL]),
    field(st.sampled_from([LIMIT, MARKET, STOP_LIMIT, STOP_MARKET])),
    field(st.sampled_from([GTC, IOC, FOK, GTD])),
    field(st.one_of(prices, st.none())),
    field(st.one_of(st.integers(1, 90), st.none())),
    cids,
    st.booleans(),
    stps,
    field(st.one_of(prices, st.none())),
    field(st.one_of(st.integers(1, 400), st.none())),
    field(st.one_of(st.integers(1, 90), st.none())),
    field(st.one_of(st.integers(1, 10**7), st.none())),
)


@PROPS
@given(st.lists(st.one_of(more_orders(), garbage_more), min_size=1, max_size=40))
def test_garbage_in_the_new_fields_never_raises_and_never_changes_state(cmds: list[Any]) -> None:
    engine = Engine(INSTRUMENTS.values())
    ref = Reference(list(INSTRUMENTS.values()))
    before = snapshot(engine)["books"]
    for i, cmd in enumerate(cmds, 1):
        events = engine.apply(cmd, i, 10 * i)
        assert events == ref.apply(cmd, i, 10 * i), (i, cmd)
        after = snapshot(engine)["books"]
        if events[0][0] == "rejected":
            # expiries due at its ts would come first: a command that starts with a reject is one
            assert len(events) == 1 and after == before
            assert all(f is None or type(f) in (str, int) for f in events[0][1:6])
        before = after


@PROPS
@given(more_commands)
def test_engine_agrees_with_the_reference_model_on_the_other_order_types(cmds: list[Command]) -> None:
    engine = Engine(INSTRUMENTS.values())
    ref = Reference(list(INSTRUMENTS.values()))
    for i, cmd in enumerate(cmds):
        seq = 2 * i + 1
        assert engine.apply(cmd, seq, 10 * seq) == ref.apply(cmd, seq, 10 * seq), (i, cmd)
    assert snapshot(engine) == ref.state()
