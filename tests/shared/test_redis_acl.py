"""The per-service ACL users against a real redis-server started with them (shared.redis_server):
each user can do its service's job, and nothing a hostile neighbour would want."""

from __future__ import annotations

import asyncio
import hashlib
import json
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hiredis
import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from shared import keys
from shared.redis_acl import (
    ACL_FILE,
    ROLES,
    SERVICES,
    Credentials,
    generate,
    load_or_create,
    redact,
    write_deploy_secrets,
)
from shared.redis_server import RedisServer
from shared.resp import RespConnection, pack

SYM = "BTC-USDT"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    srv = RedisServer(tmp_path_factory.mktemp("acl") / "redis", credentials=generate()).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def clients(server: RedisServer) -> Iterator[dict[str, redis.Redis]]:
    made = {user: redis.Redis.from_url(server.url_for(user), socket_timeout=5) for user in ROLES}
    yield made
    for client in made.values():
        client.close()


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def run(client: redis.Redis, *command: Any) -> Any:
    return client.execute_command(*command)  # type: ignore[no-untyped-call]


def denied(client: redis.Redis, *command: Any) -> bool:
    try:
        run(client, *command)
    except redis.exceptions.NoPermissionError:
        return True
    return False


def subscribed(client: redis.Redis, *channels: str) -> set[str]:
    """Subscribe a new pub/sub connection; the kinds of Redis's confirmations (NOPERM raises)."""
    pubsub = client.pubsub()  # type: ignore[no-untyped-call]
    try:
        pubsub.subscribe(*channels)
        return {pubsub.get_message(timeout=5)["type"] for _ in channels}
    finally:
        pubsub.close()


# --- nobody without a password ------------------------------------------------------------------------
def test_an_unauthenticated_connection_can_do_nothing(server: RedisServer) -> None:
    once = Retry(NoBackoff(), 0)  # a refused login is a ConnectionError, which redis-py retries
    anonymous = redis.Redis(host=server.host, port=server.port, socket_timeout=5, retry=once)
    for command in (
        ("PING",),
        ("GET", keys.checkpoint(SYM)),
        ("CONFIG", "SET", "dir", "/tmp"),
        ("FLUSHALL",),
    ):
        with pytest.raises(redis.exceptions.AuthenticationError):
            run(anonymous, *command)
    with pytest.raises(redis.exceptions.AuthenticationError):
        run(anonymous, "AUTH", "default", "")
    wrong = redis.Redis(host=server.host, port=server.port, username="matcher", password="0" * 64, retry=once)
    with pytest.raises(redis.exceptions.AuthenticationError):
        wrong.ping()
    anonymous.close()


# --- what every user is refused ---------------------------------------------------------------------
DANGEROUS: list[tuple[Any, ...]] = [
    ("CONFIG", "SET", "dir", "/tmp"),
    ("CONFIG", "GET", "dir"),
    ("DEBUG", "SLEEP", "0"),
    ("MODULE", "LOAD", "/tmp/evil.so"),
    ("FLUSHALL",),
    ("FLUSHDB",),
    ("KEYS", "*"),
    ("SAVE",),
    ("BGSAVE",),
    ("REPLICAOF", "127.0.0.1", "1"),
    ("SLAVEOF", "127.0.0.1", "1"),
    ("MIGRATE", "127.0.0.1", "1", keys.orders(SYM), "0", "1000"),
    ("ACL", "SETUSER", "default", "on", "nopass", "+@all"),
    ("ACL", "LIST"),
    ("CLIENT", "KILL", "TYPE", "normal"),
    ("SCRIPT", "FLUSH"),
    ("SHUTDOWN", "NOSAVE"),  # last: were it allowed, it would end the server for everything after
]


@pytest.mark.parametrize("user", list(ROLES))
def test_no_user_may_reconfigure_write_files_or_drop_data(clients: dict[str, redis.Redis], user: str) -> None:
    client = clients[user]
    allowed = [" ".join(map(str, cmd)) for cmd in DANGEROUS if not denied(client, *cmd)]
    assert not allowed, f"{user} may run {allowed}"
    assert client.ping()


