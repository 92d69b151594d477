"""`cme chaos`: the soak itself. Start the processes, run the traders and the fault schedule side by
side, heal everything, let the matcher catch up, collect the reports, check, print the counts.

Exit code 0 when no check found an anomaly, 1 otherwise (the first anomalies are listed). The data
dir (logs of every process start, Redis files, checkpoints) is kept when something failed.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import logging
import shutil
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, TypeVar, cast

from cme_client import ProtocolError, l2_snapshot

from services.chaos import checks
from services.chaos.flow import OrderFlow, Trader
from services.chaos.procs import Cluster
from services.chaos.schedule import KINDS, TARGETS, Fault, make_schedule
from shared import keys
from shared.instruments import Instrument, default_instruments

log = logging.getLogger("cme.chaos")
T = TypeVar("T")

SYMBOLS = ("BTC-USDT", "ETH-USDT")
SETTLE_TIMEOUT = 20.0  # seconds for the last answers after the flow stopped
CATCH_UP_TIMEOUT = 60.0  # seconds for the matcher to apply what is on the streams, and for the reports
CONNECT_TIMEOUT = 60.0  # seconds for every trader to connect (the soak fails rather than hangs)


@dataclass(frozen=True)
class ChaosConfig:
    seconds: float = 120.0
    seed: int = 1
    accounts: int = 6
    rate: float = 300.0  # messages per second over all accounts
    data_dir: Path | None = None  # None: a fresh temporary directory
    kinds: tuple[str, ...] = KINDS
    targets: tuple[str, ...] = TARGETS
    gap: tuple[float, float] = (2.0, 5.0)  # seconds between faults
    cover: bool = False  # the first faults go through every kind and target
    progress_every: float = 5.0

    def schedule(self) -> list[Fault]:
        """Every fault, a restart's recovery included, ends before the run does."""
        return make_schedule(
            self.seed, self.seconds, kinds=self.kinds, targets=self.targets, gap=self.gap, cover=self.cover
        )


@dataclass
class Result:
    schedule: list[Fault]
    injected: list[Fault] = field(default_factory=list)
    skipped: list[Fault] = field(default_factory=list)
    counts: dict[str, Any] = field(default_factory=dict)
    anomalies: checks.Anomalies = field(default_factory=checks.Anomalies)
    data_dir: Path | None = None

    @property
    def ok(self) -> bool:
        return not self.anomalies

    def summary(self) -> str:
        by_kind = Counter(f.kind for f in self.injected)
        by_target = Counter(f.target for f in self.injected)
        lines = [
            "cme chaos: " + ("no anomalies" if self.ok else f"{len(self.anomalies)} ANOMALIES"),
            "  faults injected: "
            + ", ".join(f"{k} {by_kind[k]}" for k in KINDS)
            + f" (of {len(self.schedule)} scheduled, {len(self.skipped)} skipped: target not running)",
            "  faults by target: " + ", ".join(f"{t} {n}" for t, n in sorted(by_target.items())),
        ]
        lines += [f"  {name}: {value}" for name, value in self.counts.items()]
        for kind, n in sorted(self.anomalies.counts().items()):
            lines.append(f"  anomaly {kind}: {n}")
        for kind, detail in self.anomalies.items[: checks.SHOWN]:
            lines.append(f"    - {kind}: {detail}")
        if self.data_dir is not None:
            lines.append(f"  data dir (logs): {self.data_dir}")
        return "\n".join(lines)


