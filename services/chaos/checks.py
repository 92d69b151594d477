"""What the soak checks at the end, against a replay of the orders streams through a fresh Engine.

The replay is the uninterrupted run: the core is a pure function of the stream, so whatever crashed,
stalled or restarted during the soak, the matcher's committed output must be exactly the replay's.
(The Engine itself is checked against the naive reference model by tests/core's differential tests.)
Each check adds what it finds to an `Anomalies`; the soak fails on any.

The matcher trims each orders stream below its older checkpoints, so an `OrdersTap` thread reads
every stream from the start as it grows and keeps every entry; the check that what the stream still
holds is exactly the tap's tail proves nothing was lost from it (Redis losing an acked append after a
kill -9 would show there, and as an acked order missing).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import orjson
import redis

from services.chaos.flow import Trader
from services.matcher.engine import Engine
from services.matcher.service import durable_events
from shared import keys
from shared.events import TRADE, Event
from shared.ids import SEQ_BITS, entry_to_seq
from shared.instruments import Instrument
from shared.stream import decode, decode_events, encode_events
from shared.wire import Rendered, render, split_exec_line

Message = dict[str, Any]
FULL_DEPTH = 1 << 62
SHOWN = 20  # anomalies listed in the summary


@dataclass
class Anomalies:
    items: list[tuple[str, str]] = field(default_factory=list)

    def add(self, kind: str, detail: str) -> None:
        self.items.append((kind, detail))

    def counts(self) -> Counter[str]:
        return Counter(kind for kind, _ in self.items)

    def __len__(self) -> int:
        return len(self.items)


class OrdersTap(threading.Thread):
    """Reads every symbol's orders stream from the start as it grows and keeps each entry; it
    reconnects when Redis goes away and goes on after the last entry it has."""

    def __init__(self, url: str, symbols: Sequence[str]) -> None:
        super().__init__(daemon=True, name="orders-tap")
        self.url = url
        self.by_key = {keys.orders(s).encode(): s for s in symbols}
        self.entries: dict[str, list[tuple[str, bytes]]] = {s: [] for s in symbols}
        self.last: dict[bytes, bytes] = dict.fromkeys(self.by_key, b"0-0")
        self.lock = threading.Lock()
        self._closing = threading.Event()

    def run(self) -> None:
        while not self._closing.is_set():
            client = redis.Redis.from_url(self.url, socket_timeout=5, socket_connect_timeout=1)
            try:
                while not self._closing.is_set():
                    resp = cast(
                        list[tuple[bytes, list[tuple[bytes, dict[bytes, bytes]]]]] | None,
                        client.xread(cast(Any, dict(self.last)), count=10_000, block=100),
                    )
                    for key, entries in resp or []:
                        with self.lock:
                            self.entries[self.by_key[key]] += [
                                (i.decode(), f.get(b"d", b"")) for i, f in entries
                            ]
                            self.last[key] = entries[-1][0]
            except (redis.RedisError, OSError):
                time.sleep(0.1)
            finally:
                with contextlib.suppress(redis.RedisError, OSError):
                    client.close()

    def count(self, symbol: str) -> int:
        with self.lock:
            return len(self.entries[symbol])

    def last_id(self, symbol: str) -> str | None:
        with self.lock:
            entries = self.entries[symbol]
            return entries[-1][0] if entries else None

    def snapshot(self, symbol: str) -> list[tuple[str, bytes]]:
        with self.lock:
            return list(self.entries[symbol])

    def close(self) -> None:
        self._closing.set()
        if self.is_alive():
            self.join(5)


@dataclass
class Replay:
    """A fresh Engine fed every entry of one symbol's orders stream."""

    inst: Instrument
    engine: Engine
    entry_ids: list[str]
    events: list[tuple[str, list[Event]]] = field(default_factory=list)
    trade_ids: list[int] = field(default_factory=list)
    execs: dict[str, list[Message]] = field(default_factory=dict)  # account -> reports, in exec order
    exec_count: int = 0

    def book(self) -> tuple[list[list[str]], list[list[str]]]:
        bids, asks = self.engine.books[self.inst.symbol].depth(FULL_DEPTH)
        p, q = self.inst.price_str, self.inst.qty_str
        return [[p(a), q(b)] for a, b in bids], [[p(a), q(b)] for a, b in asks]

    @property
    def book_seq(self) -> int:
        return self.engine.books[self.inst.symbol].book_seq

    @property
    def trade_seq(self) -> int:
        return self.engine.books[self.inst.symbol].trade_seq


def replay(inst: Instrument, tapped: list[tuple[str, bytes]]) -> Replay:
    """A fresh engine (balances off) fed every entry of one symbol's orders stream."""
    return replay_streams([inst], {inst.symbol: tapped}, risk=False)[inst.symbol]


