"""The matcher lease: one consumer per symbol stream, standby while held, takeover after a crash or a
stall, and a fencing epoch that rises with every takeover."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys

import pytest
import redis.asyncio as aioredis

from services.matcher.lease import LEASE_MS, POLL_SECONDS, LeaseLost, Leases
from shared import keys

SYMBOLS = ["BTC-USDT", "ETH-USDT"]


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


async def test_second_matcher_waits_until_the_first_releases(redis_url: str) -> None:
    r = aioredis.Redis.from_url(redis_url)
    first, second = Leases(r, SYMBOLS, "m1"), Leases(r, SYMBOLS, "m2")
    assert await first.acquire()
    waiting = asyncio.create_task(second.acquire())
    for _ in range(6):  # past the lease's span, renewed meanwhile: the standby keeps waiting
        await asyncio.sleep(LEASE_MS / 4000)
        await first.renew()
    assert not waiting.done()
    await first.release()
    assert await asyncio.wait_for(waiting, 5)
    assert await r.get(keys.matcher_lease("BTC-USDT")) == second.value.encode()
    assert first.epochs == dict.fromkeys(SYMBOLS, 1) and second.epochs == dict.fromkeys(SYMBOLS, 2)
    assert await r.get(keys.epoch("BTC-USDT")) == b"2"
    with pytest.raises(LeaseLost):
        await first.renew()  # the first must stop publishing
    await r.aclose()


async def test_standby_can_be_stopped(redis_url: str) -> None:
    r = aioredis.Redis.from_url(redis_url)
    assert await Leases(r, SYMBOLS, "m1").acquire()
    assert await Leases(r, SYMBOLS, "m2").acquire(lambda: True) is False
    await r.aclose()


async def test_lease_of_a_crashed_local_process_is_taken_over_at_once(redis_url: str) -> None:
    r = aioredis.Redis.from_url(redis_url)
    stale = f"{socket.gethostname()}:{_dead_pid()}:crashed"
    for s in SYMBOLS:
        await r.set(keys.matcher_lease(s), stale, px=LEASE_MS)
    await r.set(keys.epoch(SYMBOLS[0]), 7)
    mine = Leases(r, SYMBOLS, "restarted")
    assert await asyncio.wait_for(mine.acquire(), LEASE_MS / 2000)  # well before the lease lapses
    assert mine.epochs == {SYMBOLS[0]: 8, SYMBOLS[1]: 1}
    await mine.renew()
    await r.aclose()


async def test_lease_of_a_live_or_remote_holder_is_not_stolen(redis_url: str) -> None:
    r = aioredis.Redis.from_url(redis_url)
    for holder in (f"other-host:{_dead_pid()}:m", f"{socket.gethostname()}:1:init"):
        await r.set(keys.matcher_lease("BTC-USDT"), holder, px=LEASE_MS)
        waiting = asyncio.create_task(Leases(r, ["BTC-USDT"], "newcomer").acquire())
        await asyncio.sleep(POLL_SECONDS * 3)
        assert not waiting.done()
        waiting.cancel()
        await asyncio.gather(waiting, return_exceptions=True)
        assert await r.get(keys.matcher_lease("BTC-USDT")) == holder.encode()
    await r.aclose()


async def test_lease_expires_without_renewal(redis_url: str) -> None:
    r = aioredis.Redis.from_url(redis_url)
    await Leases(r, ["BTC-USDT"], "m1").acquire()
    ttl = await r.pttl(keys.matcher_lease("BTC-USDT"))
    assert 0 < ttl <= LEASE_MS
    await r.aclose()


async def test_a_stalled_holder_loses_the_lease_and_the_epoch(redis_url: str) -> None:
    r = aioredis.Redis.from_url(redis_url)
    stalled, standby = Leases(r, SYMBOLS, "stalled"), Leases(r, SYMBOLS, "standby")
    assert await stalled.acquire()
    waiting = asyncio.create_task(standby.acquire())
    # The holder stops renewing (SIGSTOP, a long pause): the standby has it within a lease and a poll.
    assert await asyncio.wait_for(waiting, LEASE_MS / 1000 + 4 * POLL_SECONDS + 1)
    assert standby.epochs == dict.fromkeys(SYMBOLS, 2)
    with pytest.raises(LeaseLost):
        await stalled.renew()  # it wakes: its renewal fails, and its epoch is stale
    assert await r.get(keys.epoch(SYMBOLS[1])) == b"2"
    await r.aclose()
