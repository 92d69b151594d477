"""The order read model (services.matcher.readmodel) as the matcher keeps it in Redis: after a flow,
the open orders in Redis are exactly the engine's, with their remaining quantity, and every order that
ended is among the closed ones with its final status."""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import orjson
import redis

from services.matcher.book import O_ACCOUNT, O_ID, O_LEAVES
from services.matcher.commands import Amend, NewOrder
from services.matcher.events import (
    ACCEPTED,
    CANCELLED,
    T_MAKER_LEAVES,
    T_MAKER_OID,
    T_TAKER_LEAVES,
    T_TAKER_OID,
    TRADE,
)
from shared import keys
from shared.ids import seq_to_entry
from tests.matcher import (
    ACCOUNTS,
    BTC,
    ETH,
    INSTRUMENTS,
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
