"""A real stack for the end-to-end tests: a redis-server and `cme matcher`, `cme gateway`, `cme feeds`
as separate processes on free ports, started exactly as an operator would start them.

`Stack` starts, kills (SIGKILL, by the pid it started: never by name) and restarts each process, or the
whole stack on the same data dir and ports. It also runs an `OrdersTap`: a thread that reads every
symbol's orders stream as it grows and keeps each entry. The matcher trims the stream below its older
checkpoints (every 2 s here), so after a while XRANGE no longer starts at the first order; the tap
still has them all, and `Stack.orders` checks it holds exactly as many entries as the gateways counted
as appended. Replaying those entries into a fresh Engine (`Stack.replay`) gives the book and trades of
an uninterrupted run: the expected state.

The replay is cross-checked, command by command, against the naive reference model of tests/core
(which shares no code with the engine), so the expected state does not rest on the engine alone.

Every process logs to its own file under the stack's root (a new file per start); a readiness failure
shows the log's tail.

Fixtures: `stack` (a fresh stack with the default instruments), `stack_factory` (stacks with other
options), `shared_stack` (one stack per module with spare symbols: each test takes a fresh book).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import orjson
import pytest
import redis
from cme_client import Connection, L2Book, Message, is_type, l2_snapshot

from services.chaos.checks import OrdersTap
from services.matcher.engine import Engine
from shared import keys
from shared.commands import Command
from shared.events import ACCEPTED, REJECTED, TRADE, Event
from shared.ids import SEQ_BITS, entry_to_seq
from shared.instruments import Instrument, default_instruments
from shared.redis_server import RedisServer, free_port
from shared.stream import decode, decode_events, encode_events
from shared.wire import Rendered, render, split_exec_line, trade_message
from tests.core.reference import Reference
from tests.e2e.client import book_of

ROOT = Path(__file__).resolve().parents[2]
HOST = "127.0.0.1"
START_TIMEOUT = 30.0  # a loaded 2-core machine may take a while to import and start a service
FULL_DEPTH = 1 << 40


def wait_until(cond: Callable[[], bool], timeout: float, what: str, detail: Callable[[], str] = str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{detail()}")
        time.sleep(0.05)


def pick_port() -> int:
    return free_port(HOST)


def port_open(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=0.5):
            return True
    except OSError:
        return False


class Service:
    """One `python -m services.cli ...` child process; each start logs to a new file."""

    def __init__(self, name: str, argv: list[str], log_dir: Path) -> None:
        self.name = name
        self.argv = argv
        self.log_dir = log_dir
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.log: Path = log_dir / f"{name}-0.log"

    def start(self) -> Service:
        assert not self.alive, f"{self.name} is already running"
        self.starts += 1
        self.log = self.log_dir / f"{self.name}-{self.starts}.log"
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "services.cli", *self.argv],
                cwd=ROOT,
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
                start_new_session=True,  # a Ctrl-C of the test run reaches pytest only; teardown kills
            )
        return self

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def tail(self, n: int = 40) -> str:
        return f"--- {self.log.name} ---\n" + "\n".join(self.text().splitlines()[-n:])

    def kill(self) -> None:
        """SIGKILL (kill -9) the process this object started, and reap it."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait(10)

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM, then SIGKILL if it does not exit in time. Returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.returncode


