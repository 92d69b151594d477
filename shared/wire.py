"""Core events -> public wire messages (docs/protocol.md). Decimal strings appear only here.

The matcher renders each batch once and publishes the bytes; gateways and feeds forward them without
re-encoding. Payload framing on the pub/sub channels (shared.keys):
- the first line is `#<publish wall clock in ns>` (for publish-to-send latency), then
- md and trades: NDJSON, one protocol message per line (orjson never emits a raw newline);
- exec: one line per message, `<account> <json>`; account names contain no spaces (gateway rule).
  The exec header is `#<ns> <first exec_id>`: every exec line's JSON carries "exec_id", rising by
  exactly one per line per symbol from 1, and line i of a payload has exec_id first + i.
"""

from __future__ import annotations

from typing import Any

import orjson

from services.matcher import events as ev
from services.matcher.balances import RESERVED_PREFIX
from shared.codes import reason_for
from shared.ids import seq_to_entry
from shared.instruments import Instrument, units_to_amount

Message = dict[str, Any]


class Rendered:
    """One batch's outgoing messages, grouped by channel, and the symbol's running exec id.

    exec_seq: the last exec id assigned (the symbol's count so far); render() numbers exec lines on."""

    __slots__ = ("exec_seq", "execs", "first_exec", "md", "trades")

    def __init__(self, exec_seq: int = 0) -> None:
        self.md: list[bytes] = []
        self.trades: list[bytes] = []
        self.execs: list[bytes] = []
        self.exec_seq = exec_seq
        self.first_exec = exec_seq + 1  # the exec id of execs[0]

    def payloads(self, now_ns: int) -> tuple[bytes | None, bytes | None, bytes | None]:
        """(md, trades, exec) payloads, None where a channel has nothing to say."""
        execs = frame(self.execs, now_ns, self.first_exec)
        return frame(self.md, now_ns), frame(self.trades, now_ns), execs

    def add_exec(self, account: str, msg: Message) -> None:
        self.exec_seq += 1
        msg["exec_id"] = self.exec_seq
        self.execs.append(_line(account, msg))


def frame(lines: list[bytes], now_ns: int, first_exec: int | None = None) -> bytes | None:
    """A channel payload; exec payloads pass the exec id of their first line."""
    if not lines:
        return None
    head = b"#%d" % now_ns if first_exec is None else b"#%d %d" % (now_ns, first_exec)
    return b"\n".join([head, *lines])


def unframe_exec(payload: bytes) -> tuple[int, int | None, list[bytes]]:
    """(publish ns, first exec id, lines) of a channel payload. Older forms still parse: `#<ns>`
    alone gives first None, and a payload without a header gives publish ns 0 as well."""
    lines = payload.split(b"\n")
    if not lines or not lines[0].startswith(b"#"):
        return 0, None, lines
    ns, _, first = lines[0][1:].partition(b" ")
    return int(ns or 0), int(first) if first else None, lines[1:]


def unframe(payload: bytes) -> tuple[int, list[bytes]]:
    """(publish ns, lines) of a channel payload; publish ns is 0 if the header is missing."""
    ns, _, lines = unframe_exec(payload)
    return ns, lines


def _silent(e: ev.Event) -> bool:
    """An event with nobody to tell: no exec line. A reject without an account (the gateway never
    sends such a command); a balance or funding change of the venue's own accounts (names starting
    with "_", which no connection can log in as: the fees account changes with every trade)."""
    kind = e[0]
    if kind == ev.REJECTED:
        return e[4] is None
    if kind == ev.BALANCE:
        return bool(e[2].startswith(RESERVED_PREFIX))
    if kind == ev.FUNDED:
        return bool(e[3].startswith(RESERVED_PREFIX))
    return False


# Exec lines per event kind, as render() makes them; _silent events make none.
_EXEC_LINES = {
    ev.ACCEPTED: 1,
    ev.CANCELLED: 1,
    ev.AMENDED: 1,
    ev.REJECTED: 1,
    ev.TRADE: 2,
    ev.TRIGGERED: 1,
    ev.BALANCE: 1,
    ev.FUNDED: 1,
}
_FUNDING_OPS = frozenset(("deposit", "withdraw", "faucet"))


def count_execs(events: list[ev.Event]) -> int:
    """How many exec lines render() makes for one command's events (replay advances exec ids by it)."""
    get = _EXEC_LINES.get
    return sum(0 if _silent(e) else get(e[0], 0) for e in events)


def _oid(seq: int | None) -> str | None:
    return None if seq is None else seq_to_entry(seq)


