"""`cme up` as a user runs it: a real redis-server and every service as its own process, on free ports.

One stack serves the module (starting it costs a second or two); the tests run in file order and the
last one stops it, checks that nothing is left running, and starts it again on the same data dir.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis
from cme_client import gateway_session, is_type, l2_snapshot
from redis.backoff import NoBackoff
from redis.retry import Retry

from services.stats import STAGES
from shared.logs import TEXT_LINE
from shared.net import port_open
from shared.redis_acl import SERVICES, URL_ENV, load_or_create
from shared.redis_server import RedisServer

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(90)]

ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT = 30.0


def alive(pid: int) -> bool:
    """Running and not a zombie (a reaped-later child still answers kill(pid, 0))."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def wait_until(cond: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.05)


def listening(port: int) -> set[str]:
    """Local addresses with a TCP socket listening on `port` (from /proc/net/tcp and tcp6)."""
    found = set()
    for table, size in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, port_hex = local.split(":")
            if state == "0A" and int(port_hex, 16) == port and len(address) == size:
                raw = bytes.fromhex(address)
                # /proc prints each 32-bit word in host (little-endian) order
                words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
                found.add(socket.inet_ntop(socket.AF_INET if size == 8 else socket.AF_INET6, words))
    return found


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


class Up:
    """A `cme up` subprocess with every port chosen free, its log in a file."""

    def __init__(self, root: Path, flags: tuple[str, ...] = ("--feeds", "2")) -> None:
        self.root = root
        self.data_dir = root / "var"  # `./var` for a command run in root: what `cme demo` defaults to
        self.log = root / "up.log"  # every process's log (stderr)
        self.out = root / "up.out"  # what `cme up` prints: the table once the stack is ready
        self.flags = flags
        self.proc: subprocess.Popen[bytes] | None = None

    def launch(self) -> None:
        ports = ["--gateway-port", "0", "--md-port", "0", "--trades-port", "0", "--metrics-port", "0"]
        ports += ["--web-port", "0"]
        argv = [sys.executable, "-m", "services.cli", "up", "--data-dir", str(self.data_dir), *ports]
        with open(self.log, "ab") as log, open(self.out, "ab") as out:
            self.proc = subprocess.Popen(
                [*argv, *self.flags], cwd=ROOT, stdout=out, stderr=log, start_new_session=True
            )

    def start(self) -> dict[str, Any]:
        self.launch()
        assert self.proc is not None
        wait_until(
            lambda: self._ready() or self.proc is None or self.proc.poll() is not None,
            START_TIMEOUT,
            "stack ready",
        )
        assert self.proc.poll() is None, f"cme up exited:\n{self.log_text()}"
        return self.state()

    def _ready(self) -> bool:
        try:
            state = self.state()
        except (OSError, orjson.JSONDecodeError):
            return False
        return bool(state["ready"]) and self.proc is not None and state["supervisor_pid"] == self.proc.pid

    def state(self) -> dict[str, Any]:
        state: dict[str, Any] = orjson.loads((self.data_dir / "stack.json").read_bytes())
        return state

    def pid_of(self, name: str) -> int:
        return next(int(p["pid"]) for p in self.state()["processes"] if p["name"] == name)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def log_tail(self, lines: int = 60) -> str:
        """The end of the stack's log without the connection chatter: for assertion messages."""
        kept = [line for line in self.log_text().splitlines() if "connection open" not in line]
        kept = [line for line in kept if "connection closed" not in line]
        return "\n".join(kept[-lines:])

    def stop(self, timeout: float = 30.0) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)  # its own session: the test must not leak processes
            self.proc.wait()
            raise


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Up]:
    stack = Up(tmp_path_factory.mktemp("up"))
    stack.start()
    yield stack
    stack.stop()


def test_every_child_runs_and_listens(up: Up) -> None:
    state = up.state()
    names = [p["name"] for p in state["processes"]]
    assert names == ["matcher", "gateway-1", "feeds-1", "feeds-2", "web"]
    assert all(alive(p["pid"]) for p in state["processes"]) and alive(state["redis_pid"])
    assert state["embedded_redis"] and (up.data_dir / "redis" / "appendonly.aof").exists()
    for port in (state["ports"]["gateway"], state["ports"]["md"], state["ports"]["trades"]):
        assert port_open("127.0.0.1", port)
    for proc in state["processes"]:  # one /metrics per process, each answering for itself
        body = urllib.request.urlopen(proc["metrics"], timeout=5).read().decode()
        assert "cme_service_info" in body


