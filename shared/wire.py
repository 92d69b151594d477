"""Core events -> public wire messages (docs/protocol.md). Decimal strings appear only here.

The matcher renders each batch once and publishes the bytes; gateways and feeds forward them without
re-encoding. Payload framing on the pub/sub channels (shared.keys):
- the first line is `#<publish wall clock in ns>` (for publish-to-send latency), then
- md and trades: NDJSON, one protocol message per line (orjson never emits a raw newline);
- exec: one line per message, `<account> <json>`; account names contain no spaces (gateway rule).
"""

from __future__ import annotations

from typing import Any

import orjson

from services.matcher import events as ev
from shared.codes import reason_for
from shared.ids import seq_to_entry
from shared.instruments import Instrument

Message = dict[str, Any]


class Rendered:
    """One batch's outgoing messages, grouped by channel."""

    __slots__ = ("execs", "md", "trades")

    def __init__(self) -> None:
        self.md: list[bytes] = []
        self.trades: list[bytes] = []
        self.execs: list[bytes] = []

    def payloads(self, now_ns: int) -> tuple[bytes | None, bytes | None, bytes | None]:
        """(md, trades, exec) payloads, None where a channel has nothing to say."""
        return frame(self.md, now_ns), frame(self.trades, now_ns), frame(self.execs, now_ns)


def frame(lines: list[bytes], now_ns: int) -> bytes | None:
    return b"\n".join([b"#%d" % now_ns, *lines]) if lines else None


def unframe(payload: bytes) -> tuple[int, list[bytes]]:
    """(publish ns, lines) of a channel payload; publish ns is 0 if the header is missing."""
    lines = payload.split(b"\n")
    if lines and lines[0].startswith(b"#"):
        return int(lines[0][1:] or 0), lines[1:]
    return 0, lines


def _oid(seq: int | None) -> str | None:
    return None if seq is None else seq_to_entry(seq)


def _exec(
    inst: Instrument,
    *,
    order_id: int,
    cid: str | None,
    side: str,
    status: str,
    exec_type: str,
    price: int | None,
    quantity: int,
    leaves: int,
    ts: int,
    filled: int | None = None,
    last_price: int | None = None,
    last_qty: int | None = None,
    fee: int | None = None,
    liquidity: str | None = None,
    trade_id: int | None = None,
    reason: str | None = None,
    code: str | None = None,
) -> Message:
    msg: Message = {
        "type": "execution",
        "order_id": seq_to_entry(order_id),
        "client_order_id": cid,
        "symbol": inst.symbol,
        "side": side,
        "status": status,
        "exec_type": exec_type,
        "price": None if price is None else inst.price_str(price),
        "quantity": inst.qty_str(quantity),
        "filled_quantity": inst.qty_str(quantity - leaves if filled is None else filled),
        "remaining_quantity": inst.qty_str(leaves),
        "last_price": None if last_price is None else inst.price_str(last_price),
        "last_quantity": None if last_qty is None else inst.qty_str(last_qty),
        "fee": inst.fee_str(fee or 0),
        "liquidity": liquidity,
        "trade_id": trade_id,
        "ts": ts,
    }
    if reason is not None:
        msg["reason"] = reason
    if code is not None:
        msg["code"] = code
    return msg


def _line(account: str, msg: Message) -> bytes:
    return account.encode() + b" " + orjson.dumps(msg)


