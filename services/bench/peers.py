"""`cme bench peers`: this project's matching core side by side with other engines, on one seeded flow.

Every engine gets the same flow (services.bench.peers_flow) through its own adapter
(services.bench.peers_adapters), in a fresh process per engine and repeat (services.bench.peers_worker),
repeats interleaved (A, B, C, A, B, C, ...) so that machine noise spreads over all engines alike; the
table shows medians. The engines: this core's two builds (compiled, and pure with CME_PURE_PYTHON=1),
the two references of services.bench.peers_ref (seed-style and tight), and the peers from PyPI that
install on this Python (the `[peers]` extra). A peer that is not installed is skipped, loudly.

Every engine that ran must have traded the same number of trades and lots (they share the flow's rules
exactly); otherwise the run prints FAIL and exits 1, as it does when an engine's process fails. The
targets are printed next to the figures; missing one is a figure, not a failure.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, TextIO

import orjson

import services
from services.bench.peers_flow import CATEGORIES, generate
from services.bench.peers_worker import RESULT_PREFIX

INSTALL_HINT = "pip install -e '.[peers]'"


@dataclass(frozen=True)
class EngineSpec:
    name: str
    factory: str  # "module:function" returning a services.bench.peers_adapters.Adapter
    about: str
    dist: str | None = None  # the PyPI distribution it needs; None: it comes with the project
    pin: str | None = None  # the version the [peers] extra installs
    pure: bool | None = None  # this project's core: True runs CME_PURE_PYTHON=1, False expects compiled


_A = "services.bench.peers_adapters:"
ENGINES: tuple[EngineSpec, ...] = (
    EngineSpec("cme-core", _A + "cme_core", "this core's Engine.apply, the compiled build", pure=False),
    EngineSpec("cme-core-pure", _A + "cme_core", "this core's Engine.apply, CME_PURE_PYTHON=1", pure=True),
    EngineSpec("seed", _A + "seed", "seed-style baseline: floats, sorted() on every order"),
    EngineSpec("tight", _A + "tight", "tight pure-Python reference: int ticks, bisect, no events"),
    EngineSpec("liquibook", _A + "liquibook", "C++ LiquiBook via SWIG, fills in a Python listener",
               "liquibook", "2.0.1"),
    EngineSpec("orderly-chaos", _A + "orderly_chaos", "C++ core via ctypes, on_trade callback",
               "orderly-chaos", "0.2.0"),
    EngineSpec("lightmatchingengine", _A + "lightmatchingengine", "pure Python, float prices",
               "lightmatchingengine", "2019.1.4"),
)  # fmt: skip

# (engine, what, against, bound): "ops" is ops/s >= bound x the other engine's; "p99" is p99 <= bound us.
TARGETS: tuple[tuple[str, str, str | None, float], ...] = (
    ("cme-core", "ops", "liquibook", 1.2),
    ("cme-core", "p99", None, 4.0),
    ("cme-core-pure", "ops", "seed", 1.4),
    ("cme-core-pure", "ops", "tight", 0.8),
    ("cme-core-pure", "p99", None, 10.0),
)
RATIO_COLUMNS = ("seed", "tight", "liquibook")


@dataclass(frozen=True)
class PeersConfig:
    ops: int = 200_000
    seed: int = 42
    prefill: int = 0
    repeats: int = 3
    quiet: bool = False
    json_path: str | None = None


def select(names: str | None, engines: Sequence[EngineSpec] = ENGINES) -> list[EngineSpec]:
    """The engines named in a comma-separated list, in its order; all of them for None."""
    if not names:
        return list(engines)
    by_name = {e.name: e for e in engines}
    wanted = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in wanted if n not in by_name]
    if unknown:
        raise SystemExit(f"unknown engine {', '.join(unknown)}; known: {', '.join(by_name)}")
    return [by_name[n] for n in wanted]


def _version(spec: EngineSpec) -> str | None:
    """The installed version, or None when the engine's distribution is missing."""
    if spec.dist is None and spec.pure is None:
        return "reference"  # services.bench.peers_ref
    try:
        return metadata.version(spec.dist or "crypto-matching-engine")
    except metadata.PackageNotFoundError:
        return None if spec.dist else "source"  # this project, run from a checkout without installing