def replay_venue(insts: list[Instrument], tapped: dict[str, list[tuple[str, bytes]]]) -> dict[str, Replay]:
    """With balances on: one Engine(risk=True) fed every symbol's entries in entry-id order (the venue
    clock's), as services.matcher.venue applies them."""
    return replay_streams(insts, tapped, risk=True)


def replay_streams(
    insts: list[Instrument], tapped: dict[str, list[tuple[str, bytes]]], risk: bool
) -> dict[str, Replay]:
    """Each symbol's events and exec lines as the matcher makes them: with balances, one engine over
    all streams merged by entry id; without, one engine per symbol."""
    shared = Engine(insts, risk=True) if risk else None
    scales = shared.ledger.scales if shared is not None and shared.ledger is not None else None
    by_symbol = {i.symbol: i for i in insts}
    out = {
        s: Replay(i, shared or Engine([i]), [e for e, _ in tapped.get(s, [])]) for s, i in by_symbol.items()
    }
    rendered = {s: Rendered() for s in by_symbol}  # per stream: exec lines are numbered on across commands
    merged = sorted(
        ((entry_to_seq(entry_id), symbol, entry_id, data) for symbol, entries in tapped.items()
         for entry_id, data in entries),
    )  # fmt: skip
    for seq, symbol, entry_id, data in merged:
        rep = out[symbol]
        cmd = decode({b"d": data}, scales)[0]
        if cmd is None or seq <= rep.engine.last_seq:
            continue
        ts = seq >> SEQ_BITS
        events = rep.engine.apply(cmd, seq, ts)
        rep.events.append((entry_id, events))
        rep.trade_ids += [e[2] for e in events if e[0] == TRADE]
        render(events, by_symbol[symbol], ts, rendered[symbol], scales=scales)
    for symbol, rep in out.items():
        for line in rendered[symbol].execs:
            account, body = split_exec_line(line)
            rep.execs.setdefault(account, []).append(orjson.loads(body))
        rep.exec_count = len(rendered[symbol].execs)
    return out


# Streams ------------------------------------------------------------------------------------------
def check_stream(r: redis.Redis, symbol: str, tapped: list[tuple[str, bytes]], found: Anomalies) -> None:
    """The stream as it is now is exactly the tail of everything the tap read (nothing lost, nothing
    rewritten), and the tap's ids rise."""
    ids = [i for i, _ in tapped]
    if ids != sorted(ids, key=entry_to_seq) or len(set(ids)) != len(ids):
        found.add("orders stream out of order", symbol)
    current = cast(list[tuple[bytes, dict[bytes, bytes]]], r.xrange(keys.orders(symbol)))
    stream = [(i.decode(), f.get(b"d", b"")) for i, f in current]
    if stream != tapped[len(tapped) - len(stream) :]:
        lost = sorted({i for i, _ in tapped[-len(stream) :]} - {i for i, _ in stream}) if stream else ids
        found.add("orders stream lost entries", f"{symbol}: {len(stream)} now vs the tap's tail; {lost[:5]}")


def check_acked(traders: Iterable[Trader], tapped: dict[str, set[str]], found: Anomalies) -> int:
    """Every acked new order is on its symbol's orders stream. Returns how many were checked."""
    n = 0
    for t in traders:
        for m in t.repeated_acks:
            found.add("order id acked twice", f"{t.account}: {m}")
        for symbol, order_id in t.acked_new:
            n += 1
            if order_id not in tapped.get(symbol, set()):
                found.add("acked order lost", f"{t.account} {symbol} {order_id}")
    return n


def check_events(r: redis.Redis, symbol: str, rep: Replay, found: Anomalies) -> None:
    """The matcher's events stream holds each command's events once (but its balance events, see
    durable_events), equal to the replay's, and the replay's trade ids run 1..N."""
    entries = cast(list[tuple[bytes, dict[bytes, bytes]]], r.xrange(keys.events(symbol)))
    got = [pair for _, fields in entries for pair in decode_events(fields[b"d"])]
    twice = sorted(i for i, n in Counter(p[0] for p in got).items() if n > 1)
    if twice:
        found.add("command committed twice", f"{symbol}: {len(twice)} entries, first {twice[:5]}")
    want = decode_events(encode_events([[i, durable_events(events)] for i, events in rep.events]))
    if got != want:
        first = next((k for k, (a, b) in enumerate(zip(got, want, strict=False)) if a != b), None)
        where = min(len(got), len(want)) if first is None else first
        found.add(
            "committed events differ from the replay",
            f"{symbol}: {len(got)} vs {len(want)} commands, first difference at {where}",
        )
    if rep.trade_ids != list(range(1, len(rep.trade_ids) + 1)):
        found.add("trade ids not contiguous", f"{symbol}: {rep.trade_ids[:10]}...")


