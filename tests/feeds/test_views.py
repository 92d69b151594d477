"""BookView against the real engine: a snapshot plus the rendered l2_updates of a random command flow
must rebuild exactly the engine's book; gaps unsync the view, duplicates are ignored."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import orjson
import pytest

from services.bench.flow import SYMBOL, FlowConfig, FlowGenerator
from services.feeds.views import Applied, BookView
from services.matcher.engine import Engine
from shared.instruments import Instrument
from shared.wire import Rendered, l2_snapshot, render

INST = Instrument(SYMBOL)
ALL = 10**9  # "every level" for OrderBook.depth


class Flow:
    """A real engine fed a seeded random flow; yields the md lines each command renders."""

    def __init__(self, seed: int, commands: int) -> None:
        self.gen = FlowGenerator(FlowConfig(commands=commands, seed=seed), INST)
        self.steps = self.gen.flow()
        self.engine = Engine([INST])
        self.book = self.engine.books[SYMBOL]

    def updates(self, n: int) -> list[dict[str, Any]]:
        """The next n commands' l2_update messages (parsed from the exact bytes the matcher publishes)."""
        out: list[dict[str, Any]] = []
        for _ in range(n):
            cmd, seq = next(self.steps)
            rendered = Rendered()
            render(self.engine.apply(cmd, seq, seq), INST, seq, rendered)
            out.extend(orjson.loads(line) for line in rendered.md)
        return out

    def snapshot(self) -> dict[str, Any]:
        bids, asks = self.book.depth(ALL)
        # Through JSON, as a feed receives it (tuples become lists).
        msg = l2_snapshot(SYMBOL, self.book.book_seq, bids, asks, INST)
        snap: dict[str, Any] = orjson.loads(orjson.dumps(msg))
        return snap

    def depth(self, n: int) -> tuple[list[list[str]], list[list[str]]]:
        snap = self.snapshot()
        return snap["bids"][:n], snap["asks"][:n]


def served(view: BookView) -> dict[str, Any]:
    """The view's snapshot without its checksum (tests/feeds/test_checksum.py checks that)."""
    snap = view.snapshot()
    del snap["checksum"]
    return snap


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_snapshot_plus_updates_rebuild_the_engine_book(seed: int) -> None:
    flow = Flow(seed, 6000)
    flow.updates(500)  # the feed joins a book that already has history
    view = BookView(INST)
    assert view.apply_snapshot(flow.snapshot())
    assert view.synced and view.seq == flow.book.book_seq
    for round_ in range(10):
        for msg in flow.updates(500):
            assert view.apply_update(msg) is Applied.OK, msg
        assert served(view) == flow.snapshot(), f"round {round_}"
        bids, asks = flow.depth(10)
        depth = view.depth(10)
        assert (depth["bids"], depth["asks"], depth["seq"]) == (bids, asks, flow.book.book_seq)
        assert depth["bbo"] == {"bid": bids[0] if bids else None, "ask": asks[0] if asks else None}


def test_gap_unsyncs_until_a_snapshot() -> None:
    flow = Flow(7, 3000)
    flow.updates(200)
    view = BookView(INST)
    view.apply_snapshot(flow.snapshot())
    updates = flow.updates(50)
    for msg in updates[:10]:
        assert view.apply_update(msg) is Applied.OK
    # updates[10] is lost on the way: the next one is a gap, and nothing is applied until a snapshot.
    assert view.apply_update(updates[11]) is Applied.GAP
    assert not view.synced
    assert view.apply_update(updates[12]) is Applied.UNSYNCED
    assert view.snapshot()["bids"] == [] and view.snapshot()["asks"] == []  # nothing stale to serve
    assert view.apply_snapshot(flow.snapshot())
    assert view.synced and served(view) == flow.snapshot()
    for msg in flow.updates(100):
        assert view.apply_update(msg) is Applied.OK
    assert served(view) == flow.snapshot()


def test_duplicates_are_ignored() -> None:
    flow = Flow(11, 2000)
    view = BookView(INST)
    view.apply_snapshot(flow.snapshot())
    updates = flow.updates(300)
    for msg in updates:
        assert view.apply_update(msg) is Applied.OK
    before = view.snapshot()
    view.changed = False
    for msg in updates[-20:]:  # a replaying matcher republishes what we already have
        assert view.apply_update(msg) is Applied.DUPLICATE
    assert view.snapshot() == before and not view.changed and view.synced


