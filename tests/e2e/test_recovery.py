"""kill -9 in the middle of things, then restart: nothing acknowledged is lost, nothing is published
twice, and the book is the book of an uninterrupted run.

The uninterrupted run is a fresh Engine (cross-checked against the naive reference model) fed every
entry of the orders streams; the stack's tap keeps them all (see conftest). Clients are real
WebSocket connections to the real processes; trades and l2 subscribers reconnect whenever their feed
goes away, and every trade id they ever receive is counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections import Counter
from collections.abc import Callable
from decimal import Decimal

import pytest
from cme_client import Connection, L2Book, Message, Rejected, gateway_session, is_type, subscribe

from services.matcher.checkpoint import directory
from shared.commands import NewOrder
from tests.e2e.client import FlowClient, WireFlow, place
from tests.e2e.conftest import Replay, Stack, current_book, reports, without_latency

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(90)]

SYMBOLS = ("BTC-USDT", "ETH-USDT")
NAMES = ("ann", "ben", "cat", "dan", "eve")


class Watcher:
    """A feed subscriber for one symbol that reconnects (and resubscribes) whenever its connection
    ends; it keeps every connection, so everything it ever received can be checked."""

    def __init__(self, url: str, symbol: str, channel: str | None = None) -> None:
        self.url, self.symbol, self.channel = url, symbol, channel
        self.conns: list[Connection] = []
        self.ready = asyncio.Event()
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            try:
                conn = await subscribe(self.url, self.symbol, channel=self.channel, retry_for=60)
            except (OSError, TimeoutError, Rejected):  # not up yet, or dying
                await asyncio.sleep(0.1)
                continue
            self.conns.append(conn)
            self.ready.set()
            await conn.closed.wait()
            self.ready.clear()

    def trades(self) -> list[Message]:
        return [m for c in self.conns for m in c.since(0, is_type("trade", symbol=self.symbol))]

    async def wait_connected(self, timeout: float = 30.0) -> None:
        await asyncio.wait_for(self.ready.wait(), timeout)

    async def close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self._task
        for conn in self.conns:
            await conn.close()


def plan_flow(seed: int, total: int) -> list[list[Message]]:
    """Each client's share of a seeded flow over both symbols."""
    flow = WireFlow(seed, SYMBOLS)
    rng = random.Random(seed + 1)
    plan: list[list[Message]] = [[] for _ in NAMES]
    for _ in range(total):
        i = rng.randrange(len(NAMES))
        plan[i].append(flow.next(NAMES[i]))
    return plan


async def send_paced(client: FlowClient, msgs: list[Message], seconds: float) -> int:
    """Send msgs spread evenly over `seconds`, without waiting for answers. Returns how many were
    sent before the connection closed (all of them if it stayed open)."""
    t0 = time.monotonic()
    for k, msg in enumerate(msgs):
        delay = t0 + seconds * k / len(msgs) - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        if client.conn.closed.is_set():
            return k
        try:
            await client.send(msg)
        except ConnectionError:
            client.sent.pop()
            return k
    return len(msgs)


def first_report(m: Message) -> bool:
    """The report that accepts or rejects a new order (one per acked new order)."""
    return m.get("type") == "execution" and m.get("exec_type") in ("new", "rejected")


def acked(clients: list[FlowClient]) -> int:
    return sum(len(c.answers()) for c in clients)


