"""Who may do what in Redis: one ACL user per service, the rules in this one place.

A stack's Redis credentials all derive from one secret (32 random bytes, hex, in a 0600 file of the
data dir): each user's password is HMAC-SHA256(secret, user), so a service given its own password
learns nothing of the others', and rotating means replacing one file. The ACL file handed to
redis-server holds only SHA-256 hashes of those passwords (`#<hex>`), never the passwords.

Every user starts from nothing (`resetkeys resetchannels -@all`) and gets the commands, key patterns
and channel patterns its service uses today. The default user is off: an unauthenticated connection can
run nothing but AUTH and HELLO. No user may run CONFIG, DEBUG, MODULE, ACL, SHUTDOWN, FLUSHALL,
FLUSHDB, KEYS, SAVE, BGSAVE, REPLICAOF, SLAVEOF, MIGRATE or CLIENT KILL (tests/shared/test_redis_acl.py),
so rename-command is not needed.

Redis 6.2 limits (its ACLs check a command and its keys separately, and channels regardless of
PUBLISH or SUBSCRIBE): the gateway may XADD to any key it may read (the exec log, the progress hash),
and the feeds may PUBLISH on the md and trades channels they subscribe to. Redis 7 selectors could
split those; the embedded server is 6.2, and a gateway or feed already speaks for itself to its own
clients, so what they could forge is what they already deliver.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import logging
import os
import secrets
import sys
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

from shared import keys

log = logging.getLogger("cme.redis_acl")

SECRET_FILE = "redis.secret"  # in the stack's data dir
ACL_FILE = "users.acl"  # in the Redis data dir, rewritten from the secret at every start
URL_ENV = "CME_REDIS_URL"  # how a service gets its URL without the password showing in `ps`

ANY = "*"  # every symbol in a key or channel pattern (Redis glob)


@dataclass(frozen=True)
class Role:
    commands: tuple[str, ...]  # ACL command rules: `get`, `script|load`, `@all`, `-@dangerous` ...
    keys: tuple[str, ...] = ()  # key glob patterns
    channels: tuple[str, ...] = ()  # pub/sub channel glob patterns


ROLES: dict[str, Role] = {
    # The single writer of every symbol: commits (MULTI/EXEC of XADD + PUBLISH + HSET), the lease and
    # fencing scripts (EVAL/EVALSHA of GET, SET, INCR, PEXPIRE, DEL, XADD, PUBLISH, HSET: Redis checks
    # each call against this user), recovery reads, checkpoints, trims, snapshot requests.
    "matcher": Role(
        commands=(
            *("ping", "get", "set", "del", "exists", "incr", "incrby", "pexpire", "pttl"),
            *("hget", "hgetall", "hset", "hdel", "lpush", "llen", "rpop"),  # lists: the closed orders
            *("xadd", "xread", "xrange", "xrevrange", "xtrim", "xlen", "xinfo"),
            *("publish", "subscribe", "unsubscribe", "multi", "exec", "discard"),
            *("eval", "evalsha", "script|load", "script|exists"),
        ),
        keys=(f"{keys.PREFIX}:*",),
        channels=(f"{keys.PREFIX}:*",),
    ),
    # Appends orders (XADD + INCRBY appended, or the id-clock script with balances on), polls lag (GET
    # appended, HGET progress), serves `executions` from the exec log and `balances` from the read
    # model, receives execution reports. It never publishes.
    "gateway": Role(
        commands=(
            *("ping", "xadd", "incrby", "get", "hget", "hgetall", "hset", "hdel", "xrange", "xrevrange"),
            *("subscribe", "unsubscribe", "evalsha", "script|load"),
            *("zadd", "zrem", "zrangebyscore", "zscore"),  # the safety switches (and their scripts)
            "hmget",  # order_status
        ),
        keys=(
            keys.orders(ANY),
            keys.id_clock(),  # the append script (balances on)
            keys.balances(ANY),  # the `balances` query
            keys.appended(ANY),
            keys.progress(ANY),
            keys.exec_log(ANY),
            keys.instances("gateway"),
            keys.matcher_lease(ANY),  # read for /healthz: is a matcher alive?
            keys.disconnect_leases(),  # cancel on disconnect (services.gateway.safety)
            keys.dead_man_deadlines(),  # the dead man's switch
            keys.open_orders(ANY, ANY),  # order_status and open_orders (the matcher's read model)
            keys.closed_orders(ANY, ANY),
            keys.client_order_ids(ANY, ANY),
        ),
        channels=(keys.exec_channel(ANY),),
    ),
    # Receives md and trades, asks the matcher for snapshots; reads no key but its discovery hash and
    # the matcher leases (for /healthz: is a matcher alive?).
    "feeds": Role(
        commands=("ping", "get", "publish", "subscribe", "unsubscribe", "hset", "hdel", "xrange"),
        keys=(keys.instances("feeds"), keys.matcher_lease(ANY), keys.events(ANY)),  # events: candles
        channels=(keys.md_channel(ANY), keys.trades_channel(ANY), keys.snapshot_request_channel(ANY)),
    ),
    # `cme up` (readiness: PING, INFO) and operators inspecting the venue (redis-cli --user admin):
    # every read and write, none of the commands that reconfigure the server, write files, replicate
    # elsewhere, drop the data or kill clients, and no SCRIPT (FLUSH would break the matcher's EVALSHA;
    # 6.2 cannot deny one subcommand). Reconfiguring means restarting with other flags.
    "admin": Role(
        commands=(
            "@all",
            "-@dangerous",
            "-script",
            "info",
            "slowlog|get",
            "latency|latest",
            "client|list",
            "role",
        ),
        keys=("*",),
        channels=("*",),
    ),
}

SERVICES = ("matcher", "gateway", "feeds")


def rule_line(user: str, password_hash: str) -> str:
    """One `user` line of an ACL file for `user`, whose password's SHA-256 is password_hash."""
    role = ROLES[user]
    parts = ["user", user, "on", f"#{password_hash}", "resetkeys", "resetchannels", "-@all"]
    parts += [c if c.startswith("-") else f"+{c}" for c in role.commands]
    parts += [f"~{k}" for k in role.keys]
    parts += [f"&{c}" for c in role.channels]
    return " ".join(parts)


