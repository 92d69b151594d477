"""Snapshots: restore + replay must be indistinguishable from never having stopped, byte for byte."""

from __future__ import annotations

import copy
import dataclasses
import json
import pickle
import random
from decimal import Decimal
from typing import Any

import orjson
import pytest

from services.matcher.engine import Engine
from services.matcher.snapshot import FORMAT_VERSION, restore, snapshot, state_hash, to_bytes
from shared.commands import BUY, IOC, LIMIT, MARKET, SELL, Cancel, Command, Deposit, NewOrder
from shared.instruments import Instrument, default_instruments
from shared.stream import decode_events, encode_events
from tests.core import test_differential as diff
from tests.core.test_differential import Profile

# The random streams of the differential tests, minus garbage ints beyond 64 bits (see
# test_rejected_events_always_serialise below): everything here goes through orjson.
NARROW = dataclasses.replace(diff.NARROW, huge_ints=False)
SPARSE = dataclasses.replace(diff.SPARSE, huge_ints=False)
CHURN = dataclasses.replace(diff.CHURN, huge_ints=False)
stream = diff.stream

S = "BTC-USDT"


def fresh() -> Engine:
    return Engine(default_instruments().values())


def apply_all(engine: Engine, cmds: list[tuple[Command, int, int]]) -> bytes:
    """All events of `cmds`, serialised with orjson, one line per command."""
    return b"\n".join(orjson.dumps(engine.apply(cmd, seq, ts)) for cmd, seq, ts in cmds)


