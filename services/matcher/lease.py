"""One matcher per symbol stream: a short lease in Redis plus a fencing epoch, so a standby takes over
within about a second and a stale holder can never publish.

The lease value names its holder as `host:pid:instance`; the holder renews it every RENEW_SECONDS and
it lapses LEASE_MS after the last renewal, so a holder that dies or stalls (SIGSTOP, a VM freeze, a
swap storm) loses it quickly. Taking a lease INCRs the symbol's epoch (keys.epoch) in the same script
and hands the new value to the taker. Every write a matcher makes runs in a script that first checks
the epoch is still its own (services.matcher.service), so a holder that wakes after someone else took
over has its commit refused whole ("FENCED"): a false takeover costs a restart, never a double publish.

A newcomer on the same host may take the lease at once when the holder's pid is gone (a crash and
restart need not wait for the expiry); otherwise it polls every POLL_SECONDS until the lease is free.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from shared import keys
from shared.resp import pack

LEASE_MS = 1_000
RENEW_SECONDS = 0.25  # four renewals per lease: one late renewal (a slow batch) does not lose it
POLL_SECONDS = 0.15  # a standby's look at a held lease

# KEYS: lease, epoch. ARGV: my value, lease ms, the (dead) holder to replace or "". Returns the new
# epoch when the lease is taken, 0 when it is held by someone else.
_TAKE = """
local held = redis.call('GET', KEYS[1])
if held and held ~= ARGV[3] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return redis.call('INCR', KEYS[2])
"""
_IF_HOLDER = "if redis.call('GET', KEYS[1]) == ARGV[1] then return {} end return 0"
RENEW = _IF_HOLDER.format("redis.call('PEXPIRE', KEYS[1], ARGV[2])")  # KEYS: lease. ARGV: me, ms
_RELEASE = _IF_HOLDER.format("redis.call('DEL', KEYS[1])")

log = logging.getLogger("cme.matcher.lease")


class LeaseLost(RuntimeError):
    """Another matcher holds a symbol this one was matching: stop at once."""


class Fenced(LeaseLost):
    """Redis refused a write: the symbol's epoch moved on, another matcher took over."""


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
        self.symbols = list(symbols)
        self.keys = [keys.matcher_lease(s) for s in symbols]
        self.value = holder_value(instance)
        self.epochs: dict[str, int] = {}  # symbol -> the epoch our lease took
        self._renewed = 0.0

    async def acquire(self, stopping: Any = lambda: False) -> bool:
        """Wait until every symbol's lease is ours; False if asked to stop meanwhile."""
        pending = list(zip(self.symbols, self.keys, strict=True))
        waited: set[str] = set()  # leases found held: taking one later is a takeover
        last_log = 0.0
        while pending:
            for symbol, key in list(pending):
                epoch = await self._take(key, symbol, "")
                if not epoch:
                    held = await self.r.get(key)
                    holder = held.decode() if isinstance(held, bytes) else str(held)
                    if held is not None and _dead_local_holder(holder):
                        epoch = await self._take(key, symbol, holder)
                        if epoch:
                            log.warning("took over %s from %s, whose process is gone", key, holder)
                            waited.discard(key)
                if epoch:
                    if key in waited:
                        log.warning("took over %s: its holder released it or stopped renewing it", key)
                    self.epochs[symbol] = epoch
                    pending.remove((symbol, key))
                    continue
                waited.add(key)
                if time.monotonic() - last_log > 10:
                    last_log = time.monotonic()
                    log.warning("standby: %s is held by %s; waiting for it to be released", key, holder)
            if pending:
                if stopping():
                    return False
                await asyncio.sleep(POLL_SECONDS)
            else:
                await self.renew()  # extend the ones taken first while we waited for the others
        log.info("leases taken: %s", ", ".join(f"{s} epoch {e}" for s, e in self.epochs.items()))
        return True

    async def _take(self, key: str, symbol: str, replacing: str) -> int:
        epoch = await self.r.eval(_TAKE, 2, key, keys.epoch(symbol), self.value, LEASE_MS, replacing)
        return int(epoch)

    def renew_due(self) -> bool:
        return time.monotonic() - self._renewed >= RENEW_SECONDS

    async def renew(self) -> None:
        self._renewed = time.monotonic()
        pipe = self.r.pipeline(transaction=False)
        for key in self.keys:
            pipe.eval(RENEW, 1, key, self.value, LEASE_MS)
        self.check_renewals(await pipe.execute())

    def renewal(self, sha: bytes) -> list[bytes]:
        """The renewal as RESP commands (EVALSHA of RENEW, one per lease) for a caller's own round
        trip; check_renewals takes their replies."""
        self._renewed = time.monotonic()
        value, ms = self.value.encode(), b"%d" % LEASE_MS
        return [pack(b"EVALSHA", sha, b"1", key.encode(), value, ms) for key in self.keys]

    def check_renewals(self, replies: list[Any]) -> None:
        for key, ok in zip(self.keys, replies, strict=True):
            if isinstance(ok, Exception):  # NOSCRIPT (Redis restarted) or another refusal
                raise RedisError(f"renewing {key} failed: {ok}")
            if not ok:
                raise LeaseLost(f"lost the lease {key}")

    async def release(self) -> None:
        for key in self.keys:
            await self.r.eval(_RELEASE, 1, key, self.value)