def _exec(
    symbol: str,
    oid: int,
    cid: str | None,
    side: str,
    status: str,
    exec_type: str,
    price: str | None,
    quantity: str,
    filled: str,
    remaining: str,
    last_price: str | None,
    last_qty: str | None,
    fee: str,
    liquidity: str | None,
    trade_id: int | None,
    ts: int,
) -> Message:
    # Positional on purpose: the matcher renders one or two of these per command.
    return {
        "type": "execution",
        "order_id": seq_to_entry(oid),
        "client_order_id": cid,
        "symbol": symbol,
        "side": side,
        "status": status,
        "exec_type": exec_type,
        "price": price,
        "quantity": quantity,
        "filled_quantity": filled,
        "remaining_quantity": remaining,
        "last_price": last_price,
        "last_quantity": last_qty,
        "fee": fee,
        "liquidity": liquidity,
        "trade_id": trade_id,
        "ts": ts,
    }


def _line(account: str, msg: Message) -> bytes:
    return account.encode() + b" " + orjson.dumps(msg)


def render(
    events: list[ev.Event],
    inst: Instrument,
    ts: int,
    out: Rendered,
    recv_ns: int = 0,
    now_ns: int = 0,
    scales: dict[str, int] | None = None,
) -> None:
    """Render one command's events into `out`. ts: the command's time (ms); recv_ns/now_ns: gateway
    receive and publish wall clocks, for the trade message's latency_us (0 when unknown); scales: the
    assets' decimal places (shared.instruments.asset_scales), needed only with balances on."""
    p, q = inst.price_str, inst.qty_str
    zero_fee = inst.zero_fee
    for e in events:
        kind = e[0]
        if kind == ev.BOOK:
            out.md.append(orjson.dumps(l2_update(e, inst)))
        elif kind == ev.TRADE:
            latency_us = (now_ns - recv_ns) // 1000 if recv_ns and now_ns else None
            render_trade(e, inst, latency_us, out)
        elif kind == ev.ACCEPTED:
            _, symbol, oid, account, cid, side, _otype, _tif, price, qty = e
            qs, ps = q(qty), None if price is None else p(price)
            msg = _exec(
                symbol, oid, cid, side, "new", "new", ps, qs, q(0), qs, None, None, zero_fee, None, None, ts
            )
            out.add_exec(account, msg)
        elif kind == ev.CANCELLED:
            _, symbol, oid, account, cid, side, price, qty, leaves, reason = e
            msg = _exec(symbol, oid, cid, side, "cancelled", "cancelled", None if price is None else p(price),
                        q(qty), q(qty - leaves), q(0), None, None, zero_fee, None, None, ts)  # fmt: skip
            msg["reason"] = reason
            out.add_exec(account, msg)
        elif kind == ev.TRIGGERED:
            _, symbol, oid, account, cid, side, _otype, _tif, price, stop_price, qty = e
            qs = q(qty)
            msg = _exec(symbol, oid, cid, side, "new", "triggered", None if price is None else p(price), qs,
                        q(0), qs, None, None, zero_fee, None, None, ts)  # fmt: skip
            msg["stop_price"] = p(stop_price)
            out.add_exec(account, msg)
        elif kind == ev.AMENDED:
            _, symbol, oid, account, cid, side, price, qty, leaves = e
            status = "new" if qty == leaves else "partially_filled"
            msg = _exec(symbol, oid, cid, side, status, "amended", p(price), q(qty), q(qty - leaves),
                        q(leaves), None, None, zero_fee, None, None, ts)  # fmt: skip
            out.add_exec(account, msg)
        elif kind == ev.REJECTED:
            if _silent(e):
                continue
            _, symbol, op, oid, account, cid, code = e
            if op in _FUNDING_OPS:
                msg = {"type": "reject", "op": op, "symbol": inst.symbol, "request_id": cid, "code": code,
                       "reason": reason_for(code)}  # fmt: skip
            elif op == "new" and oid is not None:
                msg = {
                    "type": "execution", "order_id": _oid(oid), "client_order_id": cid, "symbol": inst.symbol,
                    "status": "rejected", "exec_type": "rejected", "code": code, "reason": reason_for(code),
                    "ts": ts,
                }  # fmt: skip
            else:
                msg = {
                    "type": "reject", "op": op, "symbol": inst.symbol, "order_id": _oid(oid),
                    "client_order_id": cid, "code": code, "reason": reason_for(code),
                }  # fmt: skip
            out.add_exec(account, msg)
        elif kind == ev.BALANCE:
            if _silent(e):
                continue
            assert scales is not None, "balance events need the asset scales"
            _, _, account, asset, available, held = e
            places = scales[asset]
            # "symbol": the stream it travels on, so that exec ids (per symbol) stay countable
            out.add_exec(account, {"type": "balance", "symbol": inst.symbol, "account": account,
                                   "asset": asset, "available": units_to_amount(available, places),
                                   "held": units_to_amount(held, places), "ts": ts})  # fmt: skip
        elif kind == ev.FUNDED:
            if _silent(e):
                continue
            assert scales is not None, "funding events need the asset scales"
            _, _, op, account, asset, amount, request_id = e
            out.add_exec(account, {"type": "funded", "symbol": inst.symbol, "op": op, "account": account,
                                   "asset": asset,
                                   "amount": units_to_amount(amount, scales[asset]), "request_id": request_id,
                                   "ts": ts})  # fmt: skip


