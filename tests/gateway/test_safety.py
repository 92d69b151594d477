"""Cancel on disconnect and the dead man's switch (services.gateway.safety) against a real redis-server:
several SafetySwitches on one Redis stand for several gateways; a settable clock stands for time."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, cast

import orjson
import pytest
import redis.asyncio as aioredis
from redis.exceptions import RedisError
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from services.gateway.appender import Appender, Waiter
from services.gateway.safety import LEASE_MS, RETRY_MS, SafetySwitches, wall_ms
from services.gateway.server import Gateway
from shared import codes, keys, stream
from shared.commands import CancelAll
from shared.instruments import default_instruments
from shared.redis_acl import generate
from shared.redis_server import RedisServer

pytestmark = pytest.mark.timeout(30)

SYMBOLS = list(default_instruments())  # BTC-USDT, ETH-USDT: what the in-process gateways trade
T0 = 1_700_000_000_000
DISCONNECT, DEAD_MAN = codes.REASON_DISCONNECT, codes.REASON_DEAD_MAN


class Clock:
    def __init__(self) -> None:
        self.ms = T0

    def __call__(self) -> int:
        return self.ms


class HeldAppender:
    """Keeps every submission unanswered until the test answers it (a gateway stalled or dying
    between its claim and its appends)."""

    def __init__(self) -> None:
        self.held: list[tuple[str, bytes, Waiter]] = []

    def submit(self, symbol: str, entry: bytes, waiter: Waiter) -> None:
        self.held.append((symbol, entry, waiter))

    def answer(self, ok: bool) -> None:
        held, self.held = self.held, []
        for _, _, waiter in held:
            if ok:
                waiter.appended("1-0", 0)
            else:
                waiter.failed("Redis is unavailable")


async def until(cond: Callable[[], Any], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not await cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


@pytest.fixture()
async def rds(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url)
    yield client
    await client.aclose()


@pytest.fixture()
async def appender(redis_url: str) -> AsyncIterator[Appender]:
    app = Appender(redis_url)
    app.start()
    yield app
    await app.close()


@pytest.fixture()
def clock() -> Clock:
    return Clock()


@pytest.fixture()
def make(rds: aioredis.Redis, appender: Appender, clock: Clock) -> Callable[..., SafetySwitches]:
    """A gateway's SafetySwitches (loops not started: the test drives renew and sweep)."""

    def build(app: Any = appender, instance: str = "gw") -> SafetySwitches:
        return SafetySwitches(rds, app, SYMBOLS, instance, clock=clock)

    return build


async def cancels(rds: aioredis.Redis) -> list[CancelAll]:
    """Every CancelAll on the orders streams, stream by stream."""
    out: list[CancelAll] = []
    for symbol in SYMBOLS:
        entries = cast(list[tuple[bytes, dict[bytes, bytes]]], await rds.xrange(keys.orders(symbol)))
        for _, fields in entries:
            cmd, _ = stream.decode(fields)
            if type(cmd) is CancelAll:
                out.append(cmd)
    return out


def every_symbol(account: str, reason: str) -> list[CancelAll]:
    return [CancelAll(s, account, reason) for s in SYMBOLS]


async def leases(rds: aioredis.Redis) -> dict[str, float]:
    scored = cast(
        list[tuple[bytes, float]], await rds.zrange(keys.disconnect_leases(), 0, -1, withscores=True)
    )
    return {m.decode(): s for m, s in scored}


