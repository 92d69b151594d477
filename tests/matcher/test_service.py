"""The matcher against a real Redis: exact published messages, events stream, progress, snapshot requests,
checkpoints and trimming, and the `cme matcher` process (metrics, SIGTERM)."""

from __future__ import annotations

import asyncio
import re
import signal
import threading
import time
import urllib.request
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any, cast

import orjson
import pytest
import redis

from services.matcher import checkpoint as ck
from services.matcher.batch import SAMPLE_EVERY
from services.matcher.engine import Engine
from services.matcher.service import COMMIT_ENTRIES, Matcher, SymbolState, durable_events, split_balances
from shared import keys
from shared.commands import Cancel, Command, Deposit, NewOrder
from shared.events import BALANCE, TRADE
from shared.ids import entry_to_seq
from shared.instruments import Instrument
from tests.matcher import (
    BTC,
    ETH,
    INSTRUMENTS,
    Collector,
    Flow,
    Process,
    Record,
    add_flow,
    append,
    await_until,
    config,
    expected,
    in_process,
    progress,
    split_md,
    stream_events,
    stream_ids,
    wait_until,
)

pytestmark = pytest.mark.timeout(60)


@pytest.fixture()
def collector(redis_url: str) -> Iterator[Collector]:
    c = Collector(redis_url)
    yield c
    c.close()


def _applied(r: redis.Redis, symbol: str) -> int:
    return int(progress(r, symbol).get("applied", 0))


def _json(x: Any) -> Any:
    return orjson.loads(orjson.dumps(x))  # tuples -> lists, as the events stream has them


async def test_a_big_read_commits_in_bounded_scripts(
    r: redis.Redis, collector: Collector, redis_url: str, tmp_path: Path
) -> None:
    # One read of 2.5 commits' worth of entries: three fenced commits, each with its own exec log entry,
    # exec ids running on across them, progress at the last entry.
    n = 2 * COMMIT_ENTRIES + COMMIT_ENTRIES // 2
    cmds: list[tuple[str, Command | bytes]] = [
        (BTC, NewOrder(BTC, "alice", "buy", "limit", "gtc", 2_000_000 + i, 1, f"a{i}")) for i in range(n)
    ]
    ids = append(r, cmds)
    async with in_process(config(redis_url, tmp_path, batch=10 * COMMIT_ENTRIES)) as run:
        await await_until(lambda: _applied(r, BTC) == n, what="applied")
        await await_until(lambda: collector.count(BTC, "exec") == 3, what="exec payloads")
        assert await run.stop() == 0
    log = cast(list[tuple[bytes, dict[bytes, bytes]]], r.xrange(keys.exec_log(BTC)))
    ends = [COMMIT_ENTRIES, 2 * COMMIT_ENTRIES, n]
    assert [entry_id for entry_id, _ in log] == [b"%d-0" % e for e in ends]
    assert r.xlen(keys.events(BTC)) == 3
    exec_ids = [orjson.loads(line.split(b" ", 1)[1])["exec_id"] for line in collector.lines(BTC, "exec")]
    assert exec_ids == list(range(1, n + 1))
    assert progress(r, BTC)["last_id"] == ids[-1]