def render_trade(e: ev.Event, inst: Instrument, latency_us: int | None, out: Rendered) -> None:
    """The trade message and the maker's and taker's execution reports, each number formatted once."""
    (_, symbol, trade_id, price, qty, aggressor, m_oid, m_account, m_cid, m_qty, m_leaves, m_fee,
     t_oid, t_account, t_cid, t_price, t_qty, t_leaves, t_fee, ts) = e  # fmt: skip
    p, q = inst.price_str, inst.qty_str
    price_s, qty_s = p(price), q(qty)
    m_fee_s, t_fee_s = inst.fee_str(m_fee), inst.fee_str(t_fee)
    out.trades.append(
        orjson.dumps(
            {
                "type": "trade",
                "symbol": symbol,
                "trade_id": trade_id,
                "price": price_s,
                "quantity": qty_s,
                "aggressor_side": aggressor,
                "maker_order_id": seq_to_entry(m_oid),
                "taker_order_id": seq_to_entry(t_oid),
                "maker_fee": m_fee_s,
                "taker_fee": t_fee_s,
                "ts": ts,
                "latency_us": latency_us,
            }
        )
    )
    m_side = "sell" if aggressor == "buy" else "buy"
    m_status = "filled" if m_leaves == 0 else "partially_filled"
    t_status = "filled" if t_leaves == 0 else "partially_filled"
    t_price_s = None if t_price is None else p(t_price)
    maker = _exec(symbol, m_oid, m_cid, m_side, m_status, "trade", price_s, q(m_qty), q(m_qty - m_leaves),
                  q(m_leaves), price_s, qty_s, m_fee_s, "maker", trade_id, ts)  # fmt: skip
    t_filled = q(t_qty - t_leaves)
    taker = _exec(symbol, t_oid, t_cid, aggressor, t_status, "trade", t_price_s, q(t_qty), t_filled,
                  q(t_leaves), price_s, qty_s, t_fee_s, "taker", trade_id, ts)  # fmt: skip
    out.add_exec(m_account, maker)
    out.add_exec(t_account, taker)


def l2_update(e: ev.Event, inst: Instrument) -> Message:
    _, symbol, seq, changes, (bid, bid_qty, ask, ask_qty) = e
    p, q = inst.price_str, inst.qty_str
    return {
        "type": "l2_update",
        "symbol": symbol,
        "seq": seq,
        "changes": [[side, p(price), q(total)] for side, price, total in changes],
        "bbo": {
            "bid": None if bid is None else [p(bid), q(bid_qty)],
            "ask": None if ask is None else [p(ask), q(ask_qty)],
        },
    }


def l2_snapshot(
    symbol: str, seq: int, bids: list[tuple[int, int]], asks: list[tuple[int, int]], inst: Instrument
) -> Message:
    p, q = inst.price_str, inst.qty_str
    return {
        "type": "l2_snapshot",
        "symbol": symbol,
        "seq": seq,
        "bids": [[p(price), q(total)] for price, total in bids],
        "asks": [[p(price), q(total)] for price, total in asks],
    }


def trade_message(e: ev.Event, inst: Instrument, latency_us: int | None = None) -> Message:
    out = Rendered()
    render_trade(e, inst, latency_us, out)
    msg: Message = orjson.loads(out.trades[0])
    return msg


def trade_reports(e: ev.Event, inst: Instrument) -> tuple[Message, Message]:
    """The execution reports a trade gives its maker and its taker."""
    out = Rendered()
    render_trade(e, inst, None, out)
    maker, taker = (orjson.loads(split_exec_line(line)[1]) for line in out.execs)
    return maker, taker


def split_exec_line(line: bytes) -> tuple[str, bytes]:
    """(account, json bytes) of one exec-channel line."""
    account, _, body = line.partition(b" ")
    return account.decode(), body
