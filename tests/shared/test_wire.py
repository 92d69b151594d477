"""Exec ids in rendered payloads: numbering, the payload header, and count_execs (what replay uses
instead of rendering) against render itself; render's bytes against a dict + orjson reference."""

from __future__ import annotations

import random
from decimal import Decimal
from typing import Any

import orjson
import pytest

from services.bench.flow import ACCOUNTS as FLOW_ACCOUNTS
from services.bench.flow import SYMBOL as FLOW_SYMBOL
from services.bench.flow import FlowConfig, funding_units, generate
from services.matcher.engine import Engine
from shared import instruments
from shared.codes import reason_for
from shared.commands import Command, Deposit, Withdraw
from shared.decimals import units_to_amount
from shared.events import REJECTED, Event
from shared.ids import entry_to_seq, seq_ms, seq_to_entry
from shared.instruments import Instrument
from shared.wire import Rendered, count_execs, frame, render, split_exec_line, unframe, unframe_exec
from tests.matcher import ACCOUNTS, BTC, INSTRUMENTS, Flow

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


# Differential test: render against the straightforward form it replaced, a dict per message given to
# orjson (kept here as the reference). Byte equality over long flows with every event kind, balances
# under several asset scales, and client strings that need escaping.
def _ref_exec(symbol: str, oid: int, cid: str | None, side: str, status: str, exec_type: str,
              price: str | None, quantity: str, filled: str, remaining: str, last_price: str | None,
              last_qty: str | None, fee: str, liquidity: str | None, trade_id: int | None,
              ts: int) -> dict[str, Any]:  # fmt: skip
    return {
        "type": "execution", "order_id": seq_to_entry(oid), "client_order_id": cid, "symbol": symbol,
        "side": side, "status": status, "exec_type": exec_type, "price": price, "quantity": quantity,
        "filled_quantity": filled, "remaining_quantity": remaining, "last_price": last_price,
        "last_quantity": last_qty, "fee": fee, "liquidity": liquidity, "trade_id": trade_id, "ts": ts,
    }  # fmt: skip


