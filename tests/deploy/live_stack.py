"""A live stack for the Prometheus end-to-end test: a real redis-server, the matcher, two gateways and two
feeds as subprocesses on free ports, a real Prometheus server scraping them with the deploy/ rules, and a
traffic generator (websocket clients in a background thread) that makes every metric move.

Used by tests/deploy/test_prometheus_live.py. Every process is started here and stopped by its own pid.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import yaml
from cme_client import Connection, gateway_session, subscribe

from shared.net import port_open
from shared.redis_server import RedisServer, free_port
from tests.deploy import PROMETHEUS, ROOT, load_yaml

START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
HOST = "127.0.0.1"

# The instances, named as deploy/prometheus/prometheus.yml (and docker-compose.yml) name them: the live
# config points each of that file's targets at the local process of the same name.
MATCHER = "matcher"
GATEWAYS = ("gateway-1", "gateway-2")
FEEDS = ("feeds-1", "feeds-2")
INSTANCES = (MATCHER, *GATEWAYS, *FEEDS)


def wait_until(cond: Callable[[], bool], timeout: float, what: str, check: Callable[[], None]) -> None:
    """Poll cond until true; `check` raises when waiting is pointless (a process died)."""
    deadline = time.monotonic() + timeout
    while not cond():
        check()
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.05)


def tail(path: Path, lines: int = 25) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


class PortTaken(RuntimeError):
    """A process could not bind a port free_port() chose: something else took it meanwhile."""


@dataclass
class Process:
    """One child process with its output in a log file."""

    name: str
    argv: list[str]
    log: Path
    ready_line: str = ""  # text its log shows once it serves
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                self.argv, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def ready(self) -> bool:
        try:
            return self.ready_line in self.log.read_text(errors="replace")
        except OSError:
            return False

    def check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            why = f"{self.name} (pid {self.proc.pid}) exited with {self.proc.returncode}:\n{tail(self.log)}"
            if "address already in use" in why.lower():
                raise PortTaken(why)
            raise RuntimeError(why)

    def terminate(self) -> None:
        if self.running():
            assert self.proc is not None
            self.proc.terminate()

    def wait(self, timeout: float = STOP_TIMEOUT) -> None:
        """Wait for the exit after terminate(); SIGKILL (this pid only) when it takes too long."""
        if self.proc is None:
            return
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@dataclass
class Stack:
    """redis-server, matcher, gateways and feeds on free ports; the services' /metrics on free ports too."""

    root: Path
    checkpoint_seconds: float = 5.0
    redis: RedisServer | None = None
    processes: list[Process] = field(default_factory=list)
    metrics_ports: dict[str, int] = field(default_factory=dict)  # instance -> its /metrics port
    gateway_port: int = 0
    md_port: int = 0
    trades_port: int = 0

    @property
    def gateway_url(self) -> str:
        return f"ws://{HOST}:{self.gateway_port}"

    @property
    def md_url(self) -> str:
        return f"ws://{HOST}:{self.md_port}"

    @property
    def trades_url(self) -> str:
        return f"ws://{HOST}:{self.trades_port}"

    def start(self, attempts: int = 3) -> Stack:
        """Start everything; again on fresh ports when one of them was taken meanwhile (other tests
        choose free ports too)."""
        for attempt in range(1, attempts + 1):
            try:
                return self._start(self.root / f"attempt-{attempt}")
            except PortTaken:
                self.stop()
                if attempt == attempts:
                    raise
        raise AssertionError("unreachable")

    def _start(self, root: Path) -> Stack:
        root.mkdir(parents=True, exist_ok=True)
        self.redis = RedisServer(root / "redis").start()
        ports: set[int] = {self.redis.port}
        while len(ports) < 1 + 3 + len(INSTANCES):  # free_port() may hand the same port out twice
            ports.add(free_port(HOST))
        spare = iter(sorted(ports - {self.redis.port}))
        self.gateway_port, self.md_port, self.trades_port = next(spare), next(spare), next(spare)
        self.metrics_ports = {name: next(spare) for name in INSTANCES}

        cme = [sys.executable, "-m", "services.cli"]

        def common(name: str) -> list[str]:
            assert self.redis is not None
            return [
                "--redis-url",
                self.redis.url,
                "--metrics-port",
                str(self.metrics_ports[name]),
                "--instance",
                name,
            ]

        data_dir = root / "matcher-data"
        self.processes = [
            Process(
                MATCHER,
                [
                    *cme,
                    "matcher",
                    *common(MATCHER),
                    "--data-dir",
                    str(data_dir),
                    "--checkpoint-seconds",
                    str(self.checkpoint_seconds),
                ],
                root / f"{MATCHER}.log",
                "live:",
            )
        ]
        self.processes += [
            Process(
                name,
                [*cme, "gateway", *common(name), "--host", HOST, "--port", str(self.gateway_port)],
                root / f"{name}.log",
                "gateway listening on",
            )
            for name in GATEWAYS
        ]
        self.processes += [
            Process(
                name,
                [
                    *cme,
                    "feeds",
                    *common(name),
                    "--host",
                    HOST,
                    "--md-port",
                    str(self.md_port),
                    "--trades-port",
                    str(self.trades_port),
                ],
                root / f"{name}.log",
                f"{name}: md ws://",
            )
            for name in FEEDS
        ]
        for p in self.processes:
            p.start()
        wait_until(self._ready, START_TIMEOUT, "the stack to serve", self.check_alive)
        return self

    def _ready(self) -> bool:
        ports = [*self.metrics_ports.values(), self.gateway_port, self.md_port, self.trades_port]
        return all(p.ready() for p in self.processes) and all(port_open(HOST, port) for port in ports)

    def check_alive(self) -> None:
        for p in self.processes:
            p.check_alive()

    def logs(self, lines: int = 15) -> str:
        return "\n".join(f"--- {p.name} (pid {p.pid}): {p.log}\n{tail(p.log, lines)}" for p in self.processes)

    def stop(self) -> None:
        for p in self.processes:  # all at once: each takes up to a second or two to drain
            p.terminate()
        for p in self.processes:
            p.wait()
        if self.redis is not None:
            self.redis.stop()


