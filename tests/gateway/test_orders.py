"""order_status / open_orders from the read model (services.gateway.orders), with a real matcher."""

from __future__ import annotations

from pathlib import Path
from typing import cast

import orjson
import redis
import redis.asyncio as aioredis

from services.gateway import orders
from shared import codes
from shared.commands import Cancel, NewOrder
from shared.ids import entry_to_seq
from tests.matcher import BTC, ETH, Record, append, config, in_process


async def test_status_and_open_orders_read_your_writes(redis_url: str, tmp_path: Path) -> None:
    r = redis.Redis.from_url(redis_url)
    ar = aioredis.Redis.from_url(redis_url)
    record = cast(Record, {})
    try:
        async with in_process(config(redis_url, tmp_path)) as run:
            ids = append(r, [
                (BTC, NewOrder(BTC, "ann", "buy", "limit", "gtc", 100_000, 2_000, "a1")),
                (ETH, NewOrder(ETH, "ann", "sell", "limit", "gtc", 300_000, 1_000, "a2")),
                (BTC, NewOrder(BTC, "bob", "sell", "limit", "ioc", 100_000, 500, "b1")),  # fills a1 partly
            ], record)  # fmt: skip
            # Asked at once: the query waits until the matcher committed what was appended.
            assert await orders.caught_up(ar, BTC, entry_to_seq(ids[2]))
            status = orjson.loads(cast(bytes, await orders.order_status(ar, BTC, "ann", ids[0], None)))
            assert (status["order_id"], status["client_order_id"], status["symbol"], status["side"]) == (
                ids[0], "a1", BTC, "buy")  # fmt: skip
            state = (status["status"], status["filled_quantity"], status["remaining_quantity"])
            assert status["type"] == "order" and state == ("partially_filled", "0.00500", "0.01500")
            assert (status["order_type"], status["tif"]) == ("limit", "gtc")
            assert (status["price"], status["quantity"]) == ("1000.00", "0.02000")
            by_cid = orjson.loads(cast(bytes, await orders.order_status(ar, BTC, "bob", None, "b1")))
            assert (by_cid["order_id"], by_cid["status"]) == (ids[2], "filled")  # closed, still answered
            assert await orders.order_status(ar, BTC, "bob", ids[0], None) == codes.UNKNOWN_ORDER
            assert await orders.order_status(ar, BTC, "ann", "nonsense", None) == codes.UNKNOWN_ORDER
            listed = orjson.loads(await orders.open_orders(ar, (BTC, ETH), "ann"))
            assert [o["order_id"] for o in listed["orders"]] == [ids[0], ids[1]]
            [cancel] = append(r, [(ETH, Cancel(ETH, "ann", entry_to_seq(ids[1])))], record)
            assert await orders.caught_up(ar, ETH, entry_to_seq(cancel))
            listed = orjson.loads(await orders.open_orders(ar, (BTC, ETH), "ann"))
            assert [o["order_id"] for o in listed["orders"]] == [ids[0]]
            gone = orjson.loads(cast(bytes, await orders.order_status(ar, ETH, "ann", ids[1], None)))
            assert (gone["status"], gone["reason"]) == ("cancelled", "user")
            await run.stop()
    finally:
        r.close()
        await ar.aclose()