async def test_one_batch_publishes_exact_messages(
    r: redis.Redis, collector: Collector, redis_url: str, tmp_path: Path
) -> None:
    cmds: list[tuple[str, Command | bytes]] = [
        (BTC, NewOrder(BTC, "alice", "buy", "limit", "gtc", 3_000_000, 100, "a1")),
        (BTC, NewOrder(BTC, "bob", "sell", "limit", "gtc", 2_999_900, 40, "b1")),
        (BTC, NewOrder(BTC, "carol", "sell", "limit", "gtc", 3_000_100, 5, None)),
    ]
    ids = append(r, cmds)  # appended before the start: one XREAD, one batch, one commit
    async with in_process(config(redis_url, tmp_path)) as run:
        await await_until(lambda: _applied(r, BTC) == 3, what="applied")
        await await_until(lambda: collector.count(BTC, "exec") == 1, what="exec payload")
        assert await run.stop() == 0

    # One PUBLISH per channel for the batch (md also carries the start-up snapshot).
    assert [collector.count(BTC, k) for k in ("md", "trades", "exec")] == [2, 1, 1]
    updates, snaps = split_md(collector.lines(BTC, "md"))
    assert snaps == [{"type": "l2_snapshot", "symbol": BTC, "seq": 0, "bids": [], "asks": []}]
    assert [orjson.loads(u) for u in updates] == [
        {"type": "l2_update", "symbol": BTC, "seq": 1, "changes": [["buy", "30000.00", "0.00100"]],
         "bbo": {"bid": ["30000.00", "0.00100"], "ask": None}},
        {"type": "l2_update", "symbol": BTC, "seq": 2, "changes": [["buy", "30000.00", "0.00060"]],
         "bbo": {"bid": ["30000.00", "0.00060"], "ask": None}},
        {"type": "l2_update", "symbol": BTC, "seq": 3, "changes": [["sell", "30001.00", "0.00005"]],
         "bbo": {"bid": ["30000.00", "0.00060"], "ask": ["30001.00", "0.00005"]}},
    ]  # fmt: skip
    (trade,) = collector.messages(BTC, "trades")
    assert isinstance(trade.pop("latency_us"), int)
    assert trade == {
        "type": "trade", "symbol": BTC, "trade_id": 1, "price": "30000.00", "quantity": "0.00040",
        "aggressor_side": "sell", "maker_order_id": ids[0], "taker_order_id": ids[1], "maker_fee": "0.012",
        "taker_fee": "0.024", "ts": entry_to_seq(ids[1]) >> 20,
    }  # fmt: skip
    execs = [(line.split(b" ", 1)[0].decode(), orjson.loads(line.split(b" ", 1)[1]))
             for line in collector.lines(BTC, "exec")]  # fmt: skip
    assert [(a, m["order_id"], m["status"], m["fee"]) for a, m in execs] == [
        ("alice", ids[0], "new", "0.00"),
        ("bob", ids[1], "new", "0.00"),
        ("alice", ids[0], "partially_filled", "0.012"),
        ("bob", ids[1], "filled", "0.024"),
        ("carol", ids[2], "new", "0.00"),
    ]
    assert execs[3][1]["liquidity"] == "taker" and execs[2][1]["remaining_quantity"] == "0.00060"

    # Durable output and progress, committed with the publishes.
    exp = expected(INSTRUMENTS[BTC], [(i, c) for i, (_, c) in zip(ids, cmds, strict=True)])  # type: ignore[misc]
    assert stream_events(r, BTC) == _json(exp.events)
    assert r.xlen(keys.events(BTC)) == 1
    state = progress(r, BTC)
    assert {k: state[k] for k in ("last_id", "applied", "book_seq", "trade_seq")} == {
        "last_id": ids[2],
        "applied": "3",
        "book_seq": "3",
        "trade_seq": "1",
    }


