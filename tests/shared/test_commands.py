"""shared.commands: the list form every command travels in (the stream codec's payload), and the old
import path that users of the core as a library keep."""

from __future__ import annotations

import pytest

from shared import commands as c
from shared.commands import (
    BUY,
    GTC,
    LIMIT,
    MARKET,
    SELL,
    STOP_LIMIT,
    Amend,
    Cancel,
    CancelAll,
    CoreCommand,
    Deposit,
    Grant,
    NewOrder,
    Tick,
    Withdraw,
    command_from_list,
    command_to_list,
)

EVERY_KIND: list[CoreCommand] = [
    NewOrder("BTC-USDT", "alice", BUY, LIMIT, GTC, 3_000_000, 5, "c1"),
    NewOrder("BTC-USDT", "alice", SELL, STOP_LIMIT, GTC, 2_900_000, 5, None, False, "cancel_both", 2_950_000),
    NewOrder("BTC-USDT", "bob", BUY, MARKET, "ioc", None, None, quote_quantity=1_000),
    Cancel("BTC-USDT", "alice", 7),
    Cancel("BTC-USDT", "alice", None, "c1"),
    Amend("BTC-USDT", "alice", 7, None, 3_000_100, 4),
    Tick("BTC-USDT"),
    CancelAll(None, "alice", "disconnect"),
    Deposit("alice", "USDT", 10**17, "r1"),
    Withdraw("alice", "BTC", 5),
    Grant("carol", (("USDT", 10), ("BTC", 2))),
]


@pytest.mark.parametrize("cmd", EVERY_KIND, ids=lambda cmd: type(cmd).__name__)
def test_every_kind_comes_back_from_its_list_form_equal_and_of_its_own_type(cmd: CoreCommand) -> None:
    data = command_to_list(cmd)
    assert data[0] == type(cmd).__name__
    back = command_from_list(data)
    assert type(back) is type(cmd) and back == cmd


def test_a_plain_order_travels_without_the_later_fields_and_comes_back_with_their_defaults() -> None:
    plain = EVERY_KIND[0]
    data = command_to_list(plain)
    fields = ["BTC-USDT", "alice", BUY, LIMIT, GTC, 3_000_000, 5, "c1", False, c.STP_CANCEL_TAKER]
    assert data == ["NewOrder", *fields]
    assert command_from_list(data).stop_price is None


def test_a_stop_order_keeps_its_stop_price_and_drops_only_the_trailing_nones() -> None:
    data = command_to_list(EVERY_KIND[1])
    assert data[-1] == 2_950_000 and len(data) == 12


def test_an_unknown_kind_is_refused() -> None:
    with pytest.raises(KeyError):
        command_from_list(["Launch", "BTC-USDT"])


def test_the_core_s_old_import_paths_name_the_same_commands_and_events() -> None:
    from services.matcher import commands as old_commands
    from services.matcher import events as old_events
    from shared import events as ev

    for name in ("NewOrder", "Cancel", "Amend", "CancelAll", "Deposit", "Withdraw", "Grant", "Tick", "BUY"):
        assert getattr(old_commands, name) is getattr(c, name)
    for name in ("ACCEPTED", "TRADE", "BALANCE", "T_PRICE", "BAL_HELD", "Event"):
        assert getattr(old_events, name) is getattr(ev, name)