# --- Prometheus -----------------------------------------------------------------------------------------


def live_config(metrics_ports: dict[str, int], interval: str = "1s") -> dict[str, Any]:
    """deploy/prometheus/prometheus.yml for processes on this machine: the same global settings, rule files
    (by absolute path) and jobs, every interval `interval`, and each target `host:9100` pointed at the local
    /metrics port of the instance named `host`. The real config rewrites `instance` to that host name with
    a relabel rule; here the target label is set directly (the address is 127.0.0.1 for all of them).
    Targets of no cme process (Prometheus scraping itself) are left out."""
    real = load_yaml(PROMETHEUS)
    cfg: dict[str, Any] = {
        "global": {
            **real.get("global", {}),
            "scrape_interval": interval,
            "scrape_timeout": interval,
            "evaluation_interval": interval,
        },
        "rule_files": [str((PROMETHEUS.parent / f).resolve()) for f in real.get("rule_files", [])],
        "scrape_configs": [],
    }
    placed: set[str] = set()
    for job in real["scrape_configs"]:
        statics = []
        for static in job.get("static_configs", []):
            for target in static["targets"]:
                host = str(target).rsplit(":", 1)[0]
                if host in metrics_ports:
                    labels = {**static.get("labels", {}), "instance": host}
                    statics.append({"targets": [f"{HOST}:{metrics_ports[host]}"], "labels": labels})
                    placed.add(host)
        if statics:
            cfg["scrape_configs"].append({"job_name": job["job_name"], "static_configs": statics})
    if placed != set(metrics_ports):
        raise ValueError(
            f"{PROMETHEUS.name} has no target for {sorted(set(metrics_ports) - placed)}; "
            f"targets of the live stack: {sorted(metrics_ports)}"
        )
    return cfg


class PrometheusError(RuntimeError):
    pass