async def test_rejects_cancels_and_junk_entries(
    r: redis.Redis, collector: Collector, redis_url: str, tmp_path: Path
) -> None:
    async with in_process(config(redis_url, tmp_path)) as run:
        (oid,) = append(r, [(ETH, NewOrder(ETH, "alice", "sell", "limit", "gtc", 200_000, 300, "x"))])
        append(r, [(ETH, b"not json"), (ETH, Cancel(ETH, "mallory", entry_to_seq(oid)))])
        append(r, [(ETH, NewOrder(ETH, "bob", "buy", "limit", "gtc", 200_000, 0, "q0"))])
        append(r, [(ETH, Cancel(ETH, "alice", None, "x"))])
        await await_until(lambda: _applied(r, ETH) == 5, what="applied")
        await await_until(lambda: len(collector.lines(ETH, "exec")) == 4, what="execs")
        assert await run.stop() == 0
    execs = [(line.split(b" ", 1)[0].decode(), orjson.loads(line.split(b" ", 1)[1]))
             for line in collector.lines(ETH, "exec")]  # fmt: skip
    assert [a for a, _ in execs] == ["alice", "mallory", "bob", "alice"]
    assert execs[1][1] == {
        "type": "reject", "op": "cancel", "symbol": ETH, "order_id": oid, "client_order_id": None,
        "code": "UNKNOWN_ORDER", "reason": execs[1][1]["reason"], "exec_id": 2,
    }  # fmt: skip
    assert [m["exec_id"] for _, m in execs] == [1, 2, 3, 4]  # matcher rejects are numbered too
    assert execs[2][1]["status"] == "rejected" and execs[2][1]["code"] == "INVALID_QUANTITY"
    assert execs[3][1]["status"] == "cancelled" and execs[3][1]["order_id"] == oid
    updates, _ = split_md(collector.lines(ETH, "md"))
    changes = [orjson.loads(u)["changes"] for u in updates]
    assert changes[0] == [["sell", "2000.00", "0.00300"]]
    assert [(side, price, Decimal(qty)) for side, price, qty in changes[1]] == [
        ("sell", "2000.00", Decimal(0))
    ]
    assert [orjson.loads(u)["seq"] for u in updates] == [1, 2]
    events = stream_events(r, ETH)
    assert len(events) == 5 and events[1][1] == []  # the junk entry: applied, no events


def _book_after(updates: list[dict[str, Any]], upto: int) -> dict[str, dict[str, str]]:
    book: dict[str, dict[str, str]] = {"buy": {}, "sell": {}}
    for u in updates:
        if u["seq"] > upto:
            break
        for side, price, qty in u["changes"]:
            if Decimal(qty) == 0:
                book[side].pop(price, None)
            else:
                book[side][price] = qty
    return book


async def test_snapshot_requests_are_aligned_with_updates(
    r: redis.Redis, collector: Collector, redis_url: str, tmp_path: Path
) -> None:
    flow, record = Flow(7), cast(Record, {})
    stop = threading.Event()

    def produce() -> None:
        writer = redis.Redis.from_url(redis_url)
        while not stop.is_set():
            add_flow(writer, flow, record, (BTC,), 20)
            time.sleep(0.002)
        writer.close()

    async with in_process(config(redis_url, tmp_path, batch=50)) as run:
        r.publish(keys.snapshot_request_channel(BTC), b"")  # idle: answered at once
        await await_until(lambda: len(split_md(collector.lines(BTC, "md"))[1]) == 2, what="idle snapshot")
        producer = threading.Thread(target=produce)
        producer.start()
        try:
            for _ in range(8):
                r.publish(keys.snapshot_request_channel(BTC), b"")
                await asyncio.sleep(0.03)
        finally:
            stop.set()
            producer.join()
        total = sum([len(v) for v in record.values()])
        await await_until(lambda: _applied(r, BTC) == total, what="all applied")
        r.publish(keys.snapshot_request_channel(BTC), b"")
        await await_until(lambda: len(split_md(collector.lines(BTC, "md"))[1]) >= 5, what="snapshots")
        assert await run.stop() == 0

    messages = [orjson.loads(line) for line in collector.lines(BTC, "md")]
    updates = [m for m in messages if m["type"] == "l2_update"]
    assert [u["seq"] for u in updates] == list(range(1, len(updates) + 1))
    last_seq = 0
    snapshots = 0
    for m in messages:  # channel order: every update <= snapshot.seq before it, every later one after
        if m["type"] == "l2_update":
            assert m["seq"] == last_seq + 1
            last_seq = m["seq"]
        else:
            snapshots += 1
            assert m["seq"] == last_seq
            book = _book_after(updates, m["seq"])
            assert {p: q for p, q in m["bids"]} == book["buy"]
            assert {p: q for p, q in m["asks"]} == book["sell"]
            prices = [Decimal(p) for p, _ in m["bids"]]
            assert prices == sorted(prices, reverse=True)
    assert snapshots >= 5 and last_seq > 0


