"""`cme bench e2e --stack-risk both`: what balances cost the whole stack, measured as a pair.

Each round starts two private stacks side by side, one without balances and one with, drives one
freshly generated plan through one and then the same plan through the other, the first of each round
alternating (off-on, on-off, ...), and stops both: the neighbours' noise, when it lasts longer than a
leg, falls on both alike (runs alternated by hand, minutes apart, spread 0.72-1.19x on a busy day).
Before each leg the driver waits until both stacks are idle, so that the other's start or its last
leg's checkpoint and read-model writes do not fall into the window. The figure is the median of
the rounds' ratios, as `cme bench core --risk both` takes the median of its lockstep slices.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import time
import uuid
from dataclasses import asdict
from pathlib import Path
from typing import Any

import orjson

from services.bench.e2e import Load, Plan, build_plan, drive, load_from_args, say, stack_pids, start_stack
from services.bench.matcher import proc_cpu_s

RISKS = ("off", "on")
IDLE_CORES = 0.05  # both stacks together below this share of one core: the last leg's work is done
IDLE_SAMPLE_S = 0.25
IDLE_TIMEOUT_S = 15.0
TARGET_RATIO = 0.90  # issue 10: balances lose at most 10 % end to end


def run_from_args(args: argparse.Namespace) -> int:
    if args.gateway is not None or getattr(args, "order_types", "plain") != "plain":
        raise SystemExit("--stack-risk both starts its own two stacks and runs the plain flow")
    return run_pairs(load_from_args(args), max(1, args.rounds), args.quiet, args.json)


def run_pairs(load: Load, rounds: int, quiet: bool, json_path: str | None) -> int:
    legs: list[dict[str, dict[str, Any]]] = []
    say(quiet, f"cme bench e2e --stack-risk both: {rounds} rounds of {load.duration:g} s per stack")
    try:
        for r in range(rounds):
            order = RISKS if r % 2 == 0 else RISKS[::-1]
            plan = build_plan(load.commands, load.seed, load.clients, uuid.uuid4().hex[:6], quiet, "plain",
                              load.duration)  # fmt: skip
            legs.append(_round(plan, order, load, quiet))
            say(quiet, f"  round {r + 1}/{rounds}: on / off {_ratio(legs[-1]['on'], legs[-1]['off']):.3f}")
    except (RuntimeError, OSError) as exc:
        print(f"cme bench e2e: {exc}", file=sys.stderr)
        return 2
    report = summarise(legs, load)
    _print(report)
    if json_path:
        Path(json_path).write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2))
    clean = all(
        not leg["lost_reports"] and not leg["missing_acks"] and not leg["errors"]
        for got in legs
        for leg in got.values()
    )
    return 0 if clean else 1


def _round(plan: Plan, order: tuple[str, ...], load: Load, quiet: bool) -> dict[str, dict[str, Any]]:
    """One leg per stack, in `order`, each on a stack of its own started for the round: every leg
    then meets what a single `cme bench e2e` meets (an empty book, a short AOF, no rewrite of it
    under way), and the two of a round run back to back."""
    stacks: dict[str, Any] = {}
    tmps: list[str] = []
    try:
        for risk in order:
            stacks[risk], tmp = start_stack(quiet, risk)
            tmps.append(tmp)
        got: dict[str, dict[str, Any]] = {}
        for risk in order:
            _wait_idle(list(stacks.values()))
            say(quiet, f"[balances {risk}]")
            got[risk] = drive(stacks[risk].endpoints()["gateway"], plan, load.procs, load.rate, load.duration,
                              load.window, quiet, stacks[risk])  # fmt: skip
        return got
    finally:
        for stack in stacks.values():
            stack.stop()
        for tmp in tmps:
            shutil.rmtree(tmp, ignore_errors=True)


def summarise(legs: list[dict[str, dict[str, Any]]], load: Load) -> dict[str, Any]:
    """Per round the on / off ratios of sustained rate and of total CPU per command; their medians; and
    each process's CPU per command, the mean over the rounds, per side."""
    rounds: list[dict[str, Any]] = [
        {
            "first": next(iter(got)),  # legs are kept in the order they ran
            "sustained_per_s": {risk: got[risk]["sustained_per_s"] for risk in RISKS},
            "ratio": round(_ratio(got["on"], got["off"]), 3),
            "cpu_ratio": round(_total_cpu(got["on"]) / max(1e-9, _total_cpu(got["off"])), 3),
        }
        for got in legs
    ]
    cpu: dict[str, dict[str, float]] = {}
    for risk in RISKS:
        names = set.intersection(*(set(got[risk]["cpu_us_per_command"]) for got in legs))
        cpu[risk] = {
            name: round(statistics.fmean(got[risk]["cpu_us_per_command"][name] for got in legs), 1)
            for name in sorted(names)
        }
    median = float(statistics.median(r["ratio"] for r in rounds))
    report: dict[str, Any] = {
        "load": asdict(load),
        "rounds": rounds,
        "median_ratio": round(median, 3),
        "median_cpu_ratio": round(statistics.median(r["cpu_ratio"] for r in rounds), 3),
        "cpu_us_per_command": cpu,
        "lost_reports": sum(leg["lost_reports"] for got in legs for leg in got.values()),
        "legs": legs,
    }
    if not load.rate:  # at an offered rate both keep up, and only the CPU ratio says anything
        report["target"] = {
            "target": f"as fast as possible: balances on / off >= {TARGET_RATIO:.2f} (median of rounds)",
            "figure": f"{median:.3f}",
            "met": median >= TARGET_RATIO,
        }
    return report