@dataclass
class Replay:
    """A fresh Engine fed every entry of a symbol's orders stream: the uninterrupted run."""

    inst: Instrument
    engine: Engine
    entries: list[tuple[str, Command | None]]
    events: list[tuple[str, list[Event]]] = field(default_factory=list)
    trades: list[dict[str, Any]] = field(default_factory=list)  # wire trade messages, no latency_us
    execs: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # account -> messages in order
    md: list[dict[str, Any]] = field(default_factory=list)  # l2_update messages

    def book(self) -> tuple[list[list[str]], list[list[str]]]:
        """(bids, asks) best first as the protocol's [price, quantity] strings."""
        bids, asks = self.engine.books[self.inst.symbol].depth(FULL_DEPTH)
        p, q = self.inst.price_str, self.inst.qty_str
        return [[p(a), q(b)] for a, b in bids], [[p(a), q(b)] for a, b in asks]

    @property
    def book_seq(self) -> int:
        return self.engine.books[self.inst.symbol].book_seq

    @property
    def trade_seq(self) -> int:
        return self.engine.books[self.inst.symbol].trade_seq

    def new_order_outcomes(self) -> dict[str, str]:
        """order id -> "accepted" or "rejected" for every new order of the stream."""
        out: dict[str, str] = {}
        for entry_id, events in self.events:
            for e in events:
                if e[0] == ACCEPTED:
                    out[entry_id] = "accepted"
                elif e[0] == REJECTED and e[2] == "new":
                    out[entry_id] = "rejected"
        return out


def replay(inst: Instrument, entries: list[tuple[str, Command | None]]) -> Replay:
    """Feed the entries to a fresh Engine, and to the naive reference model of tests/core (which
    shares no code with the engine): both must give the same events, command by command."""
    out = Replay(inst, Engine([inst]), entries)
    ref = Reference([inst])
    rendered = Rendered()
    for entry_id, cmd in entries:
        if cmd is None:
            continue
        seq = entry_to_seq(entry_id)
        ts = seq >> SEQ_BITS
        events = out.engine.apply(cmd, seq, ts)
        assert events == ref.apply(cmd, seq, ts), f"engine and reference model differ on {entry_id} {cmd}"
        out.events.append((entry_id, events))
        render(events, inst, ts, rendered)
        for e in events:
            if e[0] == TRADE:
                msg = trade_message(e, inst)
                msg.pop("latency_us")
                out.trades.append(msg)
    for line in rendered.execs:
        account, body = split_exec_line(line)
        out.execs.setdefault(account, []).append(orjson.loads(body))
    out.md = [orjson.loads(line) for line in rendered.md]
    return out


@dataclass
class Feeds:
    service: Service
    md_port: int
    trades_port: int

    @property
    def md_url(self) -> str:
        return f"ws://{HOST}:{self.md_port}"

    @property
    def trades_url(self) -> str:
        return f"ws://{HOST}:{self.trades_port}"


