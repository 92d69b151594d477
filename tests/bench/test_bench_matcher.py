"""`cme bench matcher` runs the real matcher on a preloaded stream and reports every figure (no timing
is asserted: see README)."""

from __future__ import annotations

from pathlib import Path
from types import FrameType
from typing import Any

import orjson

from services.bench.flow import SYMBOL, FlowConfig, FlowGenerator
from services.bench.matcher import entry_id, funding, matcher_seq
from services.cli import main
from shared.ids import entry_to_seq
from shared.instruments import Instrument, asset_scales


def test_entry_ids_map_to_the_seqs_cancels_name() -> None:
    seqs = [1, 1023, 1024, 1025, 999_999]
    assert [entry_to_seq(entry_id(s)) for s in seqs] == [matcher_seq(s) for s in seqs]
    assert sorted(matcher_seq(s) for s in seqs) == [matcher_seq(s) for s in seqs]


def test_bench_matcher_commits_the_whole_flow_with_the_cores_outcome(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    assert main(["bench", "matcher", "-n", "3000", "--batch", "500", "--quiet", "--json", str(out)]) == 0
    report = orjson.loads(out.read_bytes())
    flow = FlowGenerator(FlowConfig(3000, 42))
    for _ in flow.flow():
        pass
    # Same trades as the flow's own engine: every cancel reached the order it names.
    assert report["applied"] == 3000 and report["trades"] == flow.book.trade_seq > 0
    assert report["batches"]["count"] >= 6 and report["batches"]["max"] <= 500
    # Every read's commits go out in one round trip (the next read's, or the one after it).
    assert report["commit_roundtrip_ms"]["count"] == report["batches"]["count"]
    assert all(report["published"][ch]["messages"] > 0 for ch in ("md", "trades", "exec"))
    cpu = report["cpu_us_per_command"]
    assert cpu["matcher"] > 0 and cpu["redis"] >= 0
    assert {"decode", "core", "render", "matcher loop", "redis client"} <= set(cpu["matcher_split"])


def test_bench_matcher_with_balances_runs_the_venue_matcher_to_the_same_trades(tmp_path: Path) -> None:
    """--risk on: funded accounts first, then the same flow through the venue matcher; the deposits
    are so large that no order is refused, so the trades are the flow's own."""
    out = tmp_path / "bench.json"
    argv = ["bench", "matcher", "-n", "2000", "--batch", "500", "--risk", "on", "--quiet", "--json", str(out)]
    assert main(argv) == 0
    report = orjson.loads(out.read_bytes())
    flow = FlowGenerator(FlowConfig(2000, 42))
    for _ in flow.flow():
        pass
    assert report["balances"] is True and report["funding_entries"] == len(
        funding(asset_scales([Instrument(SYMBOL)]))
    )
    assert report["applied"] == 2000 + report["funding_entries"]
    assert report["trades"] == flow.book.trade_seq > 0
    assert "read model" in report["cpu_us_per_command"]["matcher_split"]


def test_the_sampler_disarms_its_timer() -> None:
    """An armed ITIMER_PROF left behind kills the process once SIGPROF's handler is gone."""
    import signal

    from services.bench.matcher import Sampler

    sampler = Sampler()
    sampler.start()
    assert signal.getitimer(signal.ITIMER_PROF)[0] > 0
    sampler.stop()
    assert signal.getitimer(signal.ITIMER_PROF) == (0.0, 0.0)
    assert signal.getsignal(signal.SIGPROF) == signal.SIG_DFL


def test_the_compiled_renderers_time_is_charged_to_render(monkeypatch: Any) -> None:
    """The compiled shared.wire.render has no Python frame: the sampler sees the wrapper's frame, which
    must count as render (not as the loop around it). A stand-in renderer hands back that frame."""
    import sys

    from services.bench import matcher as bench
    from services.matcher import service, venue
    from shared import wire

    frames: list[FrameType] = []
    monkeypatch.setattr(bench, "render", lambda *args: frames.append(sys._getframe(1)))
    bench._framed_render(1, 2)
    sampler = bench.Sampler()
    sampler._charge(frames[0])
    assert sampler.seconds["render"] > 0 and sampler.seconds["other"] == 0
    assert service.render is wire.render and venue.render is wire.render  # a bench run puts them back


def test_the_services_own_code_is_charged_to_the_matcher_loop_not_to_the_redis_client() -> None:
    """Every stack ends in asyncio's frames (the Redis client's category): a sample in the service's
    own code must stop at the service's frame."""
    import sys

    from services.bench import matcher as bench
    from services.matcher import venue

    frames: list[FrameType] = []
    exec(compile("frames.append(sys._getframe(0))", venue.__file__, "exec"), {"frames": frames, "sys": sys})
    sampler = bench.Sampler()
    sampler._charge(frames[0])
    assert sampler.seconds["matcher loop"] > 0 and sampler.seconds["redis client"] == 0