def _ratio(on: dict[str, Any], off: dict[str, Any]) -> float:
    return float(on["sustained_per_s"]) / max(1, int(off["sustained_per_s"]))


def _total_cpu(leg: dict[str, Any]) -> float:
    return float(sum(leg["cpu_us_per_command"].values()))


def _wait_idle(stacks: list[Any]) -> None:
    """Until the stacks' processes together use less than IDLE_CORES of a core, or IDLE_TIMEOUT_S."""
    deadline = time.monotonic() + IDLE_TIMEOUT_S
    pids = {f"{n}:{name}": pid for n, s in enumerate(stacks) for name, pid in stack_pids(s).items()}
    before = _cpu_total(pids)
    while time.monotonic() < deadline:
        time.sleep(IDLE_SAMPLE_S)
        for stack in stacks:
            stack.poll()  # the stack not driven still restarts a crashed service
        after = _cpu_total(pids)
        if after - before < IDLE_CORES * IDLE_SAMPLE_S:
            return
        before = after


def _cpu_total(pids: dict[str, int]) -> float:
    total = 0.0
    for pid in pids.values():
        try:
            total += proc_cpu_s(pid)
        except (OSError, ValueError, IndexError):  # restarted meanwhile: the next sample has it again
            continue
    return total


def _print(rep: dict[str, Any]) -> None:
    load = rep["load"]
    rate = f"{load['rate']:,.0f}/s offered" if load["rate"] else "as fast as possible"
    print(
        f"cme bench e2e --stack-risk both  ({load['clients']} clients, {rate}, {len(rep['rounds'])} rounds"
        f" of {load['duration']:g} s per stack, seed {load['seed']})"
    )
    print(f"{'round':<6} {'off /s':>9} {'on /s':>9} {'on/off':>7} {'CPU/cmd on/off':>15}")
    for n, r in enumerate(rep["rounds"], 1):
        s = r["sustained_per_s"]
        print(f"{n:<6} {s['off']:>9,} {s['on']:>9,} {r['ratio']:>7.3f} {r['cpu_ratio']:>15.3f}")
    print(f"median{'':<20} {rep['median_ratio']:>7.3f} {rep['median_cpu_ratio']:>15.3f}")
    for risk in RISKS:
        cpu = rep["cpu_us_per_command"][risk]
        print(f"CPU per command (us), balances {risk}: " + ", ".join(f"{k} {v:.1f}" for k, v in cpu.items()))
    print(f"lost reports {rep['lost_reports']}")
    if "target" in rep:
        t = rep["target"]
        print(f"target {'MET' if t['met'] else 'NOT MET'}: {t['target']} ({t['figure']})")
