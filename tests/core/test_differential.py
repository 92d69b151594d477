"""Differential tests: the engine against the naive reference model (tests/core/reference.py).

Random command streams (seeded, so every failure replays) go through both, and every command's events
must be equal tuple for tuple; every so often the whole book state is compared too. Prices stay in a
narrow band so books cross all the time; several accounts share the book so self-trade prevention
triggers often; cancels and amends hit live orders, dead ones, unknown ids and other accounts'
orders; a few commands are invalid.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from services.matcher.engine import Engine
from services.matcher.snapshot import snapshot
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
    Command,
    NewOrder,
)
from shared.instruments import Instrument, default_instruments
from tests.core.reference import Reference

BTC, ETH = "BTC-USDT", "ETH-USDT"
ACCOUNTS = ("alice", "bob", "carol", "dave")
STP_CHOICES = (STP_CANCEL_TAKER, STP_CANCEL_MAKER, STP_CANCEL_BOTH)
PLAIN_FIELDS = 10  # a NewOrder's fields before stop_price (the other order types)
GARBAGE: tuple[Any, ...] = (
    None, True, False, 0, -1, 1.5, float("nan"), float("inf"), "", "x" * 40, [], {}, [1], {"a": 1},
    (1, 2), b"buy",
)  # fmt: skip
HUGE: tuple[Any, ...] = (2**70, -(2**64))  # valid Python ints that orjson cannot serialise


def instruments() -> list[Instrument]:
    return list(default_instruments().values())


@dataclass(frozen=True)
class Profile:
    """Shape of a random stream."""

    mid: int = 10_000  # ticks: 100.00 USDT, so 10 lots (0.0001) already meet the minimum notional
    band: int = 8  # a buy's limit is mid - step * randint(-cross, band), a sell's mid + step * (...)
    cross: int = 2  # how far past mid an order may reach: this makes the book cross
    step: int = 1
    p_new: float = 0.60
    p_cancel: float = 0.10
    p_amend: float = 0.20  # the rest are invalid commands
    p_market: float = 0.12
    max_qty: int = 60
    p_eth: float = 0.15
    huge_ints: bool = True  # garbage may include ints beyond 64 bits (events then don't serialise)


NARROW = Profile()
# Levels 100 ticks apart: the walk over keys in BookSide.iter_levels gives up and sorts.
SPARSE = Profile(band=40, step=100, p_new=0.6, p_cancel=0.25, p_amend=0.12)
# Many cancels and amends: dead queue entries, stale heap keys, lots of level churn.
CHURN = Profile(band=2, cross=0, p_new=0.5, p_cancel=0.2, p_amend=0.25, p_market=0.05)


def random_stream(rng: random.Random, n: int, ref: Reference, profile: Profile = NARROW) -> Iterator[Command]:
    """n commands; cancels and amends pick live orders from `ref`, which the caller keeps current.

    The generator is lazy: it reads `ref` just before yielding each command, after the caller applied
    the previous one.
    """
    p = profile

    def price(side: str | None = None) -> int:
        if side is None:
            return p.mid + p.step * rng.randint(-p.band, p.band)
        sign = -1 if side == BUY else 1
        return p.mid + sign * p.step * rng.randint(-p.cross, p.band)

    def symbol() -> str:
        return ETH if rng.random() < p.p_eth else BTC

    def live() -> list[tuple[str, Any]]:
        return [(s, o) for s, b in ref.books.items() for o in b.resting]

    def cid() -> str | None:
        return None if rng.random() < 0.55 else f"c{rng.randrange(6)}"

    def new_order() -> Command:
        account = rng.choice(ACCOUNTS)
        side = rng.choice((BUY, SELL))
        if rng.random() < p.p_market:
            otype, px, tif = MARKET, None, rng.choice((IOC, IOC, FOK))
        else:
            otype, px = LIMIT, price(side)
            tif = rng.choices((GTC, IOC, FOK), (70, 15, 15))[0]
        qty = rng.randint(10, p.max_qty) if rng.random() < 0.97 else rng.randint(1, 9)
        if otype == MARKET or tif != GTC:
            qty *= rng.choice((1, 2, 4))  # sweeps over several levels
        post_only = otype == LIMIT and tif == GTC and rng.random() < 0.1
        if rng.random() < 0.01:
            post_only = True  # sometimes on ioc / fok / market: INVALID_TIF
        if rng.random() < 0.2:
            return NewOrder(symbol(), account, side, otype, tif, px, qty, cid(), post_only)  # default stp
        return NewOrder(
            symbol(), account, side, otype, tif, px, qty, cid(), post_only, rng.choice(STP_CHOICES)
        )

    def cancel() -> Command:
        orders = live()
        r = rng.random()
        if orders and r < 0.75:
            s, o = rng.choice(orders)
            if r < 0.05:
                return Cancel(s, rng.choice([a for a in ACCOUNTS if a != o.account]), o.oid)  # foreign
            if o.cid is not None and rng.random() < 0.4:
                return Cancel(s, o.account, None, o.cid)
            return Cancel(s, o.account, o.oid)
        if r < 0.9:
            return Cancel(symbol(), rng.choice(ACCOUNTS), rng.randint(1, ref.last_seq + 5))
        return Cancel(symbol(), rng.choice(ACCOUNTS), None, f"c{rng.randrange(6)}")

    def amend() -> Command:
        orders = live()
        if not orders or rng.random() < 0.08:
            return Amend(symbol(), rng.choice(ACCOUNTS), rng.randint(1, ref.last_seq + 5), None, price(), 20)
        s, o = rng.choice(orders)
        account = o.account if rng.random() < 0.95 else rng.choice(ACCOUNTS)
        filled = o.qty - o.leaves
        r = rng.random()
        new_price: int | None = None
        new_qty: int | None = None
        if r < 0.3:  # quantity down (or equal) in place
            new_qty = rng.randint(max(filled + 1, 1), o.qty)
        elif r < 0.45:  # quantity up
            new_qty = o.qty + rng.randint(1, 30)
        elif r < 0.7:  # price change, may cross
            new_price = o.price + p.step * rng.randint(-3, 3)
        elif r < 0.85:
            new_price = price()
            new_qty = rng.randint(max(filled - 2, 1), o.qty + 20)
        elif r < 0.95:
            new_qty = rng.randint(1, max(filled, 1))  # at or below the filled part, or tiny
        # else: neither field: INVALID_MESSAGE
        if o.cid is not None and rng.random() < 0.3:
            return Amend(s, account, None, o.cid, new_price, new_qty)
        return Amend(s, account, o.oid, None, new_price, new_qty)

    def invalid() -> Command | Any:
        base: Command = rng.choice(
            (
                NewOrder(BTC, "alice", BUY, LIMIT, GTC, price(), 20, None, False, STP_CANCEL_TAKER),
                NewOrder(BTC, "bob", SELL, MARKET, IOC, None, 20, "c1", False, STP_CANCEL_MAKER),
                Cancel(BTC, "alice", 1, None),
                Cancel(BTC, "alice", None, "c1"),
                Amend(BTC, "alice", 1, None, price(), 20),
            )
        )
        if rng.random() < 0.05:
            return rng.choice((None, "cancel", (BTC, "x"), ["NewOrder"], {"op": "new"}))
        i = rng.randrange(min(len(base), PLAIN_FIELDS))  # the reference models plain orders only
        fields: list[Any] = list(base)
        fields[i] = rng.choice(GARBAGE + HUGE if p.huge_ints else GARBAGE)
        return type(base)(*fields)

    for _ in range(n):
        r = rng.random()
        if r < p.p_new:
            yield new_order()
        elif r < p.p_new + p.p_cancel:
            yield cancel()
        elif r < p.p_new + p.p_cancel + p.p_amend:
            yield amend()
        else:
            yield invalid()


def run_differential(seed: int, n: int, profile: Profile = NARROW, check_every: int = 500) -> dict[str, int]:
    """Apply a random stream to the engine and the reference; fail on the first difference."""
    rng = random.Random(seed)
    insts = instruments()
    engine = Engine(insts)
    ref = Reference(insts)
    seq = 0
    ts = 1_700_000_000_000_000
    stats = {"events": 0, "trades": 0, "max_resting": 0}
    for i, cmd in enumerate(random_stream(rng, n, ref, profile)):
        seq += rng.choice((1, 1, 1, 2, 7))
        ts += rng.randint(0, 1000)
        got = engine.apply(cmd, seq, ts)
        want = ref.apply(cmd, seq, ts)
        if got != want:
            pytest.fail(
                f"seed={seed} command #{i} seq={seq}: {cmd!r}\n"
                + _diff(got, want)
                + f"\nreference books after the command: {ref.state()['books']}"
            )
        stats["events"] += len(got)
        stats["trades"] += sum(1 for e in got if e[0] == "trade")
        if i % check_every == 0:
            stats["max_resting"] = max(stats["max_resting"], sum(len(b.resting) for b in ref.books.values()))
            assert snapshot(engine) == ref.state(), f"seed={seed}: state differs after command #{i}"
    assert snapshot(engine) == ref.state(), f"seed={seed}: final state differs"
    return stats


def _diff(got: list[Any], want: list[Any]) -> str:
    lines = []
    for k in range(max(len(got), len(want))):
        g = got[k] if k < len(got) else "<missing>"
        w = want[k] if k < len(want) else "<missing>"
        mark = "  " if g == w else "!!"
        lines.append(f"{mark} engine:    {g!r}\n{mark} reference: {w!r}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(8))
def test_narrow_band_streams(seed: int) -> None:
    stats = run_differential(seed, 3_000)
    assert stats["trades"] > 300  # the stream really does trade


@pytest.mark.parametrize("seed", range(4))
def test_sparse_levels_streams(seed: int) -> None:
    run_differential(100 + seed, 2_500, SPARSE)


@pytest.mark.parametrize("seed", range(4))
def test_churn_streams(seed: int) -> None:
    run_differential(200 + seed, 3_000, CHURN)


@pytest.mark.slow
def test_long_stream_100k() -> None:
    stats = run_differential(20240601, 100_000, NARROW, check_every=2_000)
    assert stats["trades"] > 10_000


# Targeted streams for the engine's lazy structures ----------------------------------------------
def _compare(engine: Engine, ref: Reference, cmds: list[Any], start_seq: int) -> int:
    seq = start_seq
    for cmd in cmds:
        seq += 1
        got = engine.apply(cmd, seq, seq)
        want = ref.apply(cmd, seq, seq)
        assert got == want, f"seq={seq} {cmd!r}\n" + _diff(got, want)
    assert snapshot(engine) == ref.state()
    return seq


@pytest.mark.parametrize("seed", range(3))
def test_deep_level_with_many_lazy_cancels(seed: int) -> None:
    """Hundreds of orders in one level, most cancelled out of order (dead entries, compaction), then
    amends and sweeps; a second level far away keeps the heap busy."""
    rng = random.Random(seed)
    insts = instruments()
    engine, ref = Engine(insts), Reference(insts)
    cmds: list[Any] = []
    for k in range(300):
        cmds.append(NewOrder(BTC, ACCOUNTS[k % 3], SELL, LIMIT, GTC, 10_000, rng.randint(10, 40), f"k{k}"))
    cmds.append(NewOrder(BTC, "dave", SELL, LIMIT, GTC, 10_500, 50))
    seq = _compare(engine, ref, cmds, 0)
    ids = list(range(1, 301))
    rng.shuffle(ids)
    cmds = [Cancel(BTC, ACCOUNTS[(i - 1) % 3], i) for i in ids[:220]]
    cmds += [Amend(BTC, ACCOUNTS[(i - 1) % 3], i, None, None, 60) for i in ids[220:240]]  # to the back
    cmds += [Amend(BTC, ACCOUNTS[(i - 1) % 3], i, None, None, 10) for i in ids[240:250]]  # in place
    cmds += [
        NewOrder(BTC, "dave", BUY, MARKET, FOK, None, 10_000),  # unfillable
        NewOrder(BTC, "dave", BUY, LIMIT, FOK, 10_000, 700, None, False, STP_CANCEL_MAKER),
        NewOrder(BTC, "alice", BUY, LIMIT, IOC, 10_000, 500, None, False, STP_CANCEL_MAKER),
        NewOrder(BTC, "bob", BUY, MARKET, IOC, None, 300, None, False, STP_CANCEL_BOTH),
        NewOrder(BTC, "carol", BUY, MARKET, IOC, None, 100_000),
    ]
    _compare(engine, ref, cmds, seq)


def test_many_levels_created_and_emptied() -> None:
    """Levels created and emptied away from the top leave stale heap keys behind; the heap must stay
    right through its rebuilds."""
    rng = random.Random(7)
    insts = instruments()
    engine, ref = Engine(insts), Reference(insts)
    cmds: list[Any] = []
    seq = 0
    for round_ in range(30):
        base = len(cmds)
        for _ in range(40):
            cmds.append(NewOrder(BTC, "alice", BUY, LIMIT, GTC, 9_000 - rng.randint(0, 400), 15))
            cmds.append(NewOrder(BTC, "bob", SELL, LIMIT, GTC, 11_000 + rng.randint(0, 400), 15))
        seq = _compare(engine, ref, cmds[base:], seq)
        live = [(s, o) for s, b in ref.books.items() for o in b.resting]
        rng.shuffle(live)
        cancels = [Cancel(s, o.account, o.oid) for s, o in live[: len(live) * 2 // 3]]
        sweep = [
            NewOrder(BTC, "carol", SELL, MARKET, FOK, None, 15 * (round_ % 7 + 1)),
            NewOrder(BTC, "carol", BUY, LIMIT, FOK, 11_000 + 200, 60),
        ]
        seq = _compare(engine, ref, cancels + sweep, seq)
        for side in (engine.books[BTC].bids, engine.books[BTC].asks):
            # Each key at most once: the heap holds exactly the live and the stale keys.
            assert sorted(side.heap) == sorted([*side.levels, *side.stale])
            assert not side.stale & side.levels.keys()
            assert not side.heap or side.heap[0] in side.levels


def run_stream(seed: int, n: int, profile: Profile = NARROW) -> Iterator[tuple[Command, int, int]]:
    """(command, seq, ts) triples of a reproducible random stream, independent of any engine."""
    rng = random.Random(seed)
    ref = Reference(instruments())
    seq = 0
    for cmd in random_stream(rng, n, ref, profile):
        seq += rng.choice((1, 1, 2))
        ts = 1_700_000_000_000 + seq * 17
        ref.apply(cmd, seq, ts)
        yield cmd, seq, ts


def stream(seed: int, n: int, profile: Profile = NARROW) -> list[tuple[Command, int, int]]:
    return list(run_stream(seed, n, profile))


def test_level_taken_one_order_at_a_time() -> None:
    """One level filled order by order while it stays alive, with orders joining its back and being
    cancelled in between: the taken entries are cut off in bulk (engine._match), and the queue,
    its lazily cancelled entries and time priority must come through every cut."""
    rng = random.Random(11)
    insts = instruments()
    engine, ref = Engine(insts), Reference(insts)
    cmds: list[Any] = [NewOrder(BTC, ACCOUNTS[k % 3], SELL, LIMIT, GTC, 10_000, 10) for k in range(300)]
    seq = _compare(engine, ref, cmds, 0)
    for round_ in range(400):
        cmds = [NewOrder(BTC, "dave", BUY, LIMIT, IOC, 10_000, rng.choice((5, 10, 10, 15)))]
        if round_ % 3 == 0:
            cmds.append(NewOrder(BTC, ACCOUNTS[round_ % 3], SELL, LIMIT, GTC, 10_000, 10))
        live = [o for o in ref.books[BTC].resting if o.side == SELL]
        if round_ % 4 == 0 and live:
            victim = rng.choice(live)
            cmds.append(Cancel(BTC, victim.account, victim.oid))
        seq = _compare(engine, ref, cmds, seq)