# Cancel on disconnect ---------------------------------------------------------------------------
async def test_a_lease_of_a_dead_gateway_is_swept_once_across_gateways(
    rds: aioredis.Redis, make: Callable[..., SafetySwitches], clock: Clock
) -> None:
    dead, a, b = make(instance="dead"), make(instance="a"), make(instance="b")
    await dead.register("conn", "alice")
    (member,) = await leases(rds)
    assert member.startswith("dead:") and member.endswith("|alice")
    assert await leases(rds) == {member: T0 + LEASE_MS}
    clock.ms = T0 + LEASE_MS - 1
    assert await a.sweep() == 0, "a lease still running is left alone"
    clock.ms = T0 + LEASE_MS
    assert sorted(await asyncio.gather(a.sweep(), b.sweep())) == [0, 1], "exactly one gateway claims it"
    assert await cancels(rds) == every_symbol("alice", DISCONNECT)
    assert await leases(rds) == {}
    clock.ms += RETRY_MS + 1
    assert await a.sweep() + await b.sweep() == 0, "nothing is left to sweep again"


async def test_renewals_keep_a_lease_alive(
    rds: aioredis.Redis, make: Callable[..., SafetySwitches], clock: Clock
) -> None:
    gw, other = make(), make()
    await gw.register("c1", "alice")
    await gw.register("c2", "bob")
    for step in range(1, 11):  # ten renewals, a second apart, outlive the first lease twice over
        clock.ms = T0 + step * 1000
        await gw.renew()
        assert await other.sweep() == 0
    assert set((await leases(rds)).values()) == {clock.ms + LEASE_MS}, "one renewal moves every lease"
    clock.ms += LEASE_MS
    assert await other.sweep() == 2
    assert sorted(await cancels(rds)) == sorted(
        every_symbol("alice", DISCONNECT) + every_symbol("bob", DISCONNECT)
    )


async def test_a_clean_disconnect_cancels_at_once_and_leaves_nothing_to_sweep(
    rds: aioredis.Redis, make: Callable[..., SafetySwitches], clock: Clock
) -> None:
    gw, other = make(), make()
    await gw.register("conn", "alice")
    gw.release("conn")
    gw.release("conn")  # a second release of the same connection does nothing

    async def cancelled() -> bool:
        return len(await cancels(rds)) >= len(SYMBOLS)

    await until(cancelled, "the disconnect's cancels")
    await until(lambda: _empty(rds), "the lease removed")
    clock.ms += LEASE_MS + RETRY_MS
    await gw.renew()
    assert await other.sweep() == 0 and await leases(rds) == {}
    assert await cancels(rds) == every_symbol("alice", DISCONNECT)


async def _empty(rds: aioredis.Redis) -> bool:
    return await leases(rds) == {}


async def test_a_failed_disconnect_cancel_is_handed_to_the_sweepers(
    rds: aioredis.Redis, make: Callable[..., SafetySwitches], clock: Clock
) -> None:
    held = HeldAppender()
    gw, other = make(held), make()
    await gw.register("conn", "alice")
    gw.release("conn")
    await until(lambda: _async(len(held.held) == len(SYMBOLS)), "the cancels submitted")
    assert await leases(rds) == {}
    held.answer(ok=False)

    async def handed_on() -> bool:
        return list((await leases(rds)).values()) == [T0]

    await until(handed_on, "the lease back in the set, due now")
    assert await other.sweep() == 1
    assert await cancels(rds) == every_symbol("alice", DISCONNECT)


async def _async(value: bool) -> bool:
    return value


async def test_a_connection_leased_for_another_account_releases_the_first(
    rds: aioredis.Redis, make: Callable[..., SafetySwitches]
) -> None:
    gw = make()
    await gw.register("conn", "alice")
    await gw.register("conn", "alice")  # the same account again: the same lease
    (first,) = await leases(rds)
    await gw.register("conn", "bob")

    async def alice_cancelled() -> bool:
        return await cancels(rds) == every_symbol("alice", DISCONNECT)

    await until(alice_cancelled, "alice's cancels")

    async def only_bob() -> bool:
        return [m.rsplit("|", 1)[1] for m in await leases(rds)] == ["bob"]

    await until(only_bob, "bob's lease alone")
    assert first not in await leases(rds)


