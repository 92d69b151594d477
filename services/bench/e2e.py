"""`cme bench e2e`: the whole stack driven through real WebSocket clients, measured at the client.

The core benchmark's seeded flow (services.bench.flow) with one account per client, rendered to wire
JSON up front: a cancel goes through the connection of the account that owns the order, by its
client order id. Clients are spread over a few load processes (one asyncio loop each); they start
together, send at --rate in total (open loop, 0: as fast as a window of unanswered commands per
client allows) for --duration seconds or until the flow is used up, then wait for the last reports.

Measured per new order at the client: ack latency (send -> ack), report latency (send -> its first
execution report, "new" or "rejected") and, for orders that trade on arrival, trade latency (send ->
its first fill as taker). A new order with no report at all by the end of the drain is a lost report.
Without --gateway the bench starts its own stack (services.supervisor) on free ports in a temporary
data dir, with the gateway's per-connection rate limit off (it protects a venue, it is not the load).
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import platform
import queue
import resource
import shutil
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from cme_client import WebSocket

from services.bench.flow import ORDER_TYPES, SYMBOL, FlowConfig, FlowGenerator
from services.bench.matcher import proc_cpu_s
from shared import aio
from shared.commands import Cancel, NewOrder
from shared.instruments import Instrument

DRAIN_TIMEOUT = 5.0  # seconds to wait for the last reports after the load ends
MAX_OPEN_LOOP_BACKLOG = 20_000  # unanswered commands per client before an open-loop sender holds back
SEND_BATCH = 256  # most messages written per socket write
# Shortest sleep of an open-loop sender: it then sends everything that fell due meanwhile. Waking for
# every message costs the load generator more CPU than the message (67 us per command at 10,000/s on
# one connection against 15 us to spare); clients are staggered over the tick, so the stack sees
# small bursts spread evenly, and every latency is still measured from the message's real send time.
PACE_SECONDS = 0.002
DEFAULT_RATE_PER_S = 40_000
EXPIRY_LEAD_MS = 5_000  # GTD flow time 0 lies this far after the plan is made (the load starts before)
CLEANUP_TIMEOUT = 10.0
# Our own rendering puts "type" first: a balance line is known by its first bytes, without parsing.
_BALANCE_LINE = b'{"type":"balance"'
_ENDED = frozenset(
    ("filled", "cancelled", "rejected")
)  # flow size for an unlimited rate when --commands is not given


# --- the flow, per client ---------------------------------------------------------------------------


class _AccountFlow(FlowGenerator):
    """The core flow with the bench's accounts, so the flow's own engine models self-trade prevention
    exactly as the matcher applies it to these accounts."""

    def __init__(self, cfg: FlowConfig, accounts: list[str]) -> None:
        super().__init__(cfg)
        self.accounts = accounts

    def _new(self, side: str, otype: str, tif: str, price: int | None, qty: int) -> NewOrder:
        return NewOrder(
            SYMBOL, self.rng.choice(self.accounts), side, otype, tif, price, qty, f"c{self.seq + 1}"
        )


@dataclass
class Plan:
    accounts: list[str]
    messages: list[list[bytes]]  # per client, in sending order
    new_orders: int = 0
    cancels: int = 0


def build_plan(
    commands: int,
    seed: int,
    clients: int,
    tag: str,
    quiet: bool,
    order_types: str = "plain",
    duration: float = 10.0,
) -> Plan:
    """Every client's messages. With order_types "all" the flow's GTD expiries, in flow time (seqs),
    become wall clock ms: the flow spread evenly over `duration` seconds from EXPIRY_LEAD_MS ahead of
    now (the load starts within that), so orders expire during the run about when the flow meant."""
    inst = Instrument(SYMBOL)
    accounts = [f"bench-{tag}-{i:03d}" for i in range(clients)]
    index = {a: i for i, a in enumerate(accounts)}
    plan = Plan(accounts, [[] for _ in accounts])
    flow = _AccountFlow(FlowConfig(commands, seed, order_types=order_types), accounts)
    expiry_base, ms_per_seq = time.time() * 1000 + EXPIRY_LEAD_MS, duration * 1000 / max(1, commands)
    every = max(1, commands // 20)
    tty = not quiet and sys.stderr.isatty()
    dumps = orjson.dumps
    for n, (cmd, _seq) in enumerate(flow.flow(), 1):
        if type(cmd) is NewOrder:
            msg: dict[str, Any] = {
                "op": "new",
                "symbol": SYMBOL,
                "side": cmd.side,
                "type": cmd.type,
                "tif": cmd.tif,
            }
            if cmd.price is not None:
                msg["price"] = inst.price_str(cmd.price)
            if cmd.quantity is not None:  # None: a quote-quantity market order
                msg["quantity"] = inst.qty_str(cmd.quantity)
            if cmd.stop_price is not None:
                msg["stop_price"] = inst.price_str(cmd.stop_price)
            if cmd.expire_time is not None:
                msg["expire_time"] = int(expiry_base + cmd.expire_time * ms_per_seq)
            if cmd.display_quantity is not None:
                msg["display_quantity"] = inst.qty_str(cmd.display_quantity)
            if cmd.quote_quantity is not None:  # ticks x lots
                msg["quote_quantity"] = inst.notional_str(cmd.quote_quantity, 1)
            msg["client_order_id"] = cmd.client_order_id  # last: Client._send_batch reads it from the bytes
            plan.new_orders += 1
        else:
            assert type(cmd) is Cancel and cmd.order_id is not None
            # The flow's order ids are its seqs and its client order ids "c<seq>": cancel by the latter,
            # since the real order id is the stream entry id the gateway assigns.
            msg = {"op": "cancel", "symbol": SYMBOL, "client_order_id": f"c{cmd.order_id}"}
            plan.cancels += 1
        plan.messages[index[cmd.account]].append(dumps(msg))
        if tty and n % every == 0:
            print(f"\r  generating flow: {n * 100 // commands:3d}%", end="", file=sys.stderr, flush=True)
    if not quiet:
        line = f"  flow: {plan.new_orders:,} new orders, {plan.cancels:,} cancels (seed {seed})"
        print(f"\r{line:<40}" if tty else line, file=sys.stderr)
    return plan


# --- one client connection --------------------------------------------------------------------------
# The client library's transport (cme_client.WebSocket) with the bench's own callback: frames in and
# out at a few microseconds each. cme_client.Client's future per request and report queue would be
# measured too, and the load generator shares the machine with the stack it measures.


@dataclass
class ClientResult:
    sent_new: int = 0
    sent_cancel: int = 0
    acks: int = 0
    reports: int = 0
    fills: int = 0
    balance_lines: int = 0  # with balances on: counted, not parsed
    lost: int = 0
    missing_acks: int = 0
    errors: list[str] = field(default_factory=list)
    rejects: Counter[str] = field(default_factory=Counter)
    ack_ns: list[int] = field(default_factory=list)
    report_ns: list[int] = field(default_factory=list)
    trade_ns: list[int] = field(default_factory=list)
    left_resting: int = 0  # orders still resting when the load ended (cancelled by the cleanup)
    cleanup_left: int = 0  # of those, how many the cleanup could not confirm cancelled
    first_send: float = 0.0  # monotonic
    last_send: float = 0.0
    last_done: float = 0.0


class Client:
    """Sends one account's messages and matches every answer to the command that caused it."""

    def __init__(self, account: str, messages: list[bytes], progress: list[int]) -> None:
        self.account = account
        self.messages = messages
        self.r = ClientResult()
        self.progress = progress  # [sent, done] shared with the worker's progress reporter
        self.await_ack: dict[str, int] = {}  # cid -> send ns of a new order not yet acked
        self.await_report: dict[str, int] = {}  # cid -> send ns of a new order with no report yet
        self.taking: dict[str, int] = {}  # cid -> send ns of an order whose next report may be a taker fill
        self.await_cancel: set[str] = set()  # cids with a cancel not yet acked
        self.resting: set[str] = set()  # cids of orders that may still rest in the book
        self.changed = asyncio.Event()  # set when the sender may send again
        self.refill_at = 0
        self.ws: WebSocket | None = None

    @property
    def in_flight(self) -> int:
        return len(self.await_report) + len(self.await_cancel)

    async def connect(self, url: str) -> None:
        first: asyncio.Future[bytes | bytearray] = asyncio.get_running_loop().create_future()

        def on_first(data: bytes | bytearray) -> None:
            if not first.done():
                first.set_result(data)

        ws = await WebSocket.connect(url, on_first)
        ws.send_texts([orjson.dumps({"op": "auth", "account": self.account})])
        reply = orjson.loads(await asyncio.wait_for(first, 10))
        if reply.get("type") != "authenticated":
            raise RuntimeError(f"auth as {self.account} refused: {reply}")
        ws.on_text = self.on_text
        ws.on_close = self.changed.set  # wake a sender waiting for answers that will never come
        self.ws = ws

    def on_text(self, data: bytes | bytearray) -> None:
        if data.startswith(_BALANCE_LINE):  # with balances on, 2-3 per command, and nothing to match
            self.r.balance_lines += 1
            return
        now = time.perf_counter_ns()
        m = orjson.loads(data)
        kind = m.get("type")
        cid = m.get("client_order_id")
        r = self.r
        if kind == "execution":
            r.reports += 1
            sent = self.await_report.pop(cid, None)
            if sent is not None:  # the order's first report ("new", or "rejected" by the matcher)
                r.report_ns.append(now - sent)
                self.taking[cid] = sent
                self._done()
            else:
                sent = self.taking.pop(cid, None)
                # Reports of one command arrive in one batch: new, then its taker fills, then any cancel.
                if sent is not None and m.get("liquidity") == "taker":
                    r.trade_ns.append(now - sent)
            if m.get("last_quantity"):
                r.fills += 1
            status = m.get("status")
            if status == "new":
                self.resting.add(cid)
            elif status in _ENDED:
                self.resting.discard(cid)
                if status == "rejected":
                    r.rejects[str(m.get("code"))] += 1
        elif kind == "ack":
            if m.get("op") == "cancel":
                if cid in self.await_cancel:
                    self.await_cancel.discard(cid)
                    self._done()
            else:
                sent = self.await_ack.pop(cid, None)
                if sent is not None:
                    r.acks += 1
                    r.ack_ns.append(now - sent)
        elif kind == "reject":
            r.rejects[str(m.get("code"))] += 1
            if m.get("op") == "cancel":
                # Refused by the gateway (no ack); the matcher's UNKNOWN_ORDER comes after the ack.
                if cid in self.await_cancel:
                    self.await_cancel.discard(cid)
                    self._done()
            elif self.await_report.pop(cid, None) is not None:  # refused at the gateway: nothing was queued
                self.await_ack.pop(cid, None)
                self._done()

    def _done(self) -> None:
        self.progress[1] += 1
        self.r.last_done = time.monotonic()
        if self.in_flight <= self.refill_at:
            self.changed.set()

    def _send_batch(self, msgs: list[bytes], start: int, stop: int) -> None:
        assert self.ws is not None
        now = time.perf_counter_ns()
        r = self.r
        batch = msgs[start:stop]
        for data in batch:
            # Client order ids sit at a fixed place in our own rendering: read them without parsing.
            cid = data[data.rindex(b'"client_order_id":"') + 19 : -2].decode()
            if data[7] == 110:  # b'{"op":"new"...': a new order
                self.await_ack[cid] = now
                self.await_report[cid] = now
                r.sent_new += 1
            else:
                self.await_cancel.add(cid)
                r.sent_cancel += 1
        self.ws.send_texts(batch)
        self.progress[0] += stop - start
        r.last_send = time.monotonic()

    async def run(self, start_at: float, duration: float, rate: float, window: int) -> None:
        """Send at `rate` per second (open loop) or, with rate 0, keep up to `window` commands unanswered."""
        assert self.ws is not None
        msgs, n, i = self.messages, len(self.messages), 0
        end = start_at + duration
        limit = window if rate <= 0 else MAX_OPEN_LOOP_BACKLOG
        # A full window is refilled once a quarter of it was answered: fewer wake-ups, bigger writes.
        self.refill_at = limit - max(1, limit // 4)
        loop = asyncio.get_running_loop()
        timer = loop.call_later(max(0.0, end - time.monotonic()), self.changed.set)  # the end wakes a waiter
        await asyncio.sleep(max(0.0, start_at - time.monotonic()))
        self.r.first_send = time.monotonic()
        try:
            while i < n:
                now = time.monotonic()
                if now >= end:
                    break
                if not self.ws.is_open:
                    self.r.errors.append(f"{self.account}: the gateway closed the connection")
                    break
                due = n if rate <= 0 else min(n, int((now - start_at) * rate) + 1)
                stop = min(due, i + SEND_BATCH, i + max(0, limit - self.in_flight))
                if stop > i:
                    self._send_batch(msgs, i, stop)
                    i = stop
                    await self.ws.drain()
                if self.in_flight >= limit:
                    self.changed.clear()
                    await self.changed.wait()
                elif rate <= 0:
                    await asyncio.sleep(0)  # let the answers in
                elif i < n:
                    await asyncio.sleep(max(PACE_SECONDS, start_at + i / rate - time.monotonic()))
        except Exception as exc:  # a dropped connection ends this client, not the benchmark
            self.r.errors.append(f"{self.account}: {type(exc).__name__}: {exc}")
        finally:
            timer.cancel()

    async def drain(self, deadline: float) -> None:
        """Wait for the answers still due; what has none by the deadline is lost."""
        while self.in_flight and time.monotonic() < deadline and self.ws is not None and self.ws.is_open:
            await asyncio.sleep(0.01)
        self.r.lost = len(self.await_report)
        self.r.missing_acks = len(self.await_ack)

    async def cleanup(self, timeout: float) -> None:
        """Cancel what this run left resting, so a shared stack's book is as the bench found it.

        Answers from here on go to a scratch result: the cleanup is not part of the measurement."""
        measured, self.r = self.r, ClientResult()
        measured.left_resting = len(self.resting)
        if not self.resting or self.ws is None or not self.ws.is_open:
            self.r = measured
            return
        symbol = SYMBOL.encode()
        self.ws.send_texts(
            [
                b'{"op":"cancel","symbol":"%s","client_order_id":"%s"}' % (symbol, cid.encode())
                for cid in self.resting
            ]
        )
        deadline = time.monotonic() + timeout
        while self.resting and time.monotonic() < deadline and self.ws.is_open:
            await asyncio.sleep(0.02)
        measured.cleanup_left = len(self.resting)
        self.r = measured


# --- a load process ---------------------------------------------------------------------------------


@dataclass
class WorkerSpec:
    wid: int
    url: str
    clients: list[tuple[str, list[bytes]]]
    rate_per_client: float
    duration: float
    window: int
    cleanup: bool  # cancel what the run left resting (a shared stack); a private stack is thrown away


def _worker(spec: WorkerSpec, counters: Any, ready: Any, go: Any, start_at: Any, results: Any) -> None:
    import gc

    gc.disable()  # latency samples must not include collector pauses of the load generator itself
    results.put(aio.run(_worker_main(spec, counters, ready, go, start_at)))


async def _worker_main(spec: WorkerSpec, counters: Any, ready: Any, go: Any, start_at: Any) -> dict[str, Any]:
    progress = [0, 0]
    clients = [Client(account, msgs, progress) for account, msgs in spec.clients]
    try:
        await asyncio.gather(*(c.connect(spec.url) for c in clients))
    except Exception as exc:
        ready.put((spec.wid, f"{type(exc).__name__}: {exc}"))
        return {"wid": spec.wid, "error": str(exc)}
    ready.put((spec.wid, None))
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, go.wait)
    begin = float(start_at.value)
    cpu0 = proc_cpu_s(os.getpid())  # the measured window: from the go to the end of the drain

    async def report() -> None:
        while True:
            counters[2 * spec.wid], counters[2 * spec.wid + 1] = progress
            await asyncio.sleep(0.1)

    reporter = asyncio.create_task(report())
    stagger = PACE_SECONDS / len(clients)
    await asyncio.gather(
        *(
            c.run(begin + k * stagger, spec.duration, spec.rate_per_client, spec.window)
            for k, c in enumerate(clients)
        )
    )
    deadline = time.monotonic() + DRAIN_TIMEOUT
    await asyncio.gather(*(c.drain(deadline) for c in clients))
    window_cpu_s = proc_cpu_s(os.getpid()) - cpu0
    if spec.cleanup:
        await asyncio.gather(*(c.cleanup(CLEANUP_TIMEOUT) for c in clients))
    reporter.cancel()
    counters[2 * spec.wid], counters[2 * spec.wid + 1] = progress
    for c in clients:
        if c.ws is not None:
            await c.ws.close()
    cpu = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "wid": spec.wid,
        "begin": begin,
        "clients": [c.r for c in clients],
        "cpu_s": cpu.ru_utime + cpu.ru_stime,
        "window_cpu_s": window_cpu_s,
    }


