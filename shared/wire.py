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

from shared import events as ev
from shared.codes import reason_for
from shared.decimals import units_to_amount
from shared.ids import RESERVED_PREFIX, SEQ_BITS
from shared.instruments import Instrument, Memo

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

    def add_exec(self, account: str, report: str) -> None:
        """Append one exec line; `report` is the message's JSON without its closing brace: the exec id
        is the last key of every exec message."""
        self.exec_seq += 1
        self.execs.append(f'{account} {report},"exec_id":{self.exec_seq}}}'.encode())


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


# Rendering. Every message is written from an f-string template, one per message shape, in the
# protocol's key order (render below, _execution for every execution report, _trade, _l2_update,
# _rejected): a dict per message for orjson to walk cost about a quarter more (tests/shared/test_wire.py
# keeps that form as the reference the bytes are checked against). Template values are JSON text
# already. Strings from clients (client_order_id, request_id) go through orjson itself, so they are
# escaped exactly as orjson escapes them; names that repeat (accounts, assets, codes, reasons) through
# a memo of the same (_names). Written as they are: decimal strings made here, integers, and the
# core's own identifiers (side, status, exec_type, liquidity: lower-case words).
_SEQ_MASK = (1 << SEQ_BITS) - 1  # order ids: shared.ids.seq_to_entry, inlined in the templates
_dumps = orjson.dumps
_names = Memo(lambda text: _dumps(text).decode())  # repeated strings (accounts, assets, codes) as JSON


class _Pieces:
    """An instrument's formatted numbers and the parts of its messages that never change."""

    __slots__ = ("fee", "inst", "no_fill", "price", "qty", "symbol", "zero_qty")

    def __init__(self, inst: Instrument) -> None:
        self.inst = inst
        self.price = inst.prices
        self.qty = inst.quantities
        self.fee = inst.fee_str
        self.symbol = _names[inst.symbol]
        self.zero_qty = inst.qty_str(0)
        # What an execution report that is not a fill says of fills (see _execution).
        self.no_fill = (
            f'"last_price":null,"last_quantity":null,"fee":"{inst.zero_fee}","liquidity":null,"trade_id":null'
        )


_pieces: dict[str, _Pieces] = {}


def _pieces_of(inst: Instrument) -> _Pieces:
    pieces = _pieces.get(inst.symbol)
    if pieces is None or pieces.inst is not inst:  # a new spec under an old name replaces the old
        pieces = _pieces[inst.symbol] = _Pieces(inst)
    return pieces


def _execution(
    out: Rendered,
    account: str,
    symbol: str,
    oid: int,
    cid: str | None,
    side: str,
    status: str,
    exec_type: str,
    price: str,
    quantity: str,
    filled: str,
    remaining: str,
    fill: str,
    ts: int,
    tail: str = "",
) -> None:
    """Append an execution report's exec line. symbol and price are JSON text (price "null" when the
    order has none); fill: the last_price .. trade_id fields (_Pieces.no_fill unless a trade); tail:
    the fields some reports add after "ts". Positional on purpose: one or two of these per command."""
    out.exec_seq += 1
    out.execs.append(
        f'{account} {{"type":"execution","order_id":"{oid >> SEQ_BITS}-{oid & _SEQ_MASK}",'
        f'"client_order_id":{_dumps(cid).decode()},"symbol":{symbol},"side":"{side}","status":"{status}",'
        f'"exec_type":"{exec_type}","price":{price},"quantity":"{quantity}","filled_quantity":"{filled}",'
        f'"remaining_quantity":"{remaining}",{fill},"ts":{ts}{tail},"exec_id":{out.exec_seq}}}'.encode()
    )