async def test_a_restarted_gateway_does_not_renew_its_predecessors_leases(
    rds: aioredis.Redis, make: Callable[..., SafetySwitches], clock: Clock
) -> None:
    old, new = make(instance="gw-1"), make(instance="gw-1")  # the same name, another process
    await old.register("conn", "alice")
    await new.register("conn", "alice")
    clock.ms = T0 + 3000
    await new.renew()
    clock.ms = T0 + LEASE_MS
    assert await new.sweep() == 1, "the dead process's lease runs out although the name lives on"
    assert await cancels(rds) == every_symbol("alice", DISCONNECT)


async def test_a_claimer_that_dies_before_appending_leaves_the_cancel_to_another(
    rds: aioredis.Redis, make: Callable[..., SafetySwitches], clock: Clock
) -> None:
    held = HeldAppender()
    dead, claimer, other = make(), make(held), make()
    await dead.register("conn", "alice")
    clock.ms = T0 + LEASE_MS
    sweep = asyncio.create_task(claimer.sweep())
    await until(lambda: _async(len(held.held) == len(SYMBOLS)), "the claimer's cancels submitted")
    assert await other.sweep() == 0, "claimed: no other gateway takes it meanwhile"
    sweep.cancel()  # the claimer dies: its cancels never reach the streams
    clock.ms += RETRY_MS
    assert await other.sweep() == 0
    clock.ms += 1
    assert await other.sweep() == 1, "the claim ran out: another gateway retries"
    assert await cancels(rds) == every_symbol("alice", DISCONNECT)
    assert await leases(rds) == {}


async def test_a_malformed_member_is_dropped_without_a_cancel(
    rds: aioredis.Redis, make: Callable[..., SafetySwitches]
) -> None:
    await rds.zadd(keys.disconnect_leases(), {"alice": T0, "x|1|bad account": T0})
    await rds.zadd(keys.dead_man_deadlines(), {"not an account": T0})
    assert await make().sweep() == 3
    assert await cancels(rds) == []
    assert await rds.zcard(keys.disconnect_leases()) == await rds.zcard(keys.dead_man_deadlines()) == 0


# Dead man's switch ------------------------------------------------------------------------------
async def test_the_dead_mans_switch_fires_once_at_its_deadline(
    rds: aioredis.Redis, make: Callable[..., SafetySwitches], clock: Clock
) -> None:
    gw, a, b = make(), make(), make()
    assert await gw.arm("alice", 1000) == T0 + 1000
    clock.ms = T0 + 999
    assert await a.sweep() == 0
    clock.ms = T0 + 1000
    assert sorted(await asyncio.gather(a.sweep(), b.sweep())) == [0, 1]
    assert await cancels(rds) == every_symbol("alice", DEAD_MAN)
    assert await rds.zscore(keys.dead_man_deadlines(), "alice") is None, "it fired: it is off"
    clock.ms += RETRY_MS + 1
    assert await a.sweep() == 0


async def test_rearming_moves_the_deadline_and_0_turns_it_off(
    rds: aioredis.Redis, make: Callable[..., SafetySwitches], clock: Clock
) -> None:
    gw, other = make(), make()
    assert await gw.arm("alice", 60_000) == T0 + 60_000
    clock.ms = T0 + 50_000
    assert await other.arm("alice", 60_000) == T0 + 110_000, "any gateway renews the account's switch"
    clock.ms = T0 + 100_000
    assert await gw.sweep() == 0
    assert await gw.arm("alice", 0) == 0
    assert await rds.zscore(keys.dead_man_deadlines(), "alice") is None
    clock.ms = T0 + 200_000
    assert await gw.sweep() == 0 and await cancels(rds) == []


