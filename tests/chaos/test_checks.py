"""The soak's end checks on hand-made data: a replay of a tiny stream, and the report and ack checks
finding exactly the anomalies planted in what a trader received."""

from __future__ import annotations

import copy

from services.chaos import checks
from services.chaos.flow import OrderFlow, Trader
from shared.commands import BUY, GTC, LIMIT, SELL, Cancel, Command, NewOrder
from shared.instruments import Instrument, default_instruments
from shared.stream import encode

INST: Instrument = default_instruments()["BTC-USDT"]
S = INST.symbol


def tapped(cmds: list[Command]) -> list[tuple[str, bytes]]:
    return [(f"1000-{i}", encode(cmd, 0)) for i, cmd in enumerate(cmds)]


def stream() -> list[tuple[str, bytes]]:
    """ann rests two sells, bob takes both and rests the rest of his buy; ann's cancels then name a
    filled order and an unknown one (two matcher rejects)."""
    return tapped(
        [
            NewOrder(S, "ann", SELL, LIMIT, GTC, 3_000_000, 100, "a1"),
            NewOrder(S, "ann", SELL, LIMIT, GTC, 3_000_001, 100, "a2"),
            NewOrder(S, "bob", BUY, LIMIT, GTC, 3_000_001, 250, "b1"),
            Cancel(S, "ann", None, "a2"),
            Cancel(S, "ann", None, "nope"),
        ]
    )


def trader(account: str) -> Trader:
    return Trader(account, OrderFlow(1, account, [INST]), [], 0)


def run_checks(t: Trader, rep: checks.Replay) -> list[str]:
    found = checks.Anomalies()
    checks.check_reports(t, {S: rep}, found, checks.ReportCounts())
    return [kind for kind, _ in found.items]


def test_the_replay_numbers_reports_and_trades() -> None:
    rep = checks.replay(INST, stream())
    assert rep.trade_ids == [1, 2] and rep.trade_seq == 2
    ids = sorted(m["exec_id"] for msgs in rep.execs.values() for m in msgs)
    assert ids == list(range(1, rep.exec_count + 1))
    assert [m["exec_type"] for m in rep.execs["bob"]] == ["new", "trade", "trade"]
    assert [m["type"] for m in rep.execs["ann"][-2:]] == ["reject", "reject"]
    assert rep.book() == ([["30000.01", "0.00050"]], [])


def test_exactly_the_replays_reports_are_clean() -> None:
    rep = checks.replay(INST, stream())
    t = trader("ann")
    t.live = copy.deepcopy(rep.execs["ann"][:3])
    t.resumed = copy.deepcopy(rep.execs["ann"][2:])  # the overlap is expected after a resume
    t.resume_chains = [[m["exec_id"] for m in t.resumed]]
    assert run_checks(t, rep) == []


def test_a_report_delivered_twice_live_is_found() -> None:
    rep = checks.replay(INST, stream())
    t = trader("bob")
    t.live = copy.deepcopy(rep.execs["bob"] + rep.execs["bob"][1:2])
    assert run_checks(t, rep) == ["report delivered twice"]


def test_a_missing_or_altered_report_is_found() -> None:
    rep = checks.replay(INST, stream())
    t = trader("bob")
    t.live = copy.deepcopy(rep.execs["bob"][:-1])
    assert run_checks(t, rep) == ["report missing after catch-up"]
    t.live = copy.deepcopy(rep.execs["bob"])
    t.live[1]["filled_quantity"] = "0.00099"
    assert run_checks(t, rep) == ["report differs from the replay"]


def test_an_executions_chain_that_goes_back_is_found() -> None:
    rep = checks.replay(INST, stream())
    t = trader("ann")
    t.resumed = copy.deepcopy(rep.execs["ann"])
    t.resume_chains = [[m["exec_id"] for m in reversed(t.resumed)]]
    assert run_checks(t, rep) == ["executions answer out of order or repeated"]


def test_an_acked_order_missing_from_the_stream_is_found() -> None:
    entries = stream()
    t = trader("ann")
    t.acked_new = {(S, "1000-0"), (S, "1000-1"), (S, "1000-9")}
    found = checks.Anomalies()
    assert checks.check_acked([t], {S: {i for i, _ in entries}}, found) == 3
    assert found.items == [("acked order lost", "ann BTC-USDT 1000-9")]
