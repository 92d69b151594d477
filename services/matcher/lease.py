"""One matcher per symbol stream: a renewed lease in Redis, so a second matcher waits as a standby.

Two matchers on one stream would each publish every trade. The lease value names its holder as
`host:pid:instance`; a holder renews it every second and it lapses after LEASE_MS without renewal.
A newcomer on the same host may take the lease at once when the holder's pid is gone (a crash and
restart should not wait for expiry); otherwise it waits until the lease is free.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from typing import Any

import redis.asyncio as aioredis

from shared import keys

LEASE_MS = 5_000
_IF_HOLDER = "if redis.call('GET', KEYS[1]) == ARGV[1] then return {} end return 0"
_RENEW = _IF_HOLDER.format("redis.call('PEXPIRE', KEYS[1], ARGV[2])")
_RELEASE = _IF_HOLDER.format("redis.call('DEL', KEYS[1])")
_STEAL = _IF_HOLDER.format("redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])")

log = logging.getLogger("cme.matcher.lease")


class LeaseLost(RuntimeError):
    """Another matcher holds a symbol this one was matching: stop at once."""


def holder_value(instance: str) -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{instance}"


def _dead_local_holder(value: str) -> bool:
    """True if the holder ran on this host and its process no longer exists."""
    host, _, rest = value.partition(":")
    pid_text = rest.partition(":")[0]
    if host != socket.gethostname() or not pid_text.isdigit():
        return False
    try:
        os.kill(int(pid_text), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


class Leases:
    def __init__(self, r: aioredis.Redis, symbols: list[str], instance: str) -> None:
        self.r = r
        self.keys = [keys.matcher_lease(s) for s in symbols]
        self.value = holder_value(instance)

    async def acquire(self, stopping: Any = lambda: False) -> bool:
        """Wait until every symbol's lease is ours; False if asked to stop meanwhile."""
        pending = list(self.keys)
        last_log = 0.0
        while pending:
            for key in list(pending):
                if await self.r.set(key, self.value, nx=True, px=LEASE_MS):
                    pending.remove(key)
                    continue
                held = await self.r.get(key)
                holder = held.decode() if isinstance(held, bytes) else str(held)
                if (
                    held is not None
                    and _dead_local_holder(holder)
                    and await self.r.eval(_STEAL, 1, key, holder, self.value, LEASE_MS)
                ):
                    log.warning("took over %s from %s, whose process is gone", key, holder)
                    pending.remove(key)
                    continue
                if time.monotonic() - last_log > 10:
                    last_log = time.monotonic()
                    log.warning("standby: %s is held by %s; waiting for it to be released", key, holder)
            if pending:
                if stopping():
                    return False
                await asyncio.sleep(0.5)
            else:
                await self.renew()  # extend the ones taken first while we waited for the others
        return True

    async def renew(self) -> None:
        for key in self.keys:
            if not await self.r.eval(_RENEW, 1, key, self.value, LEASE_MS):
                raise LeaseLost(f"lost the lease {key}")

    async def release(self) -> None:
        for key in self.keys:
            await self.r.eval(_RELEASE, 1, key, self.value)