def render(
    events: list[ev.Event], inst: Instrument, ts: int, out: Rendered, recv_ns: int = 0, now_ns: int = 0
) -> None:
    """Render one command's events into `out`. ts: the command's time (ms); recv_ns/now_ns: gateway
    receive and publish wall clocks, for the trade message's latency_us (0 when unknown)."""
    for e in events:
        kind = e[0]
        if kind == ev.BOOK:
            out.md.append(orjson.dumps(l2_update(e, inst)))
        elif kind == ev.TRADE:
            latency_us = (now_ns - recv_ns) // 1000 if recv_ns and now_ns else None
            out.trades.append(orjson.dumps(trade_message(e, inst, latency_us)))
            maker, taker = trade_reports(e, inst)
            out.execs.append(_line(e[ev.T_MAKER_ACCOUNT], maker))
            out.execs.append(_line(e[ev.T_TAKER_ACCOUNT], taker))
        elif kind == ev.ACCEPTED:
            _, _, oid, account, cid, side, _otype, _tif, price, qty = e
            out.execs.append(
                _line(
                    account,
                    _exec(
                        inst,
                        order_id=oid,
                        cid=cid,
                        side=side,
                        status="new",
                        exec_type="new",
                        price=price,
                        quantity=qty,
                        leaves=qty,
                        ts=ts,
                    ),
                )
            )
        elif kind == ev.CANCELLED:
            _, _, oid, account, cid, side, price, qty, leaves, reason = e
            out.execs.append(
                _line(
                    account,
                    _exec(
                        inst,
                        order_id=oid,
                        cid=cid,
                        side=side,
                        status="cancelled",
                        exec_type="cancelled",
                        price=price,
                        quantity=qty,
                        leaves=0,
                        filled=qty - leaves,
                        ts=ts,
                        reason=reason,
                    ),
                )
            )
        elif kind == ev.AMENDED:
            _, _, oid, account, cid, side, price, qty, leaves = e
            status = "new" if qty == leaves else "partially_filled"
            out.execs.append(
                _line(
                    account,
                    _exec(
                        inst,
                        order_id=oid,
                        cid=cid,
                        side=side,
                        status=status,
                        exec_type="amended",
                        price=price,
                        quantity=qty,
                        leaves=leaves,
                        ts=ts,
                    ),
                )
            )
        elif kind == ev.REJECTED:
            _, _, op, oid, account, cid, code = e
            if account is None:
                continue  # nobody to tell; the gateway never sends such a command
            if op == "new" and oid is not None:
                msg = {
                    "type": "execution",
                    "order_id": _oid(oid),
                    "client_order_id": cid,
                    "symbol": inst.symbol,
                    "status": "rejected",
                    "exec_type": "rejected",
                    "code": code,
                    "reason": reason_for(code),
                    "ts": ts,
                }
            else:
                msg = {
                    "type": "reject",
                    "op": op,
                    "symbol": inst.symbol,
                    "order_id": _oid(oid),
                    "client_order_id": cid,
                    "code": code,
                    "reason": reason_for(code),
                }
            out.execs.append(_line(account, msg))


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
    return {
        "type": "trade",
        "symbol": e[1],
        "trade_id": e[ev.T_TRADE_ID],
        "price": inst.price_str(e[ev.T_PRICE]),
        "quantity": inst.qty_str(e[ev.T_QTY]),
        "aggressor_side": e[ev.T_AGGRESSOR],
        "maker_order_id": seq_to_entry(e[ev.T_MAKER_OID]),
        "taker_order_id": seq_to_entry(e[ev.T_TAKER_OID]),
        "maker_fee": inst.fee_str(e[ev.T_MAKER_FEE]),
        "taker_fee": inst.fee_str(e[ev.T_TAKER_FEE]),
        "ts": e[ev.T_TS],
        "latency_us": latency_us,
    }


def trade_reports(e: ev.Event, inst: Instrument) -> tuple[Message, Message]:
    """The execution reports a trade gives its maker and its taker."""
    price, qty, aggressor, ts, trade_id = e[ev.T_PRICE], e[ev.T_QTY], e[ev.T_AGGRESSOR], e[ev.T_TS], e[2]
    m_leaves, t_leaves = e[ev.T_MAKER_LEAVES], e[ev.T_TAKER_LEAVES]
    maker = _exec(
        inst,
        order_id=e[ev.T_MAKER_OID],
        cid=e[ev.T_MAKER_CID],
        side="sell" if aggressor == "buy" else "buy",
        status="filled" if m_leaves == 0 else "partially_filled",
        exec_type="trade",
        price=price,
        quantity=e[ev.T_MAKER_QTY],
        leaves=m_leaves,
        last_price=price,
        last_qty=qty,
        fee=e[ev.T_MAKER_FEE],
        liquidity="maker",
        trade_id=trade_id,
        ts=ts,
    )
    taker = _exec(
        inst,
        order_id=e[ev.T_TAKER_OID],
        cid=e[ev.T_TAKER_CID],
        side=aggressor,
        status="filled" if t_leaves == 0 else "partially_filled",
        exec_type="trade",
        price=e[ev.T_TAKER_PRICE],
        quantity=e[ev.T_TAKER_QTY],
        leaves=t_leaves,
        last_price=price,
        last_qty=qty,
        fee=e[ev.T_TAKER_FEE],
        liquidity="taker",
        trade_id=trade_id,
        ts=ts,
    )
    return maker, taker


def split_exec_line(line: bytes) -> tuple[str, bytes]:
    """(account, json bytes) of one exec-channel line."""
    account, _, body = line.partition(b" ")
    return account.decode(), body