def _worker_env(spec: EngineSpec) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("CME_PURE_PYTHON", None)
    if spec.pure:
        env["CME_PURE_PYTHON"] = "1"
    # The worker imports the same tree as this process, installed or not.
    root = str(Path(services.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env


def run_worker(spec: EngineSpec, flow_path: str) -> dict[str, Any]:
    cmd = [
        sys.executable,
        "-m",
        "services.bench.peers_worker",
        "--factory",
        spec.factory,
        "--flow",
        flow_path,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_worker_env(spec))
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            result: dict[str, Any] = json.loads(line[len(RESULT_PREFIX) :])
            return result
    tail = proc.stderr.strip().splitlines()[-3:]
    return {"ok": False, "error": f"worker exited {proc.returncode} without a result: {' | '.join(tail)}"}


def _log(quiet: bool, text: str) -> None:
    if not quiet:
        print(text, file=sys.stderr, flush=True)


def summarize(spec: EngineSpec, version: str, runs: list[dict[str, Any]]) -> dict[str, Any]:
    def med(key: str) -> float:
        return float(statistics.median(r[key] for r in runs))

    builds = sorted({r["build"] for r in runs if r.get("build")})
    return {
        "engine": spec.name,
        "about": spec.about,
        "version": version,
        "build": builds[0] if len(builds) == 1 else ",".join(builds) or None,
        "runs": len(runs),
        "ops_per_s": round(med("ops_per_s")),
        "ops_per_s_min": round(min(r["ops_per_s"] for r in runs)),
        "ops_per_s_max": round(max(r["ops_per_s"] for r in runs)),
        "ops_per_cpu_s": round(med("ops_per_cpu_s")),
        "p50_us": round(med("p50_ns") / 1000, 2),
        "p99_us": round(med("p99_ns") / 1000, 2),
        "p999_us": round(med("p999_ns") / 1000, 2),
        "by_category_us": {
            cat: {
                q: round(statistics.median(r["by_category"][cat][q + "_ns"] for r in runs) / 1000, 2)
                for q in ("p50", "p99")
            }
            for cat in runs[0]["by_category"]
        },
        "rss_peak_mb": max(r["rss_peak_mb"] for r in runs),
        "trades": runs[0]["trades"],
        "volume": runs[0]["volume"],
        "errors": max(r["errors"] for r in runs),
    }


def volume_check(runs: dict[str, list[dict[str, Any]]]) -> tuple[bool, list[str]]:
    """Every run of every engine (both passes) must report the same (trades, volume) as the first
    engine's first run. Returns (ok, the lines to print)."""
    seen: dict[str, set[tuple[int, int]]] = {}
    for name, rs in runs.items():
        seen[name] = {(r["trades"], r["volume"]) for r in rs} | {tuple(r["latency_pass"][:2]) for r in rs}
    if not seen:
        return True, []
    first = next(iter(seen))
    expected = next(iter(runs[first]))
    want = (expected["trades"], expected["volume"])
    bad = [name for name, got in seen.items() if got != {want}]
    if not bad:
        return True, [f"volume check: ok, every engine traded {want[0]:,} trades, {want[1]:,} lots"]
    lines = [f"FAIL volume check: {first} traded {want[0]:,} trades, {want[1]:,} lots, but"]
    for name in bad:
        got = ", ".join(f"{t:,} trades, {v:,} lots" for t, v in sorted(seen[name]))
        lines.append(f"FAIL   {name} traded {got}")
    return False, lines


def evaluate_targets(rows: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for engine, what, against, bound in TARGETS:
        if what == "ops":
            label = f"{engine} ops/s >= {bound:g} x {against}"
        else:
            label = f"{engine} p99 <= {bound:g} us"
        missing = [n for n in (engine, against) if n and n not in rows]
        if missing:
            out.append({"target": label, "value": None, "met": None, "note": f"{missing[0]} not run"})
            continue
        if what == "ops":
            assert against is not None
            value = rows[engine]["ops_per_s"] / rows[against]["ops_per_s"]
            met = value >= bound
        else:
            value = rows[engine]["p99_us"]
            met = value <= bound
        out.append(
            {"target": label, "value": round(value, 4), "met": met, "unit": "x" if what == "ops" else "us"}
        )
    return out


def run(cfg: PeersConfig, engines: Sequence[EngineSpec] = ENGINES, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    started = time.monotonic()
    skipped: list[dict[str, str]] = []
    ready: list[tuple[EngineSpec, str]] = []
    for spec in engines:
        version = _version(spec)
        if version is None:
            skipped.append({"engine": spec.name, "why": f"{spec.dist} is not installed"})
            _log(cfg.quiet, f"[peers] SKIPPED {spec.name}: {spec.dist} is not installed ({INSTALL_HINT})")
        else:
            ready.append((spec, version))

    _log(cfg.quiet, f"[peers] generating {cfg.ops:,} ops, seed {cfg.seed}, prefill {cfg.prefill:,}")
    ops = generate(cfg.ops, cfg.seed, cfg.prefill)
    cats = Counter(op[5] for op in ops)
    flow_stats = {name: cats[i] for i, name in enumerate(CATEGORIES)}
    runs: dict[str, list[dict[str, Any]]] = {spec.name: [] for spec, _ in ready}
    failures: list[str] = []
    with tempfile.TemporaryDirectory(prefix="cme-peers-") as tmp:
        flow_path = os.path.join(tmp, "flow.pkl")
        with open(flow_path, "wb") as f:
            pickle.dump(ops, f, protocol=pickle.HIGHEST_PROTOCOL)
        del ops
        for rep in range(cfg.repeats):
            for spec, _ in ready:
                if spec.name in failures:
                    continue
                r = run_worker(spec, flow_path)
                if not r.get("ok"):
                    failures.append(spec.name)
                    runs[spec.name] = [r]
                    _log(cfg.quiet, f"[{rep + 1}/{cfg.repeats}] {spec.name:<20} FAILED: {r.get('error')}")
                    continue
                runs[spec.name].append(r)
                _log(
                    cfg.quiet,
                    f"[{rep + 1}/{cfg.repeats}] {spec.name:<20} {r['ops_per_s']:>11,.0f} ops/s"
                    f"  p50 {r['p50_ns'] / 1000:.2f} us  p99 {r['p99_ns'] / 1000:.2f} us",
                )

    good = {name: rs for name, rs in runs.items() if name not in failures}
    rows = {
        spec.name: summarize(spec, version, runs[spec.name]) for spec, version in ready if spec.name in good
    }
    ok_volume, volume_lines = volume_check(good)
    targets = evaluate_targets(rows)
    warnings = [
        f"WARNING {spec.name} ran the {rows[spec.name]['build']} build, not the compiled one: the compiled "
        "core is missing or older than its source (rebuild it: pip install --no-deps -e .)"
        for spec, _ in ready
        if spec.pure is False and spec.name in rows and rows[spec.name]["build"] != "compiled"
    ]
    warnings += [
        f"WARNING {spec.name} {version} is installed, not the {spec.pin} of the [peers] extra"
        for spec, version in ready
        if spec.pin and version != spec.pin
    ]
    warnings += [
        f"WARNING {name}: {row['errors']:,} cancels of unknown orders or refused orders (none expected)"
        for name, row in rows.items()
        if row["errors"]
    ]
    report: dict[str, Any] = {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "ops": cfg.ops,
        "seed": cfg.seed,
        "prefill": cfg.prefill,
        "repeats": cfg.repeats,
        "flow": flow_stats,
        "timer_floor_ns": _median_of(good, "timer_floor_ns"),
        "engines": list(rows.values()),
        "skipped": skipped,
        "failed": [{"engine": n, "error": runs[n][0].get("error")} for n in failures],
        "volume_check": {"ok": ok_volume, "lines": volume_lines},
        "targets": targets,
        "warnings": warnings,
        "elapsed_s": round(time.monotonic() - started, 1),
        "raw": runs,
    }
    _print_report(report, out)
    if cfg.json_path:
        with open(cfg.json_path, "wb") as f:
            f.write(orjson.dumps(report, option=orjson.OPT_INDENT_2))
    return 0 if ok_volume and not failures else 1


def _median_of(runs: dict[str, list[dict[str, Any]]], key: str) -> float | None:
    values = [r[key] for rs in runs.values() for r in rs if key in r]
    return statistics.median(values) if values else None


def _print_report(report: dict[str, Any], out: TextIO) -> None:
    def p(line: str = "") -> None:
        print(line, file=out)

    prefill = f"prefill {report['prefill']:,}" if report["prefill"] else "no prefill"
    p(
        f"cme bench peers  (CPython {report['python']}, {report['ops']:,} ops, seed {report['seed']},"
        f" {prefill}; medians of {report['repeats']} interleaved runs, one fresh process per engine and run)"
    )
    p("flow: " + ", ".join(f"{k} {v:,}" for k, v in report["flow"].items()))
    rows = {r["engine"]: r for r in report["engines"]}
    ratio_cols = [c for c in RATIO_COLUMNS if c in rows]
    head = f"{'engine':<20} {'version':<16} {'ops/s':>11}"
    head += "".join(f" {'x ' + c:>11}" for c in ratio_cols)
    head += f" {'p50 us':>8} {'p99 us':>8} {'trades':>9} {'volume':>11}"
    p(head)
    for r in rows.values():
        version = r["version"] + (f" {r['build']}" if r["build"] else "")
        line = f"{r['engine']:<20} {version:<16} {r['ops_per_s']:>11,}"
        line += "".join(f" {r['ops_per_s'] / rows[c]['ops_per_s']:>11.2f}" for c in ratio_cols)
        line += f" {r['p50_us']:>8.2f} {r['p99_us']:>8.2f} {r['trades']:>9,} {r['volume']:>11,}"
        p(line)
    floor = report["timer_floor_ns"]
    if floor is not None:
        p(f"latency: the clock around each op, its own ~{floor:.0f} ns included")
    for s in report["skipped"]:
        p(f"SKIPPED {s['engine']}: {s['why']}; install the peers with: {INSTALL_HINT}")
    for f in report["failed"]:
        p(f"FAIL {f['engine']}: {f['error']}")
    for w in report["warnings"]:
        p(w)
    for line in report["volume_check"]["lines"]:
        p(line)
    if report["targets"]:
        p("targets (figures, not a gate):")
    for t in report["targets"]:
        if t["met"] is None:
            p(f"  {t['target']:<38} n/a ({t['note']})")
        else:
            value = f"{t['value']:.2f} {t['unit']}"
            p(f"  {t['target']:<38} {value:>10}  {'met' if t['met'] else 'MISSED'}")


def run_from_args(args: argparse.Namespace) -> int:
    cfg = PeersConfig(
        ops=args.commands or 200_000,
        seed=args.seed,
        prefill=args.prefill,
        repeats=max(1, args.repeats or 3),
        quiet=args.quiet,
        json_path=args.json,
    )
    return run(cfg, select(args.engines))