def render(
    events: list[ev.Event],
    inst: Instrument,
    ts: int,
    out: Rendered,
    recv_ns: int = 0,
    now_ns: int = 0,
    scales: dict[str, int] | None = None,
) -> None:
    """Render one command's events (on inst's symbol) into `out`. ts: the command's time (ms);
    recv_ns/now_ns: gateway receive and publish wall clocks, for the trade message's latency_us (0
    when unknown); scales: the assets' decimal places (shared.instruments.asset_scales), needed only
    with balances on."""
    pieces = _pieces_of(inst)
    p, q, names = pieces.price, pieces.qty, _names
    sym, zero, no_fill = pieces.symbol, pieces.zero_qty, pieces.no_fill
    for e in events:
        kind = e[0]
        if kind == ev.BALANCE:  # the most frequent with balances on: one per (account, asset) touched
            _, _, account, asset, available, held = e
            if account.startswith(RESERVED_PREFIX):  # _silent
                continue
            assert scales is not None, "balance events need the asset scales"
            places = scales[asset]
            # "symbol": the stream it travels on, so that exec ids (per symbol) stay countable
            out.exec_seq += 1
            out.execs.append(
                f'{account} {{"type":"balance","symbol":{sym},"account":{names[account]},'
                f'"asset":{names[asset]},"available":"{units_to_amount(available, places)}",'
                f'"held":"{units_to_amount(held, places)}","ts":{ts},"exec_id":{out.exec_seq}}}'.encode()
            )
        elif kind == ev.BOOK:
            out.md.append(_l2_update(e, pieces))
        elif kind == ev.ACCEPTED:
            _, _, oid, account, cid, side, _otype, _tif, price, qty = e
            qs, price_j = q[qty], "null" if price is None else f'"{p[price]}"'
            _execution(out, account, sym, oid, cid, side, "new", "new", price_j, qs, zero, qs, no_fill, ts)
        elif kind == ev.TRADE:
            latency_us = (now_ns - recv_ns) // 1000 if recv_ns and now_ns else None
            _trade(e, pieces, latency_us, out)
        elif kind == ev.CANCELLED:
            _, _, oid, account, cid, side, price, qty, leaves, reason = e
            price_j = "null" if price is None else f'"{p[price]}"'
            _execution(out, account, sym, oid, cid, side, "cancelled", "cancelled", price_j, q[qty],
                       q[qty - leaves], zero, no_fill, ts, f',"reason":{names[reason]}')  # fmt: skip
        elif kind == ev.TRIGGERED:
            _, _, oid, account, cid, side, _otype, _tif, price, stop_price, qty = e
            qs, price_j = q[qty], "null" if price is None else f'"{p[price]}"'
            _execution(out, account, sym, oid, cid, side, "new", "triggered", price_j, qs, zero, qs, no_fill,
                       ts, f',"stop_price":"{p[stop_price]}"')  # fmt: skip
        elif kind == ev.AMENDED:
            _, _, oid, account, cid, side, price, qty, leaves = e
            status = "new" if qty == leaves else "partially_filled"
            _execution(out, account, sym, oid, cid, side, status, "amended", f'"{p[price]}"', q[qty],
                       q[qty - leaves], q[leaves], no_fill, ts)  # fmt: skip
        elif kind == ev.REJECTED:
            if not _silent(e):
                out.add_exec(e[4], _rejected(e, sym, ts))
        elif kind == ev.FUNDED:
            if _silent(e):
                continue
            assert scales is not None, "funding events need the asset scales"
            _, _, op, account, asset, amount, request_id = e
            out.add_exec(
                account,
                f'{{"type":"funded","symbol":{sym},"op":{names[op]},"account":{names[account]},'
                f'"asset":{names[asset]},"amount":"{units_to_amount(amount, scales[asset])}",'
                f'"request_id":{_dumps(request_id).decode()},"ts":{ts}',
            )


