"""The soak's processes on 127.0.0.1: an embedded redis-server, two matchers (one holds the lease, the
other stands by), two gateways and two feeds, each `python -m services.cli <service>` as an operator
runs them, with its own log file per start.

`Cluster.inject` applies a fault to the process a role names; `Cluster.tick` (called every few tens
of milliseconds) is the supervisor: it wakes stalled processes, starts killed ones when their hold is
over, finishes graceful restarts and starts again, after a short delay, anything that died on its own
(a matcher exits by design when Redis fails under it, or when fencing refuses its commit). Children
are started with services.supervisor's PR_SET_PDEATHSIG, which fires when the spawning *thread* ends:
so every start and tick runs on the soak's main thread.

Redis runs with appendfsync always (flag appended to shared.redis_server's argv, later flags win).
Under everysec a kill -9 of Redis can lose appends the gateway already acked: Redis 6.2 postpones
the AOF write (up to 2 s) while a background fsync is still running and sends the replies anyway, so
the XADD's reply can leave before its bytes reach the file. With always, the write and fsync happen
before any reply of that event-loop turn, so "acked" means "survives kill -9 of Redis".
"""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import time
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import cast

import redis

from services.chaos.schedule import KILL, MATCHER, REDIS, RESTART, STALL, STANDBY, Fault
from services.supervisor import _popen
from shared import keys
from shared.net import port_open
from shared.redis_server import RedisServer, free_port

log = logging.getLogger("cme.chaos")

HOST = "127.0.0.1"
RESPAWN_DELAY = 0.5  # seconds before a process that died on its own is started again
STOP_GRACE = 10.0  # seconds a graceful stop may take before SIGKILL
READY_TIMEOUT = 60.0  # a loaded 2-core machine may take a while to start a Python service

UP, STALLED, DOWN, STOPPING, DEAD = "up", "stalled", "down", "stopping", "dead"


class Managed(ABC):
    """A child process and what the soak is doing to it: UP, STALLED (until), DOWN (killed, until),
    STOPPING (SIGTERM sent, restart when it exits), DEAD (died on its own, respawn at until)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.state = UP
        self.until = 0.0
        self.since = 0.0
        self.starts = 0
        self.exits: Counter[int] = Counter()  # exit codes of deaths the soak did not cause

    @abstractmethod
    def _spawn(self) -> None:
        """Start the process."""

    @abstractmethod
    def _popen(self) -> subprocess.Popen[bytes] | None:
        """The process of the latest start (None before the first)."""

    @property
    def alive(self) -> bool:
        proc = self._popen()
        return proc is not None and proc.poll() is None

    @property
    def pid(self) -> int | None:
        proc = self._popen()
        return proc.pid if proc is not None else None

    def start(self) -> None:
        self.starts += 1
        self._spawn()
        self.state = UP

    def signal(self, sig: signal.Signals) -> None:
        proc = self._popen()
        if proc is not None and proc.poll() is None:
            proc.send_signal(sig)

    def kill(self) -> None:
        """SIGKILL the process this object started (a stopped one too), and reap it."""
        proc = self._popen()
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait(10)

    # Faults ------------------------------------------------------------------------------------
    def inject(self, fault: Fault, now: float) -> bool:
        """Apply the fault; False (skipped) when the process is not running normally."""
        if self.state != UP or not self.alive:
            return False
        if fault.kind == KILL:
            self.kill()
            self.state, self.until = DOWN, now + fault.hold
        elif fault.kind == STALL:
            self.signal(signal.SIGSTOP)
            self.state, self.until = STALLED, now + fault.hold
        elif fault.kind == RESTART:
            self.signal(signal.SIGTERM)
            self.state, self.since = STOPPING, now
        return True

    def tick(self, now: float) -> None:
        """The supervisor's step for this process."""
        if self.state == STALLED and now >= self.until:
            self.signal(signal.SIGCONT)
            self.state = UP
        elif self.state == DOWN and now >= self.until:
            self.start()
        elif self.state == STOPPING:
            if not self.alive:
                self.start()
            elif now - self.since > STOP_GRACE:
                log.warning("%s did not stop within %.0f s: SIGKILL", self.name, STOP_GRACE)
                self.kill()
        elif self.state == UP and not self.alive:
            proc = self._popen()
            code = proc.returncode if proc is not None else 0
            self.exits[code] += 1
            log.info("%s exited on its own (code %s); starting it again", self.name, code)
            self.state, self.until = DEAD, now + RESPAWN_DELAY
        elif self.state == DEAD and now >= self.until:
            self.start()

    def heal(self) -> None:
        """Back to normal at once: wake it, or start it if it is not running."""
        if self.state == STALLED:
            self.signal(signal.SIGCONT)
            self.state = UP
        elif self.state == STOPPING:
            proc = self._popen()
            if proc is not None:
                try:
                    proc.wait(STOP_GRACE)
                except subprocess.TimeoutExpired:
                    self.kill()
        if not self.alive:
            self.start()


