"""`cme bench core`: throughput, per-command latency and memory of the pure matching core.

Figures come from replaying a pre-generated seeded flow (services.bench.flow) into a fresh engine,
every event produced and kept until the command returns. Throughput is timed without per-command
clocks; latency percentiles come from a second replay that reads the clock around each command.
The cyclic garbage collector is off, as in the matcher (the core creates no reference cycles).
"""

from __future__ import annotations

import argparse
import gc
import platform
import resource
import statistics
import sys
import time
import tracemalloc
from typing import Any, Final

import orjson

from services.bench.flow import ACCOUNTS, ORDER_TYPES, SYMBOL, FlowConfig, Step, funding_units, generate
from services.matcher.engine import Engine
from shared.commands import BUY, GTC, LIMIT, SELL, NewOrder
from shared.instruments import Instrument

TS0 = 1_700_000_000_000


def _progress(label: str, done: int, total: int, quiet: bool) -> None:
    if not quiet:
        print(f"\r  {label}: {done * 100 // max(total, 1):3d}%", end="", file=sys.stderr, flush=True)


def _fresh(pre: list[Step], risk: bool = False) -> Engine:
    """An engine with the preload applied. With balances on, every account of the flow starts funded
    far beyond what it trades, so the flow's outcomes are the same with and without (set directly, as a
    snapshot would: deposits on the stream would need seqs before the flow's first)."""
    engine = Engine([Instrument(SYMBOL)], risk=risk)
    if engine.ledger is not None:
        rich = {asset: [units, 0] for asset, units in funding_units(engine.ledger.scales).items()}
        engine.ledger.set_balances({account: rich for account in ACCOUNTS})
    for cmd, seq in pre:
        engine.apply(cmd, seq, TS0 + seq)
    return engine


