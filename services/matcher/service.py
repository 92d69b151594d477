"""The matcher service: orders streams in, core events out, exactly once across crashes.

Per symbol: one Engine, fed by a plain XREAD from the last applied entry id. Each batch of entries (a
read's entries, COMMIT_ENTRIES at a time) is applied, rendered once, and committed by one Lua script call
together with the progress that makes it durable: the events stream entry, one PUBLISH per channel (md,
trades, exec), the exec log entry and the progress hash (last_id, applied, book_seq, trade_seq,
exec_seq). A crash before the call loses nothing (the batch is read again), a crash after it repeats
nothing (recovery replays up to progress.last_id without publishing).

Fencing: every write (batch commit, snapshot publish, checkpoint) is a script that first checks the
symbol's epoch (services.matcher.lease) is still the one this matcher's lease took, and otherwise does
nothing and answers "FENCED": a matcher that stalled while a standby took over cannot publish twice.
It then exits non-zero; restarted, it stands by.

Error handling is crash-only: when Redis fails mid-commit the outcome is unknown, so the process logs
and exits non-zero, and the next start (checkpoint + replay) is exact. That is also why the Redis client
never retries on its own: a retried commit could publish a batch twice. Every connection has connect and
read timeouts and TCP keepalive, so a silent partition also ends in an exit and a clean restart.

Recovery: newest valid checkpoint (Redis key or file), replay (checkpoint.entry_id, progress.last_id]
silently, then go live after max(checkpoint, progress) and publish a full l2_snapshot per symbol so feeds
resync.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import gc
import logging
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import hiredis
import orjson
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError, ResponseError

from services.matcher import checkpoint as ck
from services.matcher import readmodel
from services.matcher.batch import Item, apply_batch
from services.matcher.engine import Engine
from services.matcher.lease import RENEW, Fenced, LeaseLost, Leases
from services.matcher.snapshot import snapshot
from shared import aio, keys, logs, metrics
from shared.commands import Tick
from shared.events import BALANCE, TRADE, Event
from shared.ids import SEQ_BITS, entry_to_seq, seq_to_entry
from shared.instruments import Instrument, load_instruments
from shared.redis_acl import redact
from shared.resp import RespConnection, client_options, pack
from shared.stream import FIELD, decode, encode, encode_events
from shared.wire import Rendered, count_execs, frame, l2_snapshot, render

log = logging.getLogger("cme.matcher")

EVENTS_MAXLEN = 1_000_000  # approximate cap of each events stream
EXEC_LOG_MAXLEN = 1_000_000  # approximate cap of each exec log (entries are batches)
# Most entries per commit script, whatever a read returned. Redis runs one script at a time and nothing
# else meanwhile; its cost per entry grows with the payload (measured: 1.1-1.4 us of Redis time per entry
# at 100 entries, 1.7-8.4 us at 1000, whose ~1.3 MB scripts held Redis 10-50 ms each while the matcher
# caught up after a stall, stalling every gateway's appends behind them). The commits of one read still
# go out in one round trip; Redis serves other clients between them.
COMMIT_ENTRIES = 128
# A read of at least this many entries means a backlog: the next round trip then goes out before they are
# applied (Matcher._live). Below it the overlap saves little and each batch's commits would wait for the
# round trip in flight: reports a round trip later at low load.
OVERLAP_ENTRIES = COMMIT_ENTRIES
REPLAY_CHUNK = 5_000  # small enough to renew the lease between chunks on a loaded machine
POLL_SECONDS = 1.0  # stream length, lag and book gauges
FULL_DEPTH = 1 << 62
_EXEC_SEQ_FIELD = keys.PROGRESS_EXEC_SEQ.encode()
Entry = tuple[bytes, dict[bytes, bytes]]

# Fenced writes. Each checks the epoch before anything else and returns an error having done nothing
# when it moved on; the writes that could fail follow the check in an order where a failure leaves
# nothing half done (Lua scripts are atomic but not rolled back).
_FENCE = """
local epoch = redis.call('GET', KEYS[1])
if epoch ~= ARGV[1] then
  return redis.error_reply('FENCED epoch is ' .. tostring(epoch) .. ', this matcher holds ' .. ARGV[1])
end
"""
# KEYS: epoch, events, progress, exec log. ARGV: epoch, events data, md channel, md payload, trades
# channel, trades payload, exec channel, exec payload, exec log entry id, then the progress hash's six
# field/value pairs, then the order read model's records (services.matcher.readmodel). An empty
# payload is not published (an empty exec payload is not logged either).
_COMMIT_WRITES = f"""
if ARGV[8] ~= '' then
  redis.call('XADD', KEYS[4], 'MAXLEN', '~', {EXEC_LOG_MAXLEN}, ARGV[9], 'd', ARGV[8])
end
redis.call('XADD', KEYS[2], 'MAXLEN', '~', {EVENTS_MAXLEN}, '*', 'd', ARGV[2])
for i = 3, 7, 2 do
  if ARGV[i + 1] ~= '' then redis.call('PUBLISH', ARGV[i], ARGV[i + 1]) end
