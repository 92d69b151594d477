"""`cme up`: the whole stack on one machine, each service its own process, in the foreground.

Starts an embedded redis-server (unless --redis-url) with AOF on and its files under --data-dir, then
the matcher, the gateways and the feeds as `python -m services.cli <service>` children. A child that
dies is restarted with a backoff and the restart is logged; SIGINT/SIGTERM stops the gateways and
feeds, then the matcher (SIGTERM first, so it writes a final checkpoint), then Redis last.

{data-dir}/stack.json describes the running stack (pids, ports, URLs) for tools and `cme demo`; it is
rewritten on every restart and removed on a clean stop. `Stack` is also what `cme bench e2e` uses to
start a private stack.
"""

from __future__ import annotations

import argparse
import ctypes
import fcntl
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import orjson

from services.wsclient import port_open
from shared.redis_server import RedisServer, free_port

LOG = logging.getLogger("cme.up")

FIRST_BACKOFF = 0.25  # seconds before the first restart of a child: quick enough for a demo
MAX_BACKOFF = 5.0  # a child that keeps dying is retried this often, forever
QUICK_DEATH = 10.0  # a child that ran less than this many seconds counts as dying quickly
SERVICE_GRACE = 5.0  # seconds a gateway or feed gets to exit after SIGTERM
MATCHER_GRACE = 10.0  # the matcher may be writing its final checkpoint
READY_TIMEOUT = 30.0
POLL = 0.1

try:  # Linux: children get SIGTERM if the supervisor dies, so a `kill -9` of it leaves no orphans.
    _LIBC: Any = ctypes.CDLL(None, use_errno=True)
    _PR_SET_PDEATHSIG = 1
except OSError:  # pragma: no cover - not Linux
    _LIBC = None


def _child_setup(parent_pid: int) -> None:
    """Runs in the forked child before exec: only async-signal-safe work (the libc handle is preloaded)."""
    if _LIBC is not None and hasattr(_LIBC, "prctl"):
        _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent_pid:  # the parent died before prctl took effect
            os.kill(os.getpid(), signal.SIGTERM)


def _popen(argv: list[str], out: IO[bytes] | int | None) -> subprocess.Popen[bytes]:
    # A session of its own: a Ctrl-C at the terminal reaches only the supervisor, which then stops
    # the children in order (Redis last) instead of all of them at once.
    parent = os.getpid()
    return subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=out,
        stderr=out,
        start_new_session=True,
        preexec_fn=lambda: _child_setup(parent),
    )


class StackError(RuntimeError):
    """The stack cannot start (a port is taken, the data dir is in use, Redis does not come up)."""


@dataclass
class StackConfig:
    host: str = "127.0.0.1"
    gateway_port: int = 8000  # 0 for any of the ports: pick a free one
    md_port: int = 8001
    trades_port: int = 8002
    metrics_port: int = 9100  # first of a range: matcher, gateways, feeds
    redis_url: str | None = None
    data_dir: Path = Path("./var")
    feeds: int = 1
    gateways: int = 1
    api_keys: str | None = None
    instruments: str | None = None
    log_level: str = "INFO"
    log_dir: Path | None = None  # None: children write to our stderr; else one file per child
    extra: dict[str, list[str]] = field(default_factory=dict)  # service -> extra flags (the e2e bench)
    command: list[str] = field(default_factory=lambda: [sys.executable, "-m", "services.cli"])

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> StackConfig:
        def absolute(path: str | None) -> str | None:
            return str(Path(path).resolve()) if path else None

        return cls(
            host=args.host,
            gateway_port=args.gateway_port,
            md_port=args.md_port,
            trades_port=args.trades_port,
            metrics_port=args.metrics_port,
            redis_url=args.redis_url,
            data_dir=Path(args.data_dir),
            feeds=args.feeds,
            gateways=args.gateways,
            api_keys=absolute(args.api_keys),
            instruments=absolute(args.instruments),
            log_level=args.log_level,
        )

    @property
    def client_host(self) -> str:
        """Where local clients connect: a wildcard bind address is not a destination."""
        return "127.0.0.1" if self.host in ("0.0.0.0", "", "::") else self.host


@dataclass
class Child:
    name: str  # matcher, gateway-1, feeds-2 ...
    service: str  # matcher | gateway | feeds
    argv: list[str]
    metrics_port: int
    proc: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    restarts: int = 0
    backoff: float = FIRST_BACKOFF
    restart_at: float | None = None  # set while the child is dead and waiting for its restart

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