def _throughput(pre: list[Step], steps: list[Step], quiet: bool, risk: bool) -> tuple[float, int, int]:
    """Commands per second over the whole flow, plus counts of events and trades."""
    engine = _fresh(pre, risk)
    apply = engine.apply
    chunk = max(1, len(steps) // 20)
    events = 0
    elapsed = 0.0
    for start in range(0, len(steps), chunk):
        part = steps[start : start + chunk]
        t0 = time.perf_counter()
        for cmd, seq in part:
            events += len(apply(cmd, seq, seq))
        elapsed += time.perf_counter() - t0
        _progress("throughput", start + len(part), len(steps), quiet)
    if not quiet:
        print(file=sys.stderr)
    return len(steps) / elapsed, events, engine.books[SYMBOL].trade_seq


def metrics_overhead(pre: list[Step], steps: list[Step], rounds: int, quiet: bool) -> dict[str, Any]:
    """Throughput with and without the matcher's metrics recording (services.matcher.batch plus the
    command-time histogram), in batches of the matcher's default size, alternating the two so that
    machine noise hits both alike. Best round of each."""
    from services.matcher.batch import apply_batch
    from shared.metrics import COMMAND_SECONDS

    items = [(cmd, seq, seq) for cmd, seq in steps]
    batches = [items[i : i + 1000] for i in range(0, len(items), 1000)]
    hist = COMMAND_SECONDS.labels(SYMBOL)
    best = {"without": float("inf"), "with": float("inf")}
    for r in range(rounds):
        for mode in ("without", "with"):
            engine = _fresh(pre)
            apply = engine.apply
            t0 = time.perf_counter()
            if mode == "with":
                for batch in batches:
                    samples: list[float] = []
                    apply_batch(apply, batch, samples)
                    hist.observe_many(samples)
            else:
                for batch in batches:
                    [apply(cmd, seq, ts) for cmd, seq, ts in batch]
            best[mode] = min(best[mode], time.perf_counter() - t0)
        _progress("metrics overhead", r + 1, rounds, quiet)
    if not quiet:
        print(file=sys.stderr)
    without, with_ = len(steps) / best["without"], len(steps) / best["with"]
    return {
        "without_metrics_per_s": round(without),
        "with_metrics_per_s": round(with_),
        "loss_pct": round(100 * (1 - with_ / without), 2),
    }


RISK_SLICE: Final = 2_000  # commands per slice of risk_cost's lockstep replay


def risk_cost(pre: list[Step], steps: list[Step], quiet: bool) -> dict[str, Any]:
    """Throughput with balances off and on, measured side by side: two engines replay the flow in
    lockstep, a slice of RISK_SLICE commands each in turn, the first of each pair alternating. A
    burst of noise from the machine's neighbours then falls on both engines' slices alike instead of
    on one whole run (whole runs, alternated, gave ratios from 0.68 to 1.16 on one afternoon).
    The ratio is the median of the slices' own ratios; the rates come from the summed times."""
    engines = {False: _fresh(pre, False), True: _fresh(pre, True)}
    spent = {False: 0.0, True: 0.0}
    ratios: list[float] = []
    clock = time.perf_counter
    n_slices = max(1, -(-len(steps) // RISK_SLICE))
    for i in range(n_slices):
        part = steps[i * RISK_SLICE : (i + 1) * RISK_SLICE]
        took = {}
        for risk in (False, True) if i % 2 == 0 else (True, False):
            apply = engines[risk].apply
            t0 = clock()
            for cmd, seq in part:
                apply(cmd, seq, seq)
            took[risk] = clock() - t0
            spent[risk] += took[risk]
        ratios.append(took[False] / took[True])
        if i % max(1, n_slices // 20) == 0 or i == n_slices - 1:
            _progress("balances on vs off", i + 1, n_slices, quiet)
    if not quiet:
        print(file=sys.stderr)
    return {
        "slices": n_slices,
        "slice_commands": RISK_SLICE,
        "off_per_s": round(len(steps) / spent[False]),
        "on_per_s": round(len(steps) / spent[True]),
        "ratio": round(statistics.median(ratios), 3),
    }


def _latency(pre: list[Step], steps: list[Step], quiet: bool, risk: bool) -> dict[str, float]:
    engine = _fresh(pre, risk)
    apply = engine.apply
    clock = time.perf_counter_ns
    samples = [0] * len(steps)
    chunk = max(1, len(steps) // 20)
    for start in range(0, len(steps), chunk):
        for i in range(start, min(start + chunk, len(steps))):
            cmd, seq = steps[i]
            t0 = clock()
            apply(cmd, seq, seq)
            samples[i] = clock() - t0
        _progress("latency", min(start + chunk, len(steps)), len(steps), quiet)
    if not quiet:
        print(file=sys.stderr)
    samples.sort()
    n = len(samples)

    def pct(p: float) -> float:
        return samples[min(n - 1, int(n * p))] / 1000.0

    return {"p50_us": pct(0.50), "p99_us": pct(0.99), "p999_us": pct(0.999), "max_us": samples[-1] / 1000.0}


def bytes_per_resting_order(n: int, quiet: bool) -> dict[str, float]:
    """Traced memory of a book holding n resting orders (every one with a client order id)."""
    engine = Engine([Instrument(SYMBOL)])
    accounts = [f"acct{i:03d}" for i in range(50)]
    cmds = [
        NewOrder(
            SYMBOL,
            accounts[i % 50],
            BUY if i % 2 else SELL,
            LIMIT,
            GTC,
            2_990_000 - (i % 5000) if i % 2 else 3_010_000 + (i % 5000),
            1 + i % 1000,
            f"c{i}",
        )
        for i in range(n)
    ]
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    chunk = max(1, n // 20)
    for start in range(0, n, chunk):
        for i in range(start, min(start + chunk, n)):
            engine.apply(cmds[i], i + 1, i + 1)
        _progress("memory", min(start + chunk, n), n, quiet)
    used = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    if not quiet:
        print(file=sys.stderr)
    assert len(engine.books[SYMBOL].orders) == n
    return {"resting_orders": n, "bytes_per_resting_order": used / n}


def run_variant(
    name: str,
    cfg: FlowConfig,
    quiet: bool,
    with_metrics: bool = False,
    risk: bool = False,
    flow: tuple[list[Step], list[Step]] | None = None,
) -> dict[str, Any]:
    """One variant's figures; `flow` is cfg's flow when the caller has generated it already."""
    if not quiet:
        print(f"[{name}] {cfg.commands:,} commands, seed {cfg.seed}", file=sys.stderr)
    pre, steps = flow or generate(cfg, progress=not quiet)
    rate, events, trades = _throughput(pre, steps, quiet, risk)
    lat = _latency(pre, steps, quiet, risk)
    extra = {"metrics": metrics_overhead(pre, steps, 3, quiet)} if with_metrics else {}
    return {
        **extra,
        "variant": name,
        "commands": len(steps),
        "preloaded_orders": len(pre),
        "commands_per_s": round(rate),
        "events": events,
        "trades": trades,
        **{k: round(v, 2) for k, v in lat.items()},
    }


def run_from_args(args: argparse.Namespace) -> int:
    gc.disable()  # as the matcher does: no cycles in the core, and no collector pauses in the numbers
    quiet = args.quiet
    results: list[dict[str, Any]] = []
    # --order-types all adds the flow with stops, GTD, icebergs and quote quantity (services.bench.flow),
    # next to the default one, so the table shows what they cost.
    order_types = getattr(args, "order_types", "plain")
    if order_types not in ORDER_TYPES:
        raise SystemExit(f"--order-types must be one of {', '.join(ORDER_TYPES)}")
    risk = getattr(args, "risk", None) or "both"
    risk_report: dict[str, Any] | None = None
    if not args.deep:
        cfg = FlowConfig(args.commands, args.seed)
        flow = generate(cfg, progress=not quiet)  # the same flow with balances off and on
        if risk != "on":
            results.append(run_variant("default", cfg, quiet, args.metrics, flow=flow))
        if risk != "off":  # balances on: every order holds, every fill settles (services.matcher.balances)
            results.append(run_variant("risk on", cfg, quiet, risk=True, flow=flow))
        if risk == "both":
            risk_report = risk_cost(*flow, quiet)
        if order_types == "all":
            cfg = FlowConfig(args.commands, args.seed, order_types="all")
            results.append(run_variant("all types", cfg, quiet))
    if not args.flat:
        results.append(run_variant("deep book", FlowConfig(args.commands, args.seed, deep=True), quiet))
    memory = None if args.no_memory else bytes_per_resting_order(args.memory_orders, quiet)
    report: dict[str, Any] = {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "variants": results,
        "risk_cost": risk_report,
        "memory": memory,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    _print_table(report)
    if args.json:
        with open(args.json, "wb") as f:
            f.write(orjson.dumps(report, option=orjson.OPT_INDENT_2))
    return 0


def _print_table(report: dict[str, Any]) -> None:
    print(f"cme bench core  (CPython {report['python']}, one core, cyclic GC off)")
    head = ("variant", "commands", "cmd/s", "p50 us", "p99 us", "p99.9 us", "trades")
    print(f"{head[0]:<10} {head[1]:>10} {head[2]:>11} {head[3]:>8} {head[4]:>8} {head[5]:>9} {head[6]:>9}")
    for r in report["variants"]:
        print(
            f"{r['variant']:<10} {r['commands']:>10,} {r['commands_per_s']:>11,} {r['p50_us']:>8.2f} "
            f"{r['p99_us']:>8.2f} {r['p999_us']:>9.2f} {r['trades']:>9,}"
        )
    variants = report["variants"]
    if len(variants) >= 2 and variants[0]["variant"] == "default":
        for other in variants[1:]:
            ratio = other["commands_per_s"] / variants[0]["commands_per_s"]
            # Two whole runs one after the other: for balances, noise of the machine's neighbours
            # (0.70-0.88 for one build on 2026-12-03); risk_cost's side-by-side figure is the measure.
            whole = other["variant"] == "risk on"
            note = "  (whole runs in turn; the side-by-side ratio below is the measure)" if whole else ""
            print(f"{other['variant']} / default throughput: {ratio:.3f}{note}")
    rc = report["risk_cost"]
    if rc:
        print(
            f"balances on / off, side by side in {rc['slices']:,} slices: {rc['on_per_s']:,} vs "
            f"{rc['off_per_s']:,} cmd/s, median ratio {rc['ratio']:.3f}  (target >= 0.85)"
        )
    for r in variants:
        if "metrics" in r:
            m = r["metrics"]
            print(
                f"{r['variant']} with the matcher's metrics: {m['with_metrics_per_s']:,} cmd/s vs "
                f"{m['without_metrics_per_s']:,} without ({m['loss_pct']:.1f} % lost)"
            )
    if report["memory"]:
        m = report["memory"]
        per_order, resting = m["bytes_per_resting_order"], m["resting_orders"]
        print(f"memory: {per_order:.0f} bytes per resting order ({resting:,} resting)")
    print(f"peak RSS: {report['peak_rss_mb']} MB")