class Stack:
    """redis-server + matcher + gateway + feeds (any number), on free ports, data under `root`.

    Balances are off unless `risk`: these tests check the matching pipeline, its market data and its
    recovery, whose expected outputs come from a per-symbol engine replay; tests/e2e/test_balances.py
    runs the venue with balances on (the default of `cme up`)."""

    def __init__(
        self,
        root: Path,
        symbols: Sequence[str] | None = None,
        *,
        checkpoint_seconds: float = 2.0,
        matcher_args: Sequence[str] = (),
        gateway_args: Sequence[str] = (),
        risk: bool = False,
    ) -> None:
        self.root = root
        mode = ("--risk", "on" if risk else "off")
        self.data_dir = root / "data"
        self.logs = root / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        defaults = default_instruments()
        self.symbols = list(symbols) if symbols is not None else list(defaults)
        self.instruments = {s: defaults.get(s, Instrument(s)) for s in self.symbols}
        instrument_args: list[str] = []
        if symbols is not None:  # every symbol with the default spec (tick 0.01, lot 0.00001, fees)
            spec_file = root / "instruments.json"
            spec_file.write_bytes(orjson.dumps([inst.spec() for inst in self.instruments.values()]))
            instrument_args = ["--instruments", str(spec_file)]
        self.redis = RedisServer(self.data_dir / "redis", port=pick_port())
        common = ["--redis-url", self.redis.url, "--metrics-port", "0", *instrument_args]
        matcher_argv = ["matcher", *common, "--data-dir", str(self.data_dir)]
        matcher_argv += ["--checkpoint-seconds", str(checkpoint_seconds), *mode, *matcher_args]
        self.matcher = Service("matcher", matcher_argv, self.logs)
        self.gateway_port = pick_port()
        self.gateway = Service(
            "gateway", ["gateway", *common, "--port", str(self.gateway_port), *mode, *gateway_args], self.logs
        )
        self._common = common
        self._mode = mode
        self.extra: list[Service] = []  # more gateways started by a test
        self.feeds: list[Feeds] = []
        self.new_feeds()
        self.tap = OrdersTap(self.redis.url, self.symbols)
        self._redis_client: redis.Redis | None = None

    # URLs --------------------------------------------------------------------------------------
    @property
    def gateway_url(self) -> str:
        return f"ws://{HOST}:{self.gateway_port}"

    @property
    def md_url(self) -> str:
        return self.feeds[0].md_url

    @property
    def trades_url(self) -> str:
        return self.feeds[0].trades_url

    @property
    def r(self) -> redis.Redis:
        if self._redis_client is None:
            self._redis_client = redis.Redis.from_url(self.redis.url, socket_timeout=5)
        return self._redis_client

    # Lifecycle ---------------------------------------------------------------------------------
    def new_feeds(self) -> Feeds:
        """Declare one more feeds process on its own ports (start it with start_feeds)."""
        md, trades = pick_port(), pick_port()
        n = len(self.feeds) + 1
        argv = ["feeds", *self._common, "--md-port", str(md), "--trades-port", str(trades)]
        feeds = Feeds(Service(f"feeds{n}", argv, self.logs), md, trades)
        self.feeds.append(feeds)
        return feeds

    def start(self) -> Stack:
        self.redis.start()
        if not self.tap.is_alive():
            self.tap.start()
        self.start_matcher()
        self.gateway.start()
        for feeds in self.feeds:
            feeds.service.start()
        self.wait_gateway()
        for feeds in self.feeds:
            self.wait_feeds(feeds)
        self.wait_matcher()
        return self

    def start_matcher(self) -> None:
        self.matcher.start()

    def wait_matcher(self) -> None:
        """The matcher has recovered and is live (its log says so)."""
        m = self.matcher
        wait_until(lambda: "live: " in m.text() or not m.alive, START_TIMEOUT, "matcher live", self.tails)
        assert m.alive, f"matcher exited\n{m.tail()}"

    def restart_matcher(self) -> None:
        self.matcher.kill()
        self.matcher.start()
        self.wait_matcher()

    def wait_gateway(self) -> None:
        """The gateway accepts connections and its execution-report subscription is in place."""
        g = self.gateway
        channels = [keys.exec_channel(s) for s in self.symbols]
        wait_until(
            lambda: (port_open(self.gateway_port) and self._subscribers(channels) >= 1) or not g.alive,
            START_TIMEOUT,
            "gateway ready",
            self.tails,
        )
        assert g.alive, f"gateway exited\n{g.tail()}"

    def start_feeds(self, feeds: Feeds) -> None:
        feeds.service.start()
        self.wait_feeds(feeds)

    def wait_feeds(self, feeds: Feeds) -> None:
        """Both ports accept connections and the process has subscribed to the md and trades channels."""
        s = feeds.service
        wait_until(
            lambda: (
                (port_open(feeds.md_port) and port_open(feeds.trades_port) and "md ws://" in s.text())
                or not s.alive
            ),
            START_TIMEOUT,
            f"{s.name} ready",
            self.tails,
        )
        assert s.alive, f"{s.name} exited\n{s.tail()}"
        self.wait_subscribed()

    def wait_subscribed(self, timeout: float = START_TIMEOUT) -> None:
        """Every running gateway and feeds process is subscribed to its Redis channels (after a Redis
        restart they resubscribe on their own; what is published before that is lost to them)."""
        gateways = [keys.exec_channel(s) for s in self.symbols]
        feeds = [f(s) for s in self.symbols for f in (keys.md_channel, keys.trades_channel)]
        n_feeds = sum(1 for f in self.feeds if f.service.alive)
        n_gateways = 1 if self.gateway.alive else 0
        wait_until(
            lambda: self._subscribers(gateways) >= n_gateways and self._subscribers(feeds) >= n_feeds,
            timeout,
            "gateway and feeds subscribed",
            self.tails,
        )

    def _subscribers(self, channels: list[str]) -> int:
        """The fewest subscribers any of these channels has."""
        try:
            counts = cast(list[tuple[bytes, int]], self.r.pubsub_numsub(*channels))
        except (redis.RedisError, OSError):
            return 0
        return min(n for _, n in counts)

    def services(self) -> list[Service]:
        return [self.matcher, self.gateway, *(f.service for f in self.feeds), *self.extra]

    def start_standby_matcher(self) -> Service:
        """A second matcher on the same Redis and data dir: it must stand by while the first holds
        the symbols' leases. Returns once its log says it is standing by."""
        service = Service(f"matcher{len(self.extra) + 2}", self.matcher.argv, self.logs).start()
        self.extra.append(service)
        wait_until(lambda: "standby" in service.text() or not service.alive, START_TIMEOUT, "standby")
        assert service.alive, service.tail()
        return service

    def start_extra_gateway(self) -> tuple[Service, str]:
        """One more gateway process on its own port; returns it and its URL once it is ready."""
        port = pick_port()
        argv = ["gateway", *self._common, "--port", str(port), *self._mode]
        service = Service(f"gateway{len(self.extra) + 2}", argv, self.logs).start()
        self.extra.append(service)
        wanted = 1 + sum(1 for g in self.extra if g.alive)
        channels = [keys.exec_channel(s) for s in self.symbols]
        wait_until(
            lambda: (port_open(port) and self._subscribers(channels) >= wanted) or not service.alive,
            START_TIMEOUT,
            f"{service.name} ready",
            self.tails,
        )
        assert service.alive, service.tail()
        return service, f"ws://{HOST}:{port}"

    def kill_all(self) -> None:
        """kill -9 of every process, redis-server last (so the services die by SIGKILL, not by a
        Redis error they would handle)."""
        for service in self.services():
            service.kill()
        if self._redis_client is not None:
            with contextlib.suppress(redis.RedisError, OSError):
                self._redis_client.close()
            self._redis_client = None
        self.redis.kill()

    def restart_all(self) -> None:
        """Everything again on the same data dir and ports: Redis loads its AOF, the matcher recovers."""
        self.start()

    def close(self) -> None:
        self.tap.close()
        for service in self.services():
            service.kill()
        if self._redis_client is not None:
            with contextlib.suppress(redis.RedisError, OSError):
                self._redis_client.close()
        self.redis.kill()

    def tails(self) -> str:
        return "\n".join(s.tail(15) for s in self.services() if s.starts)

    # State -------------------------------------------------------------------------------------
    def counters(self, symbol: str) -> tuple[int, int]:
        """(entries appended by gateways, entries applied by the matcher) of a symbol."""
        pipe = self.r.pipeline(transaction=False)
        pipe.get(keys.appended(symbol))
        pipe.hget(keys.progress(symbol), "applied")
        appended, applied = pipe.execute()
        return int(appended or 0), int(applied or 0)

    def progress(self, symbol: str) -> dict[str, str]:
        raw = cast(dict[bytes, bytes], self.r.hgetall(keys.progress(symbol)))
        return {k.decode(): v.decode() for k, v in raw.items()}

    def wait_idle(self, timeout: float = 30.0, symbols: Sequence[str] | None = None) -> None:
        """The matcher has applied everything the gateways appended (progress applied == appended)."""

        def idle() -> bool:
            return all(a == b for a, b in (self.counters(s) for s in symbols or self.symbols))

        def detail() -> str:
            return f"{[(s, self.counters(s)) for s in symbols or self.symbols]}\n{self.tails()}"

        wait_until(idle, timeout, "matcher idle", detail)

    def orders(self, symbol: str, timeout: float = 15.0) -> list[tuple[str, Command | None]]:
        """Every entry ever appended to the symbol's orders stream, decoded, in stream order.

        Checks that the tap holds exactly as many entries as the gateways appended, and that what
        the stream still holds (the matcher trims below old checkpoints) is exactly the tap's tail."""

        def appended() -> int:
            return self.counters(symbol)[0]

        wait_until(
            lambda: self.tap.count(symbol) >= appended(),
            timeout,
            f"the tap to read all of {symbol}'s orders",
            lambda: f"tap {self.tap.count(symbol)}, appended {appended()}",
        )
        tapped = self.tap.snapshot(symbol)
        assert len(tapped) == appended(), f"{symbol}: tap has {len(tapped)} entries, appended {appended()}"
        ids = [entry_id for entry_id, _ in tapped]
        assert ids == sorted(ids, key=entry_to_seq) and len(set(ids)) == len(ids)
        current = cast(list[tuple[bytes, dict[bytes, bytes]]], self.r.xrange(keys.orders(symbol)))
        stream = [(i.decode(), f.get(b"d", b"")) for i, f in current]
        assert stream == tapped[len(tapped) - len(stream) :], f"{symbol}: the stream is not the tap's tail"
        return [(entry_id, decode({b"d": data})[0]) for entry_id, data in tapped]

    def replay(self, symbol: str) -> Replay:
        return replay(self.instruments[symbol], self.orders(symbol))

    def committed_events(self, symbol: str) -> list[Any]:
        """The matcher's durable output: every [entry id, events] pair of the symbol's events stream."""
        entries = cast(list[tuple[bytes, dict[bytes, bytes]]], self.r.xrange(keys.events(symbol)))
        return [pair for _, fields in entries for pair in decode_events(fields[b"d"])]

    def check_committed_events(self, symbol: str, rep: Replay) -> None:
        """The events stream holds each command's events exactly once, equal to the replay's."""
        got = self.committed_events(symbol)
        twice = sorted(i for i, n in Counter(pair[0] for pair in got).items() if n > 1)
        assert not twice, f"{symbol}: commands committed more than once: {twice[:10]}"
        want = decode_events(encode_events([[entry_id, events] for entry_id, events in rep.events]))
        assert got == want, f"{symbol}: the matcher's committed events differ from the replay"