class LoopThread:
    """An asyncio loop in a helper thread, for the traders. The main thread keeps the processes:
    children get PR_SET_PDEATHSIG (services.supervisor), which fires when the *thread* that spawned
    them ends, so every spawn must come from the thread that lives as long as the soak."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True, name="chaos-traders")
        self.thread.start()

    def call(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


def soak(cfg: ChaosConfig, out: IO[str] = sys.stderr) -> Result:
    """The whole soak; returns its counts and anomalies (an empty list: a clean run)."""
    schedule = cfg.schedule()
    result = Result(schedule)
    root = cfg.data_dir or Path(tempfile.mkdtemp(prefix="cme-chaos-"))
    root.mkdir(parents=True, exist_ok=True)
    result.data_dir = root
    instruments = default_instruments()
    insts = [instruments[s] for s in SYMBOLS]
    cluster = Cluster(root, list(SYMBOLS))
    tap = checks.OrdersTap(cluster.redis.url, list(SYMBOLS))
    aio = LoopThread()
    traders: list[Trader] = []
    codes: dict[str, int | None] = {}
    try:
        cluster.start()
        tap.start()
        for i in range(cfg.accounts):
            account = f"chaos{i + 1}"
            flow = OrderFlow(cfg.seed, account, insts)
            traders.append(Trader(account, flow, cluster.gateway_urls, i % 2))
        aio.call(_connect_all(traders), timeout=CONNECT_TIMEOUT)
        print(
            f"cme chaos: {len(schedule)} faults over {cfg.seconds:.0f} s, {cfg.accounts} accounts at "
            f"{cfg.rate:.0f} msg/s, seed {cfg.seed}, data in {root}",
            file=out,
            flush=True,
        )
        _run_flow(cfg, aio, cluster, schedule, traders, result, out)
        cluster.heal()
        aio.call(_settle_all(traders), timeout=SETTLE_TIMEOUT + CONNECT_TIMEOUT)
        _wait_caught_up(cluster, tap)
        aio.call(_final_catch_up(traders, result.anomalies), timeout=CATCH_UP_TIMEOUT)
        _check(aio, cluster, tap, traders, insts, result)
    finally:
        aio.call(_close_all(traders), timeout=30)
        aio.close()
        tap.close()
        codes = cluster.stop()
        cluster.close()
    result.counts["exit codes at the final stop"] = codes
    result.counts["exits on their own"] = {m.name: dict(m.exits) for m in cluster.managed if m.exits}
    matcher_logs = (root / "logs").glob("matcher-*.log")
    result.counts["matcher commits refused by fencing (logged FENCED)"] = sum(
        f.read_text(errors="replace").count("FENCED:") for f in matcher_logs
    )
    if result.ok and cfg.data_dir is None:
        shutil.rmtree(root, ignore_errors=True)
        result.data_dir = None
    return result


async def _connect_all(traders: list[Trader]) -> None:
    for t in traders:
        await t.connect()


async def _settle_all(traders: list[Trader]) -> None:
    await asyncio.gather(*(t.settle(SETTLE_TIMEOUT) for t in traders))


async def _final_catch_up(traders: list[Trader], found: checks.Anomalies) -> None:
    for t in traders:
        try:
            await t.final_catch_up()
        except (RuntimeError, ProtocolError) as exc:
            found.add("final catch-up failed", f"{t.account}: {exc}")


async def _close_all(traders: list[Trader]) -> None:
    for t in traders:
        await t.close()


async def _trade(traders: list[Trader], rate: float, stop: asyncio.Event) -> list[BaseException | None]:
    outcomes = await asyncio.gather(*(t.run(rate, stop) for t in traders), return_exceptions=True)
    return [o if isinstance(o, BaseException) else None for o in outcomes]


def _run_flow(
    cfg: ChaosConfig,
    aio: LoopThread,
    cluster: Cluster,
    schedule: list[Fault],
    traders: list[Trader],
    result: Result,
    out: IO[str],
) -> None:
    """The traders trade while the main thread fires the faults and supervises the processes."""
    stop = asyncio.Event()
    flow = aio.submit(_trade(traders, cfg.rate / len(traders), stop))
    pending = list(schedule)
    t0 = time.monotonic()
    next_progress = t0 + cfg.progress_every
    try:
        while (now := time.monotonic()) < t0 + cfg.seconds and not flow.done():
            cluster.tick()
            if pending and now - t0 >= pending[0].at:
                fault = pending.pop(0)
                ok = cluster.inject(fault)
                (result.injected if ok else result.skipped).append(fault)
                log.info("%s%s", fault.describe(), "" if ok else "  (skipped: not running)")
            if now >= next_progress:
                next_progress += cfg.progress_every
                print(_progress(now - t0, traders, result), file=out, flush=True)
            time.sleep(0.02)
    finally:
        aio.loop.call_soon_threadsafe(stop.set)
        outcomes = flow.result(60)
    for trader, outcome in zip(traders, outcomes, strict=True):
        if outcome is not None:
            result.anomalies.add("trader failed", f"{trader.account}: {outcome!r}")


def _progress(elapsed: float, traders: list[Trader], result: Result) -> str:
    sent = sum(sum(t.stats.sent.values()) for t in traders)
    acks = sum(sum(t.stats.acks.values()) for t in traders)
    reports = sum(t.reports_seen() for t in traders)
    connects = sum(t.stats.connects for t in traders)
    last = result.injected[-1].describe().strip() if result.injected else "none yet"
    return (
        f"  t={elapsed:5.0f}s sent {sent} acked {acks} reports {reports} connects {connects} "
        f"faults {len(result.injected)}/{len(result.schedule)}; last: {last}"
    )


def _wait_caught_up(cluster: Cluster, tap: checks.OrdersTap) -> None:
    """Until, per symbol, the matcher's progress and the tap are both at the stream's last entry."""
    deadline = time.monotonic() + CATCH_UP_TIMEOUT
    while True:
        behind = []
        for symbol in cluster.symbols:
            newest = cast(list[tuple[bytes, Any]], cluster.r.xrevrange(keys.orders(symbol), count=1))
            last = newest[0][0].decode() if newest else None
            applied = cast(bytes | None, cluster.r.hget(keys.progress(symbol), "last_id"))
            if last is not None and (
                applied is None or applied.decode() != last or tap.last_id(symbol) != last
            ):
                behind.append(symbol)
        if not behind:
            return
        if time.monotonic() > deadline:
            tails = "\n".join(s.tail() for s in cluster.matchers)
            raise RuntimeError(
                f"the matcher did not catch up on {behind} in {CATCH_UP_TIMEOUT:.0f} s\n{tails}"
            )
        time.sleep(0.1)


def _check(
    aio: LoopThread,
    cluster: Cluster,
    tap: checks.OrdersTap,
    traders: list[Trader],
    insts: list[Instrument],
    result: Result,
) -> None:
    """Every check of services.chaos.checks, and the counts for the summary."""
    found = result.anomalies
    r = cluster.r
    tapped = {inst.symbol: tap.snapshot(inst.symbol) for inst in insts}
    # The soak runs the venue as cme up does, balances on (services/chaos/procs.py passes no --risk).
    replays = checks.replay_venue(insts, tapped)
    for symbol, rep in replays.items():
        checks.check_stream(r, symbol, tapped[symbol], found)
        checks.check_events(r, symbol, rep, found)
        progress = cast(dict[bytes, bytes], r.hgetall(keys.progress(symbol)))
        checks.check_progress(progress, symbol, rep, found)
        for url in cluster.md_urls:
            snap = aio.call(_fresh_snapshot(url, symbol, rep.book_seq))
            checks.check_book(snap, url, rep, found)
    acked = checks.check_acked(traders, {s: {i for i, _ in e} for s, e in tapped.items()}, found)
    counts = checks.ReportCounts()
    for t in traders:
        checks.check_reports(t, replays, found, counts)
    trades_seen = checks.check_trade_reports(traders, replays, found)
    stats = [t.stats for t in traders]
    result.counts.update(
        {
            "messages sent": dict(sum((s.sent for s in stats), Counter())),
            "acks": dict(sum((s.acks for s in stats), Counter())),
            "acked new orders checked on the streams": acked,
            "gateway rejects": dict(sum((s.gateway_rejects for s in stats), Counter())),
            "unknown outcome (connection lost before the answer)": sum(s.unknown for s in stats),
            "orders stream entries": {s: len(e) for s, e in tapped.items()},
            "trades": {s: rep.trade_seq for s, rep in replays.items()},
            "trades seen in reports": trades_seen,
            "reports": {
                "expected": counts.expected,
                "live": counts.live,
                "resumed": counts.resumed,
                "live and resumed (deduplicated)": counts.overlap,
            },
            "connections": sum(s.connects for s in stats),
            "executions requests": sum(s.resumes for s in stats),
        }
    )


async def _fresh_snapshot(md_url: str, symbol: str, seq: int, timeout: float = 20.0) -> dict[str, Any]:
    """A new subscription's l2_snapshot that has reached `seq` (a feed may trail the matcher)."""
    deadline = time.monotonic() + timeout
    while True:
        snap = await l2_snapshot(md_url, symbol, retry_for=10)
        if snap.get("seq", 0) >= seq or time.monotonic() > deadline:
            return snap
        await asyncio.sleep(0.1)


def config_from_args(args: argparse.Namespace) -> ChaosConfig:
    return ChaosConfig(
        seconds=args.minutes * 60.0,
        seed=args.seed,
        accounts=max(1, args.accounts),
        rate=max(1.0, args.rate),
        data_dir=Path(args.data_dir).resolve() if args.data_dir else None,
    )


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S", stream=sys.stderr
    )
    for name in ("websockets", "asyncio"):
        logging.getLogger(name).setLevel(logging.WARNING)
    cfg = config_from_args(args)
    if cfg.data_dir is not None and cfg.data_dir.exists() and any(cfg.data_dir.iterdir()):
        print(f"cme chaos: {cfg.data_dir} is not empty; give a new or empty directory", file=sys.stderr)
        return 2
    result = soak(cfg)
    print(result.summary(), flush=True)
    return 0 if result.ok else 1