class Service(Managed):
    """`python -m services.cli <argv>`; each start logs to a new file under log_dir."""

    def __init__(self, name: str, argv: list[str], log_dir: Path) -> None:
        super().__init__(name)
        self.argv = argv
        self.log_dir = log_dir
        self.log = log_dir / f"{name}-0.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def _popen(self) -> subprocess.Popen[bytes] | None:
        return self.proc

    def _spawn(self) -> None:
        self.log = self.log_dir / f"{self.name}-{self.starts}.log"
        with open(self.log, "wb") as out:
            self.proc = _popen([sys.executable, "-m", "services.cli", *self.argv], out)

    def text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def tail(self, n: int = 20) -> str:
        """The end of this start's log, or of the previous one if this start has written nothing."""
        log = self.log
        if self.starts > 1 and not self.text():
            log = self.log_dir / f"{self.name}-{self.starts - 1}.log"
        try:
            lines = log.read_text(errors="replace").splitlines()[-n:]
        except OSError:
            lines = []
        return f"--- {log.name} ---\n" + "\n".join(lines)

    def stop(self) -> int | None:
        """SIGTERM, then SIGKILL if it does not exit in time; the exit code."""
        if self.proc is None:
            return None
        self.signal(signal.SIGCONT)  # a stopped process cannot handle SIGTERM
        self.signal(signal.SIGTERM)
        try:
            self.proc.wait(STOP_GRACE)
        except subprocess.TimeoutExpired:
            self.kill()
        return self.proc.returncode


class Redis(Managed):
    """The embedded redis-server (AOF, appendfsync always), same port and files across restarts."""

    def __init__(self, data_dir: Path) -> None:
        super().__init__(REDIS)
        self.server = RedisServer(data_dir, port=free_port(HOST), spawn=_spawn_redis)

    def _popen(self) -> subprocess.Popen[bytes] | None:
        return self.server.proc

    def _spawn(self) -> None:
        self.server.start()  # returns once the AOF is loaded and PING answers

    @property
    def url(self) -> str:
        return self.server.url


def _spawn_redis(argv: list[str]) -> subprocess.Popen[bytes]:
    return _popen([*argv, "--appendfsync", "always"], subprocess.DEVNULL)


