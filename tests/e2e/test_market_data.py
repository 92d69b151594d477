"""Candles, ticker and trades over real processes: two feed processes hold the same state, and one
killed mid-flow and started again rebuilds it from the events stream without counting a trade twice.

Commands go straight onto the orders stream (a seeded flow; the gateway adds nothing these tests look
at), so the flow is large and quick; the feeds are asked over HTTP on their market-data ports."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable
from typing import Any

import orjson
import pytest

from services.bench.flow import SYMBOL, FlowConfig, FlowGenerator
from services.feeds.candles import INTERVALS
from shared import keys, stream
from shared.instruments import default_instruments
from tests.e2e.conftest import HOST, Feeds, Stack, wait_until

pytestmark = pytest.mark.timeout(120)
INST = default_instruments()[SYMBOL]


def get(feeds: Feeds, target: str) -> Any:
    with socket.create_connection((HOST, feeds.md_port), timeout=5) as sock:
        sock.sendall(f"GET {target} HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode())
        raw = b""
        while chunk := sock.recv(65536):
            raw += chunk
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), raw[:300]
    return orjson.loads(body)


class Flow:
    def __init__(self, stack: Stack, seed: int) -> None:
        self.stack = stack
        self.steps = FlowGenerator(FlowConfig(commands=10**6, seed=seed), INST).flow()

    def push(self, n: int, batch: int = 50) -> None:
        """n commands onto the orders stream, a batch per pipeline (counted as the gateway counts)."""
        for _ in range(0, n, batch):
            pipe = self.stack.r.pipeline(transaction=False)
            for _ in range(batch):
                cmd, _seq = next(self.steps)
                pipe.xadd(keys.orders(SYMBOL), {"d": stream.encode(cmd, time.time_ns())})
            pipe.incrby(keys.appended(SYMBOL), batch)
            pipe.execute()
            time.sleep(0.01)  # spread the flow over a few ms-stamped entries


def state(feeds: Feeds) -> dict[str, Any]:
    """Everything trade-built a feed serves, without what legitimately differs between processes:
    the ticker's ts and the trades' latency_us (None for trades read from the events stream)."""
    out: dict[str, Any] = {i: get(feeds, f"/v1/candles?symbol={SYMBOL}&interval={i}") for i in INTERVALS}
    ticker = get(feeds, f"/v1/ticker?symbol={SYMBOL}")
    del ticker["ts"]
    out["ticker"] = ticker
    trades = get(feeds, f"/v1/trades?symbol={SYMBOL}&limit=1000")["trades"]
    out["trades"] = [{**t, "latency_us": None} for t in trades]
    return out


def wait_trades(stack: Stack, feeds: list[Feeds]) -> int:
    """Until every feed has counted the matcher's last trade; returns its id."""
    stack.wait_idle()
    last = int(stack.progress(SYMBOL)["trade_seq"])
    assert last > 100, "the flow traded"

    def counted(f: Feeds) -> Callable[[], bool]:
        return lambda: (
            (t := get(f, f"/v1/trades?symbol={SYMBOL}&limit=1")["trades"]) != [] and t[-1]["trade_id"] == last
        )

    for f in feeds:
        wait_until(counted(f), 30, f"{f.service.name} counted trade {last}", stack.tails)
    return last


def candles_from_events(stack: Stack) -> dict[str, list[tuple[Any, ...]]]:
    """Bars from the committed trade events, computed here: (open_time, open, high, low, close,
    volume, trades) per interval."""
    trades = [e for _, events in stack.committed_events(SYMBOL) for e in events if e[0] == "trade"]
    out: dict[str, list[tuple[Any, ...]]] = {}
    for name, ms in INTERVALS.items():
        bars: dict[int, list[list[Any]]] = {}
        for e in trades:
            bars.setdefault(e[19] // ms * ms, []).append(e)
        out[name] = []
        for t, g in sorted(bars.items()):
            prices = [x[3] for x in g]
            p = INST.price_str
            volume = INST.qty_str(sum(x[4] for x in g))
            out[name].append((t, p(prices[0]), p(max(prices)), p(min(prices)), p(prices[-1]), volume, len(g)))
    return out


def bars(snapshot: dict[str, Any]) -> list[tuple[Any, ...]]:
    return [
        (c["open_time"], c["open"], c["high"], c["low"], c["close"], c["volume"], c["trades"])
        for c in snapshot["candles"]
    ]


async def test_two_feeds_agree_and_a_restarted_feed_rebuilds_the_same_state(
    stack_factory: Callable[..., Stack],
) -> None:
    stack = stack_factory()
    first = stack.feeds[0]
    second = stack.new_feeds()
    await asyncio.to_thread(stack.start_feeds, second)
    flow = Flow(stack, seed=41)
    await asyncio.to_thread(flow.push, 1500)
    await asyncio.to_thread(wait_trades, stack, [first, second])
    assert await asyncio.to_thread(state, first) == await asyncio.to_thread(state, second)

    # Killed mid-flow; the flow goes on without it, and on with it once it is back.
    second.service.kill()
    await asyncio.to_thread(flow.push, 1000)
    await asyncio.to_thread(stack.start_feeds, second)
    await asyncio.to_thread(flow.push, 1000)
    last = await asyncio.to_thread(wait_trades, stack, [first, second])
    ran, restarted = await asyncio.to_thread(state, first), await asyncio.to_thread(state, second)
    assert ran == restarted
    assert ran["trades"][-1]["trade_id"] == last and len(ran["trades"]) == 1000
    ids = [t["trade_id"] for t in ran["trades"]]
    assert ids == list(range(last - 999, last + 1))  # each once, in order
    want = await asyncio.to_thread(candles_from_events, stack)
    for name in INTERVALS:
        assert bars(ran[name]) == want[name][-500:], name