def _reference(events: list[Event], inst: Instrument, ts: int, exec_seq: int, recv_ns: int, now_ns: int,
               scales: dict[str, int] | None) -> tuple[list[bytes], list[bytes], list[bytes]]:  # fmt: skip
    """(md, trades, exec) lines of one command, exec ids numbered on from exec_seq."""
    md: list[bytes] = []
    trades: list[bytes] = []
    execs: list[bytes] = []
    p, q, f, z = inst.price_str, inst.qty_str, inst.fee_str, inst.zero_fee

    def opt(price: int | None) -> str | None:
        return None if price is None else p(price)

    def add(account: str, msg: dict[str, Any]) -> None:
        msg["exec_id"] = exec_seq + len(execs) + 1
        execs.append(account.encode() + b" " + orjson.dumps(msg))

    for e in events:
        kind = e[0]
        if kind == "book":
            _, symbol, seq, changes, (bid, bid_qty, ask, ask_qty) = e
            md.append(orjson.dumps({
                "type": "l2_update", "symbol": symbol, "seq": seq,
                "changes": [[side, p(price), q(total)] for side, price, total in changes],
                "bbo": {"bid": None if bid is None else [p(bid), q(bid_qty)],
                        "ask": None if ask is None else [p(ask), q(ask_qty)]},
            }))  # fmt: skip
        elif kind == "trade":
            (_, symbol, trade_id, price, qty, aggressor, m_oid, m_account, m_cid, m_qty, m_leaves, m_fee,
             t_oid, t_account, t_cid, t_price, t_qty, t_leaves, t_fee, tts) = e  # fmt: skip
            latency_us = (now_ns - recv_ns) // 1000 if recv_ns and now_ns else None
            trades.append(orjson.dumps({
                "type": "trade", "symbol": symbol, "trade_id": trade_id, "price": p(price),
                "quantity": q(qty), "aggressor_side": aggressor, "maker_order_id": seq_to_entry(m_oid),
                "taker_order_id": seq_to_entry(t_oid), "maker_fee": f(m_fee), "taker_fee": f(t_fee),
                "ts": tts, "latency_us": latency_us,
            }))  # fmt: skip
            m_side = "sell" if aggressor == "buy" else "buy"
            add(m_account, _ref_exec(symbol, m_oid, m_cid, m_side, "filled" if m_leaves == 0 else
                "partially_filled", "trade", p(price), q(m_qty), q(m_qty - m_leaves), q(m_leaves), p(price),
                q(qty), f(m_fee), "maker", trade_id, tts))  # fmt: skip
            add(t_account, _ref_exec(symbol, t_oid, t_cid, aggressor, "filled" if t_leaves == 0 else
                "partially_filled", "trade", opt(t_price), q(t_qty), q(t_qty - t_leaves), q(t_leaves),
                p(price), q(qty), f(t_fee), "taker", trade_id, tts))  # fmt: skip
        elif kind == "accepted":
            _, symbol, oid, account, cid, side, _, _, price, qty = e
            add(account, _ref_exec(symbol, oid, cid, side, "new", "new", opt(price), q(qty), q(0), q(qty),
                None, None, z, None, None, ts))  # fmt: skip
        elif kind == "cancelled":
            _, symbol, oid, account, cid, side, price, qty, leaves, reason = e
            msg = _ref_exec(symbol, oid, cid, side, "cancelled", "cancelled", opt(price), q(qty),
                            q(qty - leaves), q(0), None, None, z, None, None, ts)  # fmt: skip
            add(account, {**msg, "reason": reason})
        elif kind == "triggered":
            _, symbol, oid, account, cid, side, _, _, price, stop_price, qty = e
            msg = _ref_exec(symbol, oid, cid, side, "new", "triggered", opt(price), q(qty), q(0), q(qty),
                            None, None, z, None, None, ts)  # fmt: skip
            add(account, {**msg, "stop_price": p(stop_price)})
        elif kind == "amended":
            _, symbol, oid, account, cid, side, price, qty, leaves = e
            status = "new" if qty == leaves else "partially_filled"
            add(account, _ref_exec(symbol, oid, cid, side, status, "amended", p(price), q(qty),
                q(qty - leaves), q(leaves), None, None, z, None, None, ts))  # fmt: skip
        elif kind == "rejected":
            _, _, op, oid, account, cid, code = e
            if account is None:
                continue
            if op in ("deposit", "withdraw", "faucet"):
                msg = {"type": "reject", "op": op, "symbol": inst.symbol, "request_id": cid, "code": code,
                       "reason": reason_for(code)}  # fmt: skip
            elif op == "new" and oid is not None:
                msg = {"type": "execution", "order_id": seq_to_entry(oid), "client_order_id": cid,
                       "symbol": inst.symbol, "status": "rejected", "exec_type": "rejected", "code": code,
                       "reason": reason_for(code), "ts": ts}  # fmt: skip
            else:
                msg = {"type": "reject", "op": op, "symbol": inst.symbol,
                       "order_id": None if oid is None else seq_to_entry(oid), "client_order_id": cid,
                       "code": code, "reason": reason_for(code)}  # fmt: skip
            add(account, msg)
        elif kind == "balance":
            _, _, account, asset, available, held = e
            if account.startswith("_"):
                continue
            assert scales is not None
            add(account, {"type": "balance", "symbol": inst.symbol, "account": account, "asset": asset,
                          "available": units_to_amount(available, scales[asset]),
                          "held": units_to_amount(held, scales[asset]), "ts": ts})  # fmt: skip
        elif kind == "funded":
            _, _, op, account, asset, amount, request_id = e
            if account.startswith("_"):
                continue
            assert scales is not None
            add(account, {"type": "funded", "symbol": inst.symbol, "op": op, "account": account,
                          "asset": asset, "amount": units_to_amount(amount, scales[asset]),
                          "request_id": request_id, "ts": ts})  # fmt: skip
    return md, trades, execs


# Client strings as validation lets them through (printable ASCII: quotes and backslashes too) and
# beyond it (controls, non-ASCII, JSON's and JavaScript's line separators), each escaped as orjson does.
WEIRD = ['"', "\\", 'a"b\\c', '\\"', "'", "</script>", " ", "tab\tnl\ncr\r", "\x00\x1f\x7f", "é", "雪",
         "\U0001f389", "\u2028\u2029", "{}[],:", "null", "c-" + "x" * 34]  # fmt: skip
# Where events carry client strings: (kind, position) of client order ids / request ids and accounts.
CID_AT = {"accepted": (4,), "cancelled": (4,), "amended": (4,), "triggered": (4,), "rejected": (5,),
          "trade": (8, 14), "funded": (6,)}  # fmt: skip
ACCOUNT_AT = {"accepted": (3,), "cancelled": (3,), "amended": (3,), "triggered": (3,), "rejected": (4,),
              "trade": (7, 13), "balance": (2,), "funded": (3,)}  # fmt: skip


def _weird(events: list[Event], rng: random.Random) -> list[Event]:
    """The events with client order ids, request ids and account names swapped for awkward ones."""
    out = []
    for e in events:
        fields = list(e)
        for i in CID_AT.get(e[0], ()):
            fields[i] = rng.choice([*WEIRD, None])
        for i in ACCOUNT_AT.get(e[0], ()):
            fields[i] = rng.choice([*WEIRD, "_fees", "_x"])
        out.append(tuple(fields))
    return out


