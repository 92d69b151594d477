"""Crash recovery is exact: after kill -9 of the matcher, a crash before any checkpoint, a corrupt or
unusable newest checkpoint, a Redis copy written with another key, or a restart of Redis itself, the final
state equals an uninterrupted in-memory run over the same stream, and every output (events stream, md,
trades, exec) was published exactly once, in order. A checkpoint of another history than the stream's (a
wiped Redis) is refused."""

from __future__ import annotations

import dataclasses
import logging
import random
import stat
import time
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


def _applied(r: redis.Redis, symbol: str) -> int:
    return int(r.hget(keys.progress(symbol), "applied") or 0)


def _caught_up(r: redis.Redis, record: Record) -> bool:
    return all(_applied(r, s) == len(record.get(s, [])) for s in SYMBOLS)


def _hash_of(snap: dict[str, Any]) -> str:
    import hashlib

    return hashlib.sha256(to_bytes(snap)).hexdigest()


def _assert_exact(r: redis.Redis, record: Record, outputs: list[Collector], data_dir: Path) -> None:
    """Final checkpoint == fresh engine over the whole stream; every output exactly once, in order."""
    key = ck.load_key(ck.default_key_file(data_dir))
    for symbol in SYMBOLS:
        exp = expected(INSTRUMENTS[symbol], record[symbol])
        blob = r.get(keys.checkpoint(symbol))
        assert isinstance(blob, bytes)
        final = ck.decode(blob, key)
        assert final.entry_id == record[symbol][-1][0] and final.applied == len(record[symbol])
        assert _hash_of(final.snapshot) == state_hash(exp.engine)
        newest_file = ck.list_files(ck.directory(data_dir, symbol))[-1][1]
        assert ck.read_file(newest_file, key) == final
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
            folder = ck.directory(tmp_path, BTC)
            await await_until(lambda: len(ck.list_files(folder)) >= 2, what="two checkpoints")
            await run.crash()
        files = ck.list_files(folder)
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


def _errors(caplog: pytest.LogCaptureFixture) -> str:
    return "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR)


async def test_an_unusable_checkpoint_with_a_valid_key_falls_back_and_the_matcher_serves(
    r: redis.Redis, redis_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """As after a downgrade: the newest checkpoint verifies but holds a snapshot format this build does
    not know. It is set aside and the next older one used, no crash loop, and new orders are answered."""
    collector = Collector(redis_url)
    flow, record = Flow(13), cast(Record, {})
    cfg = config(redis_url, tmp_path, checkpoint_every=100, keep_checkpoints=3, batch=20)
    try:
        async with in_process(cfg) as run:
            for _ in range(8):
                add_flow(r, flow, record, SYMBOLS, 50)
                await await_until(lambda: _caught_up(r, record), what="caught up")
            folder = ck.directory(tmp_path, BTC)
            await await_until(lambda: len(ck.list_files(folder)) >= 2, what="two checkpoints")
            await run.crash()
        key = ck.load_key(ck.default_key_file(tmp_path))
        files = ck.list_files(folder)
        newest = ck.read_file(files[-1][1], key)
        future = dataclasses.replace(newest, snapshot={**newest.snapshot, "version": 99})
        files[-1][1].write_bytes(ck.encode(future, key))  # valid checksum and MAC: only restore fails
        r.set(keys.checkpoint(BTC), ck.encode(future, key))
        async with in_process(cfg) as run:
            assert (folder / (files[-1][1].name + ck.SET_ASIDE)).exists()
            assert "unsupported snapshot version 99" in _errors(caplog)
            assert metrics.REPLAYED.labels(BTC)._value.get() >= 1  # from the older file on
            add_flow(r, flow, record, SYMBOLS, 100)
            await await_until(lambda: _caught_up(r, record), what="new orders answered")
            assert await run.stop() == 0
        time.sleep(0.1)
    finally:
        collector.close()
    _assert_exact(r, record, [collector], tmp_path)
    assert stat.S_IMODE(ck.default_key_file(tmp_path).stat().st_mode) == 0o600
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for _, p in ck.list_files(folder))


async def test_a_checkpoint_ahead_of_a_wiped_redis_is_refused(
    r: redis.Redis, redis_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Redis wiped (or replaced) under a data dir: its checkpoints belong to another history and must not
    be combined with the new stream; the matcher starts empty and serves the new history exactly."""
    flow, record = Flow(21), cast(Record, {})
    cfg = config(redis_url, tmp_path, checkpoint_every=100, batch=20)
    async with in_process(cfg) as run:
        add_flow(r, flow, record, SYMBOLS, 300)
        await await_until(lambda: _caught_up(r, record), what="caught up")
        assert await run.stop() == 0
    old = {s: ck.list_files(ck.directory(tmp_path, s))[-1][1] for s in SYMBOLS}
    r.flushall()
    collector = Collector(redis_url)
    flow, record = Flow(22), cast(Record, {})
    try:
        async with in_process(cfg) as run:
            for s, path in old.items():
                assert path.with_name(path.name + ck.SET_ASIDE).exists(), s
            assert "beyond the orders stream's last id 0-0" in _errors(caplog)
            assert all(not st.engine.books[s].orders for s, st in run.matcher.states.items())
            add_flow(r, flow, record, SYMBOLS, 200)
            await await_until(lambda: _caught_up(r, record), what="caught up with the new history")
            assert await run.stop() == 0
        time.sleep(0.1)
    finally:
        collector.close()
    _assert_exact(r, record, [collector], tmp_path)


async def test_the_redis_copy_written_with_another_key_falls_back_to_the_file(
    r: redis.Redis, redis_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Matchers on two hosts with their own data dirs (and keys) share a Redis: the copy there is one
    this matcher cannot authenticate, so it resumes from its own file."""
    collector = Collector(redis_url)
    flow, record = Flow(34), cast(Record, {})
    cfg = config(redis_url, tmp_path, checkpoint_every=100, batch=20)
    try:
        async with in_process(cfg) as run:
            add_flow(r, flow, record, SYMBOLS, 300)
            await await_until(lambda: _caught_up(r, record), what="caught up")
            assert await run.stop() == 0  # final checkpoints: the Redis copies equal the newest files
        key = ck.load_key(ck.default_key_file(tmp_path))
        for s in SYMBOLS:
            mine = ck.decode(cast(bytes, r.get(keys.checkpoint(s))), key)
            r.set(keys.checkpoint(s), ck.encode(mine, b"another host's key".ljust(32, b".")))
        async with in_process(cfg) as run:
            assert "refusing the checkpoint in Redis: authentication failed" in _errors(caplog)
            assert metrics.REPLAYED.labels(BTC)._value.get() == 0  # the file was as new as the copy
            assert run.matcher.states[BTC].last_id.decode() == record[BTC][-1][0]
            add_flow(r, flow, record, SYMBOLS, 100)
            await await_until(lambda: _caught_up(r, record), what="caught up again")
            assert await run.stop() == 0
        time.sleep(0.1)
    finally:
        collector.close()
    _assert_exact(r, record, [collector], tmp_path)
