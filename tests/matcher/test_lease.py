"""The matcher lease: one consumer per symbol stream, standby while held, takeover after a crash."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys

import pytest
import redis.asyncio as aioredis

from services.matcher.lease import LEASE_MS, LeaseLost, Leases
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
    await asyncio.sleep(1.2)
    assert not waiting.done()  # standby while the first holds the lease
    await first.renew()
    await first.release()
    assert await asyncio.wait_for(waiting, 5)
    assert await r.get(keys.matcher_lease("BTC-USDT")) == second.value.encode()
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
    mine = Leases(r, SYMBOLS, "restarted")
    assert await asyncio.wait_for(mine.acquire(), 2)
    await mine.renew()
    await r.aclose()


async def test_lease_of_a_live_or_remote_holder_is_not_stolen(redis_url: str) -> None:
    r = aioredis.Redis.from_url(redis_url)
    for holder in (f"other-host:{_dead_pid()}:m", f"{socket.gethostname()}:1:init"):
        await r.set(keys.matcher_lease("BTC-USDT"), holder, px=LEASE_MS)
        waiting = asyncio.create_task(Leases(r, ["BTC-USDT"], "newcomer").acquire())
        await asyncio.sleep(0.8)
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
