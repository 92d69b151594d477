"""The pure pieces of shared/wsguard.py and the metrics port's /healthz (shared/metrics.py)."""

from __future__ import annotations

import resource
import time

import pytest

from shared import metrics
from shared.wsguard import REFUSED_GLOBAL, REFUSED_PER_IP, ConnectionLimiter, ReadGate, connection_cap


def test_limiter_counts_per_address_and_in_total() -> None:
    limiter = ConnectionLimiter(max_total=3, max_per_ip=2)
    assert limiter.admit("a") is None and limiter.admit("a") is None
    assert limiter.admit("a") == REFUSED_PER_IP
    assert limiter.admit("b") is None
    assert limiter.admit("c") == REFUSED_GLOBAL
    limiter.release("a")
    assert limiter.admit("c") is None  # a released slot is free again, for anyone
    for ip in ("a", "b", "c"):
        limiter.release(ip)
    assert limiter.total == 0 and limiter.by_ip == {}
    with pytest.raises(ValueError):
        ConnectionLimiter(0, 1)


def test_read_gate_resumes_only_when_every_reason_is_gone() -> None:
    calls: list[str] = []
    gate = ReadGate(lambda: calls.append("pause"), lambda: calls.append("resume"))
    other = 1  # any other bit
    gate.hold(ReadGate.WRITE)
    gate.hold(other)
    gate.release(other)  # that reason is gone, but writes are still paused
    assert calls == ["pause"]
    gate.release(ReadGate.WRITE)
    gate.release(ReadGate.WRITE)
    assert calls == ["pause", "resume"]


def test_the_global_cap_stays_under_the_open_files_limit() -> None:
    soft = connection_cap(10**9, reserve=100) + 100
    assert soft == resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    assert soft == resource.getrlimit(resource.RLIMIT_NOFILE)[1]  # the soft limit was raised to the hard
    assert connection_cap(20) == 20


def test_healthz_reports_a_stalled_loop() -> None:
    beat = metrics.Heartbeat(stale_after=5.0)
    assert beat.healthy()  # no loop beats here: nothing to be stale
    beat.last = time.monotonic()
    assert beat.healthy()
    beat.last = time.monotonic() - 6.0
    assert not beat.healthy()