def test_every_process_logs_in_one_format(up: Up) -> None:
    """The merged log of `cme up`: each line parses with one pattern and names its service."""
    lines = up.log_text().splitlines()
    parsed = [TEXT_LINE.match(line) for line in lines]
    assert all(parsed), [line for line, m in zip(lines, parsed, strict=True) if m is None][:5]
    services = {m["service"] for m in parsed if m}
    assert services >= {"up", "matcher", "gateway", "feeds", "web"}
    instances = {m["instance"] for m in parsed if m}
    assert instances >= {"up", "matcher", "gateway-1", "feeds-1", "feeds-2"}
    assert "the stack is running" in up.out.read_text()


def test_metrics_listen_on_the_stacks_host_only(up: Up) -> None:
    """`cme up` defaults to --host 127.0.0.1: no /metrics may listen on every interface."""
    for proc in up.state()["processes"]:
        assert listening(proc["metrics_port"]) == {"127.0.0.1"}, proc["name"]


def test_redis_has_a_password_and_each_service_its_own_acl_user(up: Up) -> None:
    state = up.state()
    secret = Path(state["redis_secret"])
    assert secret.parent == up.data_dir and mode(secret) == 0o600 and mode(up.data_dir) == 0o700
    redis_dir = up.data_dir / "redis"
    assert mode(redis_dir) == 0o700
    assert [p.name for p in redis_dir.iterdir() if p.is_file() and mode(p) & 0o077] == []
    once = Retry(NoBackoff(), 0)
    anonymous = redis.Redis.from_url(state["redis_url"], socket_timeout=5, retry=once)
    with pytest.raises(redis.exceptions.AuthenticationError):
        anonymous.xadd("cme:{ETH-USDT}:orders", {"d": "forged"})
    creds = load_or_create(secret)
    port = int(state["redis_url"].rsplit(":", 1)[1].split("/")[0])
    admin = redis.Redis.from_url(creds.url("admin", "127.0.0.1", port), socket_timeout=5)
    with pytest.raises(redis.exceptions.NoPermissionError):
        admin.config_set("dir", "/tmp")
    # Every service is connected as its own user (a child may still be connecting right after start).
    wait_until(lambda: {c["user"] for c in admin.client_list()} >= set(SERVICES), 15, "every ACL user")
    for proc in state["processes"]:  # the password is in the child's environment, never in `ps`
        pid, service = proc["pid"], proc["service"]
        if service == "web":  # the page's server never talks to Redis: it gets no credentials
            assert f"{URL_ENV}=".encode() not in Path(f"/proc/{pid}/environ").read_bytes()
            continue
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        assert creds.password(service).encode() not in cmdline and b"@127.0.0.1" not in cmdline
        env = dict(
            item.split(b"=", 1)
            for item in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            if b"=" in item
        )
        assert env[URL_ENV.encode()].decode() == creds.url(service, "127.0.0.1", port)
    admin.close()
    anonymous.close()


@pytest.mark.parametrize(
    ("name", "sig"),
    [("feeds-1", signal.SIGKILL), ("matcher", signal.SIGKILL), ("gateway-1", signal.SIGSEGV)],
    ids=["feeds-1-kill", "matcher-kill", "gateway-1-segv"],
)
async def test_dead_child_is_restarted_and_logged(up: Up, name: str, sig: signal.Signals) -> None:
    old = up.pid_of(name)
    os.kill(old, sig)
    wait_until(lambda: up.pid_of(name) != old and alive(up.pid_of(name)), 15, f"{name} restarted")
    assert not alive(old)
    log = up.log_text()
    assert f"{name} (pid {old}) died" in log and f"restarted {name}: pid {old} ->" in log
    assert f"killed by {sig.name}" in log
    if sig == signal.SIGSEGV:  # a crash in native code: faulthandler leaves the Python stack
        assert "Fatal Python error: Segmentation fault" in log
    # The stack still works end to end: an order is acked and its report comes back from the matcher.
    state = up.state()
    conn = await gateway_session(state["gateway"], f"restart-{name}", retry_for=10)
    try:
        msg = {"op": "new", "symbol": "ETH-USDT", "side": "buy", "type": "limit", "price": "100.00"}
        cid = f"r-{name}-{old}"
        await conn.send({**msg, "quantity": "0.01", "client_order_id": cid})
        report = await conn.wait_for(is_type("execution", client_order_id=cid), 15)
        assert report["status"] == "new"
    finally:
        await conn.close()