# The default user (what a connection is before AUTH) can do nothing at all.
DEFAULT_OFF = "user default off resetpass resetkeys resetchannels -@all"


@dataclass(frozen=True)
class Credentials:
    """A stack's Redis secret and everything derived from it."""

    secret: bytes

    def password(self, user: str) -> str:
        if user not in ROLES:
            raise KeyError(f"no Redis ACL user {user!r}")
        return hmac.new(self.secret, f"cme-redis-user:{user}".encode(), hashlib.sha256).hexdigest()

    def acl_text(self) -> str:
        lines = [DEFAULT_OFF]
        for user in ROLES:
            digest = hashlib.sha256(self.password(user).encode()).hexdigest()
            lines.append(rule_line(user, digest))
        return "\n".join(lines) + "\n"

    def url(self, user: str, host: str, port: int, *, db: int = 0, tls: bool = False) -> str:
        scheme = "rediss" if tls else "redis"
        return f"{scheme}://{quote(user, safe='')}:{quote(self.password(user), safe='')}@{host}:{port}/{db}"


def redact(url: str) -> str:
    """The URL with its password replaced by `***`: for logs, stack.json and the terminal."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = f"{parts.username}:" if parts.username else ":"
    host = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit(parts._replace(netloc=f"{user}***@{host}"))


def generate() -> Credentials:
    return Credentials(secrets.token_hex(32).encode())


def write_private(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Write a file that is never readable by others, not even for a moment (created with `mode`)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.chmod(tmp, mode)  # the umask may have taken bits away; never added any
    os.replace(tmp, path)


def load_or_create(path: Path) -> Credentials:
    """The secret in `path`, created on first use (0600). A file others can read is made private."""
    try:
        text = path.read_bytes().strip()
    except FileNotFoundError:
        creds = generate()
        write_private(path, creds.secret + b"\n")
        log.info("generated a new Redis secret in %s", path)
        return creds
    if len(text) < 32:
        raise ValueError(
            f"{path}: the Redis secret is too short ({len(text)} characters; delete it to regenerate)"
        )
    if path.stat().st_mode & 0o077:
        log.warning("%s was readable by others: now 0600 (rotate the secret if that matters)", path)
        path.chmod(0o600)
    return Credentials(text)


# `cme redis-secrets`: credentials for deploy/ (docker compose and Kubernetes) --------------------------
K8S_SECRET = "cme-redis"  # the Secret deploy/k8s/cme.yaml reads
K8S_NAMESPACE = "cme"


def write_deploy_secrets(out: Path, host: str = "redis", port: int = 6379) -> list[Path]:
    """A fresh secret's files for a containerised venue, in `out` (mode 0700):

    - users.acl: the ACL file for redis-server (--aclfile). Hashes only, so it may be 0644: the redis
      container reads it as its own user;
    - <user>.env: `CME_REDIS_URL=...` for compose's env_file, one per service and admin (0600); admin's
      also sets REDISCLI_AUTH, so a health check can log in without a password in its arguments;
    - <user>.url, admin.password: the same values as files, the keys of k8s-secret.json;
    - k8s-secret.json: the Kubernetes Secret cme-redis holding all of them (kubectl apply -f);
    - redis.secret: the secret itself, to derive them again (0600)."""
    out.mkdir(parents=True, exist_ok=True)
    out.chmod(0o700)
    creds = generate()
    files: dict[str, tuple[str, int]] = {
        SECRET_FILE: (creds.secret.decode() + "\n", 0o600),
        ACL_FILE: (creds.acl_text(), 0o644),
        "admin.password": (creds.password("admin"), 0o600),
    }
    for user in ROLES:
        url = creds.url(user, host, port)
        extra = f"REDISCLI_AUTH={creds.password(user)}\n" if user == "admin" else ""
        files[f"{user}.env"] = (f"{URL_ENV}={url}\n{extra}", 0o600)
        files[f"{user}.url"] = (url, 0o600)
    data = {
        name: text for name, (text, _) in files.items() if name != SECRET_FILE and not name.endswith(".env")
    }
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": K8S_SECRET, "namespace": K8S_NAMESPACE},
        "type": "Opaque",
        "stringData": data,
    }
    files["k8s-secret.json"] = (json.dumps(secret, indent=2) + "\n", 0o600)
    for name, (text, mode) in files.items():
        write_private(out / name, text.encode(), mode)
    return [out / name for name in files]


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if (out / SECRET_FILE).exists() and not args.force:
        print(
            f"{out / SECRET_FILE} exists: keeping the current credentials (--force replaces them)",
            file=sys.stderr,
        )
        return 1
    for path in write_deploy_secrets(out, args.redis_host, args.redis_port):
        print(path)
    return 0
