"""The chaos soak's fault schedule: a pure function of its seed, bounded, never overlapping faults on
one target group, and (with cover) every kind and target early on."""

from __future__ import annotations

import pytest

from services.chaos.schedule import (
    KILL,
    KILL_HOLD,
    KINDS,
    RESTART,
    SETTLE,
    STALL,
    STALL_HOLD,
    TARGETS,
    counts,
    group,
    make_schedule,
)


def test_same_seed_same_schedule_and_another_seed_another() -> None:
    a = make_schedule(7, 120.0)
    assert a == make_schedule(7, 120.0)
    assert a != make_schedule(8, 120.0)


@pytest.mark.parametrize("seed", range(20))
def test_faults_are_bounded_in_time_count_and_hold(seed: int) -> None:
    seconds, gap = 60.0, (2.0, 5.0)
    faults = make_schedule(seed, seconds, gap=gap, start=1.0)
    assert faults, "a minute always has room for faults"
    assert len(faults) <= seconds / gap[0]
    assert all(f.at >= 1.0 and f.ends <= seconds for f in faults)
    assert [f.at for f in faults] == sorted(f.at for f in faults)
    for f in faults:
        assert f.kind in KINDS and f.target in TARGETS
        if f.kind == KILL:
            assert KILL_HOLD[0] <= f.hold <= KILL_HOLD[1]
        elif f.kind == STALL:
            assert STALL_HOLD[0] <= f.hold <= STALL_HOLD[1]
        else:
            assert f.kind == RESTART and f.hold == 0


@pytest.mark.parametrize("seed", range(20))
def test_faults_on_one_group_never_overlap(seed: int) -> None:
    """Nor follow each other within SETTLE seconds. The two matchers are one group: one is never
    stalled while the other is down."""
    busy: dict[str, float] = {}
    for f in make_schedule(seed, 120.0, gap=(0.5, 1.0)):
        assert f.at >= busy.get(group(f.target), 0.0), f
        busy[group(f.target)] = f.ends + SETTLE
    assert group("standby") == group("matcher") != group("redis")


@pytest.mark.parametrize("seed", range(20))
def test_cover_puts_every_kind_and_target_first(seed: int) -> None:
    faults = make_schedule(seed, 60.0, gap=(1.5, 3.0), cover=True)
    first = faults[: len(TARGETS)]
    assert {f.target for f in first} == set(TARGETS)
    assert {f.kind for f in first} == set(KINDS)


def test_only_the_given_kinds_and_targets() -> None:
    faults = make_schedule(3, 120.0, kinds=(STALL,), targets=("feeds-1", "matcher"))
    assert faults and {f.kind for f in faults} == {STALL}
    assert {f.target for f in faults} <= {"feeds-1", "matcher"}
    assert make_schedule(3, 120.0, targets=()) == []
    assert counts(faults) == {KILL: 0, STALL: len(faults), RESTART: 0}


def test_too_short_a_run_has_no_faults() -> None:
    assert make_schedule(1, 1.5) == []
