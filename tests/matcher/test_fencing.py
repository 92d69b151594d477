"""Fencing and exec ids against a real Redis.

A matcher whose epoch moved on (another matcher took the lease while it stalled) has every write refused
whole: no events entry, no publish, no exec log entry, no progress, no checkpoint; it then exits non-zero.
Exec ids rise by exactly one per exec line per symbol, in the payload header and in the durable exec log,
and continue without gap or repeat across kill -9 and recovery (checkpoint + replay)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import orjson
import pytest
import redis

from services.matcher import checkpoint as ck
from services.matcher.lease import Fenced
from shared import keys
from shared.commands import NewOrder
from shared.wire import split_exec_line, unframe_exec
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
    wait_until,
)

pytestmark = pytest.mark.timeout(90)
SYMBOLS = (BTC, ETH)


@pytest.fixture()
def r(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture()
def collector(redis_url: str) -> Iterator[Collector]:
    c = Collector(redis_url)
    yield c
    c.close()


def _applied(r: redis.Redis, symbol: str) -> int:
    return int(progress(r, symbol).get("applied", 0))


def _durable(r: redis.Redis, symbol: str) -> tuple[Any, ...]:
    """Everything a commit writes, but the publishes."""
    return (
        r.xrange(keys.events(symbol)),
        r.xrange(keys.exec_log(symbol)),
        r.hgetall(keys.progress(symbol)),
        r.get(keys.checkpoint(symbol)),
    )


async def _drain(r: redis.Redis, collector: Collector) -> None:
    """Anything published before now has reached the collector once a marker published now has."""
    marker = f"#0 0\nmarker-{time.monotonic_ns()} {{}}".encode()
    r.publish(keys.exec_channel(BTC), marker)
    await await_until(lambda: any(p == marker for _, _, p in list(collector.payloads)), what="marker")
    collector.payloads[:] = [x for x in collector.payloads if x[2] != marker]


def _take_over(r: redis.Redis, symbol: str) -> None:
    """What a standby's lease script does to the epoch when it takes the symbol."""
    r.incr(keys.epoch(symbol))


async def test_a_stale_matchers_commit_is_refused_whole(
    r: redis.Redis, collector: Collector, redis_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with in_process(config(redis_url, tmp_path)) as run:
        append(r, [(BTC, NewOrder(BTC, "alice", "buy", "limit", "gtc", 3_000_000, 100, "a1"))])
        await await_until(lambda: _applied(r, BTC) == 1, what="applied")
        await _drain(r, collector)
        before, published = _durable(r, BTC), list(collector.payloads)
        _take_over(r, BTC)
        with caplog.at_level(logging.CRITICAL, logger="cme.matcher"):
            append(r, [(BTC, NewOrder(BTC, "bob", "sell", "limit", "gtc", 3_000_000, 40, "b1"))])
            assert await asyncio.wait_for(run.task, 15) == 1  # it exits non-zero
    await _drain(r, collector)
    assert _durable(r, BTC) == before  # no events entry, no exec log entry, progress as it was
    assert collector.payloads == published  # nothing published: no trade, no report, no l2_update
    assert any("FENCED" in rec.getMessage() for rec in caplog.records)


async def test_a_stale_matchers_snapshot_answer_is_refused(
    r: redis.Redis, collector: Collector, redis_url: str, tmp_path: Path
) -> None:
    async with in_process(config(redis_url, tmp_path)) as run:
        await _drain(r, collector)
        published = list(collector.payloads)
        _take_over(r, ETH)
        r.publish(keys.snapshot_request_channel(ETH), b"")
        assert await asyncio.wait_for(run.task, 15) == 1
    await _drain(r, collector)
    assert collector.payloads == published


async def test_a_stale_matchers_checkpoint_is_refused(r: redis.Redis, redis_url: str, tmp_path: Path) -> None:
    async with in_process(config(redis_url, tmp_path)) as run:
        append(r, [(BTC, NewOrder(BTC, "alice", "buy", "limit", "gtc", 3_000_000, 100, "a1"))])
        await await_until(lambda: _applied(r, BTC) == 1, what="applied")
        matcher, st = run.matcher, run.matcher.states[BTC]
        _take_over(r, BTC)
        with pytest.raises(Fenced):
            await matcher._checkpoint(st, matcher._capture(st))
    assert r.get(keys.checkpoint(BTC)) is None
    assert ck.list_files(ck.directory(tmp_path, BTC)) == []


def _last_ids(payloads: list[bytes]) -> list[int]:
    out = []
    for payload in payloads:
        _, first, lines = unframe_exec(payload)
        assert first is not None
        out.append(first + len(lines) - 1)
    return out


def _exec_payloads(collector: Collector, symbol: str) -> list[bytes]:
    return [p for s, k, p in list(collector.payloads) if s == symbol and k == "exec"]


def test_exec_ids_continue_exactly_across_kill_9(r: redis.Redis, redis_url: str, tmp_path: Path) -> None:
    data, log = tmp_path / "var", tmp_path / "matcher.log"
    args = ("--checkpoint-every", "200", "--batch", "50")
    collector = Collector(redis_url)
    flow, record = Flow(99), cast(Record, {})
    proc = Process(redis_url, data, log, *args)
    starts = 1
    try:
        proc.wait_live(starts)
        for chunk in range(40):
            add_flow(r, flow, record, SYMBOLS, 40)
            if chunk in (12, 27):
                proc.kill()  # batches in flight, entries queued behind
                proc = Process(redis_url, data, log, *args)
                starts += 1
                proc.wait_live(starts)
        wait_until(lambda: all(_applied(r, s) == len(record[s]) for s in SYMBOLS), 30, "caught up")
        assert proc.terminate() == 0
    finally:
        if proc.proc.poll() is None:
            proc.kill()
        collector.close()
    assert log.read_text().count("checkpoint at") >= 4  # recoveries started from checkpoints
    for symbol in SYMBOLS:
        payloads = _exec_payloads(collector, symbol)
        ids: list[int] = []
        for payload in payloads:
            _, first, lines = unframe_exec(payload)
            got = [orjson.loads(split_exec_line(line)[1])["exec_id"] for line in lines]
            assert got == list(range(cast(int, first), cast(int, first) + len(lines)))
            ids += got
        assert ids == list(range(1, len(ids) + 1))  # no gap, no repeat, across both kills
        exp = expected(INSTRUMENTS[symbol], record[symbol])
        assert [line for p in payloads for line in unframe_exec(p)[2]] == exp.execs
        # The durable copy: every published payload, once, under the id of its last exec line.
        logged = cast(list[tuple[bytes, dict[bytes, bytes]]], r.xrange(keys.exec_log(symbol)))
        assert [fields[b"d"] for _, fields in logged] == payloads
        assert [entry_id.decode() for entry_id, _ in logged] == [f"{last}-0" for last in _last_ids(payloads)]
        assert progress(r, symbol)[keys.PROGRESS_EXEC_SEQ] == str(len(ids))
        final = r.get(keys.checkpoint(symbol))
        assert isinstance(final, bytes)
        assert _checkpoint_exec_seq(final, data) == len(ids)


def _checkpoint_exec_seq(blob: bytes, data_dir: Path) -> int:
    return ck.decode(blob, ck.load_key(ck.default_key_file(data_dir))).exec_seq
