"""Exec ids in rendered payloads: numbering, the payload header, and count_execs (what replay uses
instead of rendering) against render itself."""

from __future__ import annotations

import orjson

from services.bench.flow import SYMBOL as FLOW_SYMBOL
from services.bench.flow import FlowConfig, generate
from services.matcher.engine import Engine
from services.matcher.events import REJECTED
from shared.ids import entry_to_seq, seq_ms, seq_to_entry
from shared.instruments import Instrument
from shared.wire import Rendered, count_execs, frame, render, split_exec_line, unframe, unframe_exec
from tests.matcher import BTC, INSTRUMENTS, Flow

SEQ0 = entry_to_seq("1700000000000-0")


def test_count_execs_is_the_number_of_exec_lines_render_makes() -> None:
    inst = INSTRUMENTS[BTC]
    for seed in range(5):
        flow, engine, out = Flow(seed), Engine([inst]), Rendered()
        kinds: set[str] = set()
        for i in range(2_000):
            cmd = flow.command(BTC)
            seq = SEQ0 + i
            events = engine.apply(cmd, seq, seq_ms(seq))
            before = len(out.execs)
            render(events, inst, seq_ms(seq), out)
            assert count_execs(events) == len(out.execs) - before, events
            kinds.update(e[0] for e in events)
            flow.appended(BTC, seq_to_entry(seq), cmd)
        assert {"accepted", "trade", "cancelled", "amended", "rejected"} <= kinds
    silent = (REJECTED, BTC, "cancel", None, None, None, "UNKNOWN_ORDER")  # nobody to tell
    out = Rendered()
    render([silent], inst, 0, out)
    assert count_execs([silent]) == 0 == len(out.execs)


def test_count_execs_agrees_with_render_on_the_other_order_types() -> None:
    """The bench's flow with stops, GTD, icebergs and quote quantity: triggered reports included."""
    cfg = FlowConfig(3_000, seed=5, order_types="all")
    inst = Instrument(FLOW_SYMBOL)
    engine, out = Engine([inst]), Rendered()
    kinds: set[str] = set()
    for cmd, seq in generate(cfg)[1]:
        events = engine.apply(cmd, seq, seq)
        before = len(out.execs)
        render(events, inst, seq, out)
        assert count_execs(events) == len(out.execs) - before, events
        kinds.update(e[0] if e[0] != "cancelled" else e[-1] for e in events)
    assert {"triggered", "expired", "trade"} <= kinds
    triggered = [orjson.loads(split_exec_line(line)[1]) for line in out.execs if b'"triggered"' in line]
    assert triggered and all(m["status"] == "new" and m["stop_price"] for m in triggered)


def test_exec_lines_are_numbered_from_the_running_count() -> None:
    inst = INSTRUMENTS[BTC]
    engine, out = Engine([inst]), Rendered(41)
    flow = Flow(3)
    for i in range(50):
        seq = SEQ0 + i
        render(engine.apply(flow.command(BTC), seq, seq_ms(seq)), inst, seq_ms(seq), out)
    ids = [orjson.loads(split_exec_line(line)[1])["exec_id"] for line in out.execs]
    assert ids == list(range(42, 42 + len(ids))) and out.exec_seq == 41 + len(ids)
    _, _, execs = out.payloads(123)
    assert execs is not None and execs.startswith(b"#123 42\n")
    assert unframe_exec(execs) == (123, 42, out.execs)
    assert unframe(execs) == (123, out.execs)


def test_older_payload_forms_still_parse() -> None:
    lines = [b'alice {"type":"reject"}']
    assert unframe_exec(frame(lines, 5) or b"") == (5, None, lines)
    assert unframe_exec(lines[0]) == (0, None, lines)
    assert frame([], 5, 1) is None