def roundtrip_json(snap: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = orjson.loads(to_bytes(snap))
    return out


def roundtrip_pickle(snap: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = pickle.loads(pickle.dumps(snap, protocol=pickle.HIGHEST_PROTOCOL))
    return out


@pytest.mark.parametrize(
    ("seed", "profile"),
    [
        (1, NARROW),
        (2, NARROW),
        (3, NARROW),
        (4, SPARSE),
        (5, CHURN),
        (6, CHURN),
    ],
)
@pytest.mark.parametrize("transport", [copy.deepcopy, roundtrip_json, roundtrip_pickle])
def test_restore_at_a_random_midpoint_then_replay_is_byte_identical(
    seed: int, profile: Profile, transport: Any
) -> None:
    cmds = stream(seed, 2_500, profile)
    cut = random.Random(seed).randrange(1, len(cmds))

    whole = fresh()
    expected_head = apply_all(whole, cmds[:cut])
    expected_tail = apply_all(whole, cmds[cut:])

    first = fresh()
    assert apply_all(first, cmds[:cut]) == expected_head
    snap = snapshot(first)
    frozen = to_bytes(snap)
    second = fresh()
    restore(second, transport(snap))
    assert state_hash(second) == state_hash(first)
    assert apply_all(second, cmds[cut:]) == expected_tail
    assert state_hash(second) == state_hash(whole)
    assert to_bytes(snapshot(second)) == to_bytes(snapshot(whole))
    assert to_bytes(snap) == frozen  # neither the engine nor restore kept references into the snapshot


@pytest.mark.parametrize("kind", ["passive order", "cancel"])
def test_restore_gives_the_same_bbo_as_the_original_engine(kind: str) -> None:
    """Minimal case: one resting bid, restore, then a command whose book event reuses the cached BBO."""
    original = fresh()
    original.apply(NewOrder(S, "a", BUY, LIMIT, "gtc", 10_000, 20), 1, 0)
    original.apply(NewOrder(S, "a", BUY, LIMIT, "gtc", 9_000, 20), 2, 0)
    restored = fresh()
    restore(restored, snapshot(original))
    if kind == "passive order":
        cmd: Command = NewOrder(S, "b", BUY, LIMIT, "gtc", 9_990, 20)
    else:
        cmd = Cancel(S, "a", 2)
    want = original.apply(cmd, 3, 0)
    assert want[-1][4] == (10_000, 20, None, 0)
    assert restored.apply(cmd, 3, 0) == want


def test_the_same_stream_twice_gives_byte_identical_output() -> None:
    cmds = stream(11, 4_000, NARROW)
    a, b = fresh(), fresh()
    assert apply_all(a, cmds) == apply_all(b, cmds)
    assert state_hash(a) == state_hash(b)
    assert to_bytes(snapshot(a)) == to_bytes(snapshot(b))


def test_snapshot_pickle_roundtrip_is_exact() -> None:
    engine = fresh()
    apply_all(engine, stream(12, 1_500, NARROW))
    snap = snapshot(engine)
    assert snap["books"][S]["bids"] or snap["books"][S]["asks"]
    back = roundtrip_pickle(snap)
    assert back == snap and to_bytes(back) == to_bytes(snap)
    other = fresh()
    restore(other, back)
    assert snapshot(other) == snap and state_hash(other) == state_hash(engine)


def test_snapshot_is_plain_data() -> None:
    engine = fresh()
    apply_all(engine, stream(13, 500, NARROW))

    def check(x: Any) -> None:
        if isinstance(x, dict):
            for k, v in x.items():
                assert type(k) is str
                check(v)
        elif isinstance(x, list):
            for v in x:
                check(v)
        else:
            assert x is None or type(x) in (int, str)

    check(snapshot(engine))


def test_snapshot_is_detached_from_the_engine() -> None:
    engine = fresh()
    cmds = stream(14, 1_000, NARROW)
    apply_all(engine, cmds[:500])
    snap = snapshot(engine)
    before = to_bytes(snap)
    apply_all(engine, cmds[500:])
    assert to_bytes(snap) == before


def test_state_hash_ignores_lazily_cancelled_entries() -> None:
    """Equal resting orders and counters = equal hash, however the engine got there: `a` keeps a dead
    queue entry in front of order 2, `b` dropped a whole level instead."""
    a, b = fresh(), fresh()
    a.apply(NewOrder(S, "x", BUY, LIMIT, "gtc", 10_000, 10), 1, 0)
    a.apply(NewOrder(S, "y", BUY, LIMIT, "gtc", 10_000, 20), 2, 0)
    a.apply(Cancel(S, "x", 1), 3, 0)
    b.apply(NewOrder(S, "x", BUY, LIMIT, "gtc", 9_000, 20), 1, 0)
    b.apply(NewOrder(S, "y", BUY, LIMIT, "gtc", 10_000, 20), 2, 0)
    b.apply(Cancel(S, "x", 1), 3, 0)
    assert snapshot(a) == snapshot(b) and state_hash(a) == state_hash(b)


def test_restore_replaces_whatever_the_engine_held() -> None:
    cmds = stream(15, 2_000, NARROW)
    engine = fresh()
    apply_all(engine, cmds[:800])
    snap = snapshot(engine)
    apply_all(engine, cmds[800:])  # move on, then go back
    restore(engine, snap)
    clean = fresh()
    restore(clean, snap)
    assert state_hash(engine) == state_hash(clean)
    assert apply_all(engine, cmds[800:]) == apply_all(clean, cmds[800:])


def test_restore_keeps_last_seq() -> None:
    engine = fresh()
    apply_all(engine, stream(16, 200, NARROW))
    other = fresh()
    restore(other, snapshot(engine))
    with pytest.raises(ValueError):
        other.apply(NewOrder(S, "a", BUY, LIMIT, "gtc", 10_000, 10), engine.last_seq, 0)


def test_restore_of_an_engine_with_more_symbols_gives_the_extra_ones_empty_books() -> None:
    small = Engine([Instrument(S)])
    small.apply(NewOrder(S, "a", BUY, LIMIT, "gtc", 10_000, 10), 1, 0)
    big = fresh()
    big.apply(NewOrder("ETH-USDT", "a", BUY, LIMIT, "gtc", 10_000, 10), 1, 0)
    restore(big, snapshot(small))
    snap = snapshot(big)
    assert snap["books"]["ETH-USDT"] == {
        "trade_seq": 0,
        "book_seq": 0,
        "bids": [],
        "asks": [],
        "last_price": None,
        "stops": [],
        "icebergs": [],
        "gtd": [],
    }
    assert snap["books"][S] == snapshot(small)["books"][S]


@pytest.mark.parametrize("version", [0, None, "1", "2", FORMAT_VERSION + 1])
def test_restore_rejects_unknown_versions(version: Any) -> None:
    engine = fresh()
    snap = snapshot(engine)
    snap["version"] = version
    target = fresh()
    target.apply(NewOrder(S, "a", BUY, LIMIT, "gtc", 10_000, 10), 1, 0)
    before = state_hash(target)
    with pytest.raises(ValueError, match="version"):
        restore(target, snap)
    assert state_hash(target) == before


def test_restore_rejects_a_missing_version() -> None:
    snap = snapshot(fresh())
    del snap["version"]
    with pytest.raises(ValueError):
        restore(fresh(), snap)


def test_restore_rejects_unknown_symbols() -> None:
    engine = fresh()
    snap = snapshot(engine)
    snap["books"]["DOGE-USDT"] = {"trade_seq": 0, "book_seq": 0, "bids": [], "asks": []}
    target = fresh()
    target.apply(NewOrder(S, "a", BUY, LIMIT, "gtc", 10_000, 10), 1, 0)
    before = state_hash(target)
    with pytest.raises(ValueError, match="DOGE-USDT"):
        restore(target, snap)
    assert state_hash(target) == before


def test_state_hash_changes_with_any_state() -> None:
    engine = fresh()
    hashes = {state_hash(engine)}
    engine.apply(NewOrder(S, "a", BUY, LIMIT, "gtc", 10_000, 10), 1, 0)
    hashes.add(state_hash(engine))
    engine.apply(NewOrder(S, "a", BUY, MARKET, IOC, None, 10), 2, 0)  # only last_seq changes
    hashes.add(state_hash(engine))
    engine.apply(NewOrder(S, "b", SELL, LIMIT, IOC, 10_000, 5 * 2), 3, 0)  # a trade
    hashes.add(state_hash(engine))
    assert len(hashes) == 4


# Serialisation at the instruments' limits ------------------------------------------------------
def test_events_of_a_large_valid_trade_serialise() -> None:
    """Fee units exceed 64 bits on large valid trades (100 BTC at 100000.00 USDT: taker fee 2e19
    units); the events-stream codec must still round-trip them exactly."""
    engine = fresh()
    inst = default_instruments()[S]
    price = inst.price_to_ticks("100000.00")
    qty = inst.qty_to_lots("100")
    engine.apply(NewOrder(S, "a", SELL, LIMIT, "gtc", price, qty), 1, 0)
    events = engine.apply(NewOrder(S, "b", BUY, MARKET, IOC, None, qty), 2, 0)
    assert events[1][0] == "trade" and events[1][18] == 2 * 10**19
    assert decode_events(encode_events(events)) == json.loads(json.dumps(events))


def test_rejected_events_always_serialise() -> None:
    engine = fresh()
    events = engine.apply(Cancel(S, "a", 2**70), 1, 0)
    assert events == [("rejected", S, "cancel", None, "a", None, "UNKNOWN_ORDER")]
    orjson.dumps(events)


# Balances and their units -----------------------------------------------------------------------
def funded() -> Engine:
    """Balances on, a deposit of each asset, a resting buy (a hold) and a trade (fees)."""
    engine = Engine(default_instruments().values(), risk=True)
    cmds: list[Command] = [
        Deposit("b", "USDT", 12_345_678 * 10**10 + 5),  # 1,234,567.8000000005 USDT
        Deposit("s", "BTC", 3 * 10**5),
        NewOrder(S, "b", BUY, LIMIT, "gtc", 5_000_000, 70_000),
        NewOrder(S, "s", SELL, LIMIT, "gtc", 4_999_999, 30_001),
    ]
    for i, cmd in enumerate(cmds, 1):
        assert engine.apply(cmd, i, i)[0][0] in ("funded", "accepted")
    return engine


def test_a_snapshot_records_its_balance_units() -> None:
    snap = snapshot(funded())
    assert snap["version"] == FORMAT_VERSION == 4
    assert snap["asset_scales"] == {"BTC": 5, "ETH": 5, "USDT": 10}


def test_a_version_3_snapshot_restores_its_legacy_units_exactly() -> None:
    """Version 3 counted USDT in fee units (15 places with the defaults): 10^5 of them per unit now."""
    engine = funded()
    snap = roundtrip_json(snapshot(engine))
    old = copy.deepcopy(snap)
    old["version"] = 3
    del old["asset_scales"]
    for assets in old["balances"].values():
        if "USDT" in assets:
            assets["USDT"] = [v * 10**5 for v in assets["USDT"]]
    again = Engine(default_instruments().values(), risk=True)
    restore(again, old)
    assert state_hash(again) == state_hash(engine)


def test_a_snapshot_restores_under_instruments_that_need_finer_units() -> None:
    """A taker fee of 0.015 % needs 5 places beyond tick x lot: USDT goes from 10 to 12 places."""
    snap = roundtrip_json(snapshot(funded()))
    finer = [Instrument(S, taker_fee=Decimal("0.00015")), Instrument("ETH-USDT")]
    engine = Engine(finer, risk=True)
    assert engine.ledger is not None and engine.ledger.scales["USDT"] == 12
    restore(engine, snap)
    got = engine.ledger.balances()
    for account, assets in snap["balances"].items():
        for asset, pair in assets.items():
            factor = 100 if asset == "USDT" else 1
            assert got[account][asset] == [v * factor for v in pair]


def test_a_snapshot_finer_than_the_engines_units_is_refused() -> None:
    snap = roundtrip_json(snapshot(funded()))
    snap["asset_scales"]["USDT"] = 11  # its last USDT digit would be lost
    with pytest.raises(ValueError, match="finer than 10 places"):
        restore(Engine(default_instruments().values(), risk=True), snap)
    snap["asset_scales"] = {"USDT": -1}
    with pytest.raises(ValueError, match="asset scales"):
        restore(Engine(default_instruments().values(), risk=True), snap)
