"""`cme bench matcher`: the matcher service alone on a real Redis, the per-symbol ceiling.

Exactly one matcher consumes a symbol's orders stream, so its cost per command bounds what one symbol
can carry however many gateways and feeds there are. The bench preloads the stream with the core
benchmark's seeded flow (services.bench.flow), each entry exactly as the gateway writes it
(shared.stream.encode under `XADD ... d`), starts a subscriber process on every channel the matcher
publishes to, then runs the real service (services.matcher.service.Matcher, in this process) and
times it from going live until the progress hash says every preloaded entry was committed.

The subscriber process also watches the progress hash (one HGET per millisecond), so the end is when
Redis ran the last commit, not when the matcher packed it. CPU comes from /proc (this process, the
redis-server, the subscriber) over that window; this process's share is split into decode / core /
render / Redis client / other by a SIGPROF sampling profile of the main thread (the matcher's
loop), with each batch's processing also timed exactly by thread CPU.

Entry ids are explicit (the flow's seq s becomes `<T0 + s // 1024>-<s % 1024>`) so that cancels can
name their orders by the seq the matcher derives from the id, as a real cancel names an order id.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import platform
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any

import hiredis
import orjson

from services.bench.flow import ACCOUNTS, SYMBOL, FlowConfig, Step, funding_units, generate
from services.matcher import service, venue
from services.matcher.service import Config, Entry, Matcher
from services.matcher.venue import VenueMatcher
from shared import keys
from shared.commands import Cancel, Command, Deposit
from shared.ids import SEQ_BITS
from shared.instruments import Instrument, asset_scales
from shared.redis_server import RedisServer
from shared.resp import RespConnection, pack
from shared.stream import FIELD, encode
from shared.wire import render

PRELOAD_CHUNK = 10_000  # XADDs per pipelined write while preloading
PER_MS = 1024  # entries per millisecond of entry id
T0_MS = 1_700_000_000_000
SAMPLE_SECONDS = 0.001  # SIGPROF interval (process CPU time)
POLL_SECONDS = 0.001  # the subscriber's progress poll
TARGET_PER_S = 150_000
CLK_TCK = os.sysconf("SC_CLK_TCK")

# The sampler's categories: the innermost frame of the matcher's stack that matches decides.
_CATEGORIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("decode", ("shared/stream.py", "shared/commands.py", "shared/ids.py")),
    (
        "core",
        (
            "matcher/engine.py",
            "matcher/book.py",
            "matcher/balances.py",
            "matcher/batch.py",
            "shared/events.py",
        ),
    ),
    ("render", ("shared/wire.py",)),
    ("read model", ("matcher/readmodel.py",)),
    ("metrics", ("shared/metrics.py", "prometheus_client/")),
    ("checkpoint", ("matcher/checkpoint.py", "matcher/snapshot.py")),
    # The service's own code: merging reads, building the commit script call, the loop. Without it
    # those samples walked on out to asyncio's frames and were charged to the Redis client.
    ("matcher loop", ("matcher/service.py", "matcher/venue.py")),
    ("redis client", ("shared/resp.py", "redis/", "asyncio/")),
)


def entry_id(seq: int) -> bytes:
    return b"%d-%d" % (T0_MS + seq // PER_MS, seq % PER_MS)


def matcher_seq(seq: int) -> int:
    """The seq the matcher derives from entry_id(seq) (shared.ids.entry_to_seq)."""
    return ((T0_MS + seq // PER_MS) << SEQ_BITS) | (seq % PER_MS)


def proc_cpu_s(pid: int) -> float:
    """utime + stime of a process, in seconds (fields 14 and 15 of /proc/<pid>/stat)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def _pct(sorted_values: list[float], p: float) -> float:
    if not sorted_values:
        return 0.0
    return sorted_values[min(len(sorted_values) - 1, int(len(sorted_values) * p))]


def _say(quiet: bool, text: str, end: str = "\n") -> None:
    if not quiet:
        print(text, end=end, file=sys.stderr, flush=True)


# --- preload ----------------------------------------------------------------------------------------


def _roundtrip(sock: socket.socket, payload: bytes, n: int) -> list[Any]:
    sock.sendall(payload)
    reader = hiredis.Reader()
    replies: list[Any] = []
    while len(replies) < n:
        data = sock.recv(1 << 20)
        if not data:
            raise ConnectionError("Redis closed the connection during the preload")
        reader.feed(data)
        while len(replies) < n and (reply := reader.gets()) is not False:
            replies.append(reply)
    return replies


