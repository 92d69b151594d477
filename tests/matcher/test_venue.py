"""The matcher with balances on (services.matcher.venue): one engine over every symbol's stream.

Checked against a fresh Engine(risk=True) that applies the same entries in entry-id order: the events
streams, the balances read model and the exec lines must be exactly what it gives, across a crash."""

from __future__ import annotations

import asyncio
import random
import time
from decimal import Decimal
from pathlib import Path
from typing import Any, cast

import orjson
import redis

from services.matcher import checkpoint as ck
from services.matcher.engine import Engine
from services.matcher.service import durable_events
from services.matcher.snapshot import state_hash
from services.matcher.venue import GROUP, VenueMatcher
from shared import codes, keys
from shared.commands import Cancel, CancelAll, Command, Deposit, NewOrder, Withdraw
from shared.decimals import units_to_amount
from shared.ids import entry_to_seq, seq_ms
from shared.instruments import asset_scales
from shared.stream import APPEND_SCRIPT, decode_events, encode, encode_events
from shared.wire import unframe
from tests.matcher import (
    BTC,
    ETH,
    INSTRUMENTS,
    MID,
    Collector,
    await_until,
    config,
    in_process,
    progress,
    stream_events,
)

ACCOUNTS = ("alice", "bob", "carol")
USDT = 10**10  # units of 1 USDT (10 places: tick 0.01 x lot 0.00001 x the fee rates' 0.001)
COIN = 10**5  # units of 1 BTC or ETH (lot 0.00001)
SCALES = asset_scales(INSTRUMENTS.values())


def append(r: redis.Redis, items: list[tuple[str, Command]], record: list[tuple[str, str, Command]]) -> None:
    """Append as a gateway with balances on does: under the venue clock's ids."""
    for symbol, cmd in items:
        entry_id = r.eval(
            APPEND_SCRIPT, 2, keys.id_clock(), keys.orders(symbol), 2, encode(cmd, time.time_ns(), SCALES)
        )[0]
        r.incr(keys.appended(symbol))
        record.append((symbol, cast(bytes, entry_id).decode(), cmd))


def funding() -> list[tuple[str, Command]]:
    out: list[tuple[str, Command]] = []
    for a in ACCOUNTS:
        out += [(BTC, Deposit(a, "USDT", 100_000 * USDT)), (BTC, Deposit(a, "BTC", 10 * COIN)),
                (ETH, Deposit(a, "ETH", 100 * COIN))]  # fmt: skip
    return out


def flow(rng: random.Random, n: int, live: list[tuple[str, int, str]]) -> list[tuple[str, Command]]:
    out: list[tuple[str, Command]] = []
    for _ in range(n):
        symbol, account = rng.choice((BTC, ETH)), rng.choice(ACCOUNTS)
        side = rng.choice(("buy", "sell"))
        r = rng.random()
        if r < 0.6:
            out.append((symbol, NewOrder(symbol, account, side, "limit", "gtc", MID + rng.randint(-20, 20),
                                         rng.randint(1, 40_000))))  # fmt: skip
        elif r < 0.75:
            out.append(
                (symbol, NewOrder(symbol, account, side, "market", "ioc", None, rng.randint(1, 60_000)))
            )
        elif r < 0.9 and live:
            s, oid, owner = live.pop(rng.randrange(len(live)))
            out.append((s, Cancel(s, owner, oid)))
        elif r < 0.93:
            out.append((symbol, CancelAll(symbol, account, "user")))
        else:
            out.append((BTC, Withdraw(account, "USDT", rng.randint(1, 200_000) * USDT)))
    return out


def expected(record: list[tuple[str, str, Command]]) -> tuple[Engine, dict[str, list[list[Any]]]]:
    engine = Engine(INSTRUMENTS.values(), risk=True)
    events: dict[str, list[list[Any]]] = {BTC: [], ETH: []}
    for symbol, entry_id, cmd in sorted(record, key=lambda x: entry_to_seq(x[1])):
        seq = entry_to_seq(entry_id)
        events[symbol].append([entry_id, engine.apply(cmd, seq, seq_ms(seq))])
    return engine, events


def caught_up(r: redis.Redis, record: list[tuple[str, str, Command]]) -> bool:
    for symbol in (BTC, ETH):
        ids = [e for s, e, _ in record if s == symbol]
        if ids and progress(r, symbol).get("last_id") != ids[-1]:
            return False
    return True