async def wait_for(cond: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


async def replays_after_idle(stack: Stack, clients: list[FlowClient]) -> dict[str, Replay]:
    """Once every message the clients sent is answered (so on the stream) and the matcher has applied
    everything: the uninterrupted run of each symbol, and a check that the matcher committed each
    command's events exactly once, equal to that run's."""
    for client in clients:
        await client.wait_answered()
    await asyncio.to_thread(stack.wait_idle, 45.0)
    out = {}
    for symbol in SYMBOLS:
        rep = out[symbol] = await asyncio.to_thread(stack.replay, symbol)
        await asyncio.to_thread(stack.check_committed_events, symbol, rep)
    return out


async def check_all_acked_and_on_the_streams(
    stack: Stack, clients: list[FlowClient], replays: dict[str, Replay]
) -> None:
    """Every message was acked; every acked new order is on its symbol's orders stream under the
    acked id, and the streams hold exactly the acked messages, nothing else."""
    acked_new: dict[str, set[str]] = {s: set() for s in SYMBOLS}
    acked_all: Counter[str] = Counter()
    for client in clients:
        for sent, answer in await client.wait_answered():
            assert answer["type"] == "ack", (sent, answer)
            acked_all[sent["symbol"]] += 1
            if sent["op"] == "new":
                acked_new[sent["symbol"]].add(answer["order_id"])
    for symbol, rep in replays.items():
        assert len(rep.entries) == acked_all[symbol], f"{symbol}: stream entries != acked messages"
        new_ids = {entry_id for entry_id, cmd in rep.entries if isinstance(cmd, NewOrder)}
        assert acked_new[symbol] == new_ids, f"{symbol}: acked new orders != new orders on the stream"


async def check_book(stack: Stack, symbol: str, rep: Replay) -> None:
    fresh = await current_book(stack, symbol)
    assert (fresh["seq"], fresh["bids"], fresh["asks"]) == (rep.book_seq, *rep.book()), (
        f"{symbol}: the book after recovery is not the uninterrupted run's"
    )


async def check_l2_subscriber(watcher: Watcher, rep: Replay) -> None:
    """The l2 subscriber's latest connection: its snapshot plus updates (and any resync snapshots),
    seq contiguous, rebuild the uninterrupted run's book."""
    conn, symbol = watcher.conns[-1], watcher.symbol
    await conn.wait_for(lambda m: m.get("symbol") == symbol and m.get("seq") == rep.book_seq)
    book = L2Book(conn.since(0, is_type("l2_snapshot"))[0])
    book.apply_all(conn.messages)
    assert (book.seq, *book.levels()) == (rep.book_seq, *rep.book()), f"{symbol}: l2 subscriber's book"


async def check_trades_once(watcher: Watcher, rep: Replay, *, complete: bool) -> None:
    """No trade id delivered twice, over every connection of the subscriber; each delivered trade is
    the uninterrupted run's trade with that id; each connection's trades are contiguous; with
    `complete`, every trade was delivered."""
    if complete and rep.trade_seq:
        await wait_for(lambda: len(watcher.trades()) >= rep.trade_seq, 15, f"{watcher.symbol} trades")
    await asyncio.sleep(0.2)  # a duplicate would arrive right behind the rest
    got = watcher.trades()
    ids = [m["trade_id"] for m in got]
    twice = sorted(i for i, n in Counter(ids).items() if n > 1)
    assert not twice, f"{watcher.symbol}: trade ids delivered more than once: {twice[:20]}"
    by_id = {m["trade_id"]: m for m in rep.trades}
    assert all(without_latency(m) == by_id.get(m["trade_id"]) for m in got), "a trade differs from the replay"
    for conn in watcher.conns:
        one = [m["trade_id"] for m in conn.since(0, is_type("trade"))]
        assert one == list(range(one[0], one[0] + len(one))) if one else True, f"gap in {one}"
    if complete:
        assert ids == list(range(1, rep.trade_seq + 1)), f"{watcher.symbol}: trade ids not contiguous"


async def check_exec_reports(clients: list[FlowClient], replays: dict[str, Replay]) -> None:
    """Each account's connection got exactly the uninterrupted run's reports (and matcher rejects),
    each once, in order; in particular one new-or-rejected report per acked new order."""
    for symbol, rep in replays.items():
        outcomes = rep.new_order_outcomes()
        for client in clients:
            want = [m for m in rep.execs.get(client.account, []) if m.get("symbol") == symbol]

            def arrived(conn: Connection = client.conn, s: str = symbol, n: int = len(want)) -> bool:
                return len(reports(conn, s)) >= n

            await wait_for(arrived, 15, f"{client.account}'s {symbol} reports")
            await asyncio.sleep(0.05)
            got = reports(client.conn, symbol)
            firsts = Counter(m["order_id"] for m in got if m.get("exec_type") in ("new", "rejected"))
            acked_ids = [a["order_id"] for a in client.conn.since(0, is_type("ack", op="new", symbol=symbol))]
            assert all(firsts[oid] == 1 for oid in acked_ids), "one new/rejected report per acked order"
            assert set(firsts) == set(acked_ids) and all(oid in outcomes for oid in acked_ids)
            assert got == want, f"{client.account} {symbol}: reports differ from the replay"


class Clients:
    """The flow's traders and the feed subscribers of a test, closed at the end."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.traders: list[FlowClient] = []
        self.trades: dict[str, Watcher] = {}
        self.l2: dict[str, Watcher] = {}

    async def open(self, *, l2: bool = True) -> Clients:
        self.trades = {s: Watcher(self.stack.trades_url, s, "trades") for s in SYMBOLS}
        if l2:
            self.l2 = {s: Watcher(self.stack.md_url, s) for s in SYMBOLS}
        for w in [*self.trades.values(), *self.l2.values()]:
            await w.wait_connected()
        for w in self.l2.values():
            await w.conns[-1].wait_for(is_type("l2_snapshot"))
        self.traders = [await self.trader(n) for n in NAMES]
        return self

    async def trader(self, name: str) -> FlowClient:
        return FlowClient(await gateway_session(self.stack.gateway_url, name, retry_for=10), name)

    async def close(self) -> None:
        for w in [*self.trades.values(), *self.l2.values()]:
            await w.close()
        for t in self.traders:
            await t.conn.close()


# ---------------------------------------------------------------------------------------------
@pytest.mark.timeout(120)
async def test_kill_9_of_the_matcher_mid_flow(stack: Stack) -> None:
    """2000 messages from five clients over about seven seconds. Once a checkpoint exists and 35 %
    are acked, the matcher is killed with SIGKILL; the clients keep sending and the gateway keeps
    acking (Redis is up). At 60 % a new matcher starts on the same data dir and Redis: checkpoint,
    replay of what was committed (silently), then the backlog, live."""
    c = await Clients(stack).open()
    try:
        total = 2000
        plan = plan_flow(seed=424242, total=total)
        checkpoints = directory(stack.data_dir, SYMBOLS[0])

        async def crash_and_restart() -> None:
            await wait_for(lambda: acked(c.traders) >= 0.35 * total and any(checkpoints.glob("*-*")), 30,
                           "35 % acked and a checkpoint written")  # fmt: skip
            stack.matcher.kill()
            killed_at = acked(c.traders)
            applied = [stack.counters(s)[1] for s in SYMBOLS]
            await wait_for(lambda: acked(c.traders) >= 0.6 * total, 30, "60 % acked")
            assert acked(c.traders) > killed_at, "the gateway acks while the matcher is down"
            assert [stack.counters(s)[1] for s in SYMBOLS] == applied, "nothing was applied meanwhile"
            stack.matcher.start()

        sends = (send_paced(t, p, 7.0) for t, p in zip(c.traders, plan, strict=True))
        await asyncio.gather(crash_and_restart(), *sends)
        assert stack.matcher.starts == 2
        await asyncio.to_thread(stack.wait_matcher)
        replays = await replays_after_idle(stack, c.traders)
        await check_all_acked_and_on_the_streams(stack, c.traders, replays)
        log = stack.matcher.text()
        assert "checkpoint at" in log and "replayed" in log, log[-2000:]
        for symbol, rep in replays.items():
            assert rep.trade_seq > 50, f"{symbol}: the flow should trade"
            await check_book(stack, symbol, rep)
            await check_l2_subscriber(c.l2[symbol], rep)
            await check_trades_once(c.trades[symbol], rep, complete=True)
            assert len(c.trades[symbol].conns) == 1, "the feed stayed up: no reconnect was needed"
        await check_exec_reports(c.traders, replays)
    finally:
        await c.close()


@pytest.mark.timeout(120)
async def test_matcher_killed_again_while_it_catches_up(stack_factory: Callable[..., Stack]) -> None:
    """A backlog builds up while the matcher is down; the next matcher is killed while it works
    through it (small batches, so that takes a while), and a third one finishes. Each command is
    still applied, committed and reported exactly once."""
    stack = stack_factory(matcher_args=["--batch", "1"])  # one commit per entry: a slow catch-up
    c = await Clients(stack).open(l2=False)
    try:
        plan = plan_flow(seed=31337, total=1500)
        first = [p[: len(p) // 3] for p in plan]
        rest = [p[len(p) // 3 :] for p in plan]
        await asyncio.gather(*(send_paced(t, p, 1.0) for t, p in zip(c.traders, first, strict=True)))
        await asyncio.to_thread(stack.wait_idle)
        stack.matcher.kill()
        await asyncio.gather(*(send_paced(t, p, 1.0) for t, p in zip(c.traders, rest, strict=True)))
        await wait_for(lambda: acked(c.traders) == 1500, 30, "every message acked")
        appended = sum(stack.counters(s)[0] for s in SYMBOLS)
        applied = sum(stack.counters(s)[1] for s in SYMBOLS)
        assert applied < appended - 500

        def kill_after(progress: int) -> int:
            """Kill the matcher once it has applied `progress` more entries (polled tightly)."""
            deadline = time.monotonic() + 30
            while sum(stack.counters(s)[1] for s in SYMBOLS) < applied + progress:
                assert stack.matcher.alive and time.monotonic() < deadline, "no progress"
                time.sleep(0.001)
            stack.matcher.kill()
            return sum(stack.counters(s)[1] for s in SYMBOLS)

        stack.matcher.start()
        caught_up = await asyncio.to_thread(kill_after, 50)
        assert applied < caught_up < appended, (
            f"killed in the middle of the backlog: {applied} {caught_up} {appended}"
        )
        stack.matcher.start()
        await asyncio.to_thread(stack.wait_matcher)

        replays = await replays_after_idle(stack, c.traders)
        await check_all_acked_and_on_the_streams(stack, c.traders, replays)
        for symbol, rep in replays.items():
            await check_book(stack, symbol, rep)
            await check_trades_once(c.trades[symbol], rep, complete=True)
        await check_exec_reports(c.traders, replays)
    finally:
        await c.close()


@pytest.mark.timeout(120)
async def test_kill_9_of_a_feeds_process_mid_flow(stack: Stack) -> None:
    """The feeds process dies mid-flow and comes back a second later: its subscribers reconnect, get
    a snapshot of the current book and the updates from there; no trade is delivered twice."""
    c = await Clients(stack).open()
    try:
        total = 1000
        plan = plan_flow(seed=55, total=total)
        feeds = stack.feeds[0]

        async def crash_and_restart() -> None:
            await wait_for(lambda: acked(c.traders) >= 0.3 * total, 30, "30 % acked")
            feeds.service.kill()
            await asyncio.sleep(1.0)
            await asyncio.to_thread(stack.start_feeds, feeds)

        sends = (send_paced(t, p, 4.0) for t, p in zip(c.traders, plan, strict=True))
        await asyncio.gather(crash_and_restart(), *sends)
        replays = await replays_after_idle(stack, c.traders)
        await check_all_acked_and_on_the_streams(stack, c.traders, replays)
        for symbol, rep in replays.items():
            await check_book(stack, symbol, rep)
            assert len(c.l2[symbol].conns) == 2 and len(c.trades[symbol].conns) == 2, "each reconnected once"
            await check_l2_subscriber(c.l2[symbol], rep)
            await check_trades_once(c.trades[symbol], rep, complete=False)
        # the gateway and the matcher never noticed: every report arrived
        await check_exec_reports(c.traders, replays)
    finally:
        await c.close()


@pytest.mark.timeout(120)
async def test_kill_9_of_the_gateway_mid_flow(stack: Stack) -> None:
    """The gateway dies mid-flow. Its clients reconnect to the restarted gateway and send the rest.
    Every acked order is on the stream (an unacked one may or may not be: the client cannot know,
    so the flow does not resend it), nothing is on the stream that was not sent, and the book and
    trades are the uninterrupted run's of what the stream holds."""
    c = await Clients(stack).open(l2=False)
    try:
        total = 1000
        plan = plan_flow(seed=808, total=total)

        async def crash() -> None:
            await wait_for(lambda: acked(c.traders) >= 0.4 * total, 30, "40 % acked")
            stack.gateway.kill()

        crashing = asyncio.create_task(crash())
        sent_before = await asyncio.gather(
            *(send_paced(t, p, 4.0) for t, p in zip(c.traders, plan, strict=True))
        )
        await crashing
        assert all(n < len(p) for n, p in zip(sent_before, plan, strict=True)), "the kill was mid-flow"
        old = c.traders
        await asyncio.to_thread(stack.gateway.start)
        await asyncio.to_thread(stack.wait_gateway)
        c.traders = [await c.trader(n) for n in NAMES]
        rests = [p[n:] for p, n in zip(plan, sent_before, strict=True)]
        await asyncio.gather(*(send_paced(t, p, 1.0) for t, p in zip(c.traders, rests, strict=True)))
        replays = await replays_after_idle(stack, c.traders)

        sent_new = {
            (t.account, m["client_order_id"]) for t in old + c.traders for m in t.sent if m["op"] == "new"
        }
        on_stream: Counter[tuple[str, str | None]] = Counter()
        acked_ids: dict[str, set[str]] = {s: set() for s in SYMBOLS}
        for t in old + c.traders:
            for sent, answer in zip(t.sent, t.answers(), strict=False):
                assert answer["type"] == "ack" and answer["client_order_id"] == sent.get("client_order_id")
                if sent["op"] == "new":
                    acked_ids[sent["symbol"]].add(answer["order_id"])
        for symbol, rep in replays.items():
            ids = {entry_id for entry_id, _ in rep.entries}
            assert acked_ids[symbol] <= ids, f"{symbol}: an acked order is not on the stream"
            for _, cmd in rep.entries:
                assert cmd is not None
                if isinstance(cmd, NewOrder):
                    on_stream[(cmd.account, cmd.client_order_id)] += 1
        assert set(on_stream) <= sent_new and max(on_stream.values()) == 1, "only what was sent, once"
        entries = sum(len(rep.entries) for rep in replays.values())
        assert acked(old + c.traders) <= entries <= sum(len(t.sent) for t in old + c.traders)
        for symbol, rep in replays.items():
            await check_book(stack, symbol, rep)
            await check_trades_once(c.trades[symbol], rep, complete=True)
        # On the new connections, each acked new order got exactly one new-or-rejected report.
        for t in c.traders:
            acks = t.conn.since(0, is_type("ack", op="new"))

            def all_reported(conn: Connection = t.conn, n: int = len(acks)) -> bool:
                return len(conn.since(0, first_report)) >= n

            await wait_for(all_reported, 15, f"{t.account}'s reports")
            await asyncio.sleep(0.05)
            firsts = Counter(m["order_id"] for m in t.conn.since(0, first_report))
            assert all(firsts[a["order_id"]] == 1 for a in acks)
        c.traders = old + c.traders
    finally:
        await c.close()


@pytest.mark.timeout(120)
async def test_kill_9_of_the_whole_stack_then_restart(stack: Stack) -> None:
    """A flow, then SIGKILL of every process, redis-server included, and a restart of everything on
    the same data dir and ports. The book is the uninterrupted run's, no trade id is delivered twice
    to a subscriber that reconnects across the restart, and new orders trade on from there."""
    c = await Clients(stack).open()
    try:
        plan = plan_flow(seed=777, total=800)
        await asyncio.gather(*(send_paced(t, p, 2.5) for t, p in zip(c.traders, plan, strict=True)))
        before = await replays_after_idle(stack, c.traders)
        await check_all_acked_and_on_the_streams(stack, c.traders, before)
        for symbol, rep in before.items():
            await check_book(stack, symbol, rep)
            await check_trades_once(c.trades[symbol], rep, complete=True)
        # Redis runs with appendfsync everysec: a SIGKILL of redis-server may lose up to the last
        # second of writes, acked appends and matcher commits included (an ack means "on the stream",
        # not "fsynced"). So the flow is over, the matcher idle, and we wait 1.5 s for the fsync before
        # killing; losing data within that window would be Redis's documented trade-off, not a bug.
        await asyncio.sleep(1.5)
        await asyncio.to_thread(stack.kill_all)
        assert not any(s.alive for s in stack.services())
        await asyncio.sleep(0.3)  # the subscribers see their feed gone and start reconnecting
        await asyncio.to_thread(stack.restart_all)
        await asyncio.to_thread(stack.wait_idle)
        for symbol, rep in before.items():
            assert stack.progress(symbol)["trade_seq"] == str(rep.trade_seq)
            await check_book(stack, symbol, rep)
        assert "replayed" in stack.matcher.text()

        # New orders trade on from where the book was: an IOC buy takes the best ask.
        for w in [*c.trades.values(), *c.l2.values()]:
            await w.wait_connected()
        symbol, rep = SYMBOLS[0], before[SYMBOLS[0]]
        best_price, best_qty = rep.book()[1][0]
        zed = await gateway_session(stack.gateway_url, "zed", retry_for=10)
        try:
            qty = f"{min(Decimal(best_qty), Decimal('0.001')):.5f}"
            msg = {"op": "new", "symbol": symbol, "side": "buy", "type": "limit", "tif": "ioc",
                   "price": best_price, "quantity": qty, "client_order_id": "after-restart"}  # fmt: skip
            ack = await place(zed, msg)
            assert ack["type"] == "ack", ack
            fill = await zed.wait_for(is_type("execution", order_id=ack["order_id"], exec_type="trade"))
            assert (fill["trade_id"], fill["last_price"], fill["last_quantity"]) == (
                rep.trade_seq + 1, best_price, qty)  # fmt: skip
            expected_fee = Decimal(best_price) * Decimal(qty) * Decimal("0.0020")
            assert Decimal(fill["fee"]) == expected_fee and fill["status"] == "filled"
            new = await c.trades[symbol].conns[-1].wait_for(is_type("trade", trade_id=rep.trade_seq + 1))
            assert new["taker_order_id"] == ack["order_id"] and new["price"] == best_price
        finally:
            await zed.close()

        after = await replays_after_idle(stack, c.traders)
        for symbol, rep in after.items():
            await check_book(stack, symbol, rep)
            await check_l2_subscriber(c.l2[symbol], rep)
            await check_trades_once(c.trades[symbol], rep, complete=False)
            seen = {m["trade_id"] for m in c.trades[symbol].trades()}
            assert seen >= set(range(1, before[symbol].trade_seq + 1)), "every trade before the kill was seen"
            assert len(c.trades[symbol].conns) == 2, "the subscriber reconnected once, after the restart"
    finally:
        await c.close()


@pytest.mark.timeout(120)
async def test_kill_9_of_redis_alone(stack: Stack) -> None:
    """redis-server dies under a running stack and comes back on its AOF. The matcher exits by design
    (crash-only: a Redis failure mid-commit has an unknown outcome) and is started again; the gateway
    and the feeds reconnect and resubscribe on their own, keeping their clients' connections. A second
    flow on the same connections then gets every ack, report and trade exactly once."""
    c = await Clients(stack).open()
    try:
        plan = plan_flow(seed=4040, total=800)
        first = [p[: len(p) // 2] for p in plan]
        rest = [p[len(p) // 2 :] for p in plan]
        await asyncio.gather(*(send_paced(t, p, 1.5) for t, p in zip(c.traders, first, strict=True)))
        before = await replays_after_idle(stack, c.traders)
        await check_all_acked_and_on_the_streams(stack, c.traders, before)
        # appendfsync everysec: wait for the last writes to reach the disk (see the whole-stack test)
        await asyncio.sleep(1.5)
        stack.redis.kill()
        await wait_for(lambda: not stack.matcher.alive, 15, "the matcher to exit on the Redis failure")
        assert stack.matcher.proc is not None and stack.matcher.proc.returncode == 1
        assert stack.gateway.alive and stack.feeds[0].service.alive
        assert not any(t.conn.closed.is_set() for t in c.traders), "gateway connections survive"
        await asyncio.to_thread(stack.redis.start)
        stack.start_matcher()
        await asyncio.to_thread(stack.wait_matcher)
        await asyncio.to_thread(stack.wait_subscribed)
        for symbol, rep in before.items():
            await check_book(stack, symbol, rep)

        await asyncio.gather(*(send_paced(t, p, 1.5) for t, p in zip(c.traders, rest, strict=True)))
        replays = await replays_after_idle(stack, c.traders)
        await check_all_acked_and_on_the_streams(stack, c.traders, replays)
        for symbol, rep in replays.items():
            await check_book(stack, symbol, rep)
            await check_l2_subscriber(c.l2[symbol], rep)
            await check_trades_once(c.trades[symbol], rep, complete=True)
        await check_exec_reports(c.traders, replays)
    finally:
        await c.close()


@pytest.mark.timeout(120)
async def test_standby_matcher_takes_over_from_a_killed_one(stack: Stack) -> None:
    """A second matcher started on the same stack stands by (one matcher per symbol stream); when the
    live one is killed mid-flow it takes over, and nothing is applied or published twice."""
    c = await Clients(stack).open()
    try:
        standby = await asyncio.to_thread(stack.start_standby_matcher)
        total = 1200
        plan = plan_flow(seed=9001, total=total)

        async def crash() -> None:
            await wait_for(lambda: acked(c.traders) >= 0.4 * total, 30, "40 % acked")
            assert "live: " not in standby.text(), "the standby must not match while the lease is held"
            stack.matcher.kill()

        crashing = asyncio.create_task(crash())
        await asyncio.gather(*(send_paced(t, p, 4.0) for t, p in zip(c.traders, plan, strict=True)))
        await crashing
        await wait_for(lambda: "live: " in standby.text(), 30, "the standby to go live")
        assert "took over" in standby.text()
        replays = await replays_after_idle(stack, c.traders)
        await check_all_acked_and_on_the_streams(stack, c.traders, replays)
        for symbol, rep in replays.items():
            await check_book(stack, symbol, rep)
            await check_l2_subscriber(c.l2[symbol], rep)
            await check_trades_once(c.trades[symbol], rep, complete=True)
        await check_exec_reports(c.traders, replays)
    finally:
        await c.close()


@pytest.mark.timeout(90)
async def test_overloaded_while_the_matcher_is_down_then_accepting_again(
    stack_factory: Callable[..., Stack],
) -> None:
    """With the matcher dead, the gateway keeps acking until the lag (appended - applied) passes
    --max-lag, then answers new orders OVERLOADED with nothing queued; cancels still pass. Once a
    matcher has caught up, new orders are accepted again and everything acked is applied."""
    stack = stack_factory(gateway_args=["--max-lag", "100"])
    alice = await gateway_session(stack.gateway_url, "alice")
    try:
        stack.matcher.kill()
        codes = []
        for i in range(130):  # one at a time: each waits for its answer
            msg = {"op": "new", "symbol": "BTC-USDT", "side": "sell", "type": "limit", "price": "30000.00",
                   "quantity": "0.01", "client_order_id": f"o{i}"}  # fmt: skip
            reply = await place(alice, msg)
            codes.append(reply.get("code", reply["type"]))
        acks = codes.count("ack")
        assert 100 <= acks <= 102 and codes == ["ack"] * acks + ["OVERLOADED"] * (130 - acks), codes
        assert stack.counters("BTC-USDT")[0] == acks, "an OVERLOADED order is not queued"
        # ETH-USDT is not behind: its orders are accepted
        eth = await place(alice, {"op": "new", "symbol": "ETH-USDT", "side": "buy", "type": "limit",
                                  "price": "100.00", "quantity": "1", "client_order_id": "e1"})  # fmt: skip
        assert eth["type"] == "ack", eth
        cancel = await place(alice, {"op": "cancel", "symbol": "BTC-USDT", "client_order_id": "o0"})
        assert cancel["type"] == "ack", "cancels pass while overloaded: they relieve the book"

        stack.matcher.start()
        await asyncio.to_thread(stack.wait_matcher)
        await asyncio.to_thread(stack.wait_idle)
        deadline = time.monotonic() + 10
        while True:  # the gateway polls the lag every 50 ms
            msg = {"op": "new", "symbol": "BTC-USDT", "side": "sell", "type": "limit", "price": "30000.00",
                   "quantity": "0.01", "client_order_id": "again"}  # fmt: skip
            reply = await place(alice, msg)
            if reply["type"] == "ack" or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.1)
        assert reply["type"] == "ack", reply
        await asyncio.to_thread(stack.wait_idle)
        book = await current_book(stack, "BTC-USDT")
        assert book["asks"] == [["30000.00", f"{Decimal('0.01') * acks:.5f}"]], "o0 cancelled, 'again' added"
        rep = await asyncio.to_thread(stack.replay, "BTC-USDT")
        assert (book["bids"], book["asks"]) == rep.book()
    finally:
        await alice.close()
