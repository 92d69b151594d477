"""Execution reports exactly once: the router against a real redis-server, and the `executions` answer."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable

import orjson
import pytest
import redis.asyncio as aioredis

from services.gateway.executions import ExecLog, ExecRouter, answer
from services.gateway.validation import ExecutionsQuery
from shared import keys
from shared.wire import frame

pytestmark = pytest.mark.timeout(30)

BTC = "BTC-USDT"


def line(account: str, exec_id: int) -> bytes:
    return account.encode() + b" " + orjson.dumps({"type": "execution", "exec_id": exec_id})


def payload(first: int, accounts: list[str]) -> bytes:
    data = frame([line(a, first + i) for i, a in enumerate(accounts)], time.time_ns(), first)
    assert data is not None
    return data


async def log_batch(rds: aioredis.Redis, first: int, accounts: list[str]) -> bytes:
    """What the matcher's commit writes: the payload under the id of its last exec_id."""
    data = payload(first, accounts)
    await rds.xadd(keys.exec_log(BTC), {"d": data}, id=f"{first + len(accounts) - 1}-0")
    return data


async def until(cond: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


@pytest.fixture()
async def rds(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url)
    yield client
    await client.aclose()


def ids(lines: list[bytes]) -> list[int]:
    return [orjson.loads(x.partition(b" ")[2])["exec_id"] for x in lines]


async def test_a_repeated_payload_is_delivered_once(rds: aioredis.Redis) -> None:
    got: list[bytes] = []
    router = ExecRouter(rds, rds, [BTC], got.append)
    first = await log_batch(rds, 1, ["alice", "bob"])
    await router.on_payload(BTC, first)
    await router.on_payload(BTC, first)
    await router.on_payload(BTC, payload(2, ["bob", "carol"]))  # overlaps by one
    await log_batch(rds, 3, ["carol"])
    assert ids(got) == [1, 2, 3]


async def test_a_gap_is_filled_from_the_exec_log_in_order(rds: aioredis.Redis) -> None:
    got: list[bytes] = []
    router = ExecRouter(rds, rds, [BTC], got.append)
    await router.on_payload(BTC, await log_batch(rds, 1, ["alice"]))
    await log_batch(rds, 2, ["alice", "bob"])  # published while nobody listened
    await log_batch(rds, 4, ["carol"])
    await router.on_payload(BTC, await log_batch(rds, 5, ["alice"]))
    assert ids(got) == [1, 2, 3, 4, 5]
    assert [x.partition(b" ")[0] for x in got] == [b"alice", b"alice", b"bob", b"carol", b"alice"]


async def test_ids_going_back_follow_a_new_history_but_repeats_are_dropped(rds: aioredis.Redis) -> None:
    got: list[bytes] = []
    router = ExecRouter(rds, rds, [BTC], got.append)
    for first in (1, 2, 3):
        await router.on_payload(BTC, await log_batch(rds, first, ["alice"]))
    await router.on_payload(BTC, payload(2, ["alice"]))  # a repeat: the log still reaches id 3
    assert ids(got) == [1, 2, 3]
    await rds.delete(keys.exec_log(BTC))  # Redis was wiped: the matcher starts a new history
    await router.on_payload(BTC, await log_batch(rds, 1, ["alice"]))
    await router.on_payload(BTC, await log_batch(rds, 2, ["alice"]))
    assert ids(got) == [1, 2, 3, 1, 2]


async def test_payloads_without_ids_are_delivered_as_published(rds: aioredis.Redis) -> None:
    got: list[bytes] = []
    router = ExecRouter(rds, rds, [BTC], got.append)
    old = frame([b"alice {}", b"bob {}"], time.time_ns())
    assert old is not None
    await router.on_payload(BTC, old)
    assert got == [b"alice {}", b"bob {}"]


@contextlib.asynccontextmanager
async def running_router(
    redis_url: str, rds: aioredis.Redis, got: list[bytes]
) -> AsyncIterator[tuple[ExecRouter, asyncio.Task[None]]]:
    """A router running on a subscriber connection of its own, subscribed, report 1 delivered."""
    subscriber = aioredis.Redis.from_url(redis_url)
    router = ExecRouter(rds, subscriber, [BTC], got.append)
    task = asyncio.create_task(router.run())
    try:
        await asyncio.wait_for(router.subscribed.wait(), 5)
        assert await rds.publish(keys.exec_channel(BTC), await log_batch(rds, 1, ["alice"])) == 1
        await until(lambda: len(got) == 1, "the first report")
        yield router, task
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await subscriber.aclose()


async def test_reports_published_while_the_subscription_is_down_arrive_once(
    redis_url: str, rds: aioredis.Redis
) -> None:
    got: list[bytes] = []
    async with running_router(redis_url, rds, got) as (router, _):
        await rds.client_kill_filter(_type="pubsub")  # a network blip or a Redis restart
        await until(lambda: not router.subscribed.is_set(), "the router to notice the drop")
        # Committed while the subscription was down: only the exec log has it.
        await log_batch(rds, 2, ["alice", "bob"])

        await asyncio.wait_for(router.subscribed.wait(), 5)
        assert await rds.publish(keys.exec_channel(BTC), await log_batch(rds, 4, ["alice"])) == 1
        await until(lambda: len(got) >= 4, "every report")
        assert ids(got) == [1, 2, 3, 4]


async def test_a_payload_it_cannot_read_does_not_end_the_subscription(
    redis_url: str, rds: aioredis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    """An error that is no Redis error (here a header that is no clock) is logged, and the router
    subscribes again and catches up: it never leaves the gateway without reports."""
    got: list[bytes] = []
    async with running_router(redis_url, rds, got) as (router, task):
        channel = keys.exec_channel(BTC)
        assert await rds.publish(channel, b"#not-a-clock\nalice {}") == 1
        await until(lambda: "subscription failed" in caplog.text, "the failure to be logged")
        await log_batch(rds, 2, ["bob"])  # committed while the router was resubscribing
        await until(lambda: router.subscribed.is_set() and len(got) == 2, "the catch-up")
        assert await rds.publish(channel, await log_batch(rds, 3, ["alice"])) == 1
        await until(lambda: len(got) == 3, "the next report")
        assert ids(got) == [1, 2, 3] and not task.done()


async def test_executions_answer_filters_the_account_and_continues(rds: aioredis.Redis) -> None:
    await log_batch(rds, 1, ["alice", "bob", "alice"])
    await log_batch(rds, 4, ["bob"])
    await log_batch(rds, 5, ["alice", "alice"])
    reader = ExecLog(rds)

    everything = orjson.loads(await answer(reader, ExecutionsQuery(BTC, "alice", 0, 1000)))
    assert everything["type"] == "executions" and everything["symbol"] == BTC
    assert [r["exec_id"] for r in everything["reports"]] == [1, 3, 5, 6]
    assert everything["more"] is False and everything["next_after"] == 6

    page = orjson.loads(await answer(reader, ExecutionsQuery(BTC, "alice", 1, 2)))
    assert [r["exec_id"] for r in page["reports"]] == [3, 5]
    assert page["more"] is True and page["next_after"] == 5
    rest = orjson.loads(await answer(reader, ExecutionsQuery(BTC, "alice", page["next_after"], 2)))
    assert [r["exec_id"] for r in rest["reports"]] == [6] and rest["more"] is False

    nothing = orjson.loads(await answer(reader, ExecutionsQuery(BTC, "carol", 0, 10)))
    assert nothing["reports"] == [] and nothing["more"] is False
    other = orjson.loads(await answer(reader, ExecutionsQuery("ETH-USDT", "alice", 0, 10)))
    assert other["reports"] == []
