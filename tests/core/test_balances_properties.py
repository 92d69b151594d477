"""Property tests of balances (Engine(risk=True)): invariants after every command of long random flows,
the engine against the naive reference model, and snapshots that carry the balances.

The flows reuse test_properties' order generators (every order type, both default symbols, which share
USDT) and add funding, mass cancels, time and orders from the venue's reserved accounts; each flow
starts by funding some accounts, generously or barely, so that orders are both accepted and refused.
"""

from __future__ import annotations

from collections import defaultdict
from decimal import Decimal
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.matcher.book import (
    O_ACCOUNT,
    O_LEAVES,
    O_PRICE,
    O_SIDE,
    S_ACCOUNT,
    S_PRICE,
    S_QTY,
    S_SIDE,
    S_TYPE,
)
from services.matcher.engine import Engine
from services.matcher.snapshot import restore, snapshot, state_hash, to_bytes
from shared.commands import (
    STOP_LIMIT,
    Amend,
    Cancel,
    CancelAll,
    Command,
    Deposit,
    NewOrder,
    Tick,
    Withdraw,
)
from shared.events import (
    BAL_ACCOUNT,
    BAL_ASSET,
    BAL_AVAILABLE,
    BAL_HELD,
    BALANCE,
    FUNDED,
    REJECTED,
    T_MAKER_FEE,
    T_TAKER_FEE,
    TRADE,
    Event,
)
from shared.instruments import Instrument, default_instruments
from shared.stream import decode_events, encode_events
from tests.core.reference import Reference, Units
from tests.core.test_properties import (
    ACCOUNTS,
    E,
    S,
    accounts,
    amends,
    cancels,
    more_orders,
    new_orders,
    symbols,
)

INSTRUMENTS = list(default_instruments().values())
ASSETS = ("BTC", "ETH", "USDT")
# Orders are 10..90 lots at prices around 10_000 ticks: with the default instruments one lot is one
# base unit and one tick x lot 1,000 USDT units (10 places), so a buy holds about price x lots x 1,002.
ORDER_COST = 10_000 * 50 * 1_002

