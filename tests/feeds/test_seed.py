"""The seed's dialect on the feeds: L2_UPDATE and TRADE_REPORT rendering (pure), and which
connections get them, over real sockets with a real Engine playing the matcher (tests.feeds.test_server)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import orjson
import pytest
from cme_client import Connection, is_type

from services.feeds.fanout import IDLE, SEED_L2, SEED_TRADES
from services.feeds.seed import number, render_l2, trade_reports
from services.feeds.server import FeedServer
from services.feeds.views import BookView
from services.gateway import seed as gateway_seed
from services.gateway import validation
from services.matcher.engine import Engine
from shared import keys
from shared.commands import Command, NewOrder
from shared.ids import SEQ_BITS
from shared.instruments import default_instruments
from shared.wire import Rendered, l2_snapshot, render
from tests.feeds.test_server import Matcher
from tests.gateway.test_seed import BOOK, TAKERS

pytestmark = pytest.mark.timeout(60)

INSTRUMENTS = default_instruments()
BTC = "BTC-USDT"
INST = INSTRUMENTS[BTC]
T0 = 1_732_500_000_000  # ms
Msg = dict[str, Any]

# (price, quantity, aggressor, maker fee, taker fee) of each taker's trades, as the seed client shows them.
EXPECTED_TRADES = [
    [(104.0, 20.0, "BUY", 2.08, 4.16), (105.0, 10.0, "BUY", 1.05, 2.10)],
    [(98.0, 10.0, "SELL", 0.98, 1.96), (95.0, 5.0, "SELL", 0.475, 0.95)],
    [(95.0, 10.0, "SELL", 0.95, 1.90)],
]
FULL_BOOK = {
    "bids": [{"price": 98.0, "quantity": 10.0}, {"price": 95.0, "quantity": 15.0}],
    "asks": [{"price": 104.0, "quantity": 20.0}, {"price": 105.0, "quantity": 10.0}],
}


def command(text: str) -> NewOrder:
    msg = validation.decode(text)
    assert msg is not None
    cmd = gateway_seed.parse(msg, BTC, INSTRUMENTS)
    assert type(cmd) is NewOrder
    return cmd


def apply(engine: Engine, cmd: Command, i: int, out: Rendered, recv_ns: int = 0, now_ns: int = 0) -> None:
    ts = T0 + i
    render(engine.apply(cmd, ts << SEQ_BITS, ts), INST, ts, out, recv_ns, now_ns)


def shown(report: Msg) -> list[tuple[float, float, str, float, float]]:
    return [
        (t["price"], t["quantity"], t["aggressor_side"], t["maker_fee"], t["taker_fee"])
        for t in report["trades"]
    ]


# Rendering --------------------------------------------------------------------------------------
def test_numbers_keep_the_exact_decimal_text() -> None:
    assert (
        orjson.dumps({"p": number("104.00"), "f": number("0.0000020001")}) == b'{"p":104.00,"f":0.0000020001}'
    )
    for bad in ("1e5", "1_000", " 1", "NaN", "", 1.5, None):
        with pytest.raises(ValueError):
            number(bad)


def test_the_seed_scenario_trade_reports() -> None:
    engine = Engine([INST])
    for i, text in enumerate(BOOK):
        apply(engine, command(text), i, Rendered())
    for i, (text, expected) in enumerate(zip(TAKERS, EXPECTED_TRADES, strict=True)):
        out = Rendered()
        apply(engine, command(text), 10 + i, out, recv_ns=1_000, now_ns=51_000)  # 50 us in the engine
        reports = trade_reports(out.trades)
        assert len(reports) == 1, "one TRADE_REPORT per command that traded"
        raw = reports[0]
        msg = json.loads(raw)  # what the seed client does: plain JSON numbers
        assert msg["type"] == "TRADE_REPORT" and shown(msg) == expected
        first, *rest = msg["trades"]
        assert first["engine_latency_ns"] == 50_000 and all("engine_latency_ns" not in t for t in rest)
        for t in msg["trades"]:
            assert t["symbol"] == BTC and t["timestamp"] == (T0 + 10 + i) / 1000
            assert f"{t['price']:.4f} {t['quantity']:.4f} {t['taker_fee']:.4f}"  # as the seed client prints
            assert t["taker_order_id"] == f"{T0 + 10 + i}-0" and type(t["trade_id"]) is int
        wire = [orjson.loads(line) for line in out.trades]
        assert [t["maker_order_id"] for t in msg["trades"]] == [t["maker_order_id"] for t in wire]
        for w in wire:  # the exact strings, as JSON numbers: 104.00 stays 104.00 on the wire
            assert (
                f'"price":{w["price"]},'.encode() in raw and f'"taker_fee":{w["taker_fee"]}'.encode() in raw
            )


def test_trades_of_consecutive_commands_in_one_batch_are_separate_reports() -> None:
    engine = Engine([INST])
    for i, text in enumerate(BOOK):
        apply(engine, command(text), i, Rendered())
    out = Rendered()  # one matcher batch holding all three takers
    for i, text in enumerate(TAKERS):
        apply(engine, command(text), 10 + i, out)
    reports = [json.loads(r) for r in trade_reports([*out.trades, b"not json"])]
    assert [shown(r) for r in reports] == EXPECTED_TRADES  # the unreadable line is left out
    assert all(r["trades"][0]["engine_latency_ns"] == 0 for r in reports)  # unknown: 0


def test_l2_update_is_the_top_ten_levels() -> None:
    view = BookView(INST)
    bids = [(10_000 - i, 100_000) for i in range(12)]
    asks = [(10_100 + i, 5 + i) for i in range(3)]
    view.apply_snapshot(orjson.loads(orjson.dumps(l2_snapshot(BTC, 7, bids, asks, INST))))
    raw = render_l2(view, 1732500000.25)
    msg = json.loads(raw)
    assert msg["type"] == "L2_UPDATE" and msg["symbol"] == BTC and msg["timestamp"] == 1732500000.25
    assert [b["price"] for b in msg["bids"]] == [(10_000 - i) / 100 for i in range(10)]
    assert msg["bids"][0]["quantity"] == 1.0 and msg["asks"][2] == {"price": 101.02, "quantity": 0.00007}
    assert b'{"price":100.00,"quantity":1.00000}' in raw


# Over the wire ----------------------------------------------------------------------------------
@contextlib.asynccontextmanager
async def stack(redis_url: str, **kw: Any) -> AsyncIterator[tuple[FeedServer, Matcher]]:
    """A feed and a matcher (an Engine answering snapshot requests), the feed synced to it."""
    interval = kw.pop("seed_interval", None)
    matcher = await Matcher(redis_url).start()
    server = FeedServer(redis_url, INSTRUMENTS, **kw)
    if interval is not None:
        server.seed.interval = interval
    await server.start("127.0.0.1", 0, 0)
    try:
        await until(lambda: server.views[BTC].synced, "the feed synced")
        yield server, matcher
    finally:
        await server.stop()
        await matcher.stop()


async def until(cond: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


async def publish(matcher: Matcher, texts: list[str], first: int) -> None:
    """Each seed order as its own matcher batch, published as the matcher does."""
    for i, text in enumerate(texts):
        async with matcher.lock:
            out = Rendered()
            now = time.time_ns()
            apply(matcher.engine, command(text), first + i, out, now - 20_000, now)
            md, trades, _ = out.payloads(now)
            if md:
                await matcher.redis.publish(keys.md_channel(BTC), md)
            if trades:
                await matcher.redis.publish(keys.trades_channel(BTC), trades)


async def open_client(url: str) -> Connection:
    return await Connection.open(url)


def seed_clients(server: FeedServer, channel: str) -> int:
    return len(server.fanout.subscribers(channel, BTC))


async def test_silent_clients_get_the_seed_scenario(redis_url: str) -> None:
    async with stack(redis_url) as (server, matcher):
        md_url, trades_url = f"ws://127.0.0.1:{server.md_port}", f"ws://127.0.0.1:{server.trades_port}"
        md, trades = await open_client(md_url), await open_client(trades_url)
        normal_md, normal_trades = await open_client(md_url), await open_client(trades_url)
        await normal_md.request({"op": "subscribe", "symbol": BTC}, is_type("l2_snapshot"))
        await normal_trades.request({"op": "subscribe", "symbol": BTC}, is_type("subscribed"))
        first = await md.wait_for(is_type("L2_UPDATE"))  # the book as it is, at once
        assert (first["bids"], first["asks"]) == ([], [])
        await until(lambda: seed_clients(server, SEED_TRADES) == 1, "the trade client taken for the seed's")

        await publish(matcher, BOOK, 0)
        full = await md.wait_for(lambda m: m.get("type") == "L2_UPDATE" and m["bids"] == FULL_BOOK["bids"])
        assert full["asks"] == FULL_BOOK["asks"] and full["symbol"] == BTC
        assert abs(full["timestamp"] - time.time()) < 60
        await publish(matcher, TAKERS, 10)
        reports = await trades.wait_count(is_type("TRADE_REPORT"), 3)
        assert [shown(r) for r in reports] == EXPECTED_TRADES
        # The takers emptied the book: both asks bought, both bids sold.
        last = await md.wait_for(
            lambda m: m.get("type") == "L2_UPDATE" and not m["bids"] and not m["asks"], start=1
        )
        assert last["symbol"] == BTC
        # Every seed message is formattable as the seed client prints it.
        for m in md.messages:
            for level in m["bids"] + m["asks"]:
                assert f"{level['price']:.4f} {level['quantity']:.4f}"

        # A subscriber gets the protocol's messages, never the seed's.
        await normal_trades.wait_count(is_type("trade"), 5)
        assert not normal_trades.since(0, is_type("TRADE_REPORT"))
        assert not normal_md.since(0, is_type("L2_UPDATE")) and normal_md.since(0, is_type("l2_update"))
        assert not md.since(0, lambda m: m.get("type") != "L2_UPDATE")
        assert not trades.since(0, lambda m: m.get("type") != "TRADE_REPORT")
        for c in (md, trades, normal_md, normal_trades):
            await c.close()


async def test_l2_updates_are_conflated_and_stop_when_the_client_speaks(redis_url: str) -> None:
    async with stack(redis_url, seed_interval=3600.0) as (server, matcher):  # the test ticks the timer
        md_url = f"ws://127.0.0.1:{server.md_port}"
        quiet, talker = await open_client(md_url), await open_client(md_url)
        witness = await open_client(md_url)
        await witness.request({"op": "subscribe", "symbol": BTC}, is_type("l2_snapshot"))
        await until(lambda: seed_clients(server, SEED_L2) == 2, "two seed clients")
        server.seed.send_l2()
        for c in (quiet, talker):
            assert (await c.wait_for(is_type("L2_UPDATE")))["bids"] == []

        await publish(matcher, BOOK, 0)  # four book changes ...
        await witness.wait_for(is_type("l2_update", seq=matcher.book.book_seq))
        server.seed.send_l2()  # ... one L2_UPDATE
        server.seed.send_l2()  # nothing changed since: nothing
        await talker.request({"op": "subscribe", "symbol": BTC}, is_type("l2_snapshot"))
        await publish(matcher, [BOOK[0]], 4)  # 98 x 10 more
        await witness.wait_for(is_type("l2_update", seq=matcher.book.book_seq))
        server.seed.send_l2()
        updates = await quiet.wait_count(is_type("L2_UPDATE"), 3)
        assert updates[1]["bids"] == FULL_BOOK["bids"] and updates[1]["asks"] == FULL_BOOK["asks"]
        assert updates[2]["bids"][0] == {"price": 98.0, "quantity": 20.0}
        # The talker spoke: from then on it is a client of this protocol only. (An answer to a message
        # sent now is queued behind anything sent to it before.)
        await talker.request({"op": "subscribe", "symbol": BTC}, is_type("l2_snapshot"))
        assert len(talker.since(0, is_type("L2_UPDATE"))) == 2
        assert talker.since(0, is_type("l2_update", seq=matcher.book.book_seq))
        assert seed_clients(server, SEED_L2) == 1
        for c in (quiet, talker, witness):
            await c.close()


async def test_the_idle_timeout_spares_seed_clients(redis_url: str) -> None:
    async with stack(redis_url, idle_timeout=1.0) as (server, matcher):
        md_url = f"ws://127.0.0.1:{server.md_port}"
        silent, spoken = await open_client(md_url), await open_client(md_url)
        await spoken.request({"op": "unsubscribe", "symbol": BTC}, is_type("unsubscribed"))
        assert await spoken.wait_closed() == (1008, IDLE)  # spoke, holds no subscription: idle
        assert not silent.closed.is_set()  # connected with it, silent: the seed's client
        await publish(matcher, BOOK, 0)
        await silent.wait_for(lambda m: m.get("type") == "L2_UPDATE" and m["asks"] == FULL_BOOK["asks"])
        await silent.close()