end
redis.call('HSET', KEYS[3], unpack(ARGV, 10, 21))
local i = 22
{readmodel.APPLY_LUA}
return 1
"""
_COMMIT = _FENCE + _COMMIT_WRITES
# KEYS: epoch. ARGV: epoch, channel, payload.
_PUBLISH = _FENCE + "return redis.call('PUBLISH', ARGV[2], ARGV[3])"
# KEYS: epoch, checkpoint. ARGV: epoch, blob.
_CHECKPOINT = _FENCE + "return redis.call('SET', KEYS[2], ARGV[2])"
_SCRIPTS = {"commit": _COMMIT, "publish": _PUBLISH, "checkpoint": _CHECKPOINT, "renew": RENEW}


@dataclass(frozen=True)
class Config:
    redis_url: str
    instruments: tuple[Instrument, ...]
    data_dir: Path
    checkpoint_every: int = 100_000
    checkpoint_seconds: float = 30.0
    keep_checkpoints: int = 3
    batch: int = 1000
    block_ms: int = 50
    connect_timeout: float = 30.0  # how long to wait for Redis at start
    redis_timeout: float = 5.0  # connect and per-command timeout (the XREAD: block_ms more)
    instance: str = field(default_factory=lambda: metrics.instance_name("matcher"))
    metrics_endpoint: str | None = None  # registered in keys.instances("matcher") for discovery
    freeze_gc: bool = False  # gc.freeze() after recovery (the process entry point sets it)
    checkpoint_key_file: Path | None = None  # HMAC key of checkpoints; None: {data_dir}/checkpoint.key
    risk: bool = False  # balances on: one Engine for every symbol (services.matcher.venue)


class SymbolState:
    """One symbol's engine, stream position, key names and metric children."""

    def __init__(self, inst: Instrument) -> None:
        s = self.symbol = inst.symbol
        self.inst = inst
        self.engine = Engine([inst])
        self.last_id = b"0-0"  # last applied entry (committed, or replayed at start)
        self.applied = 0  # entries applied in total, including ones that were not commands
        self.ckpt_applied = 0  # `applied` at the last checkpoint
        self.ckpt_mono = time.monotonic()
        self.exec_seq = 0  # the last exec_id assigned (published, or replayed at start)
        self.epoch = b""  # the fencing epoch of our lease, checked by every write
        self.snapshot_wanted = False
        self.tick_pending = False  # a Tick we appended has not been applied yet
        self.k_orders, self.k_events, self.k_progress = keys.orders(s), keys.events(s), keys.progress(s)
        self.k_checkpoint, self.k_appended = keys.checkpoint(s), keys.appended(s)
        self.k_md, self.k_trades = keys.md_channel(s), keys.trades_channel(s)
        self.k_exec, self.k_epoch = keys.exec_channel(s), keys.epoch(s)
        # The hot loop writes RESP itself: the keys it names, as bytes once.
        self.b_events, self.b_progress = self.k_events.encode(), self.k_progress.encode()
        self.b_epoch, self.b_exec_log = self.k_epoch.encode(), keys.exec_log(s).encode()
        self.commit_keys = (self.b_epoch, self.b_events, self.b_progress, self.b_exec_log)  # its KEYS
        self.b_md, self.b_trades, self.b_exec = (
            self.k_md.encode(),
            self.k_trades.encode(),
            self.k_exec.encode(),
        )
        self.m_command = metrics.COMMAND_SECONDS.labels(s)
        self.m_wait = metrics.STREAM_WAIT_SECONDS.labels(s)
        self.m_o2p = metrics.ORDER_TO_PUBLISH_SECONDS.labels(s)
        self.m_batch = metrics.BATCH_SIZE.labels(s)
        self.m_applied = metrics.APPLIED.labels(s)
        self.m_trades = metrics.TRADES.labels(s)
        self.m_notional = metrics.TRADED_NOTIONAL.labels(s)
        self.notional_unit = float(inst.tick_size * inst.lot_size)

    def snapshot_payload(self, now_ns: int) -> bytes:
        book = self.engine.books[self.symbol]
        bids, asks = book.depth(FULL_DEPTH)
        line = orjson.dumps(l2_snapshot(self.symbol, book.book_seq, bids, asks, self.inst))
        payload = frame([line], now_ns)
        assert payload is not None  # one line always makes a payload
        return payload


def durable_events(events: list[Event]) -> list[Event]:
    """What the events stream keeps of a command's events: all but the `balance` ones. Those follow
    from the commands (a replay makes them again), reach their owners as exec lines (the exec log keeps
    them) and the balances read model; encoding their wide integers cost the matcher more than every
    other event of the command together (stdlib JSON, since orjson refuses beyond 64 bits)."""
    return split_balances(events, {})


