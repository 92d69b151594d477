"""The orders stream entry codec: funding amounts travel as decimal text, read into the reader's units."""

from __future__ import annotations

from decimal import Decimal

import orjson
import pytest

from services.matcher.engine import Engine
from shared.commands import CancelAll, Deposit, Grant, NewOrder, Withdraw
from shared.instruments import LEGACY_FEE_PLACES, Instrument, asset_scales, default_instruments
from shared.stream import decode, encode

SCALES = asset_scales(default_instruments().values())  # BTC 5, ETH 5, USDT 10
LEGACY = asset_scales(default_instruments().values(), LEGACY_FEE_PLACES)  # USDT 15


def entry(cmd: object, recv_ns: int = 7) -> dict[bytes, bytes]:
    return {b"d": encode(cmd, recv_ns, SCALES)}  # type: ignore[arg-type]


def test_funding_amounts_are_decimal_text_on_the_stream() -> None:
    data = encode(Deposit("alice", "USDT", 10_005 * 10**9, "d-1"), 7, SCALES)
    assert orjson.loads(data) == [["Deposit", "alice", "USDT", "1000.5", "d-1"], 7]
    data = encode(Grant("bob", (("USDT", 10**16), ("BTC", 1))), 7, SCALES)
    assert orjson.loads(data) == [["Grant", "bob", [["USDT", "1000000"], ["BTC", "0.00001"]]], 7]


def test_a_funding_command_cannot_be_written_without_the_scales() -> None:
    with pytest.raises(ValueError, match="scales"):
        encode(Withdraw("alice", "BTC", 5), 0)
    assert encode(CancelAll("BTC-USDT", "alice", "user"), 0)  # no amounts: no scales needed


@pytest.mark.parametrize(
    "cmd",
    [
        Deposit("alice", "USDT", 1, None),
        Withdraw("alice", "BTC", 123_456_789, "w"),
        Grant("bob", (("USDT", 10**16), ("BTC", 10**7), ("ETH", 10**8))),
        NewOrder("BTC-USDT", "alice", "buy", "limit", "gtc", 5_000_000, 3),
    ],
)
def test_commands_come_back_as_written(cmd: object) -> None:
    got, recv_ns = decode(entry(cmd), SCALES, LEGACY)
    want = Grant(cmd.account, [list(p) for p in cmd.amounts]) if isinstance(cmd, Grant) else cmd
    assert got == want and recv_ns == 7


def test_the_reader_takes_the_amount_into_its_own_units() -> None:
    """Instruments that need finer USDT (a 0.015 % fee: 12 places) read the same amount."""
    finer = asset_scales([Instrument("BTC-USDT", taker_fee=Decimal("0.00015"))])
    got, _ = decode(entry(Deposit("alice", "USDT", 25 * 10**9)), finer)
    assert got == Deposit("alice", "USDT", 25 * 10**11)


def test_integer_amounts_are_legacy_units() -> None:
    """Entries written before amounts were text hold units of the legacy scales, beyond 64 bits too."""
    deposit = b'[["Deposit","alice","USDT",10000000000000000000000,null],1]'
    assert decode({b"d": deposit}, SCALES, LEGACY)[0] == Deposit("alice", "USDT", 10**17)  # 10M USDT
    grant = b'[["Grant","bob",[["USDT",5000000000000000000000],["BTC",7]]],1]'
    assert decode({b"d": grant}, SCALES, LEGACY)[0] == Grant("bob", [["USDT", 5 * 10**16], ["BTC", 7]])


def test_what_the_reader_cannot_take_is_refused_by_the_core() -> None:
    """Off the grid, an inexact legacy amount, an unknown asset, or no scales (balances off): the
    command still arrives, and the core refuses it without touching any balance."""
    cases = [
        (b'[["Deposit","a","USDT","0.00000000001",null],1]', SCALES, "INVALID_AMOUNT"),
        (b'[["Deposit","a","USDT",123,null],1]', SCALES, "INVALID_AMOUNT"),  # 123e-15 USDT
        (b'[["Deposit","a","XRP","5",null],1]', SCALES, "UNKNOWN_ASSET"),
        (b'[["Grant","a",[["USDT","1"],["BTC","0.000001"]]],1]', SCALES, "INVALID_AMOUNT"),
    ]
    for raw, scales, code in cases:
        cmd, _ = decode({b"d": raw}, scales, LEGACY)
        assert cmd is not None
        engine = Engine(default_instruments().values(), risk=True)
        (event,) = engine.apply(cmd, 1, 1)
        assert event[0] == "rejected" and event[6] == code, (raw, event)
        assert engine.ledger is not None and engine.ledger.balances() == {}
    cmd, _ = decode({b"d": b'[["Deposit","a","USDT","5",null],1]'})  # a matcher with balances off
    assert cmd == Deposit("a", "USDT", "5")  # type: ignore[arg-type]
    (event,) = Engine(default_instruments().values()).apply(cmd, 1, 1)
    assert event[6] == "BALANCES_DISABLED"


def test_the_raw_reply_form_and_entries_that_are_not_ours() -> None:
    cmd = NewOrder("BTC-USDT", "alice", "buy", "limit", "gtc", 5_000_000, 3)
    data = encode(cmd, 9)
    assert decode([b"d", data]) == (cmd, 9)  # a raw RESP reply's [field, value]
    assert decode([b"x", b"1", b"d", data]) == (cmd, 9)  # other fields around it
    assert decode({"d": data.decode()}) == (cmd, 9)  # redis-py with decoded responses
    assert decode([b"x", data]) == (None, 0)
    assert decode({b"d": b"not json"}) == (None, 0)
    assert decode({b"d": b'[["NoSuchCommand"],1]'}) == (None, 0)