def read_model(r: redis.Redis) -> dict[str, dict[str, list[int]]]:
    out: dict[str, dict[str, list[int]]] = {}
    for key in cast(list[bytes], r.keys(keys.balances("*"))):
        account = key.decode().removeprefix(keys.balances(""))
        for asset, value in cast(dict[bytes, bytes], r.hgetall(key)).items():
            out.setdefault(account, {})[asset.decode()] = [int(x) for x in value.split()]
    return out


def live_orders(record: list[tuple[str, str, Command]]) -> list[tuple[str, int, str]]:
    return [(s, entry_to_seq(e), c.account) for s, e, c in record if type(c) is NewOrder and c.tif == "gtc"]


def _normalise(pairs: list[list[Any]]) -> list[list[Any]]:
    """As the events stream holds them: JSON, without the balance events (durable_events)."""
    return cast(list[list[Any]], decode_events(encode_events([[i, durable_events(e)] for i, e in pairs])))


async def test_one_engine_over_both_streams_with_balances_and_a_crash(
    r: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    rng, record = random.Random(7), cast(list[tuple[str, str, Command]], [])
    cfg = config(redis_url, tmp_path, risk=True, checkpoint_every=150, batch=64)
    collector = Collector(redis_url)
    try:
        async with in_process(cfg) as run:
            append(r, funding(), record)
            for _ in range(10):
                append(r, flow(rng, 40, live_orders(record)), record)
                await asyncio.sleep(0.005)
            await await_until(lambda: caught_up(r, record), 20, "caught up")
            await run.crash()  # no final checkpoint: the restart loads an older one and replays
        assert ck.list_files(ck.directory(tmp_path, GROUP)), "a checkpoint was taken before the crash"
        append(r, flow(rng, 200, live_orders(record)), record)  # while no matcher runs
        async with in_process(cfg) as run:
            append(r, flow(rng, 100, live_orders(record)), record)
            await await_until(lambda: caught_up(r, record), 20, "caught up after the restart")
            engine = run.matcher.states[BTC].engine
            want, events = expected(record)
            assert state_hash(engine) == state_hash(want)
            assert run.matcher.states[ETH].engine is engine
            assert await run.stop() == 0
    finally:
        collector.close()
    for symbol in (BTC, ETH):
        assert stream_events(r, symbol) == _normalise(events[symbol])
    assert want.ledger is not None
    model = read_model(r)
    balances = want.ledger.balances()
    assert model == {a: bals for a, bals in balances.items() if a in model} and set(model) == set(balances)
    lines = [line for s in (BTC, ETH) for line in collector.lines(s, "exec")]
    kinds = {orjson.loads(line.partition(b" ")[2])["type"] for line in lines}
    assert {"balance", "funded", "execution"} <= kinds
    ids = [orjson.loads(line.partition(b" ")[2])["exec_id"] for line in collector.lines(BTC, "exec")]
    assert ids == list(range(1, len(ids) + 1))  # exactly once, in order, across the crash
    # One USDT pays on both symbols: an account's balance lines, in the order a subscriber of both
    # channels got them, end with its final state (the commit publishes them in the commands' order).
    last: dict[tuple[str, str], tuple[str, str]] = {}
    for _, kind, payload in collector.payloads:
        if kind == "exec":
            for line in unframe(payload)[1]:
                msg = orjson.loads(line.partition(b" ")[2])
                if msg["type"] == "balance":
                    last[msg["account"], msg["asset"]] = (msg["available"], msg["held"])
    scales = want.ledger.scales
    for (account, asset), (available, held) in last.items():
        got = balances[account][asset]
        assert (available, held) == tuple(units_to_amount(v, scales[asset]) for v in got), (account, asset)


async def test_a_withdrawal_beyond_the_balance_is_refused_to_its_account(
    r: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    record = cast(list[tuple[str, str, Command]], [])
    collector = Collector(redis_url)
    try:
        async with in_process(config(redis_url, tmp_path, risk=True)) as run:
            append(
                r,
                [
                    (BTC, Deposit("alice", "USDT", 5 * USDT, "d1")),
                    (BTC, Withdraw("alice", "USDT", 6 * USDT, "w1")),
                ],
                record,
            )
            await await_until(lambda: caught_up(r, record), 10, "caught up")
            await run.stop()
    finally:
        collector.close()
    msgs = [orjson.loads(line.partition(b" ")[2]) for line in collector.lines(BTC, "exec")]
    assert [m["type"] for m in msgs] == ["funded", "balance", "reject"]
    assert msgs[1]["available"] == "5" and msgs[1]["held"] == "0"
    assert msgs[2]["code"] == codes.INSUFFICIENT_FUNDS and msgs[2]["request_id"] == "w1"
    assert read_model(r) == {"alice": {"USDT": [5 * USDT, 0]}}


async def test_one_accounts_balance_lines_from_two_symbols_arrive_in_command_order(
    r: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    """Appended before the matcher starts, these commands are applied in one chunk: USDT changes on
    BTC, then ETH, then BTC again. The commit publishes a block per run of one symbol, so a subscriber
    of both channels gets alice's USDT lines in the commands' order and ends on the final state."""
    record = cast(list[tuple[str, str, Command]], [])
    append(r, [(BTC, Deposit("alice", "USDT", 100_000 * USDT))], record)
    [btc_buy] = [len(record)]
    append(r, [
        (BTC, NewOrder(BTC, "alice", "buy", "limit", "gtc", MID, 10_000, "b1")),
        (ETH, NewOrder(ETH, "alice", "buy", "limit", "gtc", MID, 10_000, "e1")),
    ], record)  # fmt: skip
    append(r, [(BTC, Cancel(BTC, "alice", entry_to_seq(record[btc_buy][1])))], record)
    collector = Collector(redis_url)
    try:
        async with in_process(config(redis_url, tmp_path, risk=True)) as run:
            await await_until(lambda: caught_up(r, record), 10, "caught up")
            await run.stop()
    finally:
        collector.close()
    got = [
        msg["held"]
        for _, kind, payload in collector.payloads
        if kind == "exec"
        for line in unframe(payload)[1]
        if (msg := orjson.loads(line.partition(b" ")[2]))["type"] == "balance" and msg["asset"] == "USDT"
    ]
    # held: 0 (deposit), then the BTC buy's hold, then both, then the ETH one alone.
    one = MID * 10_000 * (10**8 + 200_000) * 10**15 // (100 * 10**5 * 10**8)  # 30000 x 0.1 x 1.002 USDT
    assert [Decimal(h) for h in got] == [Decimal(0), Decimal(one) / 10**15, 2 * Decimal(one) / 10**15,
                                         Decimal(one) / 10**15]  # fmt: skip


class _Acked:
    def __init__(self) -> None:
        self.done = asyncio.Event()
        self.entry_id: str | None = None

    def appended(self, entry_id: str, now_ns: int) -> None:
        self.entry_id = entry_id
        self.done.set()

    def failed(self, reason: str) -> None:
        self.done.set()


async def test_a_gateways_pipelined_appends_on_both_streams_are_applied_in_id_order(
    redis_url: str, tmp_path: Path, caplog: Any
) -> None:
    """The venue relies on every read seeing a prefix of the venue clock's ids. A blocked XREAD is
    woken and answered with one stream only, which for a batch appended in one call is no prefix: the
    other stream's entries were then skipped as stale (VenueMatcher._reads: the doorbell, then a read
    without BLOCK; this fails 2 runs in 3 with the blocking read alone)."""
    from services.gateway.appender import Appender

    r = redis.Redis.from_url(redis_url)
    appender = Appender(redis_url, id_clock=True)
    appender.start()
    acked: list[_Acked] = []

    def submit(symbol: str, cmd: Command) -> None:
        acked.append(_Acked())
        appender.submit(symbol, encode(cmd, 0, SCALES), acked[-1])

    try:
        async with in_process(config(redis_url, tmp_path, risk=True, batch=64)):
            for account in ("a", "b"):
                for asset in ("BTC", "ETH", "USDT"):
                    submit(BTC, Deposit(account, asset, 10**20))
            for i in range(400):
                symbol = BTC if i % 3 else ETH
                side = "buy" if i % 4 < 2 else "sell"
                submit(symbol, NewOrder(symbol, "ab"[i % 2], side, "limit", "gtc", 3_000_000 + i % 7, 10))
                if i % 50 == 0:
                    await asyncio.sleep(0.001)  # a new batch, often while the matcher is blocked
            await asyncio.gather(*(a.done.wait() for a in acked))
            assert all(a.entry_id is not None for a in acked)
            total = len(acked)
            await await_until(
                lambda: sum(int(progress(r, s).get("applied", 0)) for s in (BTC, ETH)) >= total,
                what="applied",
            )
    finally:
        await appender.close()
    assert not [m for m in caplog.messages if "skipping entry" in m]


async def test_recovery_takes_legacy_entries_and_rewrites_a_read_model_of_other_units(
    r: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    """An older release wrote integer amounts in its units (USDT: 15 places) and kept the read model
    in them. Its entries replay in today's units, and with no checkpoint that says the read model's
    units are the ledger's, recovery writes every account's balances anew (and only those)."""
    legacy = b'[["Deposit","alice","USDT",%d,"d1"],0]' % (7 * 10**15)  # 7 USDT
    entry_id = r.eval(APPEND_SCRIPT, 2, keys.id_clock(), keys.orders(BTC), 2, legacy)[0]
    r.incr(keys.appended(BTC))
    record = [(BTC, cast(bytes, entry_id).decode(), cast(Command, Deposit("alice", "USDT", 7 * USDT, "d1")))]
    cfg = config(redis_url, tmp_path, risk=True, checkpoint_every=10**6)
    async with in_process(cfg) as run:
        append(r, [(BTC, NewOrder(BTC, "alice", "buy", "limit", "gtc", MID, 10))], record)  # holds 3.006
        await await_until(lambda: caught_up(r, record), 10, "caught up")
        await run.crash()
    assert not r.exists(keys.checkpoint(GROUP)) and not ck.list_files(ck.directory(tmp_path, GROUP))
    want, _ = expected(record)
    assert want.ledger is not None
    balances = want.ledger.balances()
    assert balances == {"alice": {"USDT": [39_940 * 10**6, 30_060 * 10**6]}}
    assert read_model(r) == balances
    r.hset(keys.balances("alice"), mapping={"USDT": "39940000000000000 30060000000000000", "XRP": "5 0"})
    async with in_process(cfg) as run:
        await await_until(lambda: read_model(r) == balances, 10, "the read model rewritten")
        assert state_hash(run.matcher.states[BTC].engine) == state_hash(want)
        assert await run.stop() == 0


async def test_a_backlog_is_applied_while_redis_commits_exactly_as_the_engine_would(
    r: redis.Redis, redis_url: str, tmp_path: Path, caplog: Any, monkeypatch: Any
) -> None:
    """A backlog makes every read busy (service.OVERLAP_ENTRIES): the next read goes out before the
    batch in hand is applied, from the positions that batch will leave (VenueMatcher._positions: a
    stream cut at the batch size is applied only up to the read's bound, the rest is read again).
    Checkpoints fall due on the way and are taken between the overlapped rounds, each of committed
    state only (every stream's position is the one its progress hash records)."""
    captured: list[bool] = []
    capture = VenueMatcher._capture_venue

    def checked(self: VenueMatcher) -> ck.Checkpoint:
        committed = [r.hget(keys.progress(st.symbol), "last_id") or b"0-0" for st in self.states.values()]
        captured.append(committed == [st.last_id for st in self.states.values()])
        return capture(self)

    monkeypatch.setattr(VenueMatcher, "_capture_venue", checked)
    rng, record = random.Random(11), cast(list[tuple[str, str, Command]], [])
    append(r, funding(), record)
    for _ in range(6):
        append(r, flow(rng, 250, live_orders(record)), record)
    cfg = config(redis_url, tmp_path, risk=True, checkpoint_every=400, batch=200)
    collector = Collector(redis_url)
    try:
        async with in_process(cfg) as run:
            await await_until(lambda: caught_up(r, record), 30, "caught up")
            engine = run.matcher.states[BTC].engine
            want, events = expected(record)
            assert state_hash(engine) == state_hash(want)
            assert await run.stop() == 0
    finally:
        collector.close()
    for symbol in (BTC, ETH):
        assert stream_events(r, symbol) == _normalise(events[symbol])
    assert len(ck.list_files(ck.directory(tmp_path, GROUP))) >= 2  # during the backlog, and at the stop
    assert len(captured) >= 2 and all(captured)
    ids = [orjson.loads(line.partition(b" ")[2])["exec_id"] for line in collector.lines(BTC, "exec")]
    assert ids == list(range(1, len(ids) + 1))
    assert not [m for m in caplog.messages if "skipping entry" in m]