# --- each service: its job, and not its neighbours' ----------------------------------------------------
async def test_gateway_appends_reads_its_keys_and_receives_reports_only(
    server: RedisServer, clients: dict[str, redis.Redis]
) -> None:
    # The appender's own path: a bare RespConnection logging in as user:password from the URL.
    conn = await RespConnection.open(server.url_for("gateway"))
    try:
        payload = pack(b"XADD", keys.orders(SYM).encode(), b"*", b"d", b"x")
        payload += pack(b"INCRBY", keys.appended(SYM).encode(), b"1")
        added, count = await conn.roundtrip(payload, 2)
        assert isinstance(added, bytes) and count >= 1
        (forged,) = await conn.roundtrip(pack(b"PUBLISH", keys.exec_channel(SYM).encode(), b"a {}"), 1)
        assert isinstance(forged, hiredis.ReplyError) and "NOPERM" in str(forged)
    finally:
        conn.close()
    gw = clients["gateway"]
    gw.get(keys.appended(SYM))
    gw.hget(keys.progress(SYM), "applied")
    gw.xrange(keys.exec_log(SYM), "-", "+", count=10)
    gw.xrevrange(keys.exec_log(SYM), "+", "-", count=1)
    gw.hset(keys.instances("gateway"), "gateway-1", "{}")
    assert subscribed(gw, keys.exec_channel(SYM)) == {"subscribe"}
    assert denied(gw, "GET", keys.checkpoint(SYM)), "another service's data"
    assert denied(gw, "XADD", keys.events(SYM), "*", "d", "forged"), "the matcher's output"
    assert denied(gw, "SET", keys.matcher_lease(SYM), "me"), "the matcher's lease"
    assert denied(gw, "HSET", keys.instances("feeds"), "x", "y")
    with pytest.raises(redis.exceptions.NoPermissionError):
        subscribed(gw, keys.md_channel(SYM))


def test_feeds_receive_and_request_snapshots_only(clients: dict[str, redis.Redis]) -> None:
    feeds = clients["feeds"]
    assert subscribed(feeds, keys.md_channel(SYM), keys.trades_channel(SYM)) == {"subscribe"}
    feeds.publish(keys.snapshot_request_channel(SYM), "feeds-1")
    feeds.hset(keys.instances("feeds"), "feeds-1", "host:9100")
    feeds.hdel(keys.instances("feeds"), "feeds-1")
    assert denied(feeds, "XADD", keys.orders(SYM), "*", "d", "cancel everything"), "an order as the feeds"
    assert denied(feeds, "PUBLISH", keys.exec_channel(SYM), "victim {}"), "a forged execution report"
    assert denied(feeds, "XRANGE", keys.exec_log(SYM), "-", "+"), "every account's reports"
    assert denied(feeds, "HGETALL", keys.progress(SYM))
    assert denied(feeds, "GET", keys.checkpoint(SYM))
    with pytest.raises(redis.exceptions.NoPermissionError):
        subscribed(feeds, keys.exec_channel(SYM))