async def test_checkpoints_and_trim(r: redis.Redis, redis_url: str, tmp_path: Path) -> None:
    flow, record = Flow(11), cast(Record, {})
    cfg = config(redis_url, tmp_path, checkpoint_every=40, keep_checkpoints=2, batch=10)
    async with in_process(cfg) as run:
        for _ in range(10):
            add_flow(r, flow, record, (BTC,), 30)
            await await_until(lambda: _applied(r, BTC) == len(record[BTC]), what="applied")
        assert await run.stop() == 0
    folder = ck.directory(tmp_path, BTC)
    files = ck.list_files(folder)
    assert len(files) == 2
    key = ck.load_key(ck.default_key_file(tmp_path))
    newest = ck.read_file(files[-1][1], key)
    assert newest.entry_id == record[BTC][-1][0] and newest.applied == 300  # the final checkpoint
    blob = r.get(keys.checkpoint(BTC))
    assert isinstance(blob, bytes) and ck.decode(blob, key) == newest
    exp = expected(INSTRUMENTS[BTC], record[BTC])
    assert orjson.loads(orjson.dumps(newest.snapshot)) == _json(_snapshot_of(exp.engine))
    # The stream keeps exactly the entries from the oldest kept checkpoint on.
    oldest = files[0][0]
    kept = [(i, c) for i, c in record[BTC] if entry_to_seq(i) >= oldest]
    assert 0 < len(kept) < 300
    assert stream_ids(r, keys.orders(BTC)) == [i for i, _ in kept]


def _snapshot_of(engine: Any) -> Any:
    from services.matcher.snapshot import snapshot

    return snapshot(engine)


