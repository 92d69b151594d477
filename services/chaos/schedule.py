"""The chaos soak's fault schedule: a pure function of a seed (no clock, no I/O).

A fault names a kind (kill -9 then a restart after `hold` seconds, a SIGSTOP for `hold` seconds then
SIGCONT, or a graceful SIGTERM-and-start restart) and a target role. Roles are resolved when the fault
fires: "matcher" is whichever matcher holds the lease then, "standby" the other one.

Faults on one target group never overlap, and leave SETTLE seconds between them (the two matchers
form one group: stalling the standby while the holder is down would leave nobody to watch), so every
fault acts on a process that is running normally. Faults on different groups may overlap: a Redis
kill during a gateway stall is exactly the kind of combination a soak is for.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

KILL, STALL, RESTART = "kill", "stall", "restart"
KINDS = (KILL, STALL, RESTART)
MATCHER, STANDBY, REDIS = "matcher", "standby", "redis"
TARGETS = (MATCHER, STANDBY, "gateway-1", "gateway-2", "feeds-1", "feeds-2", REDIS)

KILL_HOLD = (0.2, 2.0)  # seconds a killed process stays down before it is started again
STALL_HOLD = (1.0, 4.0)  # seconds a stalled process stays stopped
RESTART_BUSY = 3.0  # seconds a graceful restart occupies its target (stop, start, recover)
SETTLE = 1.5  # seconds after a fault before its group's next: time to show what the fault did (a woken
# matcher tries its stale commit and is fenced; a restarted one recovers) before something else hits it


@dataclass(frozen=True)
class Fault:
    at: float  # seconds after the soak started
    kind: str  # KILL | STALL | RESTART
    target: str  # one of TARGETS
    hold: float  # KILL: seconds down before the restart; STALL: seconds stopped; RESTART: 0

    @property
    def ends(self) -> float:
        """When the target is back to normal, as far as the schedule is concerned."""
        return self.at + (self.hold if self.kind != RESTART else RESTART_BUSY)

    def describe(self) -> str:
        what = {KILL: f"kill -9, back after {self.hold:.1f} s", STALL: f"SIGSTOP for {self.hold:.1f} s"}
        return f"t={self.at:6.1f}s {self.target:<10} {what.get(self.kind, 'graceful restart')}"


def group(target: str) -> str:
    """Targets in one group never have overlapping faults."""
    return MATCHER if target in (MATCHER, STANDBY) else target


def make_schedule(
    seed: int,
    seconds: float,
    *,
    kinds: tuple[str, ...] = KINDS,
    targets: tuple[str, ...] = TARGETS,
    gap: tuple[float, float] = (2.0, 5.0),
    start: float = 1.0,
    cover: bool = False,
) -> list[Fault]:
    """Faults from `start` on, one every `gap` seconds (uniform), each over before `seconds`.

    With `cover`, the first faults go through every kind and every target at least once (a short run
    still exercises each), in a seeded order; after that kinds and targets are drawn at random."""
    if not kinds or not targets:
        return []
    rng = random.Random(seed)
    planned = _covering(rng, kinds, targets) if cover else []
    busy: dict[str, float] = {}  # group -> when its last fault ends
    out: list[Fault] = []
    t = start
    while True:
        kind, target = planned.pop(0) if planned else (rng.choice(kinds), rng.choice(targets))
        t = max(t, busy.get(group(target), 0.0))
        fault = Fault(t, kind, target, _hold(rng, kind))
        if fault.ends > seconds:
            return out
        out.append(fault)
        busy[group(target)] = fault.ends + SETTLE
        t += rng.uniform(*gap)


def _covering(rng: random.Random, kinds: tuple[str, ...], targets: tuple[str, ...]) -> list[tuple[str, str]]:
    k, g = list(kinds), list(targets)
    rng.shuffle(k)
    rng.shuffle(g)
    n = max(len(k), len(g))
    return [(k[i % len(k)], g[i % len(g)]) for i in range(n)]


def _hold(rng: random.Random, kind: str) -> float:
    if kind == KILL:
        return round(rng.uniform(*KILL_HOLD), 2)
    if kind == STALL:
        return round(rng.uniform(*STALL_HOLD), 2)
    return 0.0


def counts(faults: list[Fault]) -> dict[str, int]:
    """How many faults of each kind."""
    out = dict.fromkeys(KINDS, 0)
    for f in faults:
        out[f.kind] = out.get(f.kind, 0) + 1
    return out