class Prometheus:
    """A Prometheus server on a free port with its TSDB and log in `root`."""

    def __init__(self, binary: str, root: Path, config: dict[str, Any]) -> None:
        self.binary = binary
        self.root = root
        self.port = 0
        self.config_file = root / "prometheus.yml"
        self.config = config
        self.process = Process("prometheus", [], root / "prometheus.log")

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def start(self, timeout: float = START_TIMEOUT, attempts: int = 3) -> Prometheus:
        """Start on a free port (another one if that was taken meanwhile); wait for /-/ready."""
        self.root.mkdir(parents=True, exist_ok=True)
        self.config_file.write_text(yaml.safe_dump(self.config, sort_keys=False))
        for attempt in range(1, attempts + 1):
            self.port = free_port(HOST)
            argv = [
                self.binary,
                f"--config.file={self.config_file}",
                f"--storage.tsdb.path={self.root / f'tsdb-{attempt}'}",
                f"--web.listen-address={HOST}:{self.port}",
                "--log.level=warn",
            ]
            self.process = Process("prometheus", argv, self.root / "prometheus.log")
            self.process.start()
            try:
                wait_until(
                    self._ready, timeout, f"Prometheus at {self.url}/-/ready", self.process.check_alive
                )
                return self
            except PortTaken:
                self.stop()
                if attempt == attempts:
                    raise
        raise AssertionError("unreachable")

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as resp:
                return int(resp.status) == 200
        except (OSError, urllib.error.URLError):
            return False

    def api(self, path: str, **params: str) -> Any:
        """GET /api/v1/<path>; the `data` of a successful answer, else PrometheusError with the error."""
        url = f"{self.url}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(url, timeout=10) as resp:
                body = json.loads(resp.read())
        except urllib.error.HTTPError as exc:  # 400/422 carry the JSON error of a bad query
            try:
                body = json.loads(exc.read())
            except ValueError:
                raise PrometheusError(f"{url}: HTTP {exc.code}") from exc
        if body.get("status") != "success":
            raise PrometheusError(f"{body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str) -> list[Any]:
        """Instant query now: the result as a list (a vector's samples; a scalar or string as one item)."""
        data = self.api("query", query=expr)
        result = data["result"]
        if data["resultType"] in ("scalar", "string"):
            return [result]
        return list(result)

    def metric_names(self) -> list[str]:
        names: list[str] = self.api("label/__name__/values")
        return names

    def targets(self) -> list[dict[str, Any]]:
        active: list[dict[str, Any]] = self.api("targets", state="active")["activeTargets"]
        return active

    def rules(self) -> list[dict[str, Any]]:
        return [rule for group in self.api("rules")["groups"] for rule in group["rules"]]

    def log_tail(self, lines: int = 15) -> str:
        return tail(self.process.log, lines)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait()


# --- traffic --------------------------------------------------------------------------------------------

REFERENCE_PRICE = {"BTC-USDT": Decimal(30000), "ETH-USDT": Decimal(2000)}
PRICE_STEP = Decimal("0.50")
MAKER_QTY = "0.01"
TAKER_QTY = "0.005"
CANCEL_AFTER = 10  # the maker cancels its order of this many rounds ago (filled ones: rejected)
INVALID_EVERY = 10  # rounds between bursts of invalid messages (rejects at the gateway)


class Traffic:
    """Websocket clients in a thread of their own (an asyncio loop), until stop():

    - per symbol: a maker resting a bid and an ask each round at 1-5 steps from a reference price, a taker
      alternating crossing IOC buys and sells (trades), the maker cancelling its orders of CANCEL_AFTER
      rounds ago (some already filled: rejects), every INVALID_EVERY rounds invalid messages (unknown
      symbol, invalid price, unknown op) from another client;
    - per symbol: market-data subscribers on the l2 and depth channels, and a trades subscriber.

    The book keeps orders on both sides, so best prices and the spread exist.
    """

    def __init__(self, gateway_url: str, md_url: str, trades_url: str, round_seconds: float = 0.1) -> None:
        self.gateway_url, self.md_url, self.trades_url = gateway_url, md_url, trades_url
        self.round_seconds = round_seconds
        self.tag = uuid.uuid4().hex[:6]
        self.error: BaseException | None = None
        self.rounds = 0
        self.sent: Counter[str] = Counter()
        self.received: Counter[str] = Counter()
        self._stop = threading.Event()
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, name="traffic", daemon=True)

    def start(self, timeout: float = START_TIMEOUT) -> Traffic:
        self._thread.start()
        if not self._started.wait(timeout) and self.error is None:
            raise TimeoutError("traffic clients did not connect in time")
        if self.error is not None:
            raise RuntimeError(f"traffic clients failed to start: {self.error!r}") from self.error
        return self

    def stop(self, timeout: float = 15.0) -> None:
        self._stop.set()
        self._thread.join(timeout)

    def summary(self) -> str:
        sent = ", ".join(f"{k} {v}" for k, v in sorted(self.sent.items()))
        got = ", ".join(f"{k} {v}" for k, v in sorted(self.received.items()))
        err = f"; ERROR {self.error!r}" if self.error is not None else ""
        return f"{self.rounds} rounds; sent: {sent}; received: {got}{err}"

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:
            self.error = exc
            self._started.set()

    async def _main(self) -> None:
        conns: list[Connection] = []
        try:
            subscribers: list[Connection] = []
            traders: dict[str, tuple[Connection, Connection]] = {}
            for symbol in REFERENCE_PRICE:
                for channel in ("l2", "depth"):
                    subscribers.append(await subscribe(self.md_url, symbol, channel=channel, retry_for=5))
                subscribers.append(await subscribe(self.trades_url, symbol, retry_for=5))
                conns += subscribers[-3:]
                maker = await gateway_session(self.gateway_url, f"live-maker-{symbol}-{self.tag}")
                conns.append(maker)
                taker = await gateway_session(self.gateway_url, f"live-taker-{symbol}-{self.tag}")
                conns.append(taker)
                traders[symbol] = maker, taker
            bad = await gateway_session(self.gateway_url, f"live-bad-{self.tag}")
            conns.append(bad)
            self._started.set()
            while not self._stop.is_set():
                for symbol, (maker, taker) in traders.items():
                    await self._round(symbol, maker, taker, bad)
                self.rounds += 1
                for conn in conns:
                    if conn.closed_reason is not None:
                        raise ConnectionError(f"{conn.url} closed: {conn.closed_reason}")
                await asyncio.sleep(self.round_seconds)
        finally:
            for conn in conns:
                for m in conn.messages:
                    self.received[str(m.get("type"))] += 1
                with contextlib.suppress(Exception):
                    await conn.close()

    async def _send(self, conn: Connection, kind: str, msg: dict[str, Any]) -> None:
        await conn.send(msg)
        self.sent[kind] += 1

    async def _round(self, symbol: str, maker: Connection, taker: Connection, bad: Connection) -> None:
        n, ref = self.rounds, REFERENCE_PRICE[symbol]
        k = 1 + n % 5
        for side, price in (("buy", ref - k * PRICE_STEP), ("sell", ref + k * PRICE_STEP)):
            order = {
                "op": "new",
                "symbol": symbol,
                "client_order_id": f"m{n}-{side}",
                "side": side,
                "type": "limit",
                "price": f"{price:.2f}",
                "quantity": MAKER_QTY,
            }
            await self._send(maker, "limit", order)
        side = "buy" if n % 2 == 0 else "sell"
        cross = ref + 5 * PRICE_STEP if side == "buy" else ref - 5 * PRICE_STEP
        ioc = {
            "op": "new",
            "symbol": symbol,
            "client_order_id": f"t{n}",
            "side": side,
            "type": "limit",
            "tif": "ioc",
            "price": f"{cross:.2f}",
            "quantity": TAKER_QTY,
        }
        await self._send(taker, "ioc", ioc)
        if n >= CANCEL_AFTER:
            old = f"m{n - CANCEL_AFTER}-{'buy' if n % 2 else 'sell'}"
            await self._send(maker, "cancel", {"op": "cancel", "symbol": symbol, "client_order_id": old})
        if n % INVALID_EVERY == 0:
            invalid: list[dict[str, Any]] = [
                {
                    "op": "new",
                    "symbol": "NOPE-USDT",
                    "client_order_id": f"x{n}a",
                    "side": "buy",
                    "type": "limit",
                    "price": "1.00",
                    "quantity": "1",
                },
                {
                    "op": "new",
                    "symbol": symbol,
                    "client_order_id": f"x{n}b",
                    "side": "buy",
                    "type": "limit",
                    "price": "not-a-price",
                    "quantity": MAKER_QTY,
                },
                {"op": "explode", "symbol": symbol},
            ]
            for msg in invalid:
                await self._send(bad, "invalid", msg)