async def test_a_switch_rearmed_while_it_fires_stays_armed(
    rds: aioredis.Redis, make: Callable[..., SafetySwitches], clock: Clock
) -> None:
    held = HeldAppender()
    gw, sweeper = make(), make(held)
    await gw.arm("alice", 1000)
    clock.ms = T0 + 1000
    sweep = asyncio.create_task(sweeper.sweep())
    await until(lambda: _async(len(held.held) == len(SYMBOLS)), "the firing's cancels submitted")
    rearmed = await gw.arm("alice", 5000)  # too late for this firing, in time for the next
    held.answer(ok=True)
    assert await sweep == 1
    assert await rds.zscore(keys.dead_man_deadlines(), "alice") == rearmed, "the new deadline stands"


# Lifecycle and permissions ----------------------------------------------------------------------
async def test_the_loops_renew_sweep_and_stop_releases_every_lease(
    rds: aioredis.Redis, appender: Appender
) -> None:
    gw = SafetySwitches(rds, appender, SYMBOLS, "gw", lease_ms=300, renew_seconds=0.05, sweep_seconds=0.05)
    gw.start()
    await gw.register("conn", "alice")
    await gw.arm("bob", 1000)

    async def bob_fired() -> bool:
        return await cancels(rds) == every_symbol("bob", DEAD_MAN)

    await until(bob_fired, "the sweeper loop to fire bob's switch")
    assert len(await leases(rds)) == 1, "alice's lease outlived several lease periods: renewed"
    await gw.stop()
    assert await leases(rds) == {}
    want = every_symbol("bob", DEAD_MAN) + every_symbol("alice", DISCONNECT)
    assert sorted(await cancels(rds)) == sorted(want)


async def test_the_gateways_redis_user_may_run_the_switches(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "redis", credentials=generate()).start()
    try:
        client = aioredis.Redis.from_url(server.url_for("gateway"))
        app = Appender(server.url_for("gateway"))
        app.start()
        clock = Clock()
        gw = SafetySwitches(client, app, SYMBOLS, "gw", clock=clock)
        await gw.register("conn", "alice")
        await gw.renew()
        await gw.arm("bob", 1000)
        clock.ms += LEASE_MS
        assert await gw.sweep() == 2
        assert await gw.arm("bob", 0) == 0
        await app.close()
        await client.aclose()
    finally:
        server.kill()


# The gateway's messages -------------------------------------------------------------------------
@pytest.fixture()
async def gateway_url(redis_url: str) -> AsyncIterator[str]:
    gateway = Gateway(default_instruments(), redis_url)
    port = await gateway.start("127.0.0.1", 0)
    yield f"ws://127.0.0.1:{port}"
    await gateway.stop(timeout=5)


async def ask(ws: ClientConnection, msg: dict[str, Any]) -> dict[str, Any]:
    await ws.send(orjson.dumps(msg).decode())
    reply: dict[str, Any] = orjson.loads(await asyncio.wait_for(ws.recv(), 5))
    return reply


async def test_a_leased_connection_that_closes_cancels_its_accounts_orders(
    rds: aioredis.Redis, gateway_url: str
) -> None:
    ws = await connect(gateway_url, compression=None)
    auth = {"op": "auth", "account": "alice", "cancel_on_disconnect": True}
    assert await ask(ws, auth) == {"type": "authenticated", "account": "alice", "cancel_on_disconnect": True}
    (member,) = await leases(rds)  # in place when the reply is sent
    assert member.endswith("|alice")
    await ws.close()
    want = every_symbol("alice", DISCONNECT)

    async def cancelled() -> bool:
        return await cancels(rds) == want and await leases(rds) == {}

    await until(cancelled, "the disconnect's cancels and the lease removed")