def describe_exit(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def free_ports(host: str, count: int) -> list[int]:
    """`count` distinct free ports, outside the range the kernel gives to client sockets."""
    return [free_port(host) for _ in range(count)]


def port_free(host: str, port: int) -> bool:
    """Can a server bind host:port? (SO_REUSEADDR as servers set it, so TIME_WAIT does not count.)"""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


class Stack:
    """Redis (embedded or not) plus the service processes; start, poll (restart), stop."""

    def __init__(self, cfg: StackConfig) -> None:
        self.cfg = cfg
        self.data_dir = cfg.data_dir.resolve()
        self.redis: RedisServer | None = None
        self.redis_url = cfg.redis_url or ""
        self.children: list[Child] = []
        self.ready = False
        self.stopping = False
        self._lock_fd: int | None = None
        self._logs: list[IO[bytes]] = []
        self.ports: dict[str, int] = {}

    # --- start ------------------------------------------------------------------------------------
    def start(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._lock()
        self._resolve_ports()
        if self.cfg.redis_url is None:
            self._start_redis()
        self.children = self._plan()
        for child in self.children:
            self._spawn(child)
        self.write_state()

    def _lock(self) -> None:
        # Two stacks on one data dir would run two Redis servers on one AOF: refuse the second.
        fd = os.open(self.data_dir / ".cme-up.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            raise StackError(f"another `cme up` is running on {self.data_dir}") from exc
        self._lock_fd = fd

    def _resolve_ports(self) -> None:
        cfg, host = self.cfg, self.cfg.host
        n = 1 + cfg.gateways + cfg.feeds
        wanted = {"gateway": cfg.gateway_port, "md": cfg.md_port, "trades": cfg.trades_port}
        if cfg.metrics_port:
            wanted.update({f"metrics{i}": cfg.metrics_port + i for i in range(n)})
        taken = [f"{name} {port}" for name, port in wanted.items() if port and not port_free(host, port)]
        if taken:
            raise StackError(f"ports already in use on {host}: {', '.join(taken)}")
        if not cfg.metrics_port:
            wanted.update({f"metrics{i}": 0 for i in range(n)})
        spare = iter(free_ports(host, sum(1 for port in wanted.values() if not port)))
        self.ports = {name: port or next(spare) for name, port in wanted.items()}

    def _start_redis(self) -> None:
        # Same port across restarts on one data dir, so a URL someone noted down keeps working.
        redis_dir = self.data_dir / "redis"
        redis_dir.mkdir(parents=True, exist_ok=True)
        port_file = redis_dir / "port"
        port = 0
        if port_file.exists():
            text = port_file.read_text().strip()
            stored = int(text) if text.isdigit() else 0
            if stored and port_free("127.0.0.1", stored):
                port = stored
            elif stored:
                LOG.warning("redis port %d from %s is taken; choosing another", stored, port_file)
        if not port:  # not one of the ports just chosen for the services (they are not bound yet)
            port = next(p for p in free_ports("127.0.0.1", 8) if p not in self.ports.values())
        self.redis = RedisServer(redis_dir, port=port, spawn=lambda argv: _popen(argv, subprocess.DEVNULL))
        port_file.write_text(f"{self.redis.port}\n")
        LOG.info("starting redis-server on port %d (AOF everysec, files in %s)", self.redis.port, redis_dir)
        try:
            self.redis.start()
        except RuntimeError as exc:
            raise StackError(str(exc)) from exc
        self.redis_url = self.redis.url

    def _plan(self) -> list[Child]:
        cfg = self.cfg
        base = cfg.command
        common = ["--redis-url", self.redis_url, "--log-level", cfg.log_level]
        if cfg.instruments:
            common += ["--instruments", cfg.instruments]
        metrics = iter(self.ports[f"metrics{i}"] for i in range(1 + cfg.gateways + cfg.feeds))

        def child(name: str, service: str, flags: list[str]) -> Child:
            port = next(metrics)
            argv = [*base, service, *common, "--metrics-port", str(port), "--instance", name, *flags]
            return Child(name, service, [*argv, *cfg.extra.get(service, [])], port)

        keys = ["--api-keys", cfg.api_keys] if cfg.api_keys else []
        out = [child("matcher", "matcher", ["--data-dir", str(self.data_dir)])]
        out += [
            child(
                f"gateway-{i}", "gateway", ["--host", cfg.host, "--port", str(self.ports["gateway"]), *keys]
            )
            for i in range(1, cfg.gateways + 1)
        ]
        out += [
            child(
                f"feeds-{i}",
                "feeds",
                [
                    "--host",
                    cfg.host,
                    "--md-port",
                    str(self.ports["md"]),
                    "--trades-port",
                    str(self.ports["trades"]),
                ],
            )
            for i in range(1, cfg.feeds + 1)
        ]
        return out

    def _spawn(self, child: Child) -> None:
        out: IO[bytes] | None = None
        if self.cfg.log_dir is not None:
            self.cfg.log_dir.mkdir(parents=True, exist_ok=True)
            out = open(self.cfg.log_dir / f"{child.name}.log", "ab")  # noqa: SIM115 - lives as long as the stack
            self._logs.append(out)
        child.proc = _popen(child.argv, out)
        child.started = time.monotonic()
        child.restart_at = None

    def wait_ready(self, timeout: float = READY_TIMEOUT, stop: Stopper | None = None) -> bool:
        """Until every listening port accepts connections (children are restarted meanwhile)."""
        host = self.cfg.client_host
        deadline = time.monotonic() + timeout
        pending = [self.ports["gateway"], self.ports["md"], self.ports["trades"]]
        pending += [c.metrics_port for c in self.children]
        while pending and time.monotonic() < deadline and not (stop and stop.requested):
            self.poll()
            pending = [p for p in pending if not port_open(host, p, timeout=0.2)]
            if pending:
                time.sleep(POLL)
        if self.ready != (not pending):
            self.ready = not pending
            self.write_state()
        return self.ready

    # --- monitor ----------------------------------------------------------------------------------
    def poll(self) -> None:
        """Notice dead children, schedule and perform restarts (call every ~100 ms)."""
        if self.stopping:
            return
        now = time.monotonic()
        changed = False
        for child in self.children:
            if child.restart_at is None and child.proc is not None and child.proc.poll() is not None:
                uptime = now - child.started
                if uptime >= QUICK_DEATH:  # it ran fine for a while: this is a fresh failure
                    child.backoff = FIRST_BACKOFF
                delay = child.backoff
                child.backoff = min(child.backoff * 2, MAX_BACKOFF)
                child.restart_at = now + delay
                LOG.warning(
                    "%s (pid %d) died after %.1f s: %s; restarting in %.2f s",
                    child.name,
                    child.proc.pid,
                    uptime,
                    describe_exit(child.proc.returncode),
                    delay,
                )
            if child.restart_at is not None and now >= child.restart_at:
                old = child.pid
                self._spawn(child)
                child.restarts += 1
                changed = True
                LOG.warning(
                    "restarted %s: pid %s -> %d (restart #%d)", child.name, old, child.pid, child.restarts
                )
        if self.redis is not None and self.redis.proc is not None and self.redis.proc.poll() is not None:
            LOG.warning(
                "redis-server (pid %d) died: %s; restarting it on port %d",
                self.redis.proc.pid,
                describe_exit(self.redis.proc.returncode),
                self.redis.port,
            )
            try:
                self.redis.start()
                LOG.warning("restarted redis-server: pid %d", self.redis.proc.pid)
            except StackError as exc:
                LOG.error("%s", exc)  # retried on the next poll
            changed = True
        if changed:
            self.write_state()

    # --- stop -------------------------------------------------------------------------------------
    def stop(self, stop: Stopper | None = None) -> None:
        """Gateways, then feeds, then the matcher, then Redis; a second signal skips the waiting."""
        self.stopping = True
        for service, grace in (
            ("gateway", SERVICE_GRACE),
            ("feeds", SERVICE_GRACE),
            ("matcher", MATCHER_GRACE),
        ):
            group = [c for c in self.children if c.service == service]
            self._terminate(group, grace, stop)
        if self.redis is not None and self.redis.proc is not None and self.redis.proc.poll() is None:
            LOG.info("stopping redis-server (pid %d)", self.redis.proc.pid)
            self.redis.stop()  # SIGTERM: Redis flushes the AOF before it exits
        for f in self._logs:
            f.close()
        if self._lock_fd is not None:  # only the owner of the data dir may remove its stack.json
            (self.data_dir / "stack.json").unlink(missing_ok=True)
            os.close(self._lock_fd)
            self._lock_fd = None
            LOG.info("stopped")

    def _terminate(self, group: list[Child], grace: float, stop: Stopper | None) -> None:
        live = [c for c in group if c.alive()]
        for c in group:
            c.restart_at = None
        for c in live:
            LOG.info("stopping %s (pid %s)", c.name, c.pid)
            assert c.proc is not None
            c.proc.terminate()
        deadline = time.monotonic() + grace
        while any(c.alive() for c in live) and time.monotonic() < deadline and not (stop and stop.forced):
            time.sleep(0.05)
        for c in live:
            if c.alive():
                LOG.warning("%s (pid %s) did not exit in time: SIGKILL", c.name, c.pid)
                assert c.proc is not None
                c.proc.kill()
            if c.proc is not None:
                c.proc.wait()

    # --- state for tools --------------------------------------------------------------------------
    def endpoints(self) -> dict[str, str]:
        h = self.cfg.client_host
        return {
            "gateway": f"ws://{h}:{self.ports['gateway']}",
            "md": f"ws://{h}:{self.ports['md']}",
            "trades": f"ws://{h}:{self.ports['trades']}",
        }

    def state(self) -> dict[str, Any]:
        h = self.cfg.client_host
        return {
            "supervisor_pid": os.getpid(),
            "ready": self.ready,
            "host": self.cfg.host,
            **self.endpoints(),
            "ports": self.ports,
            "redis_url": self.redis_url,
            "redis_pid": self.redis.proc.pid if self.redis and self.redis.proc else None,
            "embedded_redis": self.redis is not None,
            "data_dir": str(self.data_dir),
            "processes": [
                {
                    "name": c.name,
                    "service": c.service,
                    "pid": c.pid,
                    "metrics": f"http://{h}:{c.metrics_port}/metrics",
                    "metrics_port": c.metrics_port,
                    "restarts": c.restarts,
                }
                for c in self.children
            ],
            "updated": time.time(),
        }

    def write_state(self) -> None:
        path = self.data_dir / "stack.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_bytes(orjson.dumps(self.state(), option=orjson.OPT_INDENT_2))
        os.replace(tmp, path)  # readers never see a half-written file

    def table(self) -> str:
        ep = self.endpoints()
        rows = [("gateway", ep["gateway"], "orders (ws)"), ("md", ep["md"], "l2 / depth (ws)")]
        rows.append(("trades", ep["trades"], "trades (ws)"))
        h = self.cfg.client_host
        rows += [(c.name, f"http://{h}:{c.metrics_port}/metrics", f"pid {c.pid}") for c in self.children]
        kind = "embedded, AOF everysec" if self.redis else "external"
        rows.append(("redis", self.redis_url, kind))
        rows.append(("data dir", str(self.data_dir), "stack.json"))
        width = max(len(r[1]) for r in rows)
        lines = [f"  {name:<10} {where:<{width}}  {note}" for name, where, note in rows]
        return "\n".join(["cme up: the stack is running (Ctrl-C stops it)", *lines])


class Stopper:
    """SIGINT/SIGTERM handling: the first signal asks for an orderly stop, a second one skips the waits."""

    def __init__(self) -> None:
        self.requested = False
        self.forced = False

    def install(self) -> None:
        signal.signal(signal.SIGINT, self._handle)
        signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum: int, _frame: object) -> None:
        if self.requested:
            self.forced = True
            LOG.warning("%s again: not waiting for children any more", signal.Signals(signum).name)
        else:
            self.requested = True
            LOG.info("%s: stopping the stack", signal.Signals(signum).name)


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s.%(msecs)03d cme-up %(levelname)s %(message)s",
        datefmt="%Y-%m-%d %H:%M:%S",
        stream=sys.stderr,
    )


def run(args: argparse.Namespace) -> int:
    setup_logging(args.log_level)
    stopper = Stopper()
    stopper.install()  # before any child exists, so an early Ctrl-C still stops what was started
    stack = Stack(StackConfig.from_args(args))
    try:
        stack.start()
    except (StackError, OSError) as exc:
        LOG.error("cannot start the stack: %s", exc)
        stack.stop()
        return 1
    if stack.wait_ready(stop=stopper):
        print(stack.table(), flush=True)
    elif not stopper.requested:
        LOG.warning("not every port accepts connections after %.0f s; still monitoring", READY_TIMEOUT)
        print(stack.table(), flush=True)
    while not stopper.requested:
        stack.poll()
        if not stack.ready:
            stack.wait_ready(timeout=POLL, stop=stopper)
        time.sleep(POLL)
    stack.stop(stopper)
    return 0
