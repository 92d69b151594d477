"""`cme fuzz` in make test: a bounded seeded run against a stack of real processes (services/fuzz.py)."""

from __future__ import annotations

import pytest

from services.fuzz import CLOSE, TEXT, Generator, fuzz_own_stack, split_frames, summary, ws_frame


def test_the_generator_is_seeded() -> None:
    one, two = Generator(3, "gateway", 16_384), Generator(3, "gateway", 16_384)
    first = [one.next().kind for _ in range(200)]
    again = [two.next().kind for _ in range(200)]
    assert first == again and len(set(first)) > 5


def test_frames_round_trip() -> None:
    wire = ws_frame(TEXT, b"x" * 70_000, mask=False) + ws_frame(CLOSE, b"\x03\xe8", mask=False) + b"\x81"
    frames, rest = split_frames(wire)
    assert frames == [(TEXT, b"x" * 70_000), (CLOSE, b"\x03\xe8")] and rest == b"\x81"


@pytest.mark.e2e
@pytest.mark.timeout(120)
def test_fuzz_20000_messages_no_anomaly() -> None:
    """10,000 generated messages and frames per server: no traceback or ERROR in the gateway's and the
    feeds' logs, no 1011, neighbours never closed (orders acked, l2 seq unbroken), RSS under 256 MiB."""
    report = fuzz_own_stack(seed=20_000, messages=10_000, connections=2, max_rss=256 << 20, quiet=True)
    text = summary(report, 0.0, 256 << 20)
    assert not report.anomalies, text
    assert sum(report.sent.values()) == 20_000 and report.acked > 0 and report.l2_messages > 0, text
    assert report.max_rss and report.closes, text
