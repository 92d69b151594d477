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
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import orjson
import redis

from shared import logs
from shared.net import port_open
from shared.redis_acl import SECRET_FILE, URL_ENV, load_or_create, redact
from shared.redis_server import RedisServer, free_port

LOG = logging.getLogger("cme.up")

FIRST_BACKOFF = 0.25  # seconds before the first restart of a child: quick enough for a demo
MAX_BACKOFF = 5.0  # a child that keeps dying is retried this often, forever
QUICK_DEATH = 10.0  # a child that ran less than this many seconds counts as dying quickly
SERVICE_GRACE = 5.0  # seconds a gateway or feed gets to exit after SIGTERM
MATCHER_GRACE = 10.0  # the matcher may be writing its final checkpoint
READY_TIMEOUT = 30.0
POLL = 0.1
REDIS_WAIT_FIRST, REDIS_WAIT_MAX = 1.0, 30.0  # "still waiting for Redis" lines: 1 s apart, doubling to 30
ROOT = Path(__file__).resolve().parents[1]
RULES = ROOT / "deploy" / "prometheus" / "rules.yml"
# The flag that moves each port, for the "port taken" error.
PORT_FLAGS = {
    "gateway": "--gateway-port",
    "md": "--md-port",
    "trades": "--trades-port",
    "web": "--web-port",
    "prometheus": "--prometheus-port",
}
# `cme up` flags passed through to each service (dest, the service's flag).
TUNING = {
    "gateway": (("rate_limit", "--rate-limit"), ("max_lag", "--max-lag")),
    "matcher": (
        ("checkpoint_every", "--checkpoint-every"),
        ("checkpoint_seconds", "--checkpoint-seconds"),
        ("batch", "--batch"),
    ),
    "feeds": (("depth_interval", "--depth-interval"),),
}

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