class Cluster:
    """Every process of the soak, its ports, and role resolution for faults."""

    def __init__(self, root: Path, symbols: list[str], *, checkpoint_seconds: float = 2.0) -> None:
        self.root = root
        self.symbols = symbols
        logs = root / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        self.redis = Redis(root / "redis")
        common = ["--redis-url", self.redis.url, "--metrics-port", "0"]
        data = ["--data-dir", str(root / "data"), "--checkpoint-seconds", str(checkpoint_seconds)]
        self.matchers = [
            Service(name, ["matcher", *common, "--instance", name, *data], logs)
            for name in ("matcher-a", "matcher-b")
        ]
        self.gateway_ports = [free_port(HOST) for _ in range(2)]
        self.gateways = [
            Service(
                f"gateway-{i}", ["gateway", *common, "--instance", f"gateway-{i}", "--port", str(p)], logs
            )
            for i, p in enumerate(self.gateway_ports, 1)
        ]
        self.feed_ports = [(free_port(HOST), free_port(HOST)) for _ in range(2)]
        self.feeds = [
            Service(
                f"feeds-{i}",
                [
                    "feeds",
                    *common,
                    "--instance",
                    f"feeds-{i}",
                    "--md-port",
                    str(md),
                    "--trades-port",
                    str(tr),
                ],
                logs,
            )
            for i, (md, tr) in enumerate(self.feed_ports, 1)
        ]
        self._r: redis.Redis | None = None

    @property
    def services(self) -> list[Service]:
        return [*self.matchers, *self.gateways, *self.feeds]

    @property
    def managed(self) -> list[Managed]:
        return [self.redis, *self.services]

    @property
    def gateway_urls(self) -> list[str]:
        return [f"ws://{HOST}:{p}" for p in self.gateway_ports]

    @property
    def md_urls(self) -> list[str]:
        return [f"ws://{HOST}:{md}" for md, _ in self.feed_ports]

    @property
    def r(self) -> redis.Redis:
        """A client for the soak's own reads; short timeouts, since Redis may be stopped."""
        if self._r is None:
            self._r = redis.Redis.from_url(self.redis.url, socket_timeout=2, socket_connect_timeout=1)
        return self._r

    # Lifecycle ---------------------------------------------------------------------------------
    def start(self) -> None:
        """Redis, the first matcher (live), the second (standby), gateways and feeds (ready)."""
        self.redis.start()
        first, second = self.matchers
        first.start()
        self._wait(lambda: "live: " in first.text(), "matcher-a live")
        second.start()
        self._wait(lambda: "standby" in second.text(), "matcher-b standing by")
        for s in [*self.gateways, *self.feeds]:
            s.start()
        self.wait_ready()

    def wait_ready(self) -> None:
        """Every process runs; one matcher is live; gateways and feeds listen and are subscribed."""
        exec_channels = [keys.exec_channel(s) for s in self.symbols]
        md_channels = [keys.md_channel(s) for s in self.symbols]
        self._wait(lambda: all(m.alive for m in self.managed), "every process running")
        self._wait(lambda: self.live_matcher() is not None, "a live matcher")
        self._wait(lambda: all(port_open(HOST, p) for p in self.gateway_ports), "gateways listening")
        self._wait(lambda: all(port_open(HOST, p[0]) for p in self.feed_ports), "feeds listening")
        self._wait(lambda: self._subscribers(exec_channels) >= len(self.gateways), "gateways subscribed")
        self._wait(lambda: self._subscribers(md_channels) >= len(self.feeds), "feeds subscribed")

    def _wait(self, cond: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        while not cond():
            dead = [s for s in self.services if s.starts and not s.alive]
            if time.monotonic() > deadline:
                tails = "\n".join(s.tail() for s in self.services if s.starts)
                raise RuntimeError(f"timed out waiting for {what}\n{tails}")
            for s in dead:  # e.g. a matcher that exited on a Redis failure during the heal
                s.tick(time.monotonic())
            time.sleep(0.05)

    def _subscribers(self, channels: list[str]) -> int:
        try:
            counts = cast(list[tuple[bytes, int]], self.r.pubsub_numsub(*channels))
        except (redis.RedisError, OSError):
            return 0
        return min(n for _, n in counts)

    def tick(self) -> None:
        now = time.monotonic()
        for m in self.managed:
            m.tick(now)

    def heal(self) -> None:
        """Everything back to normal (woken, started) and ready."""
        for m in self.managed:
            m.heal()
        self.wait_ready()

    def stop(self) -> dict[str, int | None]:
        """Orderly stop: gateways, feeds, the standby, then the live matcher (its final checkpoint)."""
        live = self.live_matcher()
        order = [*self.gateways, *self.feeds, *(m for m in self.matchers if m is not live)]
        codes = {s.name: s.stop() for s in order}
        if live is not None:
            codes[live.name] = live.stop()
        return codes

    def close(self) -> None:
        if self._r is not None:
            self._r.close()
        for s in self.services:
            s.kill()
        self.redis.kill()

    # Faults ------------------------------------------------------------------------------------
    def inject(self, fault: Fault) -> bool:
        target = self.resolve(fault.target)
        return target is not None and target.inject(fault, time.monotonic())

    def resolve(self, role: str) -> Managed | None:
        if role == REDIS:
            return self.redis
        if role in (MATCHER, STANDBY):
            live = self.live_matcher()
            if live is None:
                return None
            return live if role == MATCHER else next(m for m in self.matchers if m is not live)
        return next((s for s in self.services if s.name == role), None)

    def live_matcher(self) -> Service | None:
        """The matcher that holds the first symbol's lease (its value names the holder's pid)."""
        try:
            raw = self.r.get(keys.matcher_lease(self.symbols[0]))
        except (redis.RedisError, OSError):
            return None
        holder = raw.decode() if isinstance(raw, bytes) else ""
        for m in self.matchers:
            if m.alive and (f":{m.pid}:" in holder or holder.endswith(f":{m.name}")):
                return m
        return None