def _rejected(e: ev.Event, sym: str, ts: int) -> str:
    """The answer to a refused command, up to its exec id: an execution report for a new order the
    core numbered, else a reject (a funding op names its request, an order op its order)."""
    _, _, op, oid, _account, cid, code = e
    op_j, code_j, reason_j = _names[op], _names[code], _names[reason_for(code)]
    cid_j = _dumps(cid).decode()
    order_id = "null" if oid is None else f'"{oid >> SEQ_BITS}-{oid & _SEQ_MASK}"'
    if op in _FUNDING_OPS:
        return (
            f'{{"type":"reject","op":{op_j},"symbol":{sym},"request_id":{cid_j},"code":{code_j},'
            f'"reason":{reason_j}'
        )
    if op == "new" and oid is not None:
        return (
            f'{{"type":"execution","order_id":{order_id},"client_order_id":{cid_j},"symbol":{sym},'
            f'"status":"rejected","exec_type":"rejected","code":{code_j},"reason":{reason_j},"ts":{ts}'
        )
    return (
        f'{{"type":"reject","op":{op_j},"symbol":{sym},"order_id":{order_id},"client_order_id":{cid_j},'
        f'"code":{code_j},"reason":{reason_j}'
    )


def render_trade(e: ev.Event, inst: Instrument, latency_us: int | None, out: Rendered) -> None:
    """The trade message and the maker's and taker's execution reports."""
    _trade(e, _pieces_of(inst), latency_us, out)


def _trade(e: ev.Event, pieces: _Pieces, latency_us: int | None, out: Rendered) -> None:
    """render_trade, each number formatted once."""
    (_, _, trade_id, price, qty, aggressor, m_oid, m_account, m_cid, m_qty, m_leaves, m_fee,
     t_oid, t_account, t_cid, t_price, t_qty, t_leaves, t_fee, ts) = e  # fmt: skip
    p, q, sym = pieces.price, pieces.qty, pieces.symbol
    price_s, qty_s = p[price], q[qty]
    m_fee_s, t_fee_s = pieces.fee(m_fee), pieces.fee(t_fee)
    latency = "null" if latency_us is None else latency_us
    out.trades.append(
        f'{{"type":"trade","symbol":{sym},"trade_id":{trade_id},"price":"{price_s}","quantity":"{qty_s}",'
        f'"aggressor_side":"{aggressor}","maker_order_id":"{m_oid >> SEQ_BITS}-{m_oid & _SEQ_MASK}",'
        f'"taker_order_id":"{t_oid >> SEQ_BITS}-{t_oid & _SEQ_MASK}","maker_fee":"{m_fee_s}",'
        f'"taker_fee":"{t_fee_s}","ts":{ts},"latency_us":{latency}}}'.encode()
    )
    price_j = f'"{price_s}"'
    fill = f'"last_price":{price_j},"last_quantity":"{qty_s}","fee":"'  # then the fee, liquidity, trade_id
    m_fill = f'{fill}{m_fee_s}","liquidity":"maker","trade_id":{trade_id}'
    t_fill = f'{fill}{t_fee_s}","liquidity":"taker","trade_id":{trade_id}'
    m_side = "sell" if aggressor == "buy" else "buy"
    m_status = "filled" if m_leaves == 0 else "partially_filled"
    _execution(out, m_account, sym, m_oid, m_cid, m_side, m_status, "trade", price_j, q[m_qty],
               q[m_qty - m_leaves], q[m_leaves], m_fill, ts)  # fmt: skip
    t_status = "filled" if t_leaves == 0 else "partially_filled"
    t_price_j = "null" if t_price is None else f'"{p[t_price]}"'
    _execution(out, t_account, sym, t_oid, t_cid, aggressor, t_status, "trade", t_price_j, q[t_qty],
               q[t_qty - t_leaves], q[t_leaves], t_fill, ts)  # fmt: skip


def _l2_update(e: ev.Event, pieces: _Pieces) -> bytes:
    """A book event's l2_update line."""
    _, _, seq, changes, (bid, bid_qty, ask, ask_qty) = e
    p, q = pieces.price, pieces.qty
    levels = ",".join([f'["{side}","{p[price]}","{q[total]}"]' for side, price, total in changes])
    bid_j = "null" if bid is None else f'["{p[bid]}","{q[bid_qty]}"]'
    ask_j = "null" if ask is None else f'["{p[ask]}","{q[ask_qty]}"]'
    return (
        f'{{"type":"l2_update","symbol":{pieces.symbol},"seq":{seq},"changes":[{levels}],'
        f'"bbo":{{"bid":{bid_j},"ask":{ask_j}}}}}'.encode()
    )


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