async def test_bench_e2e_against_the_stack_loses_nothing_and_cleans_up(up: Up) -> None:
    state = up.state()
    out = up.root / "bench.json"
    argv = [sys.executable, "-m", "services.cli", "bench", "e2e", "--gateway", state["gateway"], "--quiet"]
    argv += ["--clients", "3", "--rate", "1000", "--duration", "1.5", "--json", str(out)]
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    report = orjson.loads(out.read_bytes())
    assert report["lost_reports"] == 0 and report["missing_acks"] == 0 and not report["errors"]
    assert report["new_orders_sent"] > 500 and report["cancels_sent"] > 0
    assert report["report_latency"]["count"] == report["new_orders_sent"]
    assert report["trade_latency"]["count"] > 0 and report["fills"] > 0
    assert "order -> execution report" in done.stdout
    # Against a shared stack the bench cancels what it left resting: the book is as it found it.
    assert report["cleanup_not_confirmed"] == 0
    book = await l2_snapshot(state["md"], "BTC-USDT")
    assert book["bids"] == [] and book["asks"] == []


def test_stats_once_shows_every_stage(up: Up) -> None:
    """After the bench's traffic every stage has observations: `cme stats --once` prints numbers."""
    argv = [sys.executable, "-m", "services.cli", "stats", "--once", "--interval", "0.2"]
    done = subprocess.run(argv, cwd=up.root, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stdout + done.stderr
    processes = len(up.state()["processes"])
    assert f"{processes} of {processes} processes answered" in done.stdout
    for stage, _ in STAGES:
        row = next(line for line in done.stdout.splitlines() if line.startswith(stage))
        count, p50, p99, p999, _over = re.split(r"\s{2,}", row[len(stage) :].strip())
        assert int(count) > 0 and "-" not in (p50, p99, p999), row


def test_demo_passes_against_the_stack(up: Up) -> None:
    state = up.state()
    argv = [sys.executable, "-m", "services.cli", "demo"]
    argv += ["--gateway", state["gateway"], "--md", state["md"], "--trades", state["trades"]]
    matcher = up.pid_of("matcher")
    # cwd = the stack's root, so the demo's default ./var is this stack's data dir: it could kill the
    # matcher, and does so only with --restart-check.
    done = subprocess.run(argv, cwd=up.root, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "demo OK" in done.stdout and "no --restart-check" in done.stdout
    assert up.pid_of("matcher") == matcher
    argv.append("--restart-check")
    done = subprocess.run(argv, cwd=up.root, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "demo OK" in done.stdout and "restart check: SIGKILL the matcher" in done.stdout
    assert up.pid_of("matcher") != matcher


def test_a_second_up_on_the_same_data_dir_or_a_taken_port_is_refused(up: Up, tmp_path: Path) -> None:
    ports = ["--gateway-port", "0", "--md-port", "0", "--trades-port", "0", "--metrics-port", "0"]
    ports += ["--web-port", "0"]
    base = [sys.executable, "-m", "services.cli", "up", *ports]
    same_dir = subprocess.run(
        [*base, "--data-dir", str(up.data_dir)], capture_output=True, text=True, timeout=30
    )
    pid = up.state()["supervisor_pid"]
    assert same_dir.returncode == 1 and f"another `cme up` (pid {pid}) is running" in same_dir.stderr
    assert (up.data_dir / "stack.json").exists(), (
        "the refused instance must not touch the running one's state"
    )
    taken = up.state()["ports"]["gateway"]
    argv = [*base, "--gateway-port", str(taken), "--data-dir", str(tmp_path / "other")]
    busy = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    assert busy.returncode == 1 and f"gateway {taken} (move it with --gateway-port" in busy.stderr


async def test_sigterm_stops_everything_and_a_restart_keeps_the_book(up: Up) -> None:
    state = up.state()
    account, cid = "keeper", f"keep-{os.getpid()}-{time.time_ns()}"
    conn = await gateway_session(state["gateway"], account)
    try:
        order = {"op": "new", "symbol": "ETH-USDT", "side": "sell", "type": "limit", "price": "4321.09"}
        await conn.send({**order, "quantity": "0.25", "client_order_id": cid})
        report = await conn.wait_for(is_type("execution", client_order_id=cid), 15)
        assert report["status"] == "new"
    finally:
        await conn.close()
    before = await l2_snapshot(state["md"], "ETH-USDT")
    assert ["4321.09", "0.25000"] in before["asks"]

    # Everything the module did (orders, restarts, the bench, the demo) ran within the ACL users' rights.
    assert "NOPERM" not in up.log_text() and "no permissions" not in up.log_text()
    pids = [p["pid"] for p in state["processes"]] + [state["redis_pid"], state["supervisor_pid"]]
    assert up.stop() == 0
    assert not [pid for pid in pids if alive(pid)], "cme up left processes running"
    assert not (up.data_dir / "stack.json").exists()
    log = up.log_text()
    order_of_stops = [
        log.index(f"stopping {what}") for what in ("gateway-1", "feeds-1", "matcher", "redis-server")
    ]
    assert order_of_stops == sorted(order_of_stops), "Redis must stop last, after the matcher"

    again = up.start()
    assert again["redis_url"] == state["redis_url"], "the embedded Redis keeps its port on one data dir"
    after = await l2_snapshot(again["md"], "ETH-USDT", timeout=15, retry_for=10)
    assert ["4321.09", "0.25000"] in after["asks"], f"{after}\n{up.log_tail()}"
    # The restored order still belongs to its account: the owner can cancel it.
    conn = await gateway_session(again["gateway"], account)
    try:
        await conn.send({"op": "cancel", "symbol": "ETH-USDT", "client_order_id": cid})
        final = await conn.wait_for(is_type("execution", client_order_id=cid, status="cancelled"), 15)
        assert final["reason"]
    finally:
        await conn.close()
    assert up.stop() == 0


def health(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_up_waits_for_redis_and_health_follows_it(tmp_path: Path) -> None:
    """An external Redis that starts late, stops and comes back: `cme up` waits and says so, reports
    running only once everything is ready, and the gateway's and feeds' /healthz and /readyz (on their
    WebSocket ports and their metrics ports) go 200 -> 503 with the reason -> 200. In JSON logs."""
    server = RedisServer(tmp_path / "redis")  # its port is chosen now; it starts later
    stack = Up(tmp_path, ("--redis-url", server.url, "--log-format", "json", "--matchers", "1"))
    stack.launch()
    try:
        wait_until(lambda: "waiting for Redis at" in stack.log_text(), 20, "the waiting line")
        assert not (stack.data_dir / "stack.json").exists() and "running" not in stack.out.read_text()
        server.start()
        wait_until(stack._ready, START_TIMEOUT, "stack ready")
        assert "the stack is running" in stack.out.read_text()
        state = stack.state()
        metrics = {p["name"]: p["metrics_port"] for p in state["processes"]}
        ports = [state["ports"]["gateway"], state["ports"]["md"], state["ports"]["trades"]]
        ports += [metrics["gateway-1"], metrics["feeds-1"]]

        def answers(path: str) -> list[tuple[int, str]]:
            return [health(port, path) for port in ports]

        assert answers("/healthz") == [(200, "OK\n")] * 5 and answers("/readyz") == [(200, "OK\n")] * 5
        server.stop()
        wait_until(lambda: all(code == 503 for code, _ in answers("/healthz")), 20, "503 everywhere")
        for code, body in [*answers("/healthz"), *answers("/readyz")]:
            assert code == 503 and "Redis unreachable" in body, body
        server.start()
        wait_until(lambda: answers("/readyz") == [(200, "OK\n")] * 5, 30, "ready again")
        assert answers("/healthz") == [(200, "OK\n")] * 5
    finally:
        assert stack.stop() == 0
        server.kill()
    records = [orjson.loads(line) for line in stack.log_text().splitlines()]
    assert all(r["service"] and r["instance"] for r in records)
    assert {r["service"] for r in records} >= {"up", "matcher", "gateway", "feeds"}
    waits = [r for r in records if r["msg"].startswith("waiting for Redis at")]
    assert 1 <= len(waits) <= 5, "the waiting line backs off"