# --- the driver -------------------------------------------------------------------------------------


def _pct(sorted_ns: list[int], p: float) -> float | None:
    if not sorted_ns:
        return None
    return sorted_ns[min(len(sorted_ns) - 1, int(len(sorted_ns) * p))] / 1e6


def _latency(samples: list[int]) -> dict[str, float | int | None]:
    s = sorted(samples)
    return {
        "count": len(s),
        "p50_ms": _pct(s, 0.50),
        "p99_ms": _pct(s, 0.99),
        "p999_ms": _pct(s, 0.999),
        "max_ms": s[-1] / 1e6 if s else None,
    }


def _default_window(clients: int) -> int:
    # Unanswered commands per client in as-fast-as-possible mode: enough in flight in total for the
    # gateway's and matcher's batching to work (about 128), not so many that it only measures queueing.
    return max(4, 128 // max(1, clients))


def _default_procs(clients: int) -> int:
    # Leave most of a small machine to the stack under test: one load process per 4 cores, at least one.
    return max(1, min(clients, (os.cpu_count() or 2) // 4 or 1))


class _Progress:
    """A bar redrawn in place on a terminal; one line per second when stderr is a file or a pipe."""

    def __init__(self, quiet: bool, duration: float, total: int) -> None:
        self.quiet, self.duration, self.total = quiet, duration, total
        self.tty = sys.stderr.isatty()
        self.last = (0.0, 0)

    def show(self, elapsed: float, sent: int, done: int, final: bool = False) -> None:
        if self.quiet or (not self.tty and not final and elapsed - self.last[0] < 1.0):
            return
        t0, done0 = self.last
        rate = (done - done0) / (elapsed - t0) if elapsed > t0 else 0.0
        self.last = (elapsed, done)
        frac = min(1.0, max(elapsed / self.duration, sent / max(1, self.total)))
        bar = "#" * int(frac * 30)
        print(
            f"\r  [{bar:<30}] {frac * 100:3.0f}%  {min(elapsed, self.duration):4.1f}/{self.duration:.0f} s"
            f"  sent {sent:>9,}  answered {done:>9,}  {rate:>8,.0f}/s  in flight {sent - done:>6,}  ",
            end="" if self.tty else "\n",
            file=sys.stderr,
            flush=True,
        )

    def end(self) -> None:
        if not self.quiet and self.tty:
            print(file=sys.stderr)


def say(quiet: bool, text: str) -> None:
    if not quiet:
        print(text, file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Load:
    """What a run offers the stack, from the command line."""

    clients: int
    procs: int
    rate: float  # orders/s in total; 0: as fast as the window allows
    duration: float
    window: int
    commands: int  # the flow's size
    seed: int


def load_from_args(args: argparse.Namespace) -> Load:
    clients: int = max(1, args.clients)
    rate: float = max(0.0, args.rate)
    commands: int = args.commands or int((rate or DEFAULT_RATE_PER_S) * args.duration)
    window: int = args.window or _default_window(clients)
    procs: int = min(clients, args.procs or _default_procs(clients))
    return Load(clients, procs, rate, args.duration, window, commands, args.seed)


def run_from_args(args: argparse.Namespace) -> int:
    quiet: bool = args.quiet
    load = load_from_args(args)
    clients, procs, rate, duration, window, commands = (
        load.clients, load.procs, load.rate, load.duration, load.window, load.commands,
    )  # fmt: skip
    order_types: str = getattr(args, "order_types", "plain")
    if order_types not in ORDER_TYPES:
        raise SystemExit(f"--order-types must be one of {', '.join(ORDER_TYPES)}")
    # --order-types all runs the plain flow and then the one with every order type, on one stack, so
    # that the two sets of figures (and their ratio) come from the same machine state.
    variants = ["plain"] if order_types == "plain" else ["plain", "all"]

    stack = None
    tmp: str | None = None
    url: str | None = args.gateway
    reports: list[dict[str, Any]] = []
    try:
        if url is None:
            stack, tmp = start_stack(quiet, getattr(args, "stack_risk", "on"))
            url = stack.endpoints()["gateway"]
        mode = f"{rate:,.0f}/s" if rate else f"as fast as possible (window {window} per client)"
        say(
            quiet,
            f"cme bench e2e: {clients} clients in {procs} process(es) on {url}, rate {mode}, {duration:g} s",
        )
        for variant in variants:
            say(quiet, f"[order types {variant}]")
            tag = uuid.uuid4().hex[:6]  # fresh accounts: no client order id of an earlier run collides
            plan = build_plan(commands, args.seed, clients, tag, quiet, variant, duration)
            reports.append(drive(url, plan, procs, rate, duration, window, quiet, stack))
    except (RuntimeError, OSError) as exc:
        print(f"cme bench e2e: {exc}", file=sys.stderr)
        return 2
    finally:
        if stack is not None:
            stack.stop()
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    for variant, report in zip(variants, reports, strict=True):
        report.update(
            {
                "gateway": args.gateway or "own stack",
                "clients": clients,
                "processes": procs,
                "offered_rate": rate or None,
                "duration_s": duration,
                "window": window if not rate else None,
                "seed": args.seed,
                "flow_commands": commands,
                "order_types": variant,
                "python": platform.python_version(),
                "cpus": os.cpu_count(),
            }
        )
        report["targets"] = targets(report)
        _print_table(report)
    report = reports[0]
    if len(reports) > 1:
        report["all_types"] = reports[1]
        report["all_vs_plain"] = compare(reports[0], reports[1])
        _print_comparison(report["all_vs_plain"])
    if args.json:
        Path(args.json).write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2))
    ok = all(not r["lost_reports"] and not r["missing_acks"] and not r["errors"] for r in reports)
    return 0 if ok else 1


def compare(plain: dict[str, Any], more: dict[str, Any]) -> dict[str, Any]:
    """The all-types run's figures over the plain run's: latency percentiles and CPU per command."""

    def ratio(a: float | None, b: float | None) -> float | None:
        return None if a is None or b is None or b <= 0 else round(a / b, 3)

    out: dict[str, Any] = {"sustained_per_s": ratio(more["sustained_per_s"], plain["sustained_per_s"])}
    for key in ("ack_latency", "report_latency", "trade_latency"):
        out[key] = {p: ratio(more[key][p], plain[key][p]) for p in ("p50_ms", "p99_ms", "p999_ms")}
    cpu_plain, cpu_more = plain.get("cpu_us_per_command", {}), more.get("cpu_us_per_command", {})
    out["cpu_us_per_command"] = {
        name: ratio(cpu_more[name], us) for name, us in cpu_plain.items() if name in cpu_more
    }
    return out


def _print_comparison(cmp: dict[str, Any]) -> None:
    def f(v: float | None) -> str:
        return "-" if v is None else f"{v:.2f}"

    print("all order types / plain:")
    print(f"  sustained/s {f(cmp['sustained_per_s'])}")
    for key, label in (("ack_latency", "order -> ack"), ("report_latency", "order -> execution report"),
                       ("trade_latency", "order -> taker trade report")):  # fmt: skip
        r = cmp[key]
        print(f"  {label:<28} p50 {f(r['p50_ms'])}  p99 {f(r['p99_ms'])}  p99.9 {f(r['p999_ms'])}")
    cpu = cmp["cpu_us_per_command"]
    if cpu:
        print("  CPU per command: " + ", ".join(f"{name} {f(v)}" for name, v in cpu.items()))


def start_stack(quiet: bool, risk: str) -> tuple[Any, str]:
    import logging

    from services.supervisor import Stack, StackConfig
    from shared import logs

    logs.setup("bench", level="WARNING")  # restarts are warnings and still show; routine lines do not
    logging.getLogger("cme.up").setLevel(logging.WARNING)
    tmp = tempfile.mkdtemp(prefix="cme-bench-")
    cfg = StackConfig(
        gateway_port=0, md_port=0, trades_port=0, metrics_port=0, data_dir=Path(tmp) / "var",
        log_dir=Path(tmp) / "logs", log_level="WARNING", extra={"gateway": ["--rate-limit", "0"]}, risk=risk,
    )  # fmt: skip
    stack = Stack(cfg)
    say(quiet, f"starting a stack in {tmp} (logs in {cfg.log_dir})")
    stack.start()
    if not stack.wait_ready(30):
        stack.stop()
        raise RuntimeError(f"the stack did not come up; see {cfg.log_dir}")
    return stack, tmp


def drive(
    url: str, plan: Plan, procs: int, rate: float, duration: float, window: int, quiet: bool, stack: Any
) -> dict[str, Any]:
    ctx = mp.get_context("spawn")  # a clean interpreter per load process: no inherited sockets or threads
    counters = ctx.Array("q", 2 * procs, lock=False)
    ready, results, go = ctx.Queue(), ctx.Queue(), ctx.Event()
    start_at = ctx.Value("d", 0.0, lock=False)
    per_client_rate = rate / len(plan.accounts) if rate else 0.0
    specs = [WorkerSpec(w, url, [], per_client_rate, duration, window, stack is None) for w in range(procs)]
    for i, (account, msgs) in enumerate(zip(plan.accounts, plan.messages, strict=True)):
        specs[i % procs].clients.append((account, msgs))
    workers = [ctx.Process(target=_worker, args=(s, counters, ready, go, start_at, results)) for s in specs]
    for w in workers:
        w.start()
    try:
        _wait_ready(ready, workers)
        start_at.value = time.monotonic() + 0.2
        services = stack_pids(stack)
        cpu0 = _cpu(services)
        go.set()
        progress = _Progress(quiet, duration, sum(len(m) for m in plan.messages))
        outputs: list[dict[str, Any]] = []
        while len(outputs) < len(workers):
            elapsed = time.monotonic() - start_at.value
            progress.show(max(0.0, elapsed), sum(counters[0::2]), sum(counters[1::2]))
            if stack is not None:
                stack.poll()  # a private stack still restarts a crashed service
            while not results.empty():
                outputs.append(results.get())
            if len(outputs) < len(workers):
                if not any(w.is_alive() for w in workers) and results.empty():
                    raise RuntimeError("a load process died without a result")
                time.sleep(0.2)
        progress.show(time.monotonic() - start_at.value, sum(counters[0::2]), sum(counters[1::2]), final=True)
        progress.end()
        cpu1 = _cpu(services)
    finally:
        for w in workers:
            w.join(timeout=10)
            if w.is_alive():
                w.kill()
    report = _aggregate(outputs, plan, start_at.value)
    report["cpu_us_per_command"] = _cpu_per_command(cpu0, cpu1, outputs, report["commands_sent"])
    return report


def stack_pids(stack: Any) -> dict[str, int]:
    """Name -> pid of every process of a private stack (none for an external gateway)."""
    if stack is None:
        return {}
    pids: dict[str, int] = {}
    if stack.redis is not None and stack.redis.proc is not None:
        pids["redis"] = stack.redis.proc.pid
    for child in stack.children:
        if child.pid is not None:
            pids[child.name] = child.pid
    return pids


def _cpu(pids: dict[str, int]) -> dict[str, float]:
    out: dict[str, float] = {}
    for name, pid in pids.items():
        try:
            out[name] = proc_cpu_s(pid)
        except (OSError, ValueError, IndexError):  # it died (the stack restarts it): no figure
            continue
    return out


def _cpu_per_command(
    before: dict[str, float], after: dict[str, float], outputs: list[dict[str, Any]], commands: int
) -> dict[str, float]:
    """CPU microseconds per command sent, per process, over the measured window (/proc utime+stime);
    a service restarted in the window has no figure (its counters started again)."""
    per = 1e6 / max(1, commands)
    out = {
        name: round((after[name] - t0) * per, 2)
        for name, t0 in before.items()
        if name in after and after[name] >= t0
    }
    out["load generator"] = round(sum(float(o.get("window_cpu_s", 0.0)) for o in outputs) * per, 2)
    return out


def _wait_ready(ready: Any, workers: list[Any], timeout: float = 60.0) -> None:
    """Until every load process has connected and authenticated its clients."""
    deadline = time.monotonic() + timeout
    waiting = len(workers)
    while waiting:
        try:
            wid, error = ready.get(timeout=0.5)
        except queue.Empty:
            if not all(w.is_alive() for w in workers) or time.monotonic() > deadline:
                raise RuntimeError("a load process died or hung before connecting") from None
            continue
        if error:
            raise RuntimeError(f"load process {wid} could not connect: {error}")
        waiting -= 1


def _aggregate(outputs: list[dict[str, Any]], plan: Plan, begin: float) -> dict[str, Any]:
    results: list[ClientResult] = [r for out in outputs for r in out.get("clients", [])]
    errors = [str(out["error"]) for out in outputs if "error" in out] + [e for r in results for e in r.errors]
    sent_new = sum(r.sent_new for r in results)
    sent_cancel = sum(r.sent_cancel for r in results)
    answered = sent_new + sent_cancel - sum(r.lost for r in results)
    last_send = max((r.last_send for r in results), default=begin)
    last_done = max((r.last_done for r in results), default=begin)
    rejects: Counter[str] = Counter()
    for r in results:
        rejects.update(r.rejects)
    load_s = max(1e-9, last_send - begin)
    span_s = max(1e-9, last_done - begin)
    return {
        "commands_sent": sent_new + sent_cancel,
        "new_orders_sent": sent_new,
        "cancels_sent": sent_cancel,
        "load_seconds": round(load_s, 3),
        "sent_per_s": round((sent_new + sent_cancel) / load_s),
        "sustained_per_s": round(answered / span_s),
        "acks": sum(r.acks for r in results),
        "reports": sum(r.reports for r in results),
        "fills": sum(r.fills for r in results),
        "balance_lines": sum(r.balance_lines for r in results),
        "lost_reports": sum(r.lost for r in results),
        "missing_acks": sum(r.missing_acks for r in results),
        "left_resting": sum(r.left_resting for r in results),
        "cleanup_not_confirmed": sum(r.cleanup_left for r in results),
        "rejects": dict(rejects.most_common()),
        "load_generator_cpu_s": round(sum(float(out.get("cpu_s", 0.0)) for out in outputs), 2),
        "errors": errors,
        "ack_latency": _latency([x for r in results for x in r.ack_ns]),
        "report_latency": _latency([x for r in results for x in r.report_ns]),
        "trade_latency": _latency([x for r in results for x in r.trade_ns]),
    }


# Issue 7's CPU budgets at 10,000 commands/s, per process kind (the stack's process names start so).
CPU_TARGETS_US = (("gateway", 15.0), ("matcher", 12.0), ("feeds", 6.0), ("load generator", 15.0))


def targets(rep: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue 7's targets that this run's settings speak to, each with the figure and whether it was met."""
    lat = rep["report_latency"]
    p99, p999 = lat["p99_ms"], lat["p999_ms"]
    lost = rep["lost_reports"] or rep["missing_acks"]
    rate = rep["offered_rate"]
    kept_up = bool(rate) and rep["sustained_per_s"] >= 0.98 * (rate or 0)
    out: list[dict[str, Any]] = []

    def ms(v: float | None) -> str:
        return "-" if v is None else f"{v:.3f}"

    def add(target: str, figure: str, met: bool) -> None:
        out.append({"target": target, "figure": figure, "met": met})

    if rate and abs(rate - 10_000) < 1:
        add(
            "10,000/s offered: order -> report p99 <= 2 ms, p99.9 <= 5 ms, nothing lost",
            f"p99 {ms(p99)} ms, p99.9 {ms(p999)} ms, sustained {rep['sustained_per_s']:,}/s, lost {lost}",
            kept_up and p99 is not None and p99 <= 2.0 and p999 is not None and p999 <= 5.0 and not lost,
        )
        cpu = rep.get("cpu_us_per_command", {})
        for kind, limit in CPU_TARGETS_US:
            for name, us in cpu.items():
                if name.startswith(kind):
                    add(
                        f"10,000/s offered: CPU of {name} <= {limit:g} us per command",
                        f"{us} us",
                        us <= limit,
                    )
    if rate and abs(rate - 20_000) < 1:
        add(
            "20,000/s offered: order -> report p99 <= 3 ms, nothing lost",
            f"p99 {ms(p99)} ms, sustained {rep['sustained_per_s']:,}/s, lost {lost}",
            kept_up and p99 is not None and p99 <= 3.0 and not lost,
        )
    if not rate:
        add(
            "as fast as possible: >= 40,000 commands/s sustained, p99 <= 10 ms, nothing lost",
            f"{rep['sustained_per_s']:,}/s, p99 {ms(p99)} ms, lost {lost}",
            rep["sustained_per_s"] >= 40_000 and p99 is not None and p99 <= 10.0 and not lost,
        )
    return out


def _print_table(rep: dict[str, Any]) -> None:
    rate = f"{rep['offered_rate']:,.0f}/s offered" if rep["offered_rate"] else "as fast as possible"
    print(
        f"cme bench e2e  ({rep['gateway']}, {rep['clients']} clients in {rep['processes']} process(es),"
        f" {rate}, order types {rep.get('order_types', 'plain')}, CPython {rep['python']},"
        f" {rep['cpus']} CPUs)"
    )
    print(
        f"commands {rep['commands_sent']:,} ({rep['new_orders_sent']:,} new, {rep['cancels_sent']:,} cancels)"
        f" in {rep['load_seconds']:.2f} s: sent {rep['sent_per_s']:,}/s,"
        f" sustained {rep['sustained_per_s']:,}/s"
    )
    print(f"{'latency (ms)':<28} {'count':>9} {'p50':>8} {'p99':>8} {'p99.9':>8} {'max':>8}")
    for key, label in (
        ("ack_latency", "order -> ack"),
        ("report_latency", "order -> execution report"),
        ("trade_latency", "order -> taker trade report"),
    ):
        lat = rep[key]

        def f(v: float | None) -> str:
            return "-" if v is None else f"{v:.3f}"

        print(
            f"{label:<28} {lat['count']:>9,} {f(lat['p50_ms']):>8} {f(lat['p99_ms']):>8}"
            f" {f(lat['p999_ms']):>8} {f(lat['max_ms']):>8}"
        )
    print(
        f"reports {rep['reports']:,}, fills {rep['fills']:,}, lost reports {rep['lost_reports']},"
        f" missing acks {rep['missing_acks']}"
    )
    if rep["left_resting"] and rep["gateway"] != "own stack":
        print(
            f"cleanup: cancelled {rep['left_resting'] - rep['cleanup_not_confirmed']:,} of the run's"
            f" {rep['left_resting']:,} resting orders"
        )
    print(f"load generator CPU: {rep['load_generator_cpu_s']:.1f} s (all load processes, connect to close)")
    cpu = rep.get("cpu_us_per_command", {})
    if cpu:
        print("CPU per command (us): " + ", ".join(f"{name} {us:.1f}" for name, us in cpu.items()))
    if rep["rejects"]:
        print("rejects: " + ", ".join(f"{code} {n:,}" for code, n in rep["rejects"].items()))
    for t in rep["targets"]:
        print(f"target {'MET' if t['met'] else 'NOT MET'}: {t['target']} ({t['figure']})")
    for e in rep["errors"][:5]:
        print(f"error: {e}")
