"""Crash recovery is exact: after kill -9 of the matcher, a crash before any checkpoint, a corrupt newest
checkpoint, or a restart of Redis itself, the final state equals an uninterrupted in-memory run over the
same stream, and every output (events stream, md, trades, exec) was published exactly once, in order."""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import orjson
import pytest
import redis

from services.matcher import checkpoint as ck
from services.matcher.snapshot import state_hash, to_bytes
from shared import keys, metrics
from shared.redis_server import RedisServer
from tests.matcher import (
    BTC,
    ETH,
    INSTRUMENTS,
    Collector,
    Flow,
    Process,
    Record,
    add_flow,
    await_until,
    config,
    expected,
    in_process,
    split_md,
    stream_events,
    stream_ids,
    wait_until,
)

pytestmark = pytest.mark.timeout(90)
SYMBOLS = (BTC, ETH)


@pytest.fixture()
def r(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


def _applied(r: redis.Redis, symbol: str) -> int:
    return int(r.hget(keys.progress(symbol), "applied") or 0)


def _caught_up(r: redis.Redis, record: Record) -> bool:
    return all(_applied(r, s) == len(record.get(s, [])) for s in SYMBOLS)


def _hash_of(snap: dict[str, Any]) -> str:
    import hashlib

    return hashlib.sha256(to_bytes(snap)).hexdigest()


def _assert_exact(r: redis.Redis, record: Record, outputs: list[Collector], data_dir: Path) -> None:
    """Final checkpoint == fresh engine over the whole stream; every output exactly once, in order."""
    for symbol in SYMBOLS:
        exp = expected(INSTRUMENTS[symbol], record[symbol])
        blob = r.get(keys.checkpoint(symbol))
        assert isinstance(blob, bytes)
        final = ck.decode(blob)
        assert final.entry_id == record[symbol][-1][0] and final.applied == len(record[symbol])
        assert _hash_of(final.snapshot) == state_hash(exp.engine)
        newest_file = ck.list_files(ck.directory(data_dir, symbol))[-1][1]
        assert ck.read_file(newest_file) == final
        # The input stream was trimmed only below the oldest kept checkpoint: what remains is a suffix.
        left = stream_ids(r, keys.orders(symbol))
        assert left == [i for i, _ in record[symbol]][len(record[symbol]) - len(left) :]

        events = stream_events(r, symbol)
        assert events == orjson.loads(orjson.dumps(exp.events))
        md = [line for c in outputs for line in c.lines(symbol, "md")]
        updates, snaps = split_md(md)
        assert updates == exp.md
        assert [m["seq"] for m in (orjson.loads(u) for u in updates)] == list(range(1, len(exp.md) + 1))
        assert snaps, "each start publishes a snapshot"
        trades = [c for o in outputs for c in o.messages(symbol, "trades")]
        for t in trades:
            t.pop("latency_us")
        assert trades == exp.trades
        assert [t["trade_id"] for t in trades] == list(range(1, len(trades) + 1))
        assert [line for c in outputs for line in c.lines(symbol, "exec")] == exp.execs


def test_kill_9_mid_flow_recovers_exactly(r: redis.Redis, redis_url: str, tmp_path: Path) -> None:
    data, log = tmp_path / "var", tmp_path / "matcher.log"
    args = ("--checkpoint-every", "300", "--keep-checkpoints", "2", "--batch", "100")
    collector = Collector(redis_url)  # before the first start: sees every publish
    flow, record = Flow(2024), cast(Record, {})
    rng = random.Random(5)
    proc = Process(redis_url, data, log, *args)
    starts = 1
    try:
        proc.wait_live(starts)
        kills = {30, 70}
        for chunk in range(100):
            add_flow(r, flow, record, SYMBOLS, 30)
            time.sleep(rng.random() * 0.004)
            if chunk in kills:
                proc.kill()  # mid-flow: batches in flight, entries queued behind
                proc = Process(redis_url, data, log, *args)
                starts += 1
                proc.wait_live(starts)  # appending goes on meanwhile in a real system; here it queues
        wait_until(lambda: _caught_up(r, record), 30, "caught up")
        assert proc.terminate() == 0  # SIGTERM: final checkpoint
    finally:
        if proc.proc.poll() is None:
            proc.kill()
        collector.close()
    assert sum([len(v) for v in record.values()]) == 3000
    assert proc.text().count("live: ") == 3 and "replayed" in proc.text()
    _assert_exact(r, record, [collector], data)


def test_redis_restart_is_survived(own_redis: RedisServer, tmp_path: Path) -> None:
    url, data, log = own_redis.url, tmp_path / "var", tmp_path / "matcher.log"
    client = redis.Redis.from_url(url)
    collectors = [Collector(url)]
    flow, record = Flow(99), cast(Record, {})
    proc = Process(url, data, log, "--checkpoint-every", "150")
    try:
        proc.wait_live()
        for _ in range(10):
            add_flow(client, flow, record, SYMBOLS, 30)
        wait_until(lambda: _caught_up(client, record), 20, "caught up before the restart")
        time.sleep(0.1)  # let the subscriber drain
        collectors[0].close()
        client.close()
        own_redis.stop()  # graceful: the AOF is flushed
        assert proc.proc.wait(15) != 0  # crash-only: a lost Redis ends the process
        assert "exiting so a restart recovers exactly" in proc.text()

        own_redis.start()  # same port, same data directory
        client = redis.Redis.from_url(url)
        collectors.append(Collector(url))
        proc = Process(url, data, log, "--checkpoint-every", "150")
        proc.wait_live(2)
        for _ in range(10):
            add_flow(client, flow, record, SYMBOLS, 30)
        wait_until(lambda: _caught_up(client, record), 20, "caught up after the restart")
        assert proc.terminate() == 0
        time.sleep(0.1)
    finally:
        if proc.proc.poll() is None:
            proc.kill()
        for c in collectors:
            c.close()
    _assert_exact(client, record, collectors, data)
    client.close()


async def test_crash_before_any_checkpoint_replays_without_republishing(
    r: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    collector = Collector(redis_url)
    flow, record = Flow(1), cast(Record, {})
    cfg = config(redis_url, tmp_path, checkpoint_every=10**9, checkpoint_seconds=3600)
    try:
        async with in_process(cfg) as run:
            add_flow(r, flow, record, SYMBOLS, 400)
            await await_until(lambda: _caught_up(r, record), what="caught up")
            await run.crash()  # no final checkpoint: recovery must replay everything
        assert ck.list_files(ck.directory(tmp_path, BTC)) == [] and r.get(keys.checkpoint(BTC)) is None
        async with in_process(cfg) as run:
            assert metrics.REPLAYED.labels(BTC)._value.get() == len(record[BTC])
            add_flow(r, flow, record, SYMBOLS, 200)
            await await_until(lambda: _caught_up(r, record), what="caught up again")
            assert await run.stop() == 0
        time.sleep(0.1)
    finally:
        collector.close()
    _assert_exact(r, record, [collector], tmp_path)


async def test_corrupt_newest_checkpoint_falls_back_to_an_older_one(
    r: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    collector = Collector(redis_url)
    flow, record = Flow(8), cast(Record, {})
    cfg = config(redis_url, tmp_path, checkpoint_every=100, keep_checkpoints=3, batch=20)
    try:
        async with in_process(cfg) as run:
            for _ in range(10):
                add_flow(r, flow, record, SYMBOLS, 50)
                await await_until(lambda: _caught_up(r, record), what="caught up")
            await run.crash()
        folder = ck.directory(tmp_path, BTC)
        files = ck.list_files(folder)
        assert len(files) >= 2
        newest = files[-1][1]
        newest.write_bytes(newest.read_bytes()[:-7])  # torn
        r.delete(keys.checkpoint(BTC))  # and the Redis copy lost
        async with in_process(cfg) as run:
            replayed = metrics.REPLAYED.labels(BTC)._value.get()
            assert replayed >= 1  # from the second newest file on, over entries the trim had kept
            add_flow(r, flow, record, SYMBOLS, 100)
            await await_until(lambda: _caught_up(r, record), what="caught up again")
            assert await run.stop() == 0
        time.sleep(0.1)
    finally:
        collector.close()
    _assert_exact(r, record, [collector], tmp_path)