def funding(scales: dict[str, int]) -> list[Command]:
    """With balances on, every account of the flow first deposits far more of each asset than the flow
    trades, so the matcher does the same matching as with balances off, plus the ledger's work."""
    units = funding_units(scales)
    return [Deposit(account, asset, units[asset]) for account in ACCOUNTS for asset in units]


def preload(
    host: str,
    port: int,
    steps: list[Step],
    quiet: bool,
    first: Sequence[Command] = (),
    scales: dict[str, int] | None = None,
) -> None:
    """XADD `first` and then every step to the orders stream, with the gateway's entry encoding (the
    asset `scales` for funding) and appended counter; the flow's seqs (and the order ids its cancels
    name) move up by len(first)."""
    key = keys.orders(SYMBOL).encode()
    recv_ns = time.time_ns()
    shift = len(first)
    with socket.create_connection((host, port)) as sock:
        if first:
            parts = [
                pack(b"XADD", key, entry_id(i), FIELD, encode(cmd, recv_ns, scales))
                for i, cmd in enumerate(first, 1)
            ]
            _roundtrip(sock, b"".join(parts), len(parts))
        for start in range(0, len(steps), PRELOAD_CHUNK):
            parts = []
            for cmd, seq in steps[start : start + PRELOAD_CHUNK]:
                if type(cmd) is Cancel and cmd.order_id is not None:
                    cmd = cmd._replace(order_id=matcher_seq(cmd.order_id + shift))
                parts.append(pack(b"XADD", key, entry_id(seq + shift), FIELD, encode(cmd, recv_ns)))
            for reply in _roundtrip(sock, b"".join(parts), len(parts)):
                if isinstance(reply, hiredis.ReplyError):
                    raise RuntimeError(f"preload XADD refused: {reply}")
            done = min(len(steps), start + PRELOAD_CHUNK)
            _say(quiet, f"\r  preloading the orders stream: {done * 100 // len(steps):3d}%", end="")
        _roundtrip(sock, pack(b"SET", keys.appended(SYMBOL).encode(), b"%d" % (shift + len(steps))), 1)
    _say(quiet, "")


# --- the subscriber process -------------------------------------------------------------------------


def subscriber_main(host: str, port: int, progress_key: str, total: int, channels: list[str]) -> None:
    """Subscribe, print `ready`; then read every message and poll the progress hash until it says
    `total` entries were applied; print `done <wall ns>`, keep reading until stdin closes, and print
    the counts as JSON."""
    sub = socket.create_connection((host, port))
    _roundtrip(sub, pack(b"SUBSCRIBE", *(c.encode() for c in channels)), len(channels))
    poll = socket.create_connection((host, port))
    print("ready", flush=True)
    reader = hiredis.Reader()
    counts = {c: [0, 0] for c in channels}  # messages, bytes
    hget = pack(b"HGET", progress_key.encode(), b"applied")
    done = False
    inputs = [sub, sys.stdin]
    while True:
        readable, _, _ = select.select(inputs, [], [], POLL_SECONDS)
        if sys.stdin in readable and not sys.stdin.readline():
            break
        if sub in readable:
            data = sub.recv(1 << 20)
            if not data:
                break
            reader.feed(data)
            while (msg := reader.gets()) is not False:
                entry = counts[msg[1].decode()]
                entry[0] += 1
                entry[1] += len(msg[2])
        if not done:
            applied = _roundtrip(poll, hget, 1)[0]
            if applied is not None and int(applied) >= total:
                done = True
                print(f"done {time.time_ns()}", flush=True)
    print(orjson.dumps(counts).decode(), flush=True)


# --- the sampler ------------------------------------------------------------------------------------


def _framed_render(*args: Any) -> None:
    """shared.wire.render inside a Python frame of its own, for the sampler: the compiled renderer
    has none, so its time would be charged to the matcher's loop and from there to the event loop
    ("redis client")."""
    render(*args)


def _use_render(fn: Any) -> None:
    """Make both matchers (service, venue) call `fn` as their renderer: they look it up by name."""
    modules: tuple[Any, ...] = (service, venue)  # Any: mypy refuses assigning a module's attribute
    for module in modules:
        module.render = fn


