"""The order read model (services.matcher.readmodel) as the matcher keeps it in Redis: after a flow,
the open orders in Redis are exactly the engine's, with their remaining quantity, and every order that
ended is among the closed ones with its final status."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, cast

import orjson
import redis

from services.matcher import readmodel
from services.matcher.book import O_ACCOUNT, O_ID, O_LEAVES
from services.matcher.engine import Engine
from shared import keys
from shared.commands import Amend, CancelAll, NewOrder
from shared.events import (
    ACCEPTED,
    AMENDED,
    CANCELLED,
    T_MAKER_ACCOUNT,
    T_MAKER_LEAVES,
    T_MAKER_OID,
    T_MAKER_QTY,
    T_TAKER_ACCOUNT,
    T_TAKER_LEAVES,
    T_TAKER_OID,
    T_TAKER_QTY,
    TRADE,
    Event,
)
from shared.ids import SEQ_BITS, seq_to_entry
from shared.instruments import Instrument
from tests.matcher import (
    ACCOUNTS,
    BTC,
    ETH,
    INSTRUMENTS,
    MID,
    Flow,
    Record,
    add_flow,
    append,
    await_until,
    config,
    expected,
    in_process,
    progress,
)

SYMBOLS = (BTC, ETH)


def open_orders(r: redis.Redis, symbol: str, account: str) -> dict[str, dict[str, Any]]:
    raw = cast(dict[bytes, bytes], r.hgetall(keys.open_orders(symbol, account)))
    out = {}
    for name, static in raw.items():
        oid, _, part = name.decode().partition(":")
        if part == "s":
            state = raw[f"{oid}:d".encode()]
            out[oid] = orjson.loads(static[:-1] + b"," + state + b"}")
    return out


def closed_orders(r: redis.Redis, symbol: str, account: str) -> dict[str, dict[str, Any]]:
    raw = cast(dict[bytes, bytes], r.hgetall(keys.closed_orders(symbol, account)))
    return {k.decode(): orjson.loads(v) for k, v in raw.items()}


def _caught_up(r: redis.Redis, record: Record) -> bool:
    return all(progress(r, s).get("last_id") == record[s][-1][0] for s in SYMBOLS if record.get(s))


async def test_open_and_closed_orders_follow_the_engine(
    r: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    flow, record = Flow(11), cast(Record, {})
    async with in_process(config(redis_url, tmp_path, batch=50)) as run:
        for _ in range(8):
            add_flow(r, flow, record, SYMBOLS, 60)
        # An amend of a resting order changes its price and quantity in the model too.
        [oid] = append(r, [(BTC, NewOrder(BTC, "alice", "buy", "limit", "gtc", 100, 5000, "keep"))], record)
        append(r, [(BTC, Amend(BTC, "alice", None, "keep", 101, 4000))], record)
        await await_until(lambda: _caught_up(r, record), 20, "caught up")
        await run.stop()
    for symbol in SYMBOLS:
        exp = expected(INSTRUMENTS[symbol], record[symbol])
        book, inst = exp.engine.books[symbol], INSTRUMENTS[symbol]
        owner: dict[str, str] = {}  # order id -> account, from the engine's own events
        ended: dict[str, str] = {}  # order id -> final status
        for _, events in exp.events:
            for e in events:
                if e[0] == ACCEPTED:
                    owner[seq_to_entry(e[2])] = e[3]
                elif e[0] == CANCELLED:
                    ended[seq_to_entry(e[2])] = "cancelled"
                elif e[0] == TRADE:
                    for order_id, leaves in (
                        (e[T_MAKER_OID], e[T_MAKER_LEAVES]),
                        (e[T_TAKER_OID], e[T_TAKER_LEAVES]),
                    ):
                        if leaves == 0:
                            ended[seq_to_entry(order_id)] = "filled"
        for account in ACCOUNTS:
            model = open_orders(r, symbol, account)
            engine_open = {seq_to_entry(o[O_ID]): o for o in book.orders.values() if o[O_ACCOUNT] == account}
            assert set(model) == set(engine_open), (symbol, account)
            for order_id, order in engine_open.items():
                assert model[order_id]["remaining_quantity"] == inst.qty_str(order[O_LEAVES])
                assert model[order_id]["status"] in ("new", "partially_filled")
            closed = closed_orders(r, symbol, account)
            assert {o: c["status"] for o, c in closed.items()} == {
                o: status for o, status in ended.items() if owner[o] == account
            }
    alice = open_orders(r, BTC, "alice")[oid]
    assert (alice["price"], alice["quantity"], alice["client_order_id"]) == ("1.01", "0.04000", "keep")
    assert r.hget(keys.client_order_ids(BTC, "alice"), "keep") == oid.encode()
    assert sum(len(closed_orders(r, s, a)) for s in SYMBOLS for a in ACCOUNTS) > 100  # the flow closed many


# The builder as it was before its records were rendered once per order (kept as the reference the
# current one must match byte for byte: the commit script, and so Redis, then ends the same).
def _old_state(status: str, filled: str, remaining: str, ts: int, reason: str | None = None) -> bytes:
    tail = b',"reason":%s' % orjson.dumps(reason) if reason is not None else b""
    return b'"status":"%s","filled_quantity":"%s","remaining_quantity":"%s","ts":%d%s' % (
        status.encode(),
        filled.encode(),
        remaining.encode(),
        ts,
        tail,
    )


class _OldOrder:
    def __init__(self, symbol: str, account: str, oid: int) -> None:
        self.symbol, self.account, self.oid = symbol, account, oid
        self.fields: dict[str, Any] | None = None
        self.amend: tuple[str, str] | None = None
        self.state = b""
        self.closed = False


class _OldRecords:
    def __init__(self) -> None:
        self._orders: dict[tuple[str, int], _OldOrder] = {}

    def _order(self, symbol: str, account: str, oid: int) -> _OldOrder:
        order = self._orders.get((symbol, oid))
        if order is None:
            order = self._orders[symbol, oid] = _OldOrder(symbol, account, oid)
        return order

    def add(self, events: list[Event], inst: Instrument, ts: int) -> None:
        q, p = inst.qty_str, inst.price_str
        for e in events:
            kind = e[0]
            if kind == TRADE:
                for oid, account, qty, leaves in (
                    (e[T_MAKER_OID], e[T_MAKER_ACCOUNT], e[T_MAKER_QTY], e[T_MAKER_LEAVES]),
                    (e[T_TAKER_OID], e[T_TAKER_ACCOUNT], e[T_TAKER_QTY], e[T_TAKER_LEAVES]),
                ):
                    order = self._order(e[1], account, oid)
                    status = "filled" if leaves == 0 else "partially_filled"
                    order.state = _old_state(status, q(qty - leaves), q(leaves), ts)
                    order.closed = leaves == 0
            elif kind == ACCEPTED:
                _, symbol, oid, account, cid, side, otype, tif, price, qty = e
                order = self._order(symbol, account, oid)
                order.fields = {
                    "order_id": seq_to_entry(oid), "client_order_id": cid, "symbol": symbol, "side": side,
                    "order_type": otype, "tif": tif, "price": None if price is None else p(price),
                    "quantity": q(qty),
                }  # fmt: skip
                order.state = _old_state("new", q(0), q(qty), ts)
            elif kind == CANCELLED:
                _, symbol, oid, account, _, _, _, qty, leaves, reason = e
                order = self._order(symbol, account, oid)
                order.state = _old_state("cancelled", q(qty - leaves), q(0), ts, reason)
                order.closed = True
            elif kind == AMENDED:
                _, symbol, oid, account, _, _, price, qty, leaves = e
                order = self._order(symbol, account, oid)
                if order.fields is not None:
                    order.fields["price"], order.fields["quantity"] = p(price), q(qty)
                else:
                    order.amend = (p(price), q(qty))
                status = "new" if qty == leaves else "partially_filled"
                order.state = _old_state(status, q(qty - leaves), q(leaves), ts)

    def records(self) -> list[bytes]:
        out: list[bytes] = []
        for order in self._orders.values():
            s, a = order.symbol, order.account
            open_key, closed_key = keys.open_orders(s, a).encode(), keys.closed_orders(s, a).encode()
            list_key, cids_key = keys.closed_list(s, a).encode(), keys.client_order_ids(s, a).encode()
            oid = seq_to_entry(order.oid).encode()
            fields = order.fields
            if fields is not None:
                static = orjson.dumps(fields)
                cid = (fields["client_order_id"] or "").encode()
                if order.closed:
                    whole = static[:-1] + b"," + order.state + b"}"
                    out += [b"x", closed_key, list_key, oid, whole, cids_key, cid]
                else:
                    out += [b"n", open_key, oid, static, order.state, cids_key, cid]
            elif order.closed:
                out += [b"c", open_key, oid, order.state, closed_key, list_key]
            elif order.amend is not None:
                out += [b"a", open_key, oid, order.amend[0].encode(), order.amend[1].encode(), order.state]
            elif order.state:
                out += [b"u", open_key, oid, order.state]
        return out


_RECORD_SIZES = {b"n": 7, b"x": 7, b"u": 4, b"a": 6, b"c": 6}  # values per record, op letter included


def test_records_match_the_reference_builder() -> None:
    """Commits of every size over a two-symbol flow (fills, IOC/FOK and market orders, cancels, amends,
    mass cancels, client ids JSON must escape) give the same records as the reference, byte for byte."""
    engines = {s: Engine([INSTRUMENTS[s]]) for s in SYMBOLS}
    flow, rng = Flow(7), random.Random(7)
    seqs = dict.fromkeys(SYMBOLS, 1_700_000_000_000 << SEQ_BITS)  # a stream each: their ids coincide
    odd_cids = iter(['q"uote', "back\\slash", "caf\u00e9 \u2603", "</b>&\U0001f600"] * 40)
    ops: set[bytes] = set()
    for _ in range(120):
        new, old = readmodel.Records(), _OldRecords()
        for _ in range(rng.choice((1, 2, 7, 40, 120))):
            symbol = rng.choice(SYMBOLS)
            cmd = flow.command(symbol)
            if type(cmd) is NewOrder and rng.random() < 0.05:
                cmd = cmd._replace(client_order_id=next(odd_cids))
            elif type(cmd) is NewOrder and rng.random() < 0.05:
                cmd = cmd._replace(client_order_id=None)
            elif rng.random() < 0.01:
                cmd = CancelAll(symbol, rng.choice(ACCOUNTS), "disconnect")
            seqs[symbol] += 1
            seq = seqs[symbol]
            ts = seq >> SEQ_BITS
            events = engines[symbol].apply(cmd, seq, ts)
            flow.appended(symbol, seq_to_entry(seq), cmd)
            if type(cmd) is NewOrder and cmd.tif == "gtc" and rng.random() < 0.1:
                # An amend of an order in the same commit as its opening.
                events = events + engines[symbol].apply(
                    Amend(symbol, cmd.account, seq, None, MID, 700), seq + 1, ts
                )
                seqs[symbol] += 1
            new.add(events, INSTRUMENTS[symbol], ts)
            old.add(events, INSTRUMENTS[symbol], ts)
        records = new.records()
        assert records == old.records()
        i = 0
        while i < len(records):
            ops.add(records[i])
            i += _RECORD_SIZES[records[i]]
    assert ops == {b"n", b"x", b"c", b"a", b"u"}  # every kind of record was compared