def split_balances(events: list[Event], latest: dict[str, dict[str, tuple[int, int]]]) -> list[Event]:
    """durable_events(events), while each balance event sets latest[account][asset] to its (available,
    held): the venue matcher's commit walks a command's events once for both."""
    durable: list[Event] = []
    for e in events:
        if e[0] == BALANCE:
            latest.setdefault(e[2], {})[e[3]] = (e[4], e[5])
        else:
            durable.append(e)
    return durable


def commit_block(
    st: SymbolState, pairs: list[list[Any]], rendered: Rendered, last_id: bytes, applied: int, now_ns: int
) -> list[bytes]:
    """One symbol's ARGV in a commit script (the layout at _COMMIT_WRITES): epoch, events, the three
    channels and payloads, the exec log entry id, and the progress hash's fields as of `last_id`."""
    md, trades, execs = rendered.payloads(now_ns)
    book, exec_seq = st.engine.books[st.symbol], rendered.exec_seq
    return [
        st.epoch, encode_events(pairs), st.b_md, md or b"", st.b_trades, trades or b"",
        st.b_exec, execs or b"", b"%d-0" % exec_seq,
        b"last_id", last_id, b"applied", b"%d" % applied, b"book_seq", b"%d" % book.book_seq,
        b"trade_seq", b"%d" % book.trade_seq, b"ts", b"%d" % (now_ns // 1_000_000),
        _EXEC_SEQ_FIELD, b"%d" % exec_seq,
    ]  # fmt: skip


def _entry_seq(entry_id: bytes) -> int | None:
    try:
        return entry_to_seq(entry_id)
    except ValueError:
        return None


class CommitFailed(RedisError):
    """Redis refused a batch's commit (NOSCRIPT after a Redis restart, an error inside the script): its
    outcome is unknown, so the process must restart."""


def _fence_error(reply: object) -> Fenced | None:
    text = str(reply)
    return Fenced(f"Redis refused a write: {text}") if text.startswith("FENCED") else None


def _due_ticks(
    states: list[SymbolState], now_ms: int, append: Callable[[SymbolState, bytes], bytes]
) -> list[bytes]:
    """XADDs of a Tick for each symbol whose next GTD expiry is due: time enters the core only through
    the stream, so an expiry fires (and replays) even when no order arrives. One Tick at a time per
    symbol; sent with the next round trip, whose XREAD then reads it back. Counted in the appended
    counter first, as the gateways count their entries, so appended - applied stays the lag. The
    replies (a count, an entry id) pass _check_commits like a commit's."""
    out = []
    for st in states:
        due = st.engine.next_expiry(st.symbol)
        if due is not None and due <= now_ms and not st.tick_pending:
            st.tick_pending = True
            out.append(pack(b"INCR", st.k_appended.encode()))
            out.append(append(st, encode(Tick(st.symbol), 0)))
    return out


def _check_commits(replies: list[Any], n: int) -> None:
    """The first n replies of a round trip, one per fenced script call, must all be successes (an
    append under the venue clock answers a list: one reply per entry)."""
    for reply in replies[:n]:
        if type(reply) is list and len(reply) == 1:
            reply = reply[0]
        if isinstance(reply, hiredis.ReplyError):
            raise _fence_error(reply) or CommitFailed(f"Redis refused a commit: {reply}")


def _stream_entries(resp: Any) -> list[tuple[bytes, list[Entry]]]:
    """XREAD's reply as (stream key, entries), for RESP2 (a list) and RESP3 (a dict) alike."""
    if not resp:
        return []
    if isinstance(resp, dict):
        return [(k, v[0] if v and isinstance(v[0], list) else v) for k, v in resp.items()]
    return [(k, v) for k, v in resp]


class Matcher:
    """All symbols of one process: `await run()` recovers, goes live, and returns the exit code."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.states = {inst.symbol: SymbolState(inst) for inst in cfg.instruments}
        self.by_stream = {st.k_orders.encode(): st for st in self.states.values()}
        self.by_request = {keys.snapshot_request_channel(s).encode(): st for s, st in self.states.items()}
        self.ready = asyncio.Event()  # set once recovery is done and the matcher is live
        self._stopping = False
        self._op = "connect"  # the Redis operation in flight, for REDIS_ERRORS
        self._ckpt_task: asyncio.Task[None] | None = None
        self.ckpt_key = ck.load_key(cfg.checkpoint_key_file or ck.default_key_file(cfg.data_dir))
        self._listener: asyncio.Task[None] | None = None
        # Never retried by the client: a retried commit could publish a batch twice (crash-only).
        common: dict[str, Any] = {"decode_responses": False, "retry": Retry(NoBackoff(), 0)}
        self.r: aioredis.Redis = aioredis.Redis.from_url(
            cfg.redis_url, **client_options(cfg.redis_timeout), **common
        )
        self.r_sub: aioredis.Redis = aioredis.Redis.from_url(
            cfg.redis_url, **client_options(cfg.redis_timeout, blocking=True), **common
        )
        self.leases = Leases(self.r, list(self.states), cfg.instance)
        self.sha: dict[str, bytes] = {}  # script name -> SHA1 (SCRIPT LOAD at start)
        self.scripts = dict(_SCRIPTS)

    def stop(self) -> None:
        """Ask for a clean stop: finish the batch in hand, checkpoint, return 0."""
        self._stopping = True

    def _rt(self, op: str) -> None:
        self._op = op
        metrics.REDIS_ROUNDTRIPS.labels(op).inc()

    # ------------------------------------------------------------------------------------------
    async def run(self) -> int:
        pubsub = self.r_sub.pubsub()
        try:
            await self._wait_for_redis()
            self._rt("script")
            for name, src in self.scripts.items():
                self.sha[name] = str(await self.r.script_load(src)).encode()
            self._rt("lease")
            if not await self.leases.acquire(lambda: self._stopping):
                log.info("stopped while standing by")
                return 0
            for s, st in self.states.items():
                st.epoch = b"%d" % self.leases.epochs[s]
            self._rt("subscribe")
            await pubsub.subscribe(*self.by_request)
            self._listener = asyncio.create_task(self._listen(pubsub))
            await self._recover_all()
            for st in self.states.values():
                await self._publish_snapshot(st)
            if self.cfg.metrics_endpoint:
                self._rt("register")
                await self.r.hset(keys.instances("matcher"), self.cfg.instance, self.cfg.metrics_endpoint)
            if self.cfg.freeze_gc:
                gc.freeze()  # the restored books are long-lived: keep any collection from scanning them
            positions = ", ".join(f"{s} after {st.last_id.decode()}" for s, st in self.states.items())
            log.info("live: %s", positions)
            self.ready.set()
            await self._live()
            await self._shutdown_checkpoints()
            self._rt("lease")
            await self.leases.release()
            if self.cfg.metrics_endpoint:
                self._rt("register")
                await self.r.hdel(keys.instances("matcher"), self.cfg.instance)
            log.info("stopped cleanly")
            return 0
        except (RedisError, OSError, hiredis.ProtocolError) as exc:
            metrics.REDIS_ERRORS.labels(self._op).inc()
            log.error("Redis failed during %s (%s: %s); exiting so a restart recovers exactly",
                      self._op, type(exc).__name__, exc)  # fmt: skip
            return 1
        except Fenced as exc:
            log.critical("FENCED: %s: another matcher took over while this one stalled; its last commit "
                         "was refused whole, nothing of it published; exiting", exc)  # fmt: skip
            return 1
        except LeaseLost as exc:
            log.error("%s: another matcher took over; exiting without publishing more", exc)
            return 1
        finally:
            for task in (self._listener, self._ckpt_task):
                if task is not None and not task.done():
                    task.cancel()
                elif task is not None and not task.cancelled():
                    task.exception()  # retrieved: the failure that matters was logged above
            with contextlib.suppress(RedisError, OSError):
                await pubsub.aclose()  # type: ignore[no-untyped-call]
                await self.r_sub.aclose()
                await self.r.aclose()

    async def _wait_for_redis(self) -> None:
        deadline = time.monotonic() + self.cfg.connect_timeout
        next_log, log_gap = (
            0.0,
            1.0,
        )  # the warning backs off (1, 2, 4 ... 30 s): an outage is one line, not a flood
        while True:
            try:
                self._rt("ping")
                await self.r.ping()
                return
            except (RedisError, OSError) as exc:
                now = time.monotonic()
                if now > deadline or self._stopping:
                    raise
                if now >= next_log:
                    log.warning("waiting for Redis at %s: %s", redact(self.cfg.redis_url), exc)
                    next_log, log_gap = now + log_gap, min(30.0, log_gap * 2)
                await asyncio.sleep(0.5)

    async def _listen(self, pubsub: aioredis.client.PubSub) -> None:
        """Snapshot requests from feeds: flag the symbol; the main loop answers in order."""
        while True:
            msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
            if msg is not None and msg.get("type") == "message":
                st = self.by_request.get(msg["channel"])
                if st is not None:
                    st.snapshot_wanted = True

    # Recovery ---------------------------------------------------------------------------------
    async def _recover_all(self) -> None:
        for st in self.states.values():
            await self._recover(st)

    async def _recover(self, st: SymbolState) -> None:
        self._rt("recover")
        blob = cast(bytes | None, await self.r.get(st.k_checkpoint))
        window = await self._stream_window(st)
        folder = ck.directory(self.cfg.data_dir, st.symbol)
        loaded = await asyncio.to_thread(ck.load_newest, st.symbol, blob, folder, self.ckpt_key,
                                         restore=ck.restore_engine(st.inst), window=window)  # fmt: skip
        if loaded is not None:
            ckpt, st.engine = loaded
            st.last_id, st.applied, st.exec_seq = ckpt.entry_id.encode(), ckpt.applied, ckpt.exec_seq
            log.info("%s: checkpoint at %s (%d entries applied)", st.symbol, ckpt.entry_id, ckpt.applied)
        st.ckpt_applied, st.ckpt_mono = st.applied, time.monotonic()
        await self._renew_if_due()  # loading a large checkpoint takes a while
        self._rt("recover")
        progress = cast(dict[bytes, bytes], await self.r.hgetall(st.k_progress))
        target = progress.get(b"last_id")
        replayed = 0
        if target is not None and entry_to_seq(target) > entry_to_seq(st.last_id):
            replayed = await self._replay_until(st, target)
            expected = progress.get(b"applied")
            if expected is not None and int(expected) != st.applied:
                log.warning("%s: replay gives %d entries applied, progress says %s", st.symbol, st.applied,
                            expected.decode())  # fmt: skip
        committed_execs = progress.get(keys.PROGRESS_EXEC_SEQ.encode())
        if committed_execs is not None and st.last_id == target and int(committed_execs) != st.exec_seq:
            # Only a checkpoint from before exec ids does this: go on from what clients were told.
            log.warning("%s: replay gives exec id %d, progress says %s; continuing from progress",
                        st.symbol, st.exec_seq, committed_execs.decode())  # fmt: skip
            st.exec_seq = int(committed_execs)
        metrics.REPLAYED.labels(st.symbol).set(replayed)
        log.info("%s: replayed %d entries up to %s", st.symbol, replayed, st.last_id.decode())

    async def _replay_until(self, st: SymbolState, target: bytes) -> int:
        replayed = 0
        while st.last_id != target:
            self._rt("replay")
            after = b"(" + st.last_id  # exclusive start
            entries = cast(list[Entry], await self.r.xrange(st.k_orders, after, target, count=REPLAY_CHUNK))
            if not entries:
                log.error("%s: orders stream ends before the committed entry %s; the state may be incomplete",
                          st.symbol, target.decode())  # fmt: skip
                st.last_id = target  # never publish again what was published
                break
            self._replay(st, entries)
            replayed += len(entries)
            await self._renew_if_due()  # a long replay must not lose the lease
        return replayed

    async def _renew_if_due(self) -> None:
        if self.leases.renew_due():
            self._rt("lease")
            await self.leases.renew()

    def _replay(self, st: SymbolState, entries: list[Entry]) -> None:
        """Apply already-committed entries: same state changes as live, nothing rendered or published."""
        engine = st.engine
        execs = st.exec_seq
        for raw_id, fields in entries:
            seq = _entry_seq(raw_id)
            cmd, _ = decode(fields)
            if cmd is not None and seq is not None and seq > engine.last_seq:
                execs += count_execs(engine.apply(cmd, seq, seq >> SEQ_BITS))
        st.exec_seq = execs
        st.last_id = entries[-1][0]
        st.applied += len(entries)

    async def _stream_window(self, st: SymbolState) -> ck.StreamWindow:
        """Where a checkpoint must end to fit this Redis's orders stream (one of another history not)."""
        self._rt("recover")
        try:
            info = await self.r.xinfo_stream(st.k_orders)
        except ResponseError:  # no such stream
            return ck.StreamWindow.from_xinfo(None)
        return ck.StreamWindow.from_xinfo(info)

    # Live -------------------------------------------------------------------------------------
    async def _live(self) -> None:
        """Read, apply, commit. Each round trip carries the previous batch's commits and the next
        XREAD in one write: one round trip per read, on a bare hiredis connection.

        At low load the batch in hand is applied first and its commits go out with a blocking read.
        A busy read (OVERLAP_ENTRIES or more) means a backlog: then the round trip that commits the
        previous batch and reads the next one goes out before the batch in hand is applied, so Redis
        runs it while this process matches, the two on the machine's two cores at once instead of
        taking turns. That read does not block: a blocked read would hold back the commits behind it.

        A round trip commits what was applied before it went out. Checkpoints are captured only when
        nothing applied is left uncommitted, so a due checkpoint makes the next round serial.

        The lease is renewed in the same round trip, after the commits: a matcher that wakes from a
        stall with a batch in hand has that commit refused (FENCED) before anything else happens."""
        states = list(self.states.values())
        self._rt("connect")
        cfg = self.cfg
        read_timeout = cfg.block_ms / 1000 + cfg.redis_timeout  # the XREAD may block that long first
        conn = await RespConnection.open(
            cfg.redis_url, connect_timeout=cfg.redis_timeout, read_timeout=read_timeout
        )
        publish_sha, renew_sha = self.sha["publish"], self.sha["renew"]
        commits: list[bytes] = []  # one fenced script call each
        streams: list[tuple[bytes, list[Entry]]] = []  # the last read's entries, not applied yet
        read_ns = 0
        next_poll = 0.0
        try:
            while True:
                if self._listener is not None and self._listener.done():
                    self._listener.result()  # re-raises the pub/sub connection's failure
                    raise ConnectionError("snapshot request listener stopped")
                stopping = self._stopping
                busy = (
                    not stopping
                    and sum(len(entries) for _, entries in streams) >= OVERLAP_ENTRIES
                    and not self._checkpoint_due()
                )
                if streams and not busy:
                    commits += self._apply_read(streams, read_ns)
                    streams = []
                if stopping and not commits:
                    return
                renewal = self.leases.renewal(renew_sha) if not stopping and self.leases.renew_due() else []
                if stopping:
                    reads = []
                elif busy:
                    reads = self._reads(states, self._positions(streams), block=False)
                else:
                    reads = self._reads(states, [st.last_id for st in states])
                self._rt("commit" if commits else "xread")  # a commit round trip also reads
                n = len(commits)
                pending = self._send(conn, b"".join(commits + renewal + reads), n + len(renewal) + len(reads))
                commits = []
                if busy:  # matched while Redis runs the round trip
                    commits = self._apply_read(streams, read_ns)
                    streams = []
                replies = await pending
                _check_commits(replies, n)
                if renewal:
                    self.leases.check_renewals(replies[n : n + len(renewal)])
                if stopping:
                    continue
                read_ns = time.time_ns()
                if not commits:  # everything applied is committed
                    self._maybe_checkpoint()
                if time.monotonic() >= next_poll:
                    next_poll = time.monotonic() + POLL_SECONDS
                    await self._poll(states)
                for st in states:
                    if st.snapshot_wanted:  # after the updates applied so far: its seq is theirs
                        st.snapshot_wanted = False
                        snap = st.snapshot_payload(time.time_ns())
                        fenced = (publish_sha, b"1", st.b_epoch, st.epoch, st.b_md, snap)
                        commits.append(pack(b"EVALSHA", *fenced))
                        metrics.PUBLISHED.labels("md").inc()
                streams = _stream_entries(replies[-1])
                commits += self._due_ticks(states, read_ns // 1_000_000)
        finally:
            conn.close()

    def _send(self, conn: RespConnection, payload: bytes, n: int) -> asyncio.Future[list[Any]]:
        """Write one round trip of n commands; its future gets the replies."""
        return conn.roundtrip(payload, n)

    def _reads(self, states: list[SymbolState], ids: list[bytes], block: bool = True) -> list[bytes]:
        """The round trip's reads of every stream from `ids` (in `states` order); the last one's reply
        is what _apply_read gets. Here one XREAD, blocking unless `block` is False: each symbol's
        stream stands alone."""
        wait = (b"BLOCK", b"%d" % self.cfg.block_ms) if block else ()
        streams = (st.k_orders.encode() for st in states)
        return [pack(b"XREAD", b"COUNT", b"%d" % self.cfg.batch, *wait, b"STREAMS", *streams, *ids)]

    def _positions(self, streams: list[tuple[bytes, list[Entry]]]) -> list[bytes]:
        """Each stream's position (in self.states order) once _apply_read has applied `streams`."""
        last = {key: entries[-1][0] for key, entries in streams if entries}
        return [last.get(key, st.last_id) for key, st in self.by_stream.items()]

    def _apply_read(self, streams: list[tuple[bytes, list[Entry]]], read_ns: int) -> list[bytes]:
        """Apply what one XREAD returned; returns the commits (fenced script calls) to send."""
        commits = []
        for key, entries in streams:
            st = self.by_stream[key]
            for i in range(0, len(entries), COMMIT_ENTRIES):
                commits.append(self._process(st, entries[i : i + COMMIT_ENTRIES], read_ns))
        return commits

    def _due_ticks(self, states: list[SymbolState], now_ms: int) -> list[bytes]:
        return _due_ticks(states, now_ms, self._append)

    def _append(self, st: SymbolState, entry: bytes) -> bytes:
        """The command that appends an entry to the symbol's orders stream, as a gateway would."""
        return pack(b"XADD", st.k_orders.encode(), b"*", FIELD, entry)

    def _process(self, st: SymbolState, entries: list[Entry], read_ns: int) -> bytes:
        """Apply a batch (at most COMMIT_ENTRIES) and render it; returns its commit (one fenced script)."""
        engine = st.engine
        read_ms = read_ns // 1_000_000
        items: list[Item] = []
        recvs: list[int] = []
        slots: list[int] = []  # per entry: its index in items, -1 when skipped
        last = engine.last_seq
        for raw_id, fields in entries:
            seq = _entry_seq(raw_id)
            cmd, recv_ns = decode(fields)
            if type(cmd) is Tick:
                st.tick_pending = False
            if cmd is None or seq is None or seq <= last:
                log.warning("%s: skipping entry %r: not a command", st.symbol, raw_id)
                slots.append(-1)
                continue
            last = seq
            slots.append(len(items))
            items.append((cmd, seq, seq >> SEQ_BITS))
            recvs.append(recv_ns)
        durations: list[float] = []
        results = apply_batch(engine.apply, items, durations)
        pairs = [
            [raw_id.decode(), results[i] if i >= 0 else []]
            for (raw_id, _), i in zip(entries, slots, strict=True)
        ]

        now_ns = time.time_ns()
        rendered = Rendered(st.exec_seq)
        records = readmodel.Records()
        inst = st.inst
        for events, (_, _, ts), recv_ns in zip(results, items, recvs, strict=True):
            render(events, inst, ts, rendered, recv_ns, now_ns)
            records.add(events, inst, ts)
        last_id = entries[-1][0]
        applied = st.applied + len(entries)
        exec_seq = rendered.exec_seq
        block = commit_block(st, pairs, rendered, last_id, applied, now_ns)
        commit = pack(b"EVALSHA", self.sha["commit"], b"4", *st.commit_keys, *block, *records.records())
        st.last_id, st.applied, st.exec_seq = last_id, applied, exec_seq

        # Metrics (cheap, batched): recorded as the batch goes out.
        st.m_batch.observe(len(entries))
        st.m_command.observe_many(durations)
        st.m_wait.observe_many([(read_ms - ts) * 1e-3 for _, _, ts in items])
        st.m_o2p.observe_many([(now_ns - r) * 1e-9 for r in recvs if r])
        st.m_applied.inc(len(entries))
        metrics.PUBLISHED.labels("md").inc(len(rendered.md))
        metrics.PUBLISHED.labels("trades").inc(len(rendered.trades))
        metrics.PUBLISHED.labels("exec").inc(len(rendered.execs))
        if rendered.trades:
            st.m_trades.inc(len(rendered.trades))
            notional = sum(e[3] * e[4] for events in results for e in events if e[0] == TRADE)
            st.m_notional.inc(notional * st.notional_unit)
        return commit

    async def _fenced(self, script: str, keys_: list[str], args: list[bytes]) -> None:
        """One fenced script call through redis-py; a moved epoch raises Fenced."""
        try:
            await self.r.evalsha(self.sha[script], len(keys_), *keys_, *args)  # type: ignore[arg-type]
        except ResponseError as exc:
            raise _fence_error(exc) or exc from None

    async def _publish_snapshot(self, st: SymbolState) -> None:
        """At start, before going live: the feeds resync from it."""
        st.snapshot_wanted = False
        self._rt("publish")
        payload = st.snapshot_payload(time.time_ns())
        await self._fenced("publish", [st.k_epoch], [st.epoch, st.b_md, payload])
        metrics.PUBLISHED.labels("md").inc()

    async def _poll(self, states: list[SymbolState]) -> None:
        pipe = self.r.pipeline(transaction=False)
        for st in states:
            pipe.xlen(st.k_orders)
            pipe.get(st.k_appended)
        self._rt("poll")
        res = await pipe.execute()
        for i, st in enumerate(states):
            s = st.symbol
            metrics.STREAM_LENGTH.labels(s).set(res[2 * i])
            appended = res[2 * i + 1]
            if appended is not None:
                metrics.MATCHER_LAG.labels(s).set(max(0, int(appended) - st.applied))
            book = st.engine.books[s]
            bid, _, ask, _ = book.bbo  # maintained by the engine on every command
            if bid is not None:
                metrics.BEST_PRICE.labels(s, "bid").set(float(st.inst.price_str(bid)))
            if ask is not None:
                metrics.BEST_PRICE.labels(s, "ask").set(float(st.inst.price_str(ask)))
            if bid is not None and ask is not None:
                metrics.SPREAD.labels(s).set(float(st.inst.price_str(ask - bid)))
            metrics.RESTING_ORDERS.labels(s).set(len(book.orders))

    # Checkpoints ------------------------------------------------------------------------------
    def _maybe_checkpoint(self) -> None:
        """Capture and write the checkpoint that is due, if any (callers: everything applied is
        committed)."""
        task = self._ckpt_task
        if task is not None:
            if not task.done():
                return  # one at a time
            self._ckpt_task = None
            task.result()  # a failed checkpoint (Redis) ends the process like any Redis failure
        st = self._due_state()
        if st is not None:
            self._ckpt_task = asyncio.create_task(self._checkpoint(st, self._capture(st)))

    def _checkpoint_due(self) -> bool:
        """Whether _maybe_checkpoint would capture one now: none is being written and one is _due."""
        task = self._ckpt_task
        return (task is None or task.done()) and self._due()

    def _due(self) -> bool:
        """A symbol's checkpoint is due (the venue matcher: its one checkpoint of every stream)."""
        return self._due_state() is not None

    def _due_state(self) -> SymbolState | None:
        """The first symbol whose checkpoint is due: enough applied, or long enough ago."""
        now = time.monotonic()
        for st in self.states.values():
            pending = st.applied - st.ckpt_applied
            due = pending >= self.cfg.checkpoint_every or now - st.ckpt_mono >= self.cfg.checkpoint_seconds
            if pending and due:
                return st
        return None

    async def _shutdown_checkpoints(self) -> None:
        if self._ckpt_task is not None:
            await self._ckpt_task
            self._ckpt_task = None
        for st in self.states.values():
            if st.applied != st.ckpt_applied:
                await self._checkpoint(st, self._capture(st))

    def _capture(self, st: SymbolState) -> ck.Checkpoint:
        """Copy the state now, synchronously: callers make sure everything applied is committed."""
        st.ckpt_applied, st.ckpt_mono = st.applied, time.monotonic()
        return ck.Checkpoint(st.symbol, st.last_id.decode(), st.applied, snapshot(st.engine), time.time_ns(),
                             exec_seq=st.exec_seq)  # fmt: skip

    async def _checkpoint(self, st: SymbolState, ckpt: ck.Checkpoint) -> None:
        await self._write_checkpoint(ckpt, st, st.k_checkpoint, [st])

    async def _write_checkpoint(
        self, ckpt: ck.Checkpoint, fence: SymbolState, key: str, covered: list[SymbolState]
    ) -> None:
        """Write a captured checkpoint (fenced by `fence`'s epoch) to Redis and a file; then trim the
        orders streams it covers below the oldest kept one. Encoding and file I/O run in a thread so
        matching goes on."""
        t0 = time.perf_counter()
        blob = await asyncio.to_thread(ck.encode, ckpt, self.ckpt_key)
        self._rt("checkpoint")
        await self._fenced("checkpoint", [fence.k_epoch, key], [fence.epoch, blob])
        folder = ck.directory(self.cfg.data_dir, ckpt.symbol)
        try:
            keep = self.cfg.keep_checkpoints
            kept = await asyncio.to_thread(_write_and_prune, folder, ckpt.entry_id, blob, keep)
        except OSError as exc:
            # The Redis copy stands; without the file the stream must keep what older files need.
            log.error("%s: checkpoint file in %s failed: %s; not trimming", ckpt.symbol, folder, exc)
        else:
            oldest = min([seq for seq, _ in kept] + [ckpt.seq])
            for st in covered:
                self._rt("trim")
                await self.r.xtrim(st.k_orders, minid=seq_to_entry(oldest), approximate=False)
        elapsed = time.perf_counter() - t0
        for st in covered:  # by symbol, even when one checkpoint covers several (dashboards, alerts)
            metrics.CHECKPOINT_SECONDS.labels(st.symbol).observe(elapsed)
            metrics.CHECKPOINT_TIMESTAMP.labels(st.symbol).set(time.time())
        log.info("%s: checkpoint at %s (%d bytes, %.3f s)", ckpt.symbol, ckpt.entry_id, len(blob), elapsed)


def _write_and_prune(folder: Path, entry_id: str, blob: bytes, keep: int) -> list[tuple[int, Path]]:
    ck.write_file(folder, entry_id, blob)
    return ck.prune(folder, keep)


# Process entry point ----------------------------------------------------------------------------
def config_from_args(args: argparse.Namespace, metrics_endpoint: str | None = None) -> Config:
    instruments = load_instruments(args.instruments)
    if args.symbols:
        wanted = [s.strip() for s in args.symbols.split(",") if s.strip()]
        unknown = [s for s in wanted if s not in instruments]
        if unknown:
            raise SystemExit(f"unknown symbols: {', '.join(unknown)}")
        if getattr(args, "risk", "off") == "on" and set(wanted) != set(instruments):
            # One account's USDT pays for every USDT market: its balances live in one engine.
            raise SystemExit("--symbols needs --risk off: with balances one matcher takes every symbol")
        instruments = {s: instruments[s] for s in wanted}
    return Config(
        redis_url=args.redis_url,
        instruments=tuple(instruments.values()),
        data_dir=Path(args.data_dir),
        checkpoint_every=max(1, args.checkpoint_every),
        checkpoint_seconds=args.checkpoint_seconds,
        keep_checkpoints=max(1, args.keep_checkpoints),
        batch=max(1, args.batch),
        instance=args.instance or metrics.instance_name("matcher"),
        metrics_endpoint=metrics_endpoint,
        freeze_gc=True,
        checkpoint_key_file=Path(args.checkpoint_key_file) if args.checkpoint_key_file else None,
        risk=getattr(args, "risk", "off") == "on",
    )


async def _main(cfg: Config) -> int:
    if cfg.risk:
        from services.matcher.venue import VenueMatcher  # the service's one other mode

        matcher: Matcher = VenueMatcher(cfg)
    else:
        matcher = Matcher(cfg)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, matcher.stop)
    return await matcher.run()


def run(args: argparse.Namespace) -> int:
    logs.from_args("matcher", args)
    cfg = config_from_args(args)
    port = metrics.serve("matcher", args.metrics_port, cfg.instance, args.metrics_host)
    log.info("metrics on port %d", port)
    cfg = dataclasses.replace(cfg, metrics_endpoint=f"{socket.gethostname()}:{port}")
    # The core creates no reference cycles: its books free their orders by reference counting alone.
    # The cyclic collector would only add pauses that grow with the book (a full pass over millions of
    # resting orders). The I/O loop (XREAD, commit scripts, pub/sub) was measured to leave no cyclic
    # garbage either; what an exception's traceback may leave is negligible in a crash-only process.
    gc.disable()
    return aio.run(_main(cfg))