class Sampler:
    """SIGPROF every SAMPLE_SECONDS of process CPU; each sample charges the main thread's CPU time
    since the previous one to the category of the innermost frame of the interrupted stack that names
    one (else `other`: the service's own loop and the event loop).

    Weighting by CPU time rather than counting samples matters: Python runs a signal handler only
    between bytecodes, so the signals that arrive during one long C call (hiredis parsing a batch,
    orjson encoding a payload) make a single call when it returns, in the frame that made it."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {name: 0.0 for name, _ in _CATEGORIES}
        self.seconds["other"] = 0.0
        self.samples = 0
        self._by_file: dict[str, str] = {}
        self._last = 0.0
        self._running = False

    def _category(self, filename: str) -> str:
        cat = self._by_file.get(filename)
        if cat is None:
            path = filename.replace(os.sep, "/")
            found = next((name for name, parts in _CATEGORIES if any(p in path for p in parts)), None)
            self._by_file[filename] = cat = found or ""
        return cat

    def _charge(self, frame: FrameType | None) -> None:
        now = time.thread_time()
        spent, self._last = now - self._last, now
        cat = ""
        while frame is not None and not cat:
            code = frame.f_code
            cat = "render" if code is _framed_render.__code__ else self._category(code.co_filename)
            frame = frame.f_back
        self.seconds[cat or "other"] += spent
        self.samples += 1

    def _handle(self, _signum: int, frame: FrameType | None) -> None:
        self._charge(frame)

    def start(self) -> None:
        self._last = time.thread_time()
        self._running = True
        signal.signal(signal.SIGPROF, self._handle)
        signal.setitimer(signal.ITIMER_PROF, SAMPLE_SECONDS, SAMPLE_SECONDS)

    def stop(self) -> None:
        # A flag, not `getsignal(...) is self._handle`: each access makes a new bound method, and an
        # armed timer left behind kills the process (SIGPROF's default action) once the handler is gone.
        if self._running:
            self._running = False
            signal.setitimer(signal.ITIMER_PROF, 0, 0)
            signal.signal(signal.SIGPROF, signal.SIG_DFL)
            self._charge(None)  # the tail since the last sample: the bench's own wake-up


# --- the matcher under test -------------------------------------------------------------------------


class BenchMatcher(Matcher):
    """The service unchanged, with each read's size, thread CPU and commit round trip recorded (from
    the write of a round trip that carries commits to its replies)."""

    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg)
        self.batch_sizes: list[int] = []
        self.roundtrip_ms: list[float] = []
        self.process_cpu_ns = 0

    def _send(self, conn: RespConnection, payload: bytes, n: int) -> asyncio.Future[list[Any]]:
        pending = super()._send(conn, payload, n)
        if self._op == "commit":
            sent_ns = time.perf_counter_ns()
            pending.add_done_callback(
                lambda _: self.roundtrip_ms.append((time.perf_counter_ns() - sent_ns) / 1e6)
            )
        return pending

    def _apply_read(self, streams: list[tuple[bytes, list[Entry]]], read_ns: int) -> list[bytes]:
        t0 = time.thread_time_ns()
        commits = super()._apply_read(streams, read_ns)
        self.process_cpu_ns += time.thread_time_ns() - t0
        self.batch_sizes.append(sum(len(entries) for _, entries in streams))
        return commits


class BenchVenue(BenchMatcher, VenueMatcher):
    """The same records around the venue matcher (balances on: one engine, merged reads)."""


async def _run_matcher(
    cfg: Config, sub: asyncio.subprocess.Process, redis_pid: int, total: int, quiet: bool
) -> dict[str, Any]:
    matcher = BenchVenue(cfg) if cfg.risk else BenchMatcher(cfg)
    sampler = Sampler()
    _use_render(_framed_render)  # restored below
    task = asyncio.create_task(matcher.run())
    await matcher.ready.wait()
    t0_ns = time.time_ns()
    cpu0 = (proc_cpu_s(os.getpid()), proc_cpu_s(redis_pid), proc_cpu_s(sub.pid))
    sampler.start()
    assert sub.stdout is not None
    st = matcher.states[SYMBOL]

    def show(now_ns: int) -> None:
        rate = st.applied / max(1e-9, (now_ns - t0_ns) / 1e9)
        _say(quiet, f"\r  matching: {st.applied * 100 // total:3d}%  {rate:>9,.0f} commands/s", end="")

    async def progress() -> None:
        while True:
            await asyncio.sleep(0.5)
            show(time.time_ns())

    reporter = asyncio.create_task(progress())
    try:
        while True:
            line = (await sub.stdout.readline()).decode()
            if line.startswith("done "):
                end_ns = int(line.split()[1])
                show(end_ns)  # the last line says 100 %, not the last half second's figure
                break
            if not line or task.done():
                raise RuntimeError("the matcher or the subscriber stopped before the end of the stream")
        sampler.stop()
        cpu1 = (proc_cpu_s(os.getpid()), proc_cpu_s(redis_pid), proc_cpu_s(sub.pid))
    finally:
        sampler.stop()
        _use_render(render)
        reporter.cancel()
        matcher.stop()
        code = await task
    _say(quiet, "")
    if code != 0:
        raise RuntimeError(f"the matcher exited with {code}")
    return {
        "seconds": (end_ns - t0_ns) / 1e9,
        "cpu_s": [b - a for a, b in zip(cpu0, cpu1, strict=True)],
        "phases_s": sampler.seconds,
        "samples": sampler.samples,
        "main_thread_cpu_s": sum(sampler.seconds.values()),
        "batch_sizes": matcher.batch_sizes,
        "roundtrip_ms": sorted(matcher.roundtrip_ms),
        "process_cpu_s": matcher.process_cpu_ns / 1e9,
        "applied": st.applied,
        "trades": st.engine.books[SYMBOL].trade_seq,
    }


async def _measure(
    cfg: Config, redis: RedisServer, redis_pid: int, total: int, quiet: bool
) -> dict[str, Any]:
    channels = [keys.md_channel(SYMBOL), keys.trades_channel(SYMBOL), keys.exec_channel(SYMBOL)]
    argv = [sys.executable, "-m", "services.bench.matcher", redis.host, str(redis.port)]
    argv += [keys.progress(SYMBOL), str(total), *channels]
    sub = await asyncio.create_subprocess_exec(*argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert sub.stdout is not None and sub.stdin is not None
    try:
        if (await sub.stdout.readline()).strip() != b"ready":
            raise RuntimeError("the subscriber process did not start")
        result = await _run_matcher(cfg, sub, redis_pid, total, quiet)
        sub.stdin.close()
        counts = orjson.loads((await sub.stdout.readline()) or b"{}")
    finally:
        if sub.returncode is None:
            if not sub.stdin.is_closing():
                sub.stdin.close()
            try:
                await asyncio.wait_for(sub.wait(), 10)
            except TimeoutError:
                sub.kill()
                await sub.wait()
    result["published"] = {
        name: {"messages": counts.get(ch, [0, 0])[0], "bytes": counts.get(ch, [0, 0])[1]}
        for name, ch in zip(("md", "trades", "exec"), channels, strict=True)
    }
    return result


def run_from_args(args: argparse.Namespace) -> int:
    gc.disable()  # as the matcher's entry point does
    quiet: bool = args.quiet
    commands: int = args.commands or 1_000_000
    if commands >= PER_MS << SEQ_BITS:
        raise SystemExit(f"at most {(PER_MS << SEQ_BITS) - 1:,} commands")
    risk = getattr(args, "risk", None) == "on"
    mode = "balances on (venue matcher)" if risk else "balances off"
    _say(quiet, f"cme bench matcher: {commands:,} commands, seed {args.seed}, batch {args.batch}, {mode}")
    _, steps = generate(FlowConfig(commands, args.seed), progress=not quiet)
    scales = asset_scales([Instrument(SYMBOL)])
    first = funding(scales) if risk else []
    total = len(first) + commands
    tmp = Path(tempfile.mkdtemp(prefix="cme-bench-matcher-"))
    redis = RedisServer(tmp / "redis")
    try:
        redis.start()
        assert redis.proc is not None
        preload(redis.host, redis.port, steps, quiet, first, scales)
        del steps
        gc.collect()
        gc.freeze()
        cfg = Config(
            redis_url=redis.url, instruments=(Instrument(SYMBOL),), data_dir=tmp / "matcher",
            batch=max(1, args.batch), instance="bench-matcher", risk=risk,
        )  # fmt: skip
        cfg.data_dir.mkdir()
        result = asyncio.run(_measure(cfg, redis, redis.proc.pid, total, quiet))
    except (RuntimeError, OSError) as exc:
        print(f"cme bench matcher: {exc}", file=sys.stderr)
        return 2
    finally:
        redis.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    report = summarize(result, total, args)
    report["balances"] = risk
    report["funding_entries"] = len(first)
    print_table(report)
    if args.json:
        Path(args.json).write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2))
    return 0 if report["applied"] == total else 1


def summarize(result: dict[str, Any], commands: int, args: argparse.Namespace) -> dict[str, Any]:
    seconds = result["seconds"]
    own_cpu, redis_cpu, sub_cpu = result["cpu_s"]
    per_cmd = 1e6 / commands
    phases: dict[str, float] = result["phases_s"]
    split = {name: round(spent * per_cmd, 2) for name, spent in phases.items()}
    split["other threads"] = round(max(0.0, own_cpu - result["main_thread_cpu_s"]) * per_cmd, 2)
    sizes = sorted(result["batch_sizes"])
    rts: list[float] = result["roundtrip_ms"]
    rate = commands / seconds
    return {
        "commands": commands,
        "applied": result["applied"],
        "trades": result["trades"],
        "seed": args.seed,
        "batch_limit": args.batch,
        "seconds": round(seconds, 3),
        "commands_per_s": round(rate),
        "target_commands_per_s": TARGET_PER_S,
        "target_met": rate >= TARGET_PER_S,
        "batches": {
            "count": len(sizes),
            "mean": round(sum(sizes) / max(1, len(sizes)), 1),
            "p50": _pct(sizes, 0.5),
            "min": sizes[0] if sizes else 0,
            "max": sizes[-1] if sizes else 0,
        },
        "commit_roundtrip_ms": {
            "count": len(rts),
            "p50": round(_pct(rts, 0.5), 3),
            "p99": round(_pct(rts, 0.99), 3),
            "max": round(rts[-1], 3) if rts else 0.0,
        },
        "cpu_us_per_command": {
            "matcher": round(own_cpu * per_cmd, 2),
            "matcher_split": split,
            "matcher_batch_processing": round(result["process_cpu_s"] * per_cmd, 2),
            "redis": round(redis_cpu * per_cmd, 2),
            "subscriber": round(sub_cpu * per_cmd, 2),
        },
        "profile_samples": result["samples"],
        "published": result["published"],
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }


def print_table(r: dict[str, Any]) -> None:
    met = "MET" if r["target_met"] else "NOT MET"
    print(
        f"cme bench matcher  (one symbol, balances {'on' if r.get('balances') else 'off'},"
        f" CPython {r['python']},"
        f" {r['cpus']} CPUs, load {r['load_average']})"
    )
    print(
        f"{r['commands']:,} commands in {r['seconds']:.2f} s: {r['commands_per_s']:,} commands/s"
        f"  (target >= {r['target_commands_per_s']:,}: {met})"
    )
    b, rt = r["batches"], r["commit_roundtrip_ms"]
    print(f"batches: {b['count']:,}, size mean {b['mean']} p50 {b['p50']} min {b['min']} max {b['max']}")
    print(f"commit round trip: p50 {rt['p50']:.3f} ms, p99 {rt['p99']:.3f} ms, max {rt['max']:.3f} ms")
    cpu = r["cpu_us_per_command"]
    print(f"CPU per command (us): matcher {cpu['matcher']:.2f}, redis-server {cpu['redis']:.2f},"
          f" subscriber {cpu['subscriber']:.2f}")  # fmt: skip
    split = ", ".join(f"{name} {us:.2f}" for name, us in cpu["matcher_split"].items())
    print(f"  matcher by phase ({r['profile_samples']:,} samples): {split}")
    print(f"  matcher batch processing (decode + core + render + metrics, thread CPU): "
          f"{cpu['matcher_batch_processing']:.2f}")  # fmt: skip
    pub = ", ".join(
        f"{k} {v['messages']:,} msgs / {v['bytes'] / 1e6:.1f} MB" for k, v in r["published"].items()
    )
    print(f"published: {pub}")


if __name__ == "__main__":
    subscriber_main(sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), sys.argv[5:])
