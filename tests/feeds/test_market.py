"""MarketData: the events stream and live trades give each trade exactly once, in every order they
can arrive in (history first, live during the read, live ahead of the stream, a gap)."""

from __future__ import annotations

from typing import Any

import orjson
import redis.asyncio as aioredis

from services.bench.flow import SYMBOL
from services.feeds.market import MarketData, catch_up
from shared import keys
from shared.events import Event
from shared.stream import encode_events
from shared.wire import trade_message
from tests.feeds.test_server import INST, Matcher


def wire(e: Event) -> tuple[dict[str, Any], bytes]:
    msg = trade_message(e, INST)
    return msg, orjson.dumps(msg)


def fingerprint(md: MarketData) -> tuple[Any, ...]:
    bars = md.candles.series["1m"].snapshot(0)["candles"]
    return md.last_trade_id, orjson.dumps(bars), md.ticker.volume, md.ticker.quote


async def test_history_then_live_counts_every_trade_once(redis_url: str) -> None:
    m = await Matcher(redis_url, seed=4, ms_per_command=900).start()
    try:
        await m.run(30, 10)
        ref = MarketData(INST)  # every trade, live, in order: the truth
        ref.caught_up()
        for e in m.trades:
            ref.live(*wire(e))
        r = aioredis.Redis.from_url(redis_url)
        md = MarketData(INST)
        # Live trades arrive while the history is read: the newest of the stream and one beyond it.
        beyond = list(m.trades)
        await m.run(3, 10)
        beyond = m.trades[len(beyond) :]
        assert beyond, "the flow traded"
        for e in [*m.trades[-len(beyond) - 2 :]]:
            assert not md.live(*wire(e))  # held while catching up
        await catch_up(r, md)
        assert md.caught_up()
        for e in beyond:
            ref.live(*wire(e))
        assert fingerprint(md) == fingerprint(ref)
        assert md.last_trade_id == m.trades[-1][2] and len(md.trades(10_000)) == len(m.trades)
        # Every trade once, the same as the wire: stream trades rendered, live ones as they came.
        assert [t if isinstance(t, dict) else orjson.loads(t) for t in md.trades(5)] == [
            wire(e)[0] for e in m.trades[-5:]
        ]
        await r.aclose()
    finally:
        await m.stop()


async def test_a_gap_in_live_trades_is_read_from_the_stream(redis_url: str) -> None:
    r = aioredis.Redis.from_url(redis_url)
    m = await Matcher(redis_url, seed=6).start()
    try:
        md = MarketData(INST)
        await catch_up(r, md)
        assert md.caught_up()
        while len(m.trades) < 3:
            await m.run(1, 10)
        first, missed, after = m.trades[0], m.trades[1:-1], m.trades[-1]
        assert not md.live(*wire(first))
        assert md.live(*wire(after))  # trades are missing: the caller must read the stream
        assert md.catching_up and md.last_trade_id == first[2]
        await catch_up(r, md)
        assert md.caught_up()
        assert md.last_trade_id == after[2] and len(md.recent) == 2 + len(missed)
    finally:
        await m.stop()
        await r.aclose()


async def test_held_trades_ahead_of_the_stream_wait_for_another_read(redis_url: str) -> None:
    r = aioredis.Redis.from_url(redis_url)
    md = MarketData(INST)
    await catch_up(r, md)  # an empty stream
    assert md.caught_up()
    m = await Matcher(redis_url, seed=8).start()
    try:
        while len(m.trades) < 3:
            await m.run(1, 10)
        assert not md.live(*wire(m.trades[0]))
        md.catching_up = True  # as after a lost pub/sub connection
        assert not md.live(*wire(m.trades[-1]))  # held
        assert not md.caught_up()  # does not follow on from trade 1: read the stream again
        assert md.caught_up(force=True) and md.last_trade_id == m.trades[-1][2]
        assert len(md.recent) == 2  # forced: the trades never read are missing, nothing is doubled
    finally:
        await m.stop()
        await r.aclose()


async def test_the_stream_is_read_in_chunks(redis_url: str) -> None:
    r = aioredis.Redis.from_url(redis_url)
    trade = list(await _one_trade(redis_url))
    entries = []
    for i in range(1, 1203):  # more than two chunks of READ_CHUNK entries
        e = list(trade)
        e[2] = i  # trade id
        entries.append(encode_events([[f"{i}-0", [e]]]))
    pipe = r.pipeline(transaction=False)
    for data in entries:
        pipe.xadd(keys.events(SYMBOL), {"d": data})
    await pipe.execute()
    md = MarketData(INST)
    await catch_up(r, md)
    assert md.caught_up() and md.last_trade_id == 1202 and md.candles.series["1d"].bars[-1].trades == 1202
    await r.aclose()


async def _one_trade(redis_url: str) -> Event:
    m = Matcher(redis_url, seed=9)
    while not m.trades:
        cmd, seq = next(m.steps)
        m.trades.extend(e for e in m.engine.apply(cmd, seq, seq) if e[0] == "trade")
    await m.redis.aclose()
    return m.trades[0]
