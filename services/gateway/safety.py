"""Cancel on disconnect and the dead man's switch, kept in Redis so that any gateway can fire them.

Both must fire even when the gateway that holds the session is killed, so their state is two sorted
sets every gateway reads (shared.keys):

- disconnect_leases(): one member `<owner>|<n>|<account>` per live connection that authenticated with
  "cancel_on_disconnect": true, scored by the ms its lease runs out. The gateway holding the
  connection renews all of its leases every second (one ZADD) to now + 5 s. On a clean disconnect it
  removes the member and appends the cancels itself; when the gateway dies, the lease runs out.
- dead_man_deadlines(): member = account, scored by the ms its switch fires (cancel_all_after).

Every gateway sweeps both sets twice a second. CLAIM_SCRIPT takes the due members atomically, so exactly
one gateway handles each; it appends CancelAll(symbol, account, reason) for every symbol (one appender
batch) and then FINISH_SCRIPT removes the member. A claim does not remove the member: it re-scores it
to a half-integer ms retry_ms ahead (deadlines and leases are whole ms, so the half marks it as this
claim). If the claiming gateway dies before its cancels are appended, the member comes due again and
another gateway sweeps it: a cancel may be appended twice after a crash, never lost. A claimed member
that is written meanwhile (a client re-arming its switch, a stalled gateway renewing the lease of a
connection still open) carries the new score, and FINISH_SCRIPT leaves it.

Deadlines are wall-clock ms of the gateway that wrote them: gateways on several hosts need clocks
in sync to well under the lease (NTP does that).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from typing import Any, Final, Protocol

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from services.gateway import validation
from services.gateway.appender import Waiter
from shared import codes, keys, metrics, stream
from shared.commands import CancelAll
from shared.metrics import REDIS_ERRORS
from shared.wsguard import Throttled

log = logging.getLogger("gateway.safety")

LEASE_MS: Final = 5_000  # a connection's lease runs this long past its last renewal
RENEW_SECONDS: Final = 1.0
SWEEP_SECONDS: Final = 0.5
RETRY_MS: Final = 5_000  # a claimed member comes due again this long after its claim unless finished
CLAIM_LIMIT: Final = 500  # members per claim (Lua's unpack and one appender batch stay small)
APPEND_TIMEOUT: Final = 10.0  # seconds to wait for the appender's answer (it times out at 5 s itself)
STOP_TIMEOUT: Final = 5.0

# KEYS[1]: the sorted set. ARGV: now ms, the claim's score, the most members to claim.
# Returns the members scored <= now, re-scored to the claim's score.
CLAIM_SCRIPT: Final = """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[3]))
for _, member in ipairs(due) do
  redis.call('ZADD', KEYS[1], 'XX', ARGV[2], member)
end
return due
"""
# KEYS[1]: the sorted set. ARGV: the claim's score, then members. Removes each member still scored
# exactly so (not written since the claim); returns how many it removed.
FINISH_SCRIPT: Final = """
local removed = 0
local claim = tonumber(ARGV[1])
for i = 2, #ARGV do
  local score = redis.call('ZSCORE', KEYS[1], ARGV[i])
  if score and tonumber(score) == claim then
    redis.call('ZREM', KEYS[1], ARGV[i])
    removed = removed + 1
  end
end
return removed
"""


def wall_ms() -> int:
    return time.time_ns() // 1_000_000


class _Script(Protocol):
    def __call__(self, keys: list[str], args: list[Any]) -> Awaitable[Any]: ...


class _Cancels:
    """The appender's waiter for one account's CancelAll of every symbol: `done` resolves to True once
    all are on their streams, False as soon as one is not."""

    __slots__ = ("done", "left")

    def __init__(self, n: int) -> None:
        self.left = n
        self.done: asyncio.Future[bool] = asyncio.get_running_loop().create_future()

    def appended(self, entry_id: str, now_ns: int) -> None:
        self.left -= 1
        if self.left == 0 and not self.done.done():
            self.done.set_result(True)

    def failed(self, reason: str) -> None:
        if not self.done.done():
            log.warning("a mass cancel was not appended: %s", reason)
            self.done.set_result(False)


class Submit(Protocol):
    """What SafetySwitches needs of the gateway's Appender."""

    def submit(self, symbol: str, entry: bytes, waiter: Waiter) -> None: ...