async def test_matcher_commits_in_a_transaction_and_runs_its_scripts(server: RedisServer) -> None:
    conn = await RespConnection.open(server.url_for("matcher"))
    try:
        read = pack(b"XREAD", b"COUNT", b"10", b"STREAMS", keys.orders(SYM).encode(), b"0-0")
        commit = [
            pack(b"MULTI"),
            pack(b"XADD", keys.events(SYM).encode(), b"MAXLEN", b"~", b"1000", b"*", b"d", b"e"),
            pack(b"XADD", keys.exec_log(SYM).encode(), b"*", b"d", b"e"),
            pack(b"PUBLISH", keys.exec_channel(SYM).encode(), b"a {}"),
            pack(b"PUBLISH", keys.md_channel(SYM).encode(), b"{}"),
            pack(b"HSET", keys.progress(SYM).encode(), b"applied", b"1"),
            pack(b"EXEC"),
        ]
        replies = await conn.roundtrip(read + b"".join(commit), 1 + len(commit))
        assert not [r for r in replies if isinstance(r, hiredis.ReplyError)], replies
        assert isinstance(replies[-1], list) and len(replies[-1]) == 5
    finally:
        conn.close()
    r = redis.Redis.from_url(server.url_for("matcher"), socket_timeout=5)
    # A fencing script as the matcher runs them: Redis checks every call against the matcher user.
    script = """
    local epoch = redis.call('INCR', KEYS[2])
    redis.call('SET', KEYS[1], ARGV[1], 'PX', 1000)
    redis.call('PEXPIRE', KEYS[1], 1000)
    redis.call('XADD', KEYS[3], '*', 'd', 'x')
    redis.call('PUBLISH', KEYS[4], 'x')
    redis.call('HSET', KEYS[5], 'epoch', epoch)
    local got = redis.call('GET', KEYS[1])
    redis.call('DEL', KEYS[1])
    return got
    """
    names = [
        keys.matcher_lease(SYM),
        keys.epoch(SYM),
        keys.events(SYM),
        keys.exec_channel(SYM),
        keys.progress(SYM),
    ]
    sha = r.script_load(script)
    assert r.evalsha(sha, len(names), *names, "me") == b"me"
    assert r.eval("return redis.call('GET', KEYS[1])", 1, keys.checkpoint(SYM)) is None
    with pytest.raises(redis.exceptions.ResponseError, match="user executing the script can't"):
        r.eval("return redis.call('KEYS', '*')", 0)
    with pytest.raises(redis.exceptions.ResponseError, match="user executing the script can't"):
        r.eval("return redis.call('SET', 'outside', '1')", 0)
    r.set(keys.checkpoint(SYM), b"blob")
    r.xrange(keys.orders(SYM))
    r.xinfo_stream(keys.orders(SYM))
    r.xtrim(keys.orders(SYM), minid="0-1")
    r.hgetall(keys.progress(SYM))
    assert denied(r, "SET", "not-ours", "1"), "keys outside cme:*"
    r.close()


def test_admin_checks_readiness_and_reads_everything(clients: dict[str, redis.Redis]) -> None:
    admin = clients["admin"]
    assert admin.ping() and "loading" in admin.info("persistence")
    admin.xrange(keys.orders(SYM), count=1)


async def test_resp_connection_refuses_a_wrong_password(server: RedisServer) -> None:
    bad = generate().url("gateway", server.host, server.port)  # another secret's password
    with pytest.raises(ConnectionError, match="refused the connection setup"):
        await asyncio.wait_for(RespConnection.open(bad), 5)


# --- credentials and files -----------------------------------------------------------------------------
def test_passwords_are_per_user_and_the_acl_file_holds_only_hashes() -> None:
    creds = generate()
    passwords = {user: creds.password(user) for user in ROLES}
    assert len(set(passwords.values())) == len(ROLES) and all(len(p) == 64 for p in passwords.values())
    assert Credentials(creds.secret).password("feeds") == passwords["feeds"]
    assert generate().password("feeds") != passwords["feeds"]
    text = creds.acl_text()
    for user, password in passwords.items():
        assert password not in text
        assert f"#{hashlib.sha256(password.encode()).hexdigest()}" in text, user
    assert text.splitlines()[0].startswith("user default off")
    with pytest.raises(KeyError):
        creds.password("nobody")


def test_the_secret_is_created_private_and_kept(tmp_path: Path) -> None:
    path = tmp_path / "redis.secret"
    first = load_or_create(path)
    assert mode(path) == 0o600 and len(first.secret) == 64
    assert load_or_create(path) == first
    path.chmod(0o644)
    assert load_or_create(path) == first and mode(path) == 0o600


def test_server_files_are_private(server: RedisServer) -> None:
    assert mode(server.data_dir) == 0o700
    for name in ("appendonly.aof", "redis.log", ACL_FILE):
        assert mode(server.data_dir / name) == 0o600, name


