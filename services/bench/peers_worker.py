"""One engine, one fresh process: `python -m services.bench.peers_worker --factory MOD:FUNC --flow FILE`.

Started by `cme bench peers` (services.bench.peers) once per engine per repeat, so no engine inherits
another's heap, imports or JIT-less warm caches. It prints one JSON line on stdout (RESULT_PREFIX).

Pass 1 (throughput) replays the whole flow into a fresh adapter between two clock reads. Pass 2
(latency) replays it into another fresh adapter with a clock read around every op. The flow is loaded,
the engine imported and gc.freeze()d before either pass; the collector stays on, as a peer's users
run it (the same for every engine).
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import os
import pickle
import platform
import resource
import sys
import time
import traceback
from array import array
from collections.abc import Callable
from typing import Any

from services.bench.peers_adapters import Adapter
from services.bench.peers_flow import CATEGORIES, Op

RESULT_PREFIX = "PEERS_RESULT "


def load_factory(spec: str) -> Callable[[], Adapter]:
    module, _, attr = spec.partition(":")
    factory: Callable[[], Adapter] = getattr(importlib.import_module(module), attr)
    return factory


def percentile(ordered: list[int] | array[int], p: float) -> int:
    return ordered[min(len(ordered) - 1, int(len(ordered) * p))]


def throughput(factory: Callable[[], Adapter], ops: list[Op]) -> tuple[int, int, Adapter]:
    """Wall and CPU ns of the whole flow. On a shared machine the CPU time moves less than the wall
    time when other processes take the cores; the table shows wall time, the JSON has both."""
    ad = factory()
    handle = ad.handle
    gc.collect()
    c0 = time.process_time_ns()
    t0 = time.perf_counter_ns()
    for op in ops:
        handle(op)
    t1 = time.perf_counter_ns()
    c1 = time.process_time_ns()
    ad.close()
    return t1 - t0, c1 - c0, ad


def latency(factory: Callable[[], Adapter], ops: list[Op]) -> tuple[array[int], Adapter]:
    ad = factory()
    handle = ad.handle
    samples = array("q", bytes(8 * len(ops)))
    clock = time.perf_counter_ns
    gc.collect()
    for i, op in enumerate(ops):
        t0 = clock()
        handle(op)
        samples[i] = clock() - t0
    ad.close()
    return samples, ad


def timer_floor(n: int = 100_000) -> int:
    """Median ns of timing a call that does nothing: the clock's own share of every latency figure."""
    clock = time.perf_counter_ns
    samples = array("q", bytes(8 * n))

    def nothing(op: Op) -> None:
        pass

    op: Op = (0, 0, 0, 0, 0, 0)
    for i in range(n):
        t0 = clock()
        nothing(op)
        samples[i] = clock() - t0
    return percentile(sorted(samples), 0.5)


def measure(factory_spec: str, flow_path: str) -> dict[str, Any]:
    factory = load_factory(factory_spec)
    with open(flow_path, "rb") as f:
        ops: list[Op] = pickle.load(f)
    factory().close()  # imports the engine's modules before the heap is frozen and RSS is read
    gc.collect()
    gc.freeze()
    rss_base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    wall_ns, cpu_ns, ad = throughput(factory, ops)
    rss_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    samples, ad2 = latency(factory, ops)
    ordered = sorted(samples)
    by_category: dict[str, dict[str, int]] = {}
    for cat, name in enumerate(CATEGORIES):
        chosen = sorted(samples[i] for i, op in enumerate(ops) if op[5] == cat)
        if chosen:
            by_category[name] = {
                "n": len(chosen),
                "p50_ns": percentile(chosen, 0.5),
                "p99_ns": percentile(chosen, 0.99),
            }
    matcher = sys.modules.get("services.matcher")
    return {
        "ops": len(ops),
        "ops_per_s": len(ops) / (wall_ns / 1e9),
        "wall_s": wall_ns / 1e9,
        "ops_per_cpu_s": len(ops) / (max(cpu_ns, 1) / 1e9),
        "p50_ns": percentile(ordered, 0.50),
        "p99_ns": percentile(ordered, 0.99),
        "p999_ns": percentile(ordered, 0.999),
        "trades": ad.counts.trades,
        "volume": ad.counts.volume,
        "errors": ad.counts.errors,
        # the latency pass must agree with the throughput pass: the same flow into a fresh engine
        "latency_pass": [ad2.counts.trades, ad2.counts.volume, ad2.counts.errors],
        "by_category": by_category,  # where the tail comes from: crossing orders or cancels
        "timer_floor_ns": timer_floor(),
        "rss_base_mb": round(rss_base / 1024, 1),
        "rss_peak_mb": round(rss_peak / 1024, 1),
        "build": getattr(matcher, "BUILD", None),
        "python": platform.python_version(),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    ap.add_argument("--factory", required=True, help="module:function returning an Adapter")
    ap.add_argument("--flow", required=True, help="pickled list of ops (services.bench.peers_flow)")
    a = ap.parse_args(argv)
    try:
        out: dict[str, Any] = {"ok": True, **measure(a.factory, a.flow)}
    except Exception as exc:  # reported to the driver, which prints it and fails the run
        out = {
            "ok": False,
            "error": f"{type(exc).__name__}: {exc}",
            "traceback": traceback.format_exc()[-2000:],
        }
    print(RESULT_PREFIX + json.dumps(out), flush=True)
    sys.stdout.flush()
    # An engine's native threads or finalizers (a C++ book freed after its Python listener) must not
    # keep the process alive or crash it on the way out: the result is already written.
    os._exit(0)


if __name__ == "__main__":
    main()