def _flows() -> list[tuple[Instrument, dict[str, int], list[tuple[list[Event], int]]]]:
    """(instrument, the engine's asset scales, per command its events and ts) of three flows: the bench's
    flow with every order type and balances on; the matcher tests' flow (amends, rejects of every order
    op) with balances on; funding (deposits, withdrawals, their rejects) with balances moving."""
    flows = []
    cfg = FlowConfig(3_000, seed=7, order_types="all")
    inst = Instrument(FLOW_SYMBOL)
    engine = Engine([inst], risk=True)
    assert engine.ledger is not None
    rich = {asset: [units, 0] for asset, units in funding_units(engine.ledger.scales).items()}
    engine.ledger.set_balances({account: rich for account in FLOW_ACCOUNTS})
    pre, steps = generate(cfg)
    flows.append((inst, engine.ledger.scales, [(engine.apply(c, s, s), s) for c, s in pre + steps]))

    inst = INSTRUMENTS[BTC]
    engine, flow, cmds = Engine([inst], risk=True), Flow(11), []
    assert engine.ledger is not None
    engine.ledger.set_balances({a: {"BTC": [10**9, 0], "USDT": [10**20, 0]} for a in ACCOUNTS[:4]})
    for i in range(3_000):  # erin has no balances: her orders are refused
        cmd, seq = flow.command(BTC), SEQ0 + i
        cmds.append((engine.apply(cmd, seq, seq_ms(seq)), seq_ms(seq)))
        flow.appended(BTC, seq_to_entry(seq), cmd)
    flows.append((inst, engine.ledger.scales, cmds))

    engine, cmds, rng = Engine([inst], risk=True), [], random.Random(3)
    for i in range(500):
        account, asset = rng.choice(ACCOUNTS), rng.choice(["BTC", "USDT", "DOGE"])
        amount = rng.choice([1, 7, 10**5, 10**10 + 1, 10**22, rng.randrange(1, 10**25)])
        rid = rng.choice([None, f"r-{i}"])
        funding: Command = (Deposit if rng.random() < 0.6 else Withdraw)(account, asset, amount, rid)
        cmds.append((engine.apply(funding, SEQ0 + i, 1_700_000_000_000 + i), 1_700_000_000_000 + i))
    assert engine.ledger is not None
    flows.append((inst, engine.ledger.scales, cmds))
    return flows


def test_render_is_byte_identical_to_the_dict_and_orjson_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = random.Random(1)
    kinds: set[str] = set()
    for memo_max in (instruments.MEMO_MAX, 3):  # 3: the memos clear all the time
        monkeypatch.setattr(instruments, "MEMO_MAX", memo_max)
        for inst, engine_scales, cmds in _flows():
            # the scales are the renderer's to follow, whatever they are (0 places: a whole-unit asset)
            for scales in (engine_scales, {**dict.fromkeys(engine_scales, 0), "USDT": 15}):
                for weird in (False, True):
                    out = Rendered(100)
                    md: list[bytes] = []
                    trades: list[bytes] = []
                    execs: list[bytes] = []
                    for i, (events, ts) in enumerate(cmds):
                        if weird:
                            events = _weird(events, rng)
                        recv_ns = 0 if i % 3 == 0 else 1_700_000_000_000_000_000 + i  # 0: no latency_us
                        now_ns = recv_ns + 123_456_789
                        render(events, inst, ts, out, recv_ns, now_ns, scales)
                        ref = _reference(events, inst, ts, 100 + len(execs), recv_ns, now_ns, scales)
                        md += ref[0]
                        trades += ref[1]
                        execs += ref[2]
                        kinds.update(e[0] for e in events)
                    assert out.md == md
                    assert out.trades == trades
                    assert out.execs == execs
                    assert out.exec_seq == 100 + len(execs)
    assert kinds == {"accepted", "rejected", "trade", "cancelled", "amended", "book", "triggered", "funded",
                     "balance"}  # fmt: skip


def test_an_instrument_respecified_under_its_name_renders_on_its_own_grid() -> None:
    """Formatted numbers are kept per instrument: a new spec for a symbol must not reuse the old texts."""
    fine = Instrument(BTC)
    coarse = Instrument(BTC, tick_size=Decimal("1"), lot_size=Decimal("0.1"), min_qty=Decimal("0.1"))
    accepted = ("accepted", BTC, SEQ0, "alice", "c-1", "buy", "limit", "gtc", 12_345, 7)
    for inst in (fine, coarse, fine):
        out = Rendered()
        render([accepted], inst, 5, out)
        assert out.execs == _reference([accepted], inst, 5, 0, 0, 0, None)[2]