def check_progress(progress: dict[bytes, bytes], symbol: str, rep: Replay, found: Anomalies) -> None:
    """The matcher's committed position and counters are the replay's."""
    want = {
        b"last_id": rep.entry_ids[-1] if rep.entry_ids else None,
        b"book_seq": str(rep.book_seq),
        b"trade_seq": str(rep.trade_seq),
    }
    if keys.PROGRESS_EXEC_SEQ.encode() in progress:
        want[keys.PROGRESS_EXEC_SEQ.encode()] = str(rep.exec_count)
    for name, value in want.items():
        got = progress.get(name, b"").decode() or None
        if got != value:
            found.add(
                "matcher progress differs from the replay", f"{symbol}: {name.decode()} {got} != {value}"
            )


def check_book(snapshot: Message, source: str, rep: Replay, found: Anomalies) -> None:
    """A feed's fresh l2_snapshot is the replay's book at the replay's book seq."""
    bids, asks = rep.book()
    if (snapshot.get("seq"), snapshot.get("bids"), snapshot.get("asks")) != (rep.book_seq, bids, asks):
        found.add(
            "book differs from the replay",
            f"{rep.inst.symbol} via {source}: seq {snapshot.get('seq')} vs {rep.book_seq}, "
            f"{len(snapshot.get('bids', []))}/{len(snapshot.get('asks', []))} levels vs "
            f"{len(bids)}/{len(asks)}",
        )


# Reports ------------------------------------------------------------------------------------------
@dataclass
class ReportCounts:
    expected: int = 0
    live: int = 0
    resumed: int = 0
    overlap: int = 0  # reports both delivered live and returned by a resume (expected, deduplicated)


def check_reports(t: Trader, replays: dict[str, Replay], found: Anomalies, counts: ReportCounts) -> None:
    """By exec_id: no report delivered live twice; every report received (live or resumed) is the
    replay's report with that exec_id; after the final catch-up every report the replay has for the
    account was received; each `executions` chain rises."""
    expected: dict[tuple[Any, Any], Message] = {
        (s, m["exec_id"]): m
        for s, rep in replays.items()
        for m in rep.execs.get(t.account, [])
        if "exec_id" in m
    }
    counts.expected += sum(len(rep.execs.get(t.account, [])) for rep in replays.values())
    counts.live += len(t.live)
    counts.resumed += len(t.resumed)
    live = Counter((m.get("symbol"), m.get("exec_id")) for m in t.live)
    for key, n in live.items():
        if n > 1:
            found.add("report delivered twice", f"{t.account} {key[0]} exec_id {key[1]} x{n}")
    received: dict[tuple[Any, Any], Message] = {}
    for m in (*t.live, *t.resumed):
        key = (m.get("symbol"), m.get("exec_id"))
        if not isinstance(key[1], int):
            found.add("report without exec_id", f"{t.account}: {m}")
            continue
        if expected.get(key) != m:
            found.add("report differs from the replay", f"{t.account} {key}: {m} vs {expected.get(key)}")
        received[key] = m
    counts.overlap += len(set(live) & {(m.get("symbol"), m.get("exec_id")) for m in t.resumed})
    missing = sorted(set(expected) - set(received), key=str)
    if missing:
        found.add("report missing after catch-up", f"{t.account}: {len(missing)}, first {missing[:5]}")
    for chain in t.resume_chains:
        if chain != sorted(set(chain)):
            found.add("executions answer out of order or repeated", f"{t.account}: {chain[:10]}")


def check_trade_reports(traders: Iterable[Trader], replays: dict[str, Replay], found: Anomalies) -> int:
    """The trade ids in the reports the accounts received are exactly 1..N per symbol, each in one
    maker and one taker report. Returns the number of distinct trades seen."""
    seen: dict[str, Counter[int]] = {s: Counter() for s in replays}
    for t in traders:
        unique = {(m.get("symbol"), m.get("exec_id"), m.get("trade_id")): m for m in (*t.live, *t.resumed)}
        for symbol, _, trade_id in unique:
            if trade_id is not None and symbol in seen:
                seen[symbol][trade_id] += 1
    total = 0
    for symbol, ids in seen.items():
        n = replays[symbol].trade_seq
        total += len(ids)
        if set(ids) != set(range(1, n + 1)):
            gaps = sorted(set(range(1, n + 1)) - set(ids))[:5]
            found.add("trade ids seen are not 1..N", f"{symbol}: {len(ids)} seen of {n}; missing {gaps}")
        repeated = sorted(i for i, k in ids.items() if k != 2)
        if repeated:
            found.add("trade not in exactly two reports", f"{symbol}: {repeated[:5]}")
    return total
