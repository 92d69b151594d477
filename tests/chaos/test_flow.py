"""The soak's order flow: the same messages for a seed and account, all valid, cancels naming the
account's own earlier limit orders."""

from __future__ import annotations

from collections import Counter

from services.chaos.flow import OrderFlow, is_report
from services.gateway.validation import parse_order
from shared.instruments import default_instruments


def messages(seed: int, account: str, n: int) -> list[dict[str, object]]:
    insts = default_instruments()
    flow = OrderFlow(seed, account, [insts["BTC-USDT"], insts["ETH-USDT"]])
    return [flow.next() for _ in range(n)]


def test_same_seed_and_account_same_messages() -> None:
    assert messages(5, "chaos1", 500) == messages(5, "chaos1", 500)
    assert messages(5, "chaos1", 500) != messages(5, "chaos2", 500)
    assert messages(5, "chaos1", 500) != messages(6, "chaos1", 500)


def test_every_message_is_a_valid_command_of_the_mix() -> None:
    insts = default_instruments()
    msgs = messages(11, "chaos3", 3000)
    for msg in msgs:
        cmd = parse_order(msg, "chaos3", insts)
        assert not isinstance(cmd, dict), (msg, cmd)  # a dict is the gateway's reject
    kinds = Counter((m["op"], m.get("type"), m.get("tif")) for m in msgs)
    assert kinds[("cancel", None, None)] > 300
    assert kinds[("new", "limit", None)] > 1500
    assert kinds[("new", "market", None)] > 50
    assert kinds[("new", "limit", "ioc")] > 50 and kinds[("new", "limit", "fok")] > 50


def test_cancels_name_own_earlier_limits_once() -> None:
    msgs = messages(2, "chaos4", 2000)
    limits: set[tuple[object, object]] = set()
    cancelled: set[tuple[object, object]] = set()
    for m in msgs:
        key = (m["symbol"], m["client_order_id"])
        if m["op"] == "cancel":
            assert key in limits and key not in cancelled, m
            cancelled.add(key)
        elif m.get("type") == "limit" and "tif" not in m:
            limits.add(key)
    assert len({m["client_order_id"] for m in msgs if m["op"] == "new"}) == sum(
        m["op"] == "new" for m in msgs
    )


def test_reports_are_matcher_messages_only() -> None:
    assert is_report({"type": "execution", "symbol": "BTC-USDT"})
    assert is_report({"type": "reject", "op": "cancel", "symbol": "BTC-USDT", "code": "UNKNOWN_ORDER"})
    assert not is_report({"type": "reject", "op": "new", "code": "INVALID_PRICE"})  # the gateway's own
    assert not is_report({"type": "ack", "op": "new", "symbol": "BTC-USDT"})