async def test_a_plain_login_has_no_lease_and_a_relogin_without_it_ends_the_lease(
    rds: aioredis.Redis, gateway_url: str
) -> None:
    ws = await connect(gateway_url, compression=None)
    assert await ask(ws, {"op": "auth", "account": "bob"}) == {"type": "authenticated", "account": "bob"}
    assert await ask(ws, {"op": "auth", "account": "bob", "cancel_on_disconnect": False}) == {
        "type": "authenticated",
        "account": "bob",
    }
    assert await leases(rds) == {}
    await ask(ws, {"op": "auth", "account": "bob", "cancel_on_disconnect": True})
    assert len(await leases(rds)) == 1
    await ask(ws, {"op": "auth", "account": "bob"})  # the connection no longer wants it: released

    async def released() -> bool:
        return await leases(rds) == {} and len(await cancels(rds)) == len(SYMBOLS)

    await until(released, "the lease released with its cancels")
    reply = await ask(ws, {"op": "auth", "account": "bob", "cancel_on_disconnect": "yes"})
    assert (reply["type"], reply["code"], reply["op"]) == ("reject", codes.INVALID_MESSAGE, "auth")
    assert "cancel_on_disconnect" in reply["reason"]
    await ws.close()


async def test_cancel_all_after_arms_renews_and_turns_off_the_switch(
    rds: aioredis.Redis, gateway_url: str
) -> None:
    ws = await connect(gateway_url, compression=None)
    anon = await ask(ws, {"op": "cancel_all_after", "timeout_ms": 60_000})
    assert (anon["type"], anon["code"], anon["op"]) == ("reject", codes.UNAUTHENTICATED, "cancel_all_after")
    await ask(ws, {"op": "auth", "account": "carol"})
    for bad in (999, 600_001, -1, 1000.0, "60000", True, None):
        reply = await ask(ws, {"op": "cancel_all_after", "timeout_ms": bad})
        assert (reply["type"], reply["code"], reply["op"]) == (
            "reject",
            codes.INVALID_MESSAGE,
            "cancel_all_after",
        )
        assert "timeout_ms must be 0 (off) or an integer from 1000 to 600000" in reply["reason"]
    before = wall_ms()
    armed = await ask(ws, {"op": "cancel_all_after", "timeout_ms": 60_000})
    assert armed["type"] == "cancel_all_after" and before + 60_000 <= armed["deadline"] <= wall_ms() + 60_000
    assert await rds.zscore(keys.dead_man_deadlines(), "carol") == armed["deadline"]
    assert (await ask(ws, {"op": "cancel_all_after", "timeout_ms": 600_000}))["deadline"] > armed["deadline"]
    assert await ask(ws, {"op": "cancel_all_after", "timeout_ms": 0}) == {
        "type": "cancel_all_after",
        "deadline": 0,
    }
    assert await rds.zscore(keys.dead_man_deadlines(), "carol") is None
    await ws.close()


async def test_a_lease_redis_refuses_fails_the_login_closed(redis_url: str) -> None:
    gateway = Gateway(default_instruments(), redis_url)
    port = await gateway.start("127.0.0.1", 0)

    async def refuse(conn: object, account: str) -> None:
        raise RedisError("OOM command not allowed")

    gateway.safety.register = refuse  # type: ignore[method-assign]
    try:
        ws = await connect(f"ws://127.0.0.1:{port}", compression=None)
        reply = await ask(ws, {"op": "auth", "account": "dave", "cancel_on_disconnect": True})
        assert (reply["type"], reply["code"], reply["op"]) == ("reject", codes.INTERNAL_ERROR, "auth")
        with pytest.raises(ConnectionClosed) as closed:
            await asyncio.wait_for(ws.recv(), 5)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1011
    finally:
        await gateway.stop(timeout=5)


async def test_a_gateway_shutdown_ends_its_leased_connections_with_their_cancels(
    rds: aioredis.Redis, redis_url: str
) -> None:
    gateway = Gateway(default_instruments(), redis_url)
    port = await gateway.start("127.0.0.1", 0)
    ws = await connect(f"ws://127.0.0.1:{port}", compression=None)
    await ask(ws, {"op": "auth", "account": "erin", "cancel_on_disconnect": True})
    await gateway.stop(timeout=5)
    assert await cancels(rds) == every_symbol("erin", DISCONNECT), "appended before the appender closed"
    assert await leases(rds) == {}
    await ws.close()