def test_cme_matcher_process_serves_metrics_and_checkpoints_on_sigterm(
    r: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    proc = Process(
        redis_url, tmp_path / "var", tmp_path / "matcher.log", "--symbols", BTC, "--log-level", "info"
    )
    try:
        proc.wait_live()
        record: Record = {}
        add_flow(r, Flow(3), record, (BTC,), 200)
        wait_until(lambda: _applied(r, BTC) == 200, what="applied")
        port = int(re.findall(r"metrics on port (\d+)", proc.text())[0])
        gauges = (
            'cme_stream_length{symbol="BTC-USDT"} 200.0',
            'cme_matcher_lag_entries{symbol="BTC-USDT"} 0.0',
        )
        wait_until(lambda: all(g in _scrape(port) for g in gauges), 5, "polled gauges")
        text = _scrape(port)
        assert 'cme_matcher_applied_total{symbol="BTC-USDT"} 200.0' in text
        # One command in SAMPLE_EVERY is timed, starting with the first of every batch.
        timed = re.search(r'cme_matcher_command_seconds_count\{symbol="BTC-USDT"\} (\d+)', text)
        assert timed is not None and 200 // SAMPLE_EVERY <= int(timed[1]) < 200
        assert 'cme_redis_roundtrips_total{op="commit"}' in text
        (endpoint,) = cast(list[bytes], r.hvals(keys.instances("matcher")))  # registered for discovery
        assert endpoint.decode().endswith(f":{port}")
        assert proc.terminate() == 0
    finally:
        if proc.proc.poll() is None:
            proc.kill()
    assert "stopped cleanly" in proc.text()
    files = ck.list_files(ck.directory(tmp_path / "var", BTC))
    key = ck.load_key(ck.default_key_file(tmp_path / "var"))
    assert len(files) == 1 and ck.read_file(files[0][1], key).applied == 200
    assert r.hlen(keys.instances("matcher")) == 0  # deregistered on the way out


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        body: bytes = resp.read()
    return body.decode()


def test_sigint_is_a_clean_stop_too(redis_url: str, tmp_path: Path) -> None:
    proc = Process(redis_url, tmp_path / "var", tmp_path / "matcher.log", "--symbols", ETH)
    proc.wait_live()
    proc.proc.send_signal(signal.SIGINT)
    assert proc.proc.wait(15) == 0


async def test_a_backlog_is_applied_while_redis_commits_exactly_as_the_engine_would(
    r: redis.Redis, collector: Collector, redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A backlog makes every read busy (service.OVERLAP_ENTRIES): the round trip that commits one batch
    and reads the next goes out before the batch in hand is applied. Checkpoints fall due on the way and
    snapshot requests keep arriving; both must see only what is committed, in channel order.

    A checkpoint of an applied batch whose commit is still in flight would, after a crash or a fenced
    commit, restore past reports that were never published: each capture is checked against the
    progress hash (the commit's own record) at that moment."""
    captured: list[tuple[str, str | None]] = []
    capture = Matcher._capture

    def checked(self: Matcher, st: SymbolState) -> ck.Checkpoint:
        committed = r.hget(keys.progress(st.symbol), "last_id")
        captured.append((st.last_id.decode(), committed.decode() if committed else None))
        return capture(self, st)

    monkeypatch.setattr(Matcher, "_capture", checked)
    flow, record = Flow(23), cast(Record, {})
    for _ in range(6):
        add_flow(r, flow, record, (BTC,), 250)
    total = len(record[BTC])
    # 400: due in the middle of a read of 256, so the checkpoint falls due while a commit is in flight.
    cfg = config(redis_url, tmp_path, checkpoint_every=400, batch=2 * COMMIT_ENTRIES)
    async with in_process(cfg) as run:
        while _applied(r, BTC) < total:  # each request is answered by the round after it arrives
            r.publish(keys.snapshot_request_channel(BTC), b"")
            await asyncio.sleep(0)
        assert await run.stop() == 0
    exp = expected(INSTRUMENTS[BTC], record[BTC])
    assert stream_events(r, BTC) == _json(exp.events)
    assert len(ck.list_files(ck.directory(tmp_path, BTC))) >= 2  # during the backlog, and at the stop
    assert len(captured) >= 2 and all(applied == committed for applied, committed in captured)
    await await_until(lambda: len(collector.lines(BTC, "exec")) >= len(exp.execs), what="exec reports")
    assert collector.lines(BTC, "exec") == exp.execs  # each once, exec ids running on
    await await_until(lambda: len(split_md(collector.lines(BTC, "md"))[0]) >= len(exp.md), what="md")
    updates, snaps = split_md(collector.lines(BTC, "md"))
    assert updates == exp.md
    seen = 0  # updates so far in channel order: each snapshot is of exactly them
    for m in (orjson.loads(line) for line in collector.lines(BTC, "md")):
        seen += m["type"] == "l2_update"
        assert m["seq"] == seen
    assert len(snaps) >= 2


def test_split_balances_keeps_the_other_events_in_order_and_each_balances_last_state() -> None:
    """As the venue matcher's commit uses it: over a chunk's commands, in order, into one `latest`."""
    engine = Engine([Instrument("BTC-USDT")], risk=True)
    assert engine.ledger is not None
    usdt, coin = (10 ** engine.ledger.scales[a] for a in ("USDT", "BTC"))
    for seq, cmd in enumerate([Deposit("alice", "USDT", 10_000 * usdt), Deposit("bob", "BTC", 2 * coin)], 1):
        engine.apply(cmd, seq, seq)
    buy = engine.apply(NewOrder("BTC-USDT", "alice", "buy", "limit", "gtc", 100_00, 100_000, "b1"), 3, 3)
    sell = engine.apply(NewOrder("BTC-USDT", "bob", "sell", "limit", "gtc", 100_00, 100_000, "s1"), 4, 4)
    latest: dict[str, dict[str, tuple[int, int]]] = {"carol": {"BTC": (1, 0)}}
    for events in (buy, sell):
        durable = split_balances(events, latest)
        assert durable == [e for e in events if e[0] != BALANCE] == durable_events(events)
    assert any(e[0] == TRADE for e in durable)
    held = next(e for e in buy if e[0] == BALANCE and e[2:4] == ("alice", "USDT"))
    paid = next(e for e in sell if e[0] == BALANCE and e[2:4] == ("alice", "USDT"))
    assert held[5] > 0 and paid[5] == 0 and latest["alice"]["USDT"] == paid[4:6]  # the last state wins
    assert latest["bob"]["BTC"] == next(e[4:6] for e in sell if e[0] == BALANCE and e[2:4] == ("bob", "BTC"))
    assert latest["carol"] == {"BTC": (1, 0)}  # what was there stays