def _popen(
    argv: list[str], out: IO[bytes] | int | None, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    # A session of its own: a Ctrl-C at the terminal reaches only the supervisor, which then stops
    # the children in order (Redis last) instead of all of them at once. Umask 077: whatever a child
    # writes in the data dir (AOF, checkpoints, logs) is the stack user's alone.
    parent = os.getpid()
    return subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=out,
        stderr=out,
        env={**os.environ, **env} if env else None,
        start_new_session=True,
        umask=0o077,
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
    web_port: int | None = None  # the trading page (0: any free port); None: no web process
    metrics_port: int = 9100  # first of a range: matcher, gateways, feeds
    metrics_host: str | None = None  # None: the same as host
    redis_url: str | None = None
    data_dir: Path = Path("./var")
    feeds: int = 1
    gateways: int = 1
    matchers: int = 1  # one active, the others standing by to take over its leases
    api_keys: str | None = None
    risk: str = "on"  # on: balances (matchers and gateways get --risk on); off: none
    admin_keys: str | None = None  # the gateways' --admin-keys
    faucet: str | None = None  # the gateways' --faucet (None: their default)
    instruments: str | None = None
    seed_symbol: str = "BTC-USDT"  # the seed dialect's symbol (gateways and feeds)
    log_level: str = "INFO"
    log_format: str = "text"  # shared.logs: text or json, for every process
    log_dir: Path | None = None  # None: children write to our stderr; else one file per child
    log_file: Path | None = None  # every process's log appended to this one file (cme up --log-file)
    prometheus_port: int | None = None  # start a local Prometheus on this port; None: none
    extra: dict[str, list[str]] = field(default_factory=dict)  # service -> extra flags (the e2e bench)
    command: list[str] = field(default_factory=lambda: [sys.executable, "-m", "services.cli"])

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> StackConfig:
        def absolute(path: str | None) -> str | None:
            return str(Path(path).resolve()) if path else None

        extra = {
            service: [
                str(x)
                for dest, flag in flags
                if getattr(args, dest, None) is not None
                for x in (flag, getattr(args, dest))
            ]
            for service, flags in TUNING.items()
        }
        return cls(
            extra=extra,
            log_format=getattr(args, "log_format", "text"),
            log_file=Path(args.log_file).resolve() if getattr(args, "log_file", None) else None,
            prometheus_port=args.prometheus_port if getattr(args, "prometheus", False) else None,
            host=args.host,
            gateway_port=args.gateway_port,
            md_port=args.md_port,
            trades_port=args.trades_port,
            web_port=None if getattr(args, "web_port", -1) < 0 else args.web_port,
            metrics_port=args.metrics_port,
            metrics_host=getattr(args, "metrics_host", None),
            redis_url=args.redis_url,
            data_dir=Path(args.data_dir),
            feeds=args.feeds,
            gateways=args.gateways,
            matchers=getattr(args, "matchers", 1),
            api_keys=absolute(args.api_keys),
            risk=getattr(args, "risk", "on"),
            admin_keys=absolute(getattr(args, "admin_keys", None)),
            faucet=getattr(args, "faucet", None),
            instruments=absolute(args.instruments),
            seed_symbol=getattr(args, "seed_symbol", "BTC-USDT"),
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
    env: dict[str, str] = field(default_factory=dict)  # on top of ours: the Redis URL with its password
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
        self._log_file: IO[bytes] | None = None
        self.ports: dict[str, int] = {}
        self.prometheus: subprocess.Popen[bytes] | None = None
        self.not_ready: dict[str, str] = {}  # child (or port) -> why it is not ready yet

    # --- start ------------------------------------------------------------------------------------
    def start(self, stop: Stopper | None = None) -> None:
        self.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.data_dir.chmod(0o700)  # the Redis secret, checkpoints and the AOF live here
        self._lock()
        self._resolve_ports()
        if self.cfg.log_file is not None:
            self._log_file = open(self.cfg.log_file, "ab")  # noqa: SIM115 - lives as long as the stack
        if self.cfg.redis_url is None:
            self._start_redis()
        elif not self.wait_for_redis(stop):
            return  # stopped while waiting
        self.children = self._plan()
        for child in self.children:
            self._spawn(child)
        self.write_targets()
        if self.cfg.prometheus_port is not None:
            self._start_prometheus()
        self.write_state()

    def wait_for_redis(self, stop: Stopper | None = None) -> bool:
        """Until the external Redis answers PING (False: a stop was asked for first). The services
        would start and retry on their own, but each would log its failures: one line here instead,
        repeated with a growing gap while Redis stays away."""
        where = redact(self.redis_url)
        client = redis.Redis.from_url(self.redis_url, socket_timeout=2.0, socket_connect_timeout=2.0)
        started = time.monotonic()
        gap, next_line = REDIS_WAIT_FIRST, 0.0
        try:
            while not (stop and stop.requested):
                try:
                    client.ping()
                except redis.exceptions.AuthenticationError as exc:  # waiting will not fix a password
                    raise StackError(f"Redis at {where} refused the login: {exc}") from exc
                except (redis.exceptions.RedisError, OSError) as exc:
                    waited = time.monotonic() - started
                    if waited >= next_line:
                        LOG.warning("waiting for Redis at %s (%.0f s so far): %s", where, waited, exc)
                        next_line, gap = waited + gap, min(gap * 2, REDIS_WAIT_MAX)
                    time.sleep(POLL)
                    continue
                if next_line:
                    LOG.info("Redis at %s answers after %.1f s", where, time.monotonic() - started)
                return True
            return False
        finally:
            client.close()

    def _lock(self) -> None:
        # Two stacks on one data dir would run two Redis servers on one AOF: refuse the second.
        fd = os.open(self.data_dir / ".cme-up.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = os.read(fd, 32).decode(errors="replace").strip()
            os.close(fd)
            pid = f" (pid {holder})" if holder.isdigit() else ""
            raise StackError(f"another `cme up`{pid} is running on {self.data_dir}") from exc
        os.ftruncate(fd, 0)  # the holder's pid, for the error above
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    def _resolve_ports(self) -> None:
        cfg, host = self.cfg, self.cfg.host
        n = self._processes()
        wanted = {"gateway": cfg.gateway_port, "md": cfg.md_port, "trades": cfg.trades_port}
        if cfg.web_port is not None:
            wanted["web"] = cfg.web_port
        if cfg.prometheus_port is not None:
            wanted["prometheus"] = cfg.prometheus_port
        if cfg.metrics_port:
            wanted.update({f"metrics{i}": cfg.metrics_port + i for i in range(n)})
        taken = [name for name, port in wanted.items() if port and not port_free(host, port)]
        if taken:
            said = []
            for name in taken:
                flag = PORT_FLAGS.get(name) or f"--metrics-port (the first of {n} /metrics ports)"
                said.append(f"{name} {wanted[name]} (move it with {flag}, 0: any free port)")
            raise StackError(f"ports already in use on {host}: {'; '.join(said)}")
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
        creds = load_or_create(self.data_dir / SECRET_FILE)  # a new one on first start, kept after
        self.redis = RedisServer(
            redis_dir, port=port, spawn=lambda argv: _popen(argv, subprocess.DEVNULL), credentials=creds
        )
        port_file.write_text(f"{self.redis.port}\n")
        LOG.info(
            "starting redis-server on port %d (AOF everysec, files in %s, ACL users from %s)",
            self.redis.port,
            redis_dir,
            self.data_dir / SECRET_FILE,
        )
        try:
            self.redis.start()
        except RuntimeError as exc:
            raise StackError(str(exc)) from exc
        self.redis_url = self.redis.url

    def _plan(self) -> list[Child]:
        cfg = self.cfg
        base = cfg.command
        # Each service logs in as its own ACL user; the URL goes in the environment, not in `ps`.
        metrics_host = cfg.metrics_host or cfg.host
        common = [
            "--log-level",
            cfg.log_level,
            "--log-format",
            cfg.log_format,
            "--metrics-host",
            metrics_host,
        ]
        if cfg.instruments:
            common += ["--instruments", cfg.instruments]
        metrics = iter(self.ports[f"metrics{i}"] for i in range(self._processes()))

        def child(name: str, service: str, flags: list[str]) -> Child:
            port = next(metrics)
            argv = [*base, service, *common, "--metrics-port", str(port), "--instance", name, *flags]
            url = self.redis.url_for(service) if self.redis is not None else self.redis_url
            # A crash in native code (picows, hiredis, the compiled core) leaves its Python stack in
            # the child's log instead of only a signal number.
            env = {URL_ENV: url, "PYTHONFAULTHANDLER": "1"}
            return Child(name, service, [*argv, *cfg.extra.get(service, [])], port, env)

        keys = ["--api-keys", cfg.api_keys] if cfg.api_keys else []
        keys += ["--admin-keys", cfg.admin_keys] if cfg.admin_keys else []
        keys += ["--faucet", cfg.faucet] if cfg.faucet is not None else []
        seed_flags = ["--seed-symbol", cfg.seed_symbol]
        risk = ["--risk", cfg.risk]
        matcher_flags = ["--data-dir", str(self.data_dir), *risk]
        if cfg.matchers <= 1:
            out = [child("matcher", "matcher", matcher_flags)]
        else:  # whichever gets the leases first is active; a restarted one stands by
            out = [child(f"matcher-{i}", "matcher", matcher_flags) for i in range(1, cfg.matchers + 1)]
        out += [
            child(
                f"gateway-{i}",
                "gateway",
                ["--host", cfg.host, "--port", str(self.ports["gateway"]), *keys, *seed_flags, *risk],
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
                    *seed_flags,
                ],
            )
            for i in range(1, cfg.feeds + 1)
        ]
        if cfg.web_port is not None:  # last: it reads the others' /metrics for the page's latency panel
            ep, port = self.endpoints(), next(metrics)
            scrape = "127.0.0.1" if metrics_host in ("0.0.0.0", "", "::") else metrics_host
            web = [*base, "web", *common, "--metrics-port", str(port), "--instance", "web"]
            web += [f"--{name}-url={ep[name]}" for name in ("gateway", "md", "trades")]
            web += [f"--metrics-url=http://{scrape}:{c.metrics_port}/metrics" for c in out]
            web += ["--host", cfg.host, "--port", str(self.ports["web"])]
            web += ["--auth", "api_key" if cfg.api_keys else "open"]
            out.append(Child("web", "web", web, port))  # it never talks to Redis: no credentials
        return out

    def _processes(self) -> int:
        """Service processes, each with its own /metrics port."""
        cfg = self.cfg
        return cfg.matchers + cfg.gateways + cfg.feeds + (cfg.web_port is not None)

    def _spawn(self, child: Child) -> None:
        out: IO[bytes] | None = None
        if self.cfg.log_dir is not None:
            self.cfg.log_dir.mkdir(parents=True, exist_ok=True)
            out = open(self.cfg.log_dir / f"{child.name}.log", "ab")  # noqa: SIM115 - lives as long as the stack
            self._logs.append(out)
        elif self._log_file is not None:
            out = self._log_file
        child.proc = _popen(child.argv, out, child.env)
        child.started = time.monotonic()
        child.restart_at = None

    def wait_ready(self, timeout: float = READY_TIMEOUT, stop: Stopper | None = None) -> bool:
        """Until every listening port accepts connections and every child's /readyz answers 200 (the
        gateways' and feeds' say whether Redis, the matcher and its books are there); children are
        restarted meanwhile. `not_ready` keeps the reasons of what is still pending."""
        host = self.cfg.client_host
        deadline = time.monotonic() + timeout
        ports = [
            (name, self.ports[name]) for name in ("gateway", "md", "trades", "web") if name in self.ports
        ]
        opened: set[int] = set()  # a port is probed until it accepts once: each probe is a log line
        while True:
            self.poll()
            opened.update(
                port for _, port in ports if port not in opened and port_open(host, port, timeout=0.2)
            )
            pending = {
                f"{name} port {port}": "not accepting connections"
                for name, port in ports
                if port not in opened
            }
            for child in self.children:
                reason = readiness(host, child.metrics_port)
                if reason is not None:
                    pending[child.name] = reason
            self.not_ready = pending
            if not pending or time.monotonic() >= deadline or (stop and stop.requested):
                break
            time.sleep(POLL)
        if self.ready != (not pending):
            self.ready = not pending
            self.write_state()
        return self.ready

    # --- Prometheus -------------------------------------------------------------------------------
    def write_targets(self) -> Path:
        """Prometheus file-based service discovery of this stack's /metrics ports (they follow
        --metrics-port and the process counts, so a fixed list in a config cannot)."""
        h = self.cfg.client_host
        targets = [
            {"targets": [f"{h}:{c.metrics_port}"], "labels": {"process": c.name}} for c in self.children
        ]
        path = self.data_dir / "prometheus" / "targets.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_bytes(orjson.dumps(targets, option=orjson.OPT_INDENT_2))
        os.replace(tmp, path)  # Prometheus rereads the file on change: never a half-written one
        return path

    def prometheus_config(self) -> Path:
        """A config that scrapes the targets file, with the project's rules (JSON is YAML)."""
        config = {
            "global": {
                "scrape_interval": "5s",
                "scrape_timeout": "4s",
                "evaluation_interval": "5s",
                "external_labels": {"venue": "cme-local"},
            },
            "rule_files": [str(RULES)] if RULES.exists() else [],
            "scrape_configs": [
                {
                    "job_name": "cme",
                    "file_sd_configs": [
                        {
                            "files": [str(self.data_dir / "prometheus" / "targets.json")],
                            "refresh_interval": "5s",
                        }
                    ],
                }
            ],
        }
        path = self.data_dir / "prometheus" / "prometheus.yml"
        path.write_bytes(orjson.dumps(config, option=orjson.OPT_INDENT_2))
        return path

    def _start_prometheus(self) -> None:
        binary = shutil.which("prometheus")
        if binary is None:
            raise StackError(
                "--prometheus: no `prometheus` on PATH (Debian: apt-get install prometheus, "
                "or bash deploy/install-prometheus.sh)"
            )
        if not RULES.exists():
            LOG.warning("no %s here: the local Prometheus runs without the rules", RULES)
        base = self.data_dir / "prometheus"
        argv = [
            binary,
            f"--config.file={self.prometheus_config()}",
            f"--storage.tsdb.path={base / 'data'}",
            f"--web.listen-address={self.cfg.client_host}:{self.ports['prometheus']}",
        ]
        out = open(base / "prometheus.log", "ab")  # noqa: SIM115 - lives as long as the stack
        self._logs.append(out)
        self.prometheus = _popen(argv, out)
        LOG.info("starting prometheus (pid %d), its log in %s", self.prometheus.pid, base / "prometheus.log")

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
        if self.prometheus is not None and self.prometheus.poll() is None:
            LOG.info("stopping prometheus (pid %d)", self.prometheus.pid)
            self.prometheus.terminate()
            try:
                self.prometheus.wait(SERVICE_GRACE)
            except subprocess.TimeoutExpired:
                self.prometheus.kill()
                self.prometheus.wait()
        for service, grace in (
            ("web", SERVICE_GRACE),
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
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
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
            **({"web": f"http://{h}:{self.ports['web']}/"} if "web" in self.ports else {}),
        }

    def state(self) -> dict[str, Any]:
        h = self.cfg.client_host
        return {
            "supervisor_pid": os.getpid(),
            "ready": self.ready,
            "host": self.cfg.host,
            **self.endpoints(),
            "ports": self.ports,
            "redis_url": redact(self.redis_url),
            "redis_pid": self.redis.proc.pid if self.redis and self.redis.proc else None,
            "embedded_redis": self.redis is not None,
            "redis_secret": str(self.data_dir / SECRET_FILE) if self.redis is not None else None,
            "data_dir": str(self.data_dir),
            "not_ready": self.not_ready,
            "prometheus": self.prometheus_url(),
            "prometheus_targets": str(self.data_dir / "prometheus" / "targets.json"),
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

    def prometheus_url(self) -> str | None:
        if self.prometheus is None:
            return None
        return f"http://{self.cfg.client_host}:{self.ports['prometheus']}/"

    def table(self) -> str:
        ep = self.endpoints()
        rows = [("gateway", ep["gateway"], "orders (ws)"), ("md", ep["md"], "l2 / depth (ws)")]
        rows.append(("trades", ep["trades"], "trades (ws)"))
        if "web" in ep:
            rows.insert(0, ("page", ep["web"], "trading page: open it in a browser"))
        h = self.cfg.client_host
        rows += [(c.name, f"http://{h}:{c.metrics_port}/metrics", f"pid {c.pid}") for c in self.children]
        kind = "embedded, AOF everysec" if self.redis else "external"
        rows.append(("redis", redact(self.redis_url), kind))
        rows.append(("data dir", str(self.data_dir), "stack.json, prometheus/targets.json"))
        if self.prometheus_url() is not None:
            rows.append(("prometheus", str(self.prometheus_url()), "scrapes the stack, with the rules"))
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


def readiness(host: str, port: int) -> str | None:
    """None when the /readyz of the process on this metrics port answers 200, else why not."""
    try:
        with urllib.request.urlopen(f"http://{host}:{port}/readyz", timeout=1.0) as reply:
            return None if reply.status == 200 else f"/readyz: {reply.status}"
    except urllib.error.HTTPError as exc:
        return exc.read().decode(errors="replace").strip() or f"/readyz: {exc.code}"
    except OSError as exc:
        return f"/metrics port {port} not answering ({exc})"


def run(args: argparse.Namespace) -> int:
    cfg = StackConfig.from_args(args)
    log_stream = open(cfg.log_file, "a") if cfg.log_file else None  # noqa: SIM115 - until exit
    logs.setup("up", args.instance or "up", args.log_level, cfg.log_format, log_stream or sys.stderr)
    stopper = Stopper()
    stopper.install()  # before any child exists, so an early Ctrl-C still stops what was started
    stack = Stack(cfg)
    try:
        stack.start(stopper)
    except (StackError, OSError) as exc:
        LOG.error("cannot start the stack: %s", exc)
        if log_stream is not None:  # the terminal hears of it too
            print(f"cme up: cannot start the stack: {exc}", file=sys.stderr)
        stack.stop()
        return 1
    timeout = getattr(args, "ready_timeout", READY_TIMEOUT)
    announced = False
    if not stopper.requested and not stack.wait_ready(timeout, stop=stopper) and not stopper.requested:
        reasons = "; ".join(f"{name}: {why}" for name, why in stack.not_ready.items())
        LOG.warning("not ready after %.0f s (%s); still waiting", timeout, reasons)
    last_reasons = dict(stack.not_ready)
    while not stopper.requested:
        if stack.ready and not announced:
            print(stack.table(), flush=True)
            announced = True
        stack.poll()
        if not stack.ready:
            stack.wait_ready(timeout=POLL, stop=stopper)
            if stack.not_ready.keys() != last_reasons.keys() and stack.not_ready:
                LOG.info("waiting for: %s", "; ".join(f"{n}: {w}" for n, w in stack.not_ready.items()))
            last_reasons = dict(stack.not_ready)
        time.sleep(POLL)
    stack.stop(stopper)
    if log_stream is not None:
        log_stream.close()
    return 0