def reports(conn: Connection, symbol: str) -> list[Message]:
    """What the matcher told a gateway connection about a symbol: execution reports and its rejects
    (the gateway's own answers carry no symbol, or are acks)."""
    return [
        m for m in conn.messages if m.get("symbol") == symbol and m.get("type") in ("execution", "reject")
    ]


async def current_book(stack: Stack, symbol: str, timeout: float = 15.0) -> Message:
    """A fresh l2_snapshot (new subscription) that includes everything the matcher has committed so
    far. The feed may trail the matcher by a moment (an execution report can arrive before the feed
    has applied the same command's l2_update), so this polls until the snapshot's seq reaches the
    book seq of the matcher's progress hash, read first."""
    progress = await asyncio.to_thread(stack.progress, symbol)
    target = int(progress.get("book_seq", 0))
    deadline = time.monotonic() + timeout
    while True:
        snap = await l2_snapshot(stack.md_url, symbol, retry_for=10)
        if snap["seq"] >= target:
            return snap
        assert time.monotonic() < deadline, f"{symbol}: the feed stays at seq {snap['seq']} < {target}"
        await asyncio.sleep(0.05)


def without_latency(msg: Message) -> Message:
    out = dict(msg)
    out.pop("latency_us", None)
    return out


async def settle(
    stack: Stack,
    symbol: str,
    *,
    md: Connection | None = None,
    trades: Connection | None = None,
    accounts: Sequence[tuple[str, Connection]] = (),
) -> Replay:
    """Once the matcher has applied everything, check what clients saw against a fresh Engine
    replaying the symbol's orders stream (the uninterrupted run). Call it once every order message
    sent has been answered (acked): "idle" means the matcher applied all that was appended.

    - the matcher's events stream holds each command's events once, equal to the replay's;
    - a new md subscription's l2_snapshot is exactly the replayed book, at the replayed book seq;
    - `md` (subscribed before the symbol's first order): its snapshot plus every l2_update, seq
      contiguous, rebuilds exactly that book, and the updates are exactly the replay's;
    - `trades` (subscribed before the first order): exactly the replayed trades, each once, in order;
    - each (account, connection): exactly the replayed execution reports and matcher rejects of that
      account for the symbol, each once, in order.
    """
    await asyncio.to_thread(stack.wait_idle)
    rep = await asyncio.to_thread(stack.replay, symbol)
    await asyncio.to_thread(stack.check_committed_events, symbol, rep)
    expected = rep.book()
    fresh = await current_book(stack, symbol)
    assert (fresh["seq"], book_of(fresh)) == (rep.book_seq, expected), f"fresh snapshot {fresh}"
    if md is not None:
        first = await md.wait_for(is_type("l2_snapshot", symbol=symbol))
        if rep.book_seq > first["seq"]:
            await md.wait_for(is_type("l2_update", symbol=symbol, seq=rep.book_seq))
        book = L2Book(first)
        later = md.messages[md.messages.index(first) + 1 :]
        book.apply_all(later)
        assert book.seq == rep.book_seq and book.levels() == expected
        # The feeds add each update's book checksum (tests/feeds/test_checksum.py checks its value);
        # the rest is the matcher's message as the replay renders it.
        updates = [
            {k: v for k, v in m.items() if k != "checksum"}
            for m in later
            if m.get("type") == "l2_update" and m.get("symbol") == symbol
        ]
        assert all(
            type(m.get("checksum")) is int for m in later if m.get("type") in ("l2_update", "l2_snapshot")
        )
        assert updates == rep.md[first["seq"] :], (
            "the l2_updates are exactly the replay's, from the snapshot on"
        )
    if trades is not None:
        want = rep.trades
        got = await trades.wait_count(is_type("trade", symbol=symbol), len(want)) if want else []
        await asyncio.sleep(0.1)  # anything extra (a duplicate) would have arrived with the rest
        got = trades.since(0, is_type("trade", symbol=symbol))
        assert [without_latency(m) for m in got] == want
        assert all(type(m["latency_us"]) is int and m["latency_us"] >= 0 for m in got), got
    for account, conn in accounts:
        want = [m for m in rep.execs.get(account, []) if m.get("symbol") == symbol]
        deadline = time.monotonic() + 15
        while len(reports(conn, symbol)) < len(want) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.1)
        assert reports(conn, symbol) == want, f"{account}: reports differ from the replay"
    return rep