FLOWS = settings(
    max_examples=40,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def amounts(asset: str) -> st.SearchStrategy[int]:
    if asset == "USDT":
        return st.integers(ORDER_COST // 10, ORDER_COST * 40)
    return st.integers(1, 2_000)


@st.composite
def fundings(draw: st.DrawFn, kind: type[Deposit] | type[Withdraw]) -> Deposit | Withdraw:
    asset = draw(st.sampled_from(ASSETS))
    account = draw(st.one_of(*[accounts] * 6, st.sampled_from(["_fees", "_x", ""])))
    amount: Any = draw(st.one_of(amounts(asset), amounts(asset), st.sampled_from([0, -5, 2**96, 2**96 - 1])))
    if draw(st.integers(0, 19)) == 0:
        asset = draw(st.sampled_from(["XRP", "", "usdt"]))
    return kind(account, asset, amount, draw(st.one_of(st.none(), st.sampled_from(["r1", "r2"]))))


cancel_alls = st.builds(
    CancelAll,
    st.one_of(st.none(), symbols, st.just("NOPE-USDT")),
    st.one_of(accounts, accounts, accounts, st.just("_fees")),
    st.sampled_from(["user", "user", "disconnect", "dead_man_switch", "bogus"]),
)
venue_orders = st.one_of(new_orders(), more_orders()).map(lambda o: o._replace(account="_fees"))
# A step is drawn by kind first, from a list with repeats: the weights of a realistic flow (mostly
# orders), which a plain one_of of the strategies would not keep.
STEPS: dict[str, st.SearchStrategy[Any]] = {
    "order": new_orders(),
    "other order": more_orders(),
    "cancel": cancels,
    "amend": amends,
    "deposit": fundings(Deposit),
    "withdraw": fundings(Withdraw),
    "cancel all": cancel_alls,
    "tick": st.builds(Tick, symbols),
    "venue order": venue_orders,
}
KINDS = ["order"] * 8 + ["other order"] * 5 + ["cancel", "amend"] * 2 + list(STEPS)[4:]


def at_time(i: int, cmd: Any) -> Any:
    """Command i runs at ts 10 x (2i + 1) (every runner here): a GTD order's expire_time, drawn in
    [1, 400], becomes that much later than its ts, so it expires some commands later."""
    if type(cmd) is NewOrder and type(cmd.expire_time) is int:
        return cmd._replace(expire_time=10 * (2 * i + 1) + cmd.expire_time)
    return cmd


@st.composite
def flows(draw: st.DrawFn, max_size: int = 80) -> list[Any]:
    """Initial deposits for some (account, asset) pairs, then a random flow."""
    funding: list[Any] = [
        Deposit(account, asset, draw(amounts(asset)))
        for account in ACCOUNTS
        for asset in ASSETS
        if draw(st.integers(0, 3))
    ]
    kinds = draw(st.lists(st.sampled_from(KINDS), min_size=max_size // 2, max_size=max_size))
    flow = funding + [draw(STEPS[kind]) for kind in kinds]
    return [at_time(i, cmd) for i, cmd in enumerate(flow)]


def nonzero(balances: dict[str, dict[str, list[int]]]) -> dict[str, dict[str, list[int]]]:
    """The balances minus [0, 0] pairs (a ledger may keep an emptied pair; the reference does not)."""
    out: dict[str, dict[str, list[int]]] = {}
    for account, assets in balances.items():
        for asset, bal in assets.items():
            if bal != [0, 0]:
                out.setdefault(account, {})[asset] = list(bal)
    return out


def ledger_state(engine: Engine) -> dict[tuple[str, str], tuple[int, int]]:
    assert engine.ledger is not None
    return {(a, s): (b[0], b[1]) for a, assets in engine.ledger.balances().items() for s, b in assets.items()}


def needs(engine: Engine, units: dict[str, Units]) -> dict[tuple[str, str], int]:
    """What every account's open orders need held, from the books: resting orders with their
    iceberg reserves, untriggered stop_limits at their placement hold."""
    out: dict[tuple[str, str], int] = defaultdict(int)
    for symbol, book in engine.books.items():
        u = units[symbol]
        for oid, order in book.orders.items():
            ice = book.icebergs.get(oid)
            lots = order[O_LEAVES] + (ice[1] if ice is not None else 0)
            asset, amount = u.need(order[O_SIDE], order[O_PRICE], lots)
            out[order[O_ACCOUNT], asset] += amount
        for stop in book.stops.values():
            if stop[S_TYPE] == STOP_LIMIT:
                asset, amount = u.need(stop[S_SIDE], stop[S_PRICE], stop[S_QTY])
                out[stop[S_ACCOUNT], asset] += amount
    return out


def without_seq(snap: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in snap.items() if k != "last_seq"}


def check_balance_events(
    cmd: Any,
    events: list[Event],
    before: dict[tuple[str, str], tuple[int, int]],
    after: dict[tuple[str, str], tuple[int, int]],
) -> None:
    """The `balance` events come last, one per pair, each the pair's final state, and they cover
    every pair whose state changed."""
    kinds = [e[0] for e in events]
    n = kinds.count(BALANCE)
    assert BALANCE not in kinds[: len(kinds) - n], events
    pairs = [(e[BAL_ACCOUNT], e[BAL_ASSET]) for e in events[len(kinds) - n :]]
    assert len(set(pairs)) == len(pairs), events
    symbol = cmd[0] if type(cmd) in (NewOrder, Cancel, Amend, Tick, CancelAll) else None
    for e in events[len(kinds) - n :]:
        assert e[1] == symbol
        assert after.get((e[BAL_ACCOUNT], e[BAL_ASSET]), (0, 0)) == (e[BAL_AVAILABLE], e[BAL_HELD])
    changed = {p for p in set(before) | set(after) if before.get(p, (0, 0)) != after.get(p, (0, 0))}
    assert changed <= set(pairs), (changed, pairs)


def run_checked(cmds: list[Any], instruments: list[Instrument]) -> Engine:
    """Apply `cmds` with every invariant checked after each command."""
    engine = Engine(instruments, risk=True)
    assert engine.ledger is not None
    units = {i.symbol: Units.of(i, engine.ledger.scales) for i in instruments}
    funded: dict[str, int] = defaultdict(int)  # asset -> deposits - withdrawals
    fees: dict[str, int] = defaultdict(int)  # asset -> what _fees should own: trade fees - its withdrawals
    snap = snapshot(engine)
    state = ledger_state(engine)
    for i, cmd in enumerate(cmds):
        seq = 2 * i + 1
        events = engine.apply(cmd, seq, 10 * seq)
        for e in events:
            if e[0] == FUNDED:
                funded[e[4]] += e[5] if e[2] == "deposit" else -e[5]
                if e[3] == "_fees":
                    fees[e[4]] -= e[5]
            elif e[0] == TRADE:
                u = units[e[1]]
                fees[u.quote] += u.quote_units(e[T_MAKER_FEE] + e[T_TAKER_FEE])
        new_snap, new_state = snapshot(engine), ledger_state(engine)
        check_balance_events(cmd, events, state, new_state)
        if events and events[0][0] == REJECTED:
            assert len(events) == 1 and without_seq(new_snap) == without_seq(snap), (i, cmd, events)
        totals: dict[str, int] = defaultdict(int)
        for (_, asset), (avail, held) in new_state.items():
            assert avail >= 0 and held >= 0, (i, cmd)
            totals[asset] += avail + held
        assert {a: t for a, t in totals.items() if t} == {a: t for a, t in funded.items() if t}, (i, cmd)
        assert {a: x for a, x in fees.items() if x} == {
            s: avail for (a, s), (avail, _) in new_state.items() if a == "_fees" and avail
        }, (i, cmd)
        need = needs(engine, units)
        held_now = {p: h for p, (_, h) in new_state.items() if h}
        assert held_now == {p: h for p, h in need.items() if h}, (i, cmd, events)
        snap, state = new_snap, new_state
    return engine


@FLOWS
@given(flows())
def test_balances_are_conserved_held_matches_open_orders_and_rejects_change_nothing(cmds: list[Any]) -> None:
    run_checked(cmds, INSTRUMENTS)


def differential(cmds: list[Any], instruments: list[Instrument]) -> None:
    engine = Engine(instruments, risk=True)
    ref = Reference(instruments, risk=True)
    for i, cmd in enumerate(cmds):
        seq = 2 * i + 1
        got = engine.apply(cmd, seq, 10 * seq)
        want = ref.apply(cmd, seq, 10 * seq)
        assert [e for e in got if e[0] != BALANCE] == want, (i, cmd)
        assert engine.ledger is not None
        assert nonzero(engine.ledger.balances()) == ref.balances(), (i, cmd)
    snap = snapshot(engine)
    snap["balances"] = nonzero(snap["balances"])
    assert snap.pop("granted", []) == []  # the faucet (Grant) is not in these flows nor in the model
    assert snap == ref.state()


@FLOWS
@given(flows())
def test_engine_balances_agree_with_the_reference_model(cmds: list[Any]) -> None:
    differential(cmds, INSTRUMENTS)


# Instruments whose lots and ticks are not one asset unit each (the contract's factors, per
# shared.instruments.asset_scales): ETH-BTC's tick 0.00005 and lot 0.001 make BTC units 10^-11 (5+3+3
# places), so a BTC-USDT lot is 10^6 BTC units and an ETH-BTC tick x lot 5,000 BTC units (its maker
# fee 5); ETH-USDT keeps ETH at 10^-5, so an ETH-BTC lot is 100 ETH units; SOL-USDT's tick 0.05 and
# lot 0.1 make its tick x lot 5 x 10^7 USDT units, and it has no maker fee (a resting buy holds at the
# taker rate).
EXOTIC = [
    Instrument("BTC-USDT"),
    Instrument("ETH-USDT"),
    Instrument(
        "ETH-BTC",
        tick_size=Decimal("0.00005"),
        lot_size=Decimal("0.001"),
        min_qty=Decimal("0.001"),
        min_notional=Decimal("0"),
    ),
    Instrument(
        "SOL-USDT",
        tick_size=Decimal("0.05"),
        lot_size=Decimal("0.1"),
        min_qty=Decimal("0.1"),
        maker_fee=Decimal("0"),
    ),
]
_SCALE = {"BTC": 10**7, "ETH": 100, "USDT": 10**4, "SOL": 1}


def exotic(i: int, cmd: Any) -> Any:
    """Command i of a flow moved to EXOTIC: most ETH-USDT commands go to ETH-BTC, every third
    BTC-USDT one to SOL-USDT, every other ETH funding to SOL; amounts scale to the finer units."""
    if type(cmd) in (Deposit, Withdraw):
        asset = "SOL" if cmd.asset == "ETH" and i % 2 else cmd.asset
        if type(cmd.amount) is int and 0 < cmd.amount < 2**64:
            return cmd._replace(asset=asset, amount=cmd.amount * _SCALE.get(asset, 1))
        return cmd._replace(asset=asset)
    symbol = getattr(cmd, "symbol", None)
    if symbol == E:
        return cmd._replace(symbol=E if i % 4 == 0 else "ETH-BTC")
    if symbol == S and i % 3 == 0:
        return cmd._replace(symbol="SOL-USDT")
    return cmd


@FLOWS
@given(flows())
def test_the_invariants_and_the_reference_hold_for_instruments_with_other_units(cmds: list[Any]) -> None:
    flow = [exotic(i, c) for i, c in enumerate(cmds)]
    run_checked(flow, EXOTIC)
    differential(flow, EXOTIC)


@FLOWS
@given(flows(), st.integers(0, 89))
def test_a_snapshot_mid_flow_restores_balances_and_continues_byte_identically(
    cmds: list[Command], cut: int
) -> None:
    """Through the events stream's own codec."""
    whole = Engine(INSTRUMENTS, risk=True)
    expected = [encode_events(whole.apply(c, 2 * i + 1, 20 * i + 10)) for i, c in enumerate(cmds)]
    engine = Engine(INSTRUMENTS, risk=True)
    out: list[bytes] = []
    for i, cmd in enumerate(cmds):
        if i == cut:
            snap = snapshot(engine)
            assert "balances" in snap
            fresh = Engine(INSTRUMENTS, risk=True)
            restore(fresh, decode_events(to_bytes(snap)))
            assert state_hash(fresh) == state_hash(engine)
            engine = fresh
        out.append(encode_events(engine.apply(cmd, 2 * i + 1, 20 * i + 10)))
    assert out == expected
    assert to_bytes(snapshot(engine)) == to_bytes(snapshot(whole))
    assert state_hash(engine) == state_hash(whole)


@FLOWS
@given(flows(max_size=20), st.sampled_from(ACCOUNTS), st.sampled_from(ASSETS), st.integers(1, 10**6))
def test_state_hash_covers_the_balances(cmds: list[Any], account: str, asset: str, amount: int) -> None:
    """Two engines that differ by one deposit (the books equal) hash differently."""
    a, b = Engine(INSTRUMENTS, risk=True), Engine(INSTRUMENTS, risk=True)
    for i, cmd in enumerate(cmds, 1):
        a.apply(cmd, i, i)
        b.apply(cmd, i, i)
    n = len(cmds) + 1
    a.apply(Deposit(account, asset, amount), n, n)
    b.apply(Tick(S), n, n)
    assert snapshot(a)["books"] == snapshot(b)["books"]
    assert state_hash(a) != state_hash(b)
