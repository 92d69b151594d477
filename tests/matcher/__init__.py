"""Helpers shared by the matcher service tests: a seeded order flow, an appender that writes real stream
entries, a pub/sub collector, the expected output of a flow (from a fresh in-memory engine), and ways to
run the matcher in-process or as a real `cme matcher` process. Everything runs against real Redis."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import orjson
import redis

from services.matcher.engine import Engine
from services.matcher.service import Config, Matcher
from services.matcher.venue import VenueMatcher
from shared import keys
from shared.commands import Amend, Cancel, Command, NewOrder
from shared.events import Event
from shared.ids import entry_to_seq, seq_ms
from shared.instruments import Instrument, default_instruments
from shared.stream import decode_events, encode
from shared.wire import Rendered, render, unframe

REPO = Path(__file__).resolve().parents[2]
INSTRUMENTS = default_instruments()
BTC, ETH = "BTC-USDT", "ETH-USDT"
ACCOUNTS = ("alice", "bob", "carol", "dave", "erin")
MID = 3_000_000  # 30000.00 in ticks


# Waiting ---------------------------------------------------------------------------------------
def wait_until(pred: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


async def await_until(pred: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


# Flow -----------------------------------------------------------------------------------------
class Flow:
    """Seeded random commands around a fixed mid: books cross often, cancels and amends hit live ids."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.n = 0
        self.live: dict[str, list[tuple[int, str]]] = {}  # symbol -> (order seq, account)

    def command(self, symbol: str) -> Command:
        rng, live = self.rng, self.live.setdefault(symbol, [])
        self.n += 1
        account = rng.choice(ACCOUNTS)
        side = rng.choice(("buy", "sell"))
        r = rng.random()
        if r < 0.55:
            price = MID + rng.randint(-15, 15)
            return NewOrder(symbol, account, side, "limit", "gtc", price, rng.randint(1, 500), f"c{self.n}")
        if r < 0.63:
            return NewOrder(symbol, account, side, "market", "ioc", None, rng.randint(1, 800), f"c{self.n}")
        if r < 0.70:
            tif = rng.choice(("ioc", "fok"))
            price = MID + rng.randint(-5, 5)
            return NewOrder(symbol, account, side, "limit", tif, price, rng.randint(1, 800), f"c{self.n}")
        if r < 0.95 and live:
            oid, owner = live.pop(rng.randrange(len(live)))
            return Cancel(symbol, owner, oid)
        if live:
            oid, owner = rng.choice(live)
            return Amend(symbol, owner, oid, None, MID + rng.randint(-15, 15), rng.randint(1, 600))
        return NewOrder(symbol, account, side, "limit", "gtc", MID, 1 + rng.randint(0, 99), f"c{self.n}")

    def appended(self, symbol: str, entry_id: str, cmd: Command) -> None:
        if type(cmd) is NewOrder and cmd.tif == "gtc":
            self.live.setdefault(symbol, []).append((entry_to_seq(entry_id), cmd.account))


Record = dict[str, list[tuple[str, Command]]]  # symbol -> (entry id, command) in stream order


def append(
    r: redis.Redis, items: list[tuple[str, Command | bytes]], record: Record | None = None
) -> list[str]:
    """XADD each command (or raw field value) as a gateway would, with its INCR of `appended`."""
    pipe = r.pipeline(transaction=False)
    for symbol, cmd in items:
        data = cmd if isinstance(cmd, bytes) else encode(cmd, time.time_ns())
        pipe.xadd(keys.orders(symbol), {b"d": data})
        pipe.incr(keys.appended(symbol))
    ids = [x.decode() for x in pipe.execute()[0::2]]
    if record is not None:
        for (symbol, cmd), entry_id in zip(items, ids, strict=True):
            if not isinstance(cmd, bytes):
                record.setdefault(symbol, []).append((entry_id, cmd))
    return ids


def add_flow(r: redis.Redis, flow: Flow, record: Record, symbols: tuple[str, ...], count: int) -> None:
    items: list[tuple[str, Command | bytes]] = []
    for _ in range(count):
        symbol = flow.rng.choice(symbols)
        items.append((symbol, flow.command(symbol)))
    ids = append(r, items, record)
    for (symbol, cmd), entry_id in zip(items, ids, strict=True):
        assert not isinstance(cmd, bytes)
        flow.appended(symbol, entry_id, cmd)


def stream_ids(r: redis.Redis, key: str) -> list[str]:
    entries = cast(list[tuple[bytes, Any]], r.xrange(key))
    return [entry_id.decode() for entry_id, _ in entries]


def stream_events(r: redis.Redis, symbol: str) -> list[list[Any]]:
    """Every [entry id, events] pair of the symbol's events stream, batches flattened."""
    entries = cast(list[tuple[bytes, dict[bytes, bytes]]], r.xrange(keys.events(symbol)))
    return [pair for _, fields in entries for pair in decode_events(fields[b"d"])]


def progress(r: redis.Redis, symbol: str) -> dict[str, str]:
    raw = cast(dict[bytes, bytes], r.hgetall(keys.progress(symbol)))
    return {k.decode(): v.decode() for k, v in raw.items()}


# Expected output ------------------------------------------------------------------------------
@dataclass
class Expected:
    engine: Engine
    events: list[list[Any]] = field(default_factory=list)  # [entry id, events] as the events stream has it
    md: list[bytes] = field(default_factory=list)
    trades: list[dict[str, Any]] = field(default_factory=list)  # latency_us removed
    execs: list[bytes] = field(default_factory=list)