def test_snapshot_at_our_seq_is_a_no_op_and_a_new_one_wins() -> None:
    flow = Flow(5, 2000)
    flow.updates(100)
    view = BookView(INST)
    assert view.apply_snapshot(flow.snapshot())  # first one: clients need it
    assert not view.apply_snapshot(flow.snapshot())  # another feed's request answered: nothing to do
    flow.updates(30)
    assert view.apply_snapshot(flow.snapshot())  # we had missed updates: adopt
    assert served(view) == flow.snapshot()
    older = {**flow.snapshot(), "seq": 1, "bids": [["1.00", "0.00010"]], "asks": []}
    assert view.apply_snapshot(older)  # the matcher went back (reset): its word is the truth
    assert view.seq == 1 and view.snapshot()["bids"] == [["1.00", "0.00010"]]


def test_depth_top_n_and_zero_totals() -> None:
    view = BookView(INST)
    view.apply_snapshot({"type": "l2_snapshot", "symbol": SYMBOL, "seq": 5, "bids": [], "asks": []})
    assert view.depth(10)["bbo"] == {"bid": None, "ask": None}
    changes = [["buy", f"{100 + i}.00", "1.00000"] for i in range(20)]
    changes += [["sell", f"{200 + i}.50", "2.00000"] for i in range(20)]
    bbo = {"bid": ["119.00", "1.00000"], "ask": ["200.50", "2.00000"]}
    assert view.apply_update({"type": "l2_update", "seq": 6, "changes": changes, "bbo": bbo}) is Applied.OK
    depth = view.depth(3)
    assert depth["bids"] == [["119.00", "1.00000"], ["118.00", "1.00000"], ["117.00", "1.00000"]]
    assert depth["asks"] == [["200.50", "2.00000"], ["201.50", "2.00000"], ["202.50", "2.00000"]]
    assert len(view.depth(1000)["bids"]) == 20
    # "0", "0.00000" and "0E-5" all remove a level (numeric comparison, not string).
    removals = [["buy", "119.00", "0"], ["buy", "118.00", "0.00000"], ["sell", "200.50", "0E-5"]]
    bbo = {"bid": ["117.00", "1.00000"], "ask": ["201.50", "2.00000"]}
    assert view.apply_update({"type": "l2_update", "seq": 7, "changes": removals, "bbo": bbo}) is Applied.OK
    assert view.depth(1)["bbo"] == bbo
    # Prices sort as numbers, not strings: 99.99 is below 100.00.
    add = [["buy", "99.99", "1.00000"], ["buy", "1000.00", "3.00000"]]
    bbo = {"bid": ["1000.00", "3.00000"], "ask": ["201.50", "2.00000"]}
    assert view.apply_update({"type": "l2_update", "seq": 8, "changes": add, "bbo": bbo}) is Applied.OK
    bids = view.snapshot()["bids"]
    assert bids[0] == ["1000.00", "3.00000"] and bids[-1] == ["99.99", "1.00000"]


def test_inconsistent_update_unsyncs() -> None:
    view = BookView(INST)
    view.apply_snapshot({"type": "l2_snapshot", "seq": 1, "bids": [["10.00", "1.00000"]], "asks": []})
    wrong_bbo = {"bid": ["11.00", "1.00000"], "ask": None}
    assert view.apply_update({"seq": 2, "changes": [], "bbo": wrong_bbo}) is Applied.GAP
    assert not view.synced
    view.apply_snapshot({"type": "l2_snapshot", "seq": 2, "bids": [], "asks": []})
    assert view.apply_update({"seq": 3, "changes": [["buy", "10.001", "1"]]}) is Applied.GAP  # off the grid
    view.apply_snapshot({"type": "l2_snapshot", "seq": 3, "bids": [], "asks": []})
    assert view.apply_update({"seq": 4, "changes": "nope"}) is Applied.GAP


def test_views_module_is_pure() -> None:
    code = (
        "import sys, services.feeds.views; "
        "bad = {'asyncio', 'socket', 'redis', 'websockets'} & set(sys.modules); "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=30)
