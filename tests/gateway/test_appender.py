"""The appender on a real redis-server: plain XADDs, and one id-clock script call per batch with
balances on (ids unique and rising across every stream, errors per entry)."""

from __future__ import annotations

import asyncio

import pytest
import redis

from services.gateway.appender import OUTCOME_UNKNOWN, Appender
from shared import keys
from shared.ids import entry_to_seq

pytestmark = pytest.mark.timeout(30)


class Told:
    """A waiter that records how its append ended."""

    def __init__(self) -> None:
        self.done = asyncio.Event()
        self.entry_id: str | None = None
        self.reason: str | None = None

    def appended(self, entry_id: str, now_ns: int) -> None:
        self.entry_id = entry_id
        self.done.set()

    def failed(self, reason: str) -> None:
        self.reason = reason
        self.done.set()


async def _append_all(appender: Appender, items: list[tuple[str, bytes]]) -> list[Told]:
    told = [Told() for _ in items]
    for (symbol, entry), waiter in zip(items, told, strict=True):
        appender.submit(symbol, entry, waiter)
    await asyncio.gather(*(t.done.wait() for t in told))
    return told


@pytest.mark.parametrize("id_clock", [False, True])
async def test_every_entry_lands_in_order_and_is_counted(redis_url: str, id_clock: bool) -> None:
    r = redis.Redis.from_url(redis_url)
    appender = Appender(redis_url, id_clock=id_clock)
    appender.start()
    try:
        items = [("BTC-USDT" if i % 3 else "ETH-USDT", b"[%d]" % i) for i in range(300)]
        told = await _append_all(appender, items)
    finally:
        await appender.close()
    ids = [t.entry_id for t in told]
    assert None not in ids
    for symbol in ("BTC-USDT", "ETH-USDT"):
        stream = [(i.decode(), f[b"d"]) for i, f in r.xrange(keys.orders(symbol))]
        assert stream == [(t.entry_id, e) for (s, e), t in zip(items, told, strict=True) if s == symbol]
        assert int(r.get(keys.appended(symbol)) or 0) == len(stream)
    if id_clock:  # one clock for the venue: every later append has a larger id, whatever its stream
        seqs = [entry_to_seq(i) for i in ids if i is not None]
        assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
        assert [i for i, _ in r.xrange(keys.id_clock())] == [max(ids, key=entry_to_seq).encode()]  # type: ignore[arg-type]


async def test_id_clock_follows_a_stream_whose_top_is_ahead(redis_url: str) -> None:
    r = redis.Redis.from_url(redis_url)
    ahead = "9999999999999-5"
    r.xadd(keys.orders("BTC-USDT"), {b"d": b"[]"}, id=ahead)
    appender = Appender(redis_url, id_clock=True)
    appender.start()
    try:
        first, second = await _append_all(appender, [("BTC-USDT", b"[1]"), ("ETH-USDT", b"[2]")])
    finally:
        await appender.close()
    assert first.entry_id == "9999999999999-6"
    assert second.entry_id is not None and entry_to_seq(second.entry_id) > entry_to_seq(first.entry_id)


async def test_id_clock_refuses_per_entry_and_survives_a_script_flush(redis_url: str) -> None:
    r = redis.Redis.from_url(redis_url)
    r.set(keys.orders("ETH-USDT"), b"not a stream")
    appender = Appender(redis_url, id_clock=True)
    appender.start()
    try:
        ok, refused = await _append_all(appender, [("BTC-USDT", b"[1]"), ("ETH-USDT", b"[2]")])
        assert ok.entry_id is not None and refused.entry_id is None
        assert refused.reason is not None and "WRONGTYPE" in refused.reason
        assert int(r.get(keys.appended("ETH-USDT")) or 0) == 0  # the refused entry is not counted
        r.script_flush()  # as after a Redis restart: the script is gone from the server
        (lost,) = await _append_all(appender, [("BTC-USDT", b"[3]")])
        assert lost.reason == OUTCOME_UNKNOWN and r.xlen(keys.orders("BTC-USDT")) == 1
        (again,) = await _append_all(appender, [("BTC-USDT", b"[4]")])  # reconnected, script loaded
        assert again.entry_id is not None and r.xlen(keys.orders("BTC-USDT")) == 2
    finally:
        await appender.close()
    assert int(r.get(keys.appended("BTC-USDT")) or 0) == 2