def expected(inst: Instrument, entries: list[tuple[str, Command]]) -> Expected:
    """What the matcher must produce for these entries: a fresh engine, same seq and ts derivation."""
    out = Expected(Engine([inst]))
    rendered = Rendered()
    for entry_id, cmd in entries:
        seq = entry_to_seq(entry_id)
        events: list[Event] = out.engine.apply(cmd, seq, seq_ms(seq))
        out.events.append([entry_id, events])
        render(events, inst, seq_ms(seq), rendered)
    out.md, out.execs = rendered.md, rendered.execs
    out.trades = [_no_latency(orjson.loads(line)) for line in rendered.trades]
    return out


def _no_latency(msg: dict[str, Any]) -> dict[str, Any]:
    msg.pop("latency_us", None)
    return msg


# Pub/sub --------------------------------------------------------------------------------------
class Collector(threading.Thread):
    """Subscribes at construction (so nothing published afterwards is missed) and keeps every payload."""

    def __init__(self, url: str, symbols: tuple[str, ...] = (BTC, ETH)) -> None:
        super().__init__(daemon=True)
        self.client = redis.Redis.from_url(url)
        self.pubsub = self.client.pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call]
        self.channels: dict[bytes, tuple[str, str]] = {}
        for s in symbols:
            for kind, name in (("md", keys.md_channel(s)), ("trades", keys.trades_channel(s)),
                               ("exec", keys.exec_channel(s))):  # fmt: skip
                self.channels[name.encode()] = (s, kind)
        self.pubsub.subscribe(*self.channels)
        self.payloads: list[tuple[str, str, bytes]] = []  # (symbol, kind, payload) in arrival order
        self._closing = threading.Event()
        self.start()

    def run(self) -> None:
        with contextlib.suppress(redis.RedisError, OSError, ValueError):
            while not self._closing.is_set():
                msg = self.pubsub.get_message(timeout=0.05)
                if msg is not None and msg["type"] == "message":
                    self.payloads.append((*self.channels[msg["channel"]], msg["data"]))

    def close(self) -> None:
        self._closing.set()
        self.join(5)
        with contextlib.suppress(redis.RedisError, OSError):
            self.pubsub.close()
            self.client.close()

    def lines(self, symbol: str, kind: str) -> list[bytes]:
        out: list[bytes] = []
        for s, k, payload in list(self.payloads):
            if s == symbol and k == kind:
                out.extend(unframe(payload)[1])
        return out

    def messages(self, symbol: str, kind: str) -> list[dict[str, Any]]:
        return [orjson.loads(line) for line in self.lines(symbol, kind)]

    def count(self, symbol: str, kind: str) -> int:
        return sum(1 for s, k, _ in list(self.payloads) if s == symbol and k == kind)


def split_md(lines: list[bytes]) -> tuple[list[bytes], list[dict[str, Any]]]:
    """(l2_update lines, l2_snapshot messages) of an md line list."""
    updates, snaps = [], []
    for line in lines:
        if b'"l2_snapshot"' in line:
            snaps.append(orjson.loads(line))
        else:
            updates.append(line)
    return updates, snaps


# Running the matcher --------------------------------------------------------------------------
def config(redis_url: str, data_dir: Path, **kw: Any) -> Config:
    return Config(redis_url=redis_url, instruments=tuple(INSTRUMENTS.values()), data_dir=data_dir, **kw)


@dataclass
class InProcess:
    matcher: Matcher
    task: asyncio.Task[int]

    async def stop(self) -> int:
        self.matcher.stop()
        return await asyncio.wait_for(self.task, 15)

    async def crash(self) -> None:
        """Stop without the final checkpoint, as a kill would (the task is cancelled mid-loop).

        Cancelled again until it ends: redis-py 8.1's asyncio client sometimes swallows a cancellation
        that lands during a command (the loop then simply goes on)."""
        deadline = time.monotonic() + 10
        while not self.task.done() and time.monotonic() < deadline:
            self.task.cancel()
            await asyncio.wait({self.task}, timeout=0.2)
        assert self.task.done(), "the matcher task ignored cancellation"
        with contextlib.suppress(asyncio.CancelledError):
            self.task.result()


@contextlib.asynccontextmanager
async def in_process(cfg: Config) -> AsyncIterator[InProcess]:
    m = VenueMatcher(cfg) if cfg.risk else Matcher(cfg)
    run = InProcess(m, asyncio.create_task(m.run()))
    waiter = asyncio.create_task(m.ready.wait())
    await asyncio.wait({waiter, run.task}, timeout=15, return_when=asyncio.FIRST_COMPLETED)
    if not m.ready.is_set():
        waiter.cancel()
        raise AssertionError(f"matcher did not get ready (task done: {run.task.done()})")
    try:
        yield run
    finally:
        if not run.task.done():
            await run.crash()


class Process:
    """`python -m services.cli matcher` as a real child process, its log in a file."""

    def __init__(self, redis_url: str, data_dir: Path, log: Path, *extra: str) -> None:
        self.log = log
        risk = () if "--risk" in extra else ("--risk", "off")  # these tests append with XADD *
        cmd = [sys.executable, "-m", "services.cli", "matcher", "--redis-url", redis_url, "--data-dir",
               str(data_dir), "--metrics-port", "0", *risk, *extra]  # fmt: skip
        with open(log, "ab") as f:
            self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT,
                                         env={**os.environ, "PYTHONUNBUFFERED": "1"})  # fmt: skip

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_live(self, starts: int = 1, timeout: float = 15.0) -> None:
        """Wait until the log shows `starts` matchers gone live (the log file is shared across restarts)."""
        wait_until(
            lambda: self.text().count("live: ") >= starts or self.proc.poll() is not None, timeout, "live"
        )
        assert self.proc.poll() is None, self.text()[-3000:]

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(10)

    def terminate(self, timeout: float = 20.0) -> int:
        self.proc.terminate()
        return self.proc.wait(timeout)