class SafetySwitches:
    """One gateway's side of cancel on disconnect and the dead man's switch (see the module docstring).

    Connections are any hashable key (the server's Client objects). start() runs the renew and sweep
    loops; stop() ends them and releases every lease still held (a shutdown ends those connections),
    while the appender still runs: call it before closing the appender.
    """

    def __init__(
        self,
        redis: aioredis.Redis,
        appender: Submit,
        symbols: Iterable[str],
        instance: str | None = None,
        *,
        lease_ms: int = LEASE_MS,
        renew_seconds: float = RENEW_SECONDS,
        sweep_seconds: float = SWEEP_SECONDS,
        retry_ms: int = RETRY_MS,
        clock: Callable[[], int] = wall_ms,
    ) -> None:
        self.redis = redis
        self.appender = appender
        self.symbols = list(symbols)
        # A process-unique owner: a gateway restarted under the same instance name must not take over
        # (and renew) the leases its dead predecessor left to be swept.
        name = (instance or metrics.instance_name("gateway")).replace("|", "_")
        self.owner = f"{name}:{secrets.token_hex(4)}"
        self.lease_ms, self.retry_ms = lease_ms, retry_ms
        self.renew_seconds, self.sweep_seconds = renew_seconds, sweep_seconds
        self.clock = clock
        self.leases: dict[object, tuple[str, str]] = {}  # connection -> (member, account)
        self._ids = itertools.count(1)
        # Lease writes of this process in the order they were made: a renewal in flight must not
        # re-add a lease whose removal was issued after it.
        self._lock = asyncio.Lock()
        self._claim: _Script = redis.register_script(CLAIM_SCRIPT)
        self._finish: _Script = redis.register_script(FINISH_SCRIPT)
        self._stopped = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._pending: set[asyncio.Task[None]] = set()
        self._warn = Throttled(log)

    # Lifecycle --------------------------------------------------------------------------------
    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._every(self.renew_seconds, self.renew, "renew"), name="safety-renew"),
            loop.create_task(self._every(self.sweep_seconds, self.sweep, "sweep"), name="safety-sweep"),
        ]

    async def stop(self) -> None:
        """End the loops between two rounds, release every lease (appending its cancels), and wait
        (bounded) for the cancels and removals under way."""
        self._stopped.set()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(STOP_TIMEOUT):
                await asyncio.gather(*self._tasks, return_exceptions=True)
        for task in self._tasks:
            task.cancel()
        for conn in list(self.leases):
            self.release(conn)
        if self._pending:
            _, late = await asyncio.wait(set(self._pending), timeout=STOP_TIMEOUT)
            for task in late:
                task.cancel()

    async def _every(self, seconds: float, job: Callable[[], Awaitable[Any]], what: str) -> None:
        while not self._stopped.is_set():
            try:
                await job()
            except (RedisError, OSError) as exc:
                REDIS_ERRORS.labels("safety").inc()
                self._warn.warning("safety switches: %s failed: %s", what, exc)
            except Exception:  # a bug must not end the switches of every connection
                log.exception("safety switches: %s failed", what)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(seconds):
                    await self._stopped.wait()

    # Cancel on disconnect ---------------------------------------------------------------------
    async def register(self, conn: object, account: str) -> None:
        """Lease the connection's account; returns once the lease is in Redis (RedisError if it could
        not be written: the lease stays, renewals retry it). A connection leased for another account
        first releases that one, as a disconnect of it."""
        held = self.leases.get(conn)
        if held is not None:
            if held[1] == account:
                return
            self.release(conn)
        member = f"{self.owner}|{next(self._ids)}|{account}"
        self.leases[conn] = (member, account)
        async with self._lock:
            await self.redis.zadd(keys.disconnect_leases(), {member: self.clock() + self.lease_ms})

    def release(self, conn: object) -> None:
        """The connection ended (or dropped cancel on disconnect): remove its lease and cancel every
        open order of its account. Never blocks; a no-op for a connection without a lease."""
        held = self.leases.pop(conn, None)
        if held is not None:
            self._spawn(self._release(*held))

    async def _release(self, member: str, account: str) -> None:
        try:
            async with self._lock:
                await self.redis.zrem(keys.disconnect_leases(), member)
        except (RedisError, OSError) as exc:
            # The lease runs out on its own: a sweep cancels again, which does no harm.
            REDIS_ERRORS.labels("safety").inc()
            self._warn.warning("safety switches: a lease removal failed: %s", exc)
        if not await self._cancel_all(account, codes.REASON_DISCONNECT):
            # Hand it to the sweepers: due now, so whichever gateway sweeps next retries it.
            try:
                async with self._lock:
                    await self.redis.zadd(keys.disconnect_leases(), {member: self.clock()})
            except (RedisError, OSError) as exc:
                REDIS_ERRORS.labels("safety").inc()
                log.error("cancel on disconnect of %s was neither appended nor handed on: %s", account, exc)

    async def renew(self) -> None:
        """Push every lease of this gateway to now + lease_ms, in one ZADD."""
        if not self.leases:
            return
        async with self._lock:
            if self.leases:
                until = self.clock() + self.lease_ms
                await self.redis.zadd(keys.disconnect_leases(), {m: until for m, _ in self.leases.values()})

    # Dead man's switch -------------------------------------------------------------------------
    async def arm(self, account: str, timeout_ms: int) -> int:
        """Set the account's switch to fire timeout_ms from now (0: turn it off); returns the
        deadline in ms since the epoch, 0 when off. timeout_ms is validated (validation)."""
        if timeout_ms == 0:
            await self.redis.zrem(keys.dead_man_deadlines(), account)
            return 0
        deadline = self.clock() + timeout_ms
        await self.redis.zadd(keys.dead_man_deadlines(), {account: deadline})
        return deadline

    # Sweeping ----------------------------------------------------------------------------------
    async def sweep(self) -> int:
        """Claim the due leases and switches, append their cancels, then remove them; returns how
        many this gateway claimed."""
        now = self.clock()
        claim = now + self.retry_ms + 0.5
        claimed = 0
        for key, reason in (
            (keys.disconnect_leases(), codes.REASON_DISCONNECT),
            (keys.dead_man_deadlines(), codes.REASON_DEAD_MAN),
        ):
            members = [m.decode() for m in await self._claim(keys=[key], args=[now, claim, CLAIM_LIMIT])]
            claimed += len(members)
            finished: list[str] = []
            cancels: dict[str, Awaitable[bool]] = {}
            for member in members:
                account = _account_of(member, reason)
                if account is None:
                    log.warning("dropping a malformed member %r of %s", member, key)
                    finished.append(member)
                else:
                    cancels[member] = self._cancel_all(account, reason)
            results = await asyncio.gather(*cancels.values())
            for member, ok in zip(cancels, results, strict=True):
                if ok:  # else it comes due again after retry_ms, for any gateway to retry
                    log.info("%s: %s's open orders cancelled", reason, _account_of(member, reason))
                    finished.append(member)
            if finished:
                await self._finish(keys=[key], args=[claim, *finished])
        return claimed

    async def _cancel_all(self, account: str, reason: str) -> bool:
        """Append CancelAll(symbol, account, reason) for every symbol (one appender batch); True once
        all are on their streams."""
        waiter = _Cancels(len(self.symbols))
        now_ns = time.time_ns()
        for symbol in self.symbols:
            self.appender.submit(symbol, stream.encode(CancelAll(symbol, account, reason), now_ns), waiter)
        if not self.symbols:
            return True
        try:
            async with asyncio.timeout(APPEND_TIMEOUT):
                return await waiter.done
        except TimeoutError:
            log.warning("the mass cancel of %s (%s) was not answered in time", account, reason)
            return False

    def _spawn(self, job: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(job)
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)


def _account_of(member: str, reason: str) -> str | None:
    """The account a member stands for: a lease `<owner>|<n>|<account>`, a switch the account itself
    (None: a member this code did not write)."""
    if reason == codes.REASON_DISCONNECT:
        parts = member.split("|")
        account = parts[-1] if len(parts) >= 3 else None
    else:
        account = member
    return account if validation.valid_account(account) else None