@pytest.fixture()
def stack_factory(tmp_path: Path) -> Iterator[Callable[..., Stack]]:
    """Start stacks (each under its own directory); every process is killed at teardown."""
    made: list[Stack] = []

    def make(*args: Any, **kw: Any) -> Stack:
        stack = Stack(tmp_path / f"stack{len(made)}", *args, **kw)
        made.append(stack)
        return stack.start()

    yield make
    for stack in made:
        stack.close()


@pytest.fixture()
def stack(stack_factory: Callable[..., Stack]) -> Stack:
    """A stack with the default instruments (BTC-USDT, ETH-USDT), fresh for the test."""
    return stack_factory()


class SymbolPool:
    """Symbols of a stack shared by a module's tests: each test takes its own, so it sees an empty book."""

    def __init__(self, stack: Stack, symbols: list[str]) -> None:
        self.stack = stack
        self.free = list(symbols)

    def take(self) -> str:
        assert self.free, "the module's stack has no unused symbol left: add more"
        return self.free.pop(0)


@pytest.fixture(scope="module")
def shared_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SymbolPool]:
    """One stack for a whole module, with BTC-USDT, ETH-USDT and sixteen more symbols of the default
    spec (tick 0.01, lot 0.00001, maker 0.0010, taker 0.0020): a test takes a symbol nobody used."""
    symbols = ["BTC-USDT", "ETH-USDT", *(f"T{i:02d}-USDT" for i in range(1, 17))]
    stack = Stack(tmp_path_factory.mktemp("e2e"), symbols)
    try:
        stack.start()
        yield SymbolPool(stack, symbols)
    finally:
        stack.close()