def test_deploy_secrets(tmp_path: Path) -> None:
    out = tmp_path / "secrets"
    write_deploy_secrets(out, "redis", 6379)
    assert mode(out) == 0o700 and mode(out / ACL_FILE) == 0o644
    creds = load_or_create(out / "redis.secret")
    assert (out / ACL_FILE).read_text() == creds.acl_text()
    secret = json.loads((out / "k8s-secret.json").read_text())
    assert (secret["kind"], secret["metadata"]["name"]) == ("Secret", "cme-redis")
    assert secret["stringData"][ACL_FILE] == creds.acl_text()
    assert secret["stringData"]["admin.password"] == creds.password("admin")
    for user in (*SERVICES, "admin"):
        url = creds.url(user, "redis", 6379)
        assert (out / f"{user}.url").read_text() == url == secret["stringData"][f"{user}.url"]
        env = (out / f"{user}.env").read_text().splitlines()
        assert env[0] == f"CME_REDIS_URL={url}" and mode(out / f"{user}.env") == 0o600
    assert (out / "admin.env").read_text().splitlines()[1] == f"REDISCLI_AUTH={creds.password('admin')}"
    assert not [p.name for p in out.iterdir() if p.name != ACL_FILE and mode(p) != 0o600]


def test_redact_hides_only_the_password() -> None:
    url = generate().url("gateway", "10.0.0.5", 6380)
    assert redact(url) == "redis://gateway:***@10.0.0.5:6380/0"
    assert redact("rediss://:pw@h:1/2") == "rediss://:***@h:1/2"
    assert redact("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"


@pytest.mark.parametrize("risk", [False, True])
async def test_the_real_matcher_and_gateway_queries_run_as_their_users(tmp_path: Path, risk: bool) -> None:
    """The matcher's own commit scripts (events, publishes, exec log, progress, order read model and,
    with balances, the balances read model) pass the matcher user's ACL, and the gateway user may read
    what order_status, open_orders and balances read."""
    import redis.asyncio as aioredis

    from services.gateway import orders
    from shared.commands import Cancel, Deposit, NewOrder
    from shared.ids import entry_to_seq
    from shared.instruments import asset_scales
    from shared.stream import APPEND_SCRIPT, encode
    from tests.matcher import await_until, config, in_process

    sym, account = "ETH-USDT", "acl"
    server = RedisServer(tmp_path / "redis", credentials=generate()).start()  # its own: a fresh venue
    admin = redis.Redis.from_url(server.url_for("admin"), socket_timeout=5)

    def append(cmd: Any) -> str:
        data = encode(cmd, 0, asset_scales(cfg.instruments))
        if risk:
            return str(admin.eval(APPEND_SCRIPT, 2, keys.id_clock(), keys.orders(sym), 2, data)[0].decode())
        return str(admin.xadd(keys.orders(sym), {b"d": data}).decode())

    gateway = aioredis.Redis.from_url(server.url_for("gateway"), socket_timeout=5)
    cfg = config(server.url_for("matcher"), tmp_path / "var", risk=risk)
    try:
        async with in_process(cfg) as run:
            if risk:
                append(Deposit(account, "USDT", 10**20))
            resting = append(NewOrder(sym, account, "buy", "limit", "gtc", 100_000, 5_000, "r1"))
            gone = append(NewOrder(sym, account, "buy", "limit", "gtc", 100_001, 5_000, "r2"))
            last = append(Cancel(sym, account, entry_to_seq(gone)))
            await await_until(
                lambda: admin.hget(keys.progress(sym), "last_id") == last.encode(), 10, "committed"
            )
            assert await run.stop() == 0
        assert await orders.caught_up(gateway, sym, entry_to_seq(last))
        listed = await orders.open_orders(gateway, (sym,), account)
        assert resting.encode() in listed and gone.encode() not in listed
        assert isinstance(await orders.order_status(gateway, sym, account, gone, None), bytes)
        if risk:
            assert await gateway.hgetall(keys.balances(account))
    finally:
        await gateway.aclose()
        admin.close()
        server.stop()
