"""The matcher with balances on: one Engine for every symbol, every stream applied in one order.

An account's USDT pays for BTC-USDT and ETH-USDT orders alike, so the books of all symbols and the
ledger live in one Engine (``Engine(instruments, risk=True)``), and the order in which it applies the
symbols' streams must be the same live and on replay. Entry ids give that order: with balances on,
every append takes the next id of the venue clock (shared.stream.APPEND_SCRIPT), so ids are unique
and rise across all streams, and an entry appended after another has the larger id wherever it goes.

Live, one XREAD returns every stream's new entries as of one moment: all entries up to the largest
id read are then known, except in a stream whose reply was cut at the read's COUNT, beyond whose
last entry more may follow; entries past the smallest such cut wait for the next read. The merged
entries are applied in id order, COMMIT_ENTRIES at a time, and each such chunk is committed by ONE
script over every symbol it touched (fencing checks of all of them first), together with the
balances read model (shared.keys.balances). So what is committed is always every entry up to some
id, and recovery replays all streams merged up to the largest committed id, silently.

Per symbol nothing else changes: its progress, events stream, exec log, exec ids and channels are
its own, and its entries' events (balance messages included) go out on its channels.

One checkpoint holds the whole engine (group ``_venue``): the engine's snapshot and each stream's
position, applied count and exec id.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any, Final, cast

from services.matcher import checkpoint as ck
from services.matcher import readmodel
from services.matcher.batch import Item, apply_batch
from services.matcher.engine import Engine
from services.matcher.service import (
    COMMIT_ENTRIES,
    EVENTS_MAXLEN,
    EXEC_LOG_MAXLEN,
    REPLAY_CHUNK,
    Config,
    Entry,
    Matcher,
    SymbolState,
    _entry_seq,
    commit_block,
    split_balances,
)
from services.matcher.snapshot import restore, snapshot
from shared import keys, metrics
from shared.commands import Tick
from shared.events import BALANCE, Event
from shared.ids import SEQ_BITS, entry_to_seq, seq_to_entry
from shared.instruments import LEGACY_FEE_PLACES, asset_scales
from shared.resp import pack
from shared.stream import APPEND_SCRIPT, APPEND_SHA, decode
from shared.wire import Rendered, count_execs, render

log = logging.getLogger("cme.matcher")

GROUP: Final = "_venue"  # the checkpoint's name: no symbol starts with "_"
_BLOCK: Final = 21  # ARGV values per symbol in _COMMIT_MANY
_PROGRESS_FIELDS: Final = 12  # the six field/value pairs of the progress hash

# KEYS: per symbol i (1..n) epoch, events, progress, exec log at 4i-3 .. 4i; then one balances hash per
# changed account. ARGV[1] = n; then per symbol a block of _BLOCK values from 2 + (i-1) * _BLOCK: epoch,
# events data, md channel, md payload, trades channel, trades payload, exec channel, exec payload, exec
# log entry id, the progress hash's 12 fields and values; then, per balances hash, its field/value
# pairs as "<count> f v f v ..."; then the order read model's records (services.matcher.readmodel).
# Every epoch is checked before anything is written.
_COMMIT_MANY: Final = f"""
local n = tonumber(ARGV[1])
for i = 1, n do
  local b = 2 + (i - 1) * {_BLOCK}
  local epoch = redis.call('GET', KEYS[4 * i - 3])
  if epoch ~= ARGV[b] then
    return redis.error_reply('FENCED epoch is ' .. tostring(epoch) .. ', this matcher holds ' .. ARGV[b])
  end
end
for i = 1, n do
  local b = 2 + (i - 1) * {_BLOCK}
  local k = 4 * (i - 1)
  if ARGV[b + 7] ~= '' then
    redis.call('XADD', KEYS[k + 4], 'MAXLEN', '~', {EXEC_LOG_MAXLEN}, ARGV[b + 8], 'd', ARGV[b + 7])
  end
  redis.call('XADD', KEYS[k + 2], 'MAXLEN', '~', {EVENTS_MAXLEN}, '*', 'd', ARGV[b + 1])
  for j = b + 2, b + 6, 2 do
    if ARGV[j + 1] ~= '' then redis.call('PUBLISH', ARGV[j], ARGV[j + 1]) end
  end
  redis.call('HSET', KEYS[k + 3], unpack(ARGV, b + 9, b + 8 + {_PROGRESS_FIELDS}))
end
local a = 2 + n * {_BLOCK}
for k = 4 * n + 1, #KEYS do
  local count = tonumber(ARGV[a])
  redis.call('HSET', KEYS[k], unpack(ARGV, a + 1, a + count))
  a = a + count + 1
end
local i = a
{readmodel.APPLY_LUA}
return 1
"""

# The balances read model written anew from the ledger, when recovery cannot tell that what Redis
# holds has the ledger's scales (no checkpoint, or one written under other scales). KEYS: every
# symbol's epoch, then one balances hash per account. ARGV[1] = the number of epochs, then the epochs
# this matcher holds, then per hash "<count> f v f v ...". Every epoch is checked before any write.
_REWRITE_BALANCES: Final = """
local n = tonumber(ARGV[1])
for i = 1, n do
  local epoch = redis.call('GET', KEYS[i])
  if epoch ~= ARGV[1 + i] then
    return redis.error_reply('FENCED epoch is ' .. tostring(epoch) .. ', this matcher holds ' .. ARGV[1 + i])
  end
end
local a = n + 2
for k = n + 1, #KEYS do
  local count = tonumber(ARGV[a])
  redis.call('DEL', KEYS[k])
  redis.call('HSET', KEYS[k], unpack(ARGV, a + 1, a + count))
  a = a + count + 1
end
return 1
"""
_REWRITE_ACCOUNTS: Final = 500  # balances hashes per script call

# (place, stream order, state, entry, its seq): the place is the seq, or for an id that is no seq
# (None) the place of the entry before it in its stream
Merged = tuple[int, int, SymbolState, Entry, int | None]
Read = tuple[SymbolState, list[Entry], bool]  # (state, entries, whether the reply was cut at the batch size)


class _Block:
    """One symbol's part of a commit: its events, rendered messages (their exec ids) and its stream
    position at its end."""

    __slots__ = ("applied", "last_id", "pairs", "rendered", "st")

    def __init__(self, st: SymbolState) -> None:
        self.st = st
        self.rendered = Rendered(st.exec_seq)
        self.pairs: list[list[Any]] = []
        self.last_id, self.applied = st.last_id, st.applied


def _balances_hash(assets: Mapping[str, Sequence[int]]) -> list[bytes]:
    """One account's balances read-model hash as script ARGV: "<count> f v f v ...", a field per
    asset and its value "<available> <held>" in asset units (shared.keys.balances)."""
    flat = [v for asset, (a, h) in assets.items() for v in (asset.encode(), b"%d %d" % (a, h))]
    return [b"%d" % len(flat), *flat]


def _bound(streams: list[Read]) -> int | None:
    """The last seq that is sure: a stream whose reply was cut (truncated) may have more after its last
    entry, so nothing beyond the smallest such last entry may be applied yet."""
    return min((entry_to_seq(entries[-1][0]) for _, entries, cut in streams if cut and entries), default=None)


def _included(entries: list[Entry], bound: int | None) -> int:
    """How many of a stream's entries, a prefix, lie within `bound`; an id that is no seq keeps the place
    of the entry before it."""
    last = _entry_seq(entries[-1][0]) if entries else None
    if bound is None or (last is not None and last <= bound):
        return len(entries)
    prev = 0
    for n, (raw_id, _) in enumerate(entries):
        seq = _entry_seq(raw_id)
        prev = prev if seq is None else seq
        if prev > bound:
            return n
    return len(entries)


def _crosses_symbols(rows: list[tuple[SymbolState, bytes, int, int]], results: list[list[Event]]) -> bool:
    """Did one (account, asset) balance change on two symbols among these rows?"""
    if len({row[0] for row in rows}) < 2:
        return False
    seen: dict[tuple[str, str], SymbolState] = {}
    for st, _, index, _ in rows:
        if index >= 0:
            for e in results[index]:
                if e[0] == BALANCE and seen.setdefault((e[2], e[3]), st) is not st:
                    return True
    return False


class VenueMatcher(Matcher):
    """Matcher over one shared Engine(risk=True); see the module docstring."""

    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg)
        self.engine = Engine(cfg.instruments, risk=True)
        ledger = self.engine.ledger
        assert ledger is not None
        self.scales = ledger.scales
        self.legacy_scales = asset_scales(cfg.instruments, LEGACY_FEE_PLACES)  # integer funding amounts
        for st in self.states.values():
            st.engine = self.engine
        self.order = {st: i for i, st in enumerate(self.states.values())}
        self.scripts["commit_many"] = _COMMIT_MANY
        self.scripts["rewrite_balances"] = _REWRITE_BALANCES
        self.scripts["append"] = APPEND_SCRIPT
        self.k_checkpoint = keys.checkpoint(GROUP)
        self.ckpt_applied = 0  # entries of all streams applied at the last checkpoint
        self.ckpt_mono = time.monotonic()

    def _applied(self) -> int:
        return sum(st.applied for st in self.states.values())

    # Recovery ---------------------------------------------------------------------------------
    async def _recover_all(self) -> None:
        states = list(self.states.values())
        self._rt("recover")
        blob = cast(bytes | None, await self.r.get(self.k_checkpoint))
        windows = [await self._stream_window(st) for st in states]
        live = [w for w in windows if w.last]
        window = ck.StreamWindow(
            min((w.first for w in live), default=0), max((w.last for w in live), default=0)
        )
        folder = ck.directory(self.cfg.data_dir, GROUP)
        loaded = await asyncio.to_thread(ck.load_newest, GROUP, blob, folder, self.ckpt_key,
                                         restore=self._restore, window=window)  # fmt: skip
        if loaded is not None:
            ckpt, engine = loaded
            self._adopt(engine)
            for st in states:
                last_id, applied, exec_seq = ckpt.snapshot["streams"].get(st.symbol, ["0-0", 0, 0])
                st.last_id, st.applied, st.exec_seq = last_id.encode(), applied, exec_seq
            log.info("venue: checkpoint at %s (%d entries applied)", ckpt.entry_id, ckpt.applied)
        self.ckpt_applied, self.ckpt_mono = self._applied(), time.monotonic()
        await self._renew_if_due()
        target = 0
        for st in states:
            self._rt("recover")
            progress = cast(dict[bytes, bytes], await self.r.hgetall(st.k_progress))
            last = progress.get(b"last_id")
            if last is not None:
                target = max(target, entry_to_seq(last))
        replayed = await self._replay_merged(states, target)
        for st in states:
            metrics.REPLAYED.labels(st.symbol).set(replayed)
        log.info("venue: replayed %d entries up to %s", replayed, seq_to_entry(target))
        if loaded is None or loaded[0].snapshot["engine"].get("asset_scales") != self.scales:
            await self._rewrite_balances(states)

    async def _rewrite_balances(self, states: list[SymbolState]) -> None:
        """The balances read model from the ledger, every account, in fenced script calls."""
        ledger = self.engine.ledger
        assert ledger is not None
        accounts = list(ledger.balances().items())
        for start in range(0, len(accounts), _REWRITE_ACCOUNTS):
            keys_, args = [st.k_epoch for st in states], [b"%d" % len(states), *(st.epoch for st in states)]
            for account, assets in accounts[start : start + _REWRITE_ACCOUNTS]:
                keys_.append(keys.balances(account))
                args += _balances_hash(assets)
            self._rt("recover")
            await self._fenced("rewrite_balances", keys_, args)
        log.info("venue: balances read model written for %d accounts", len(accounts))

    def _restore(self, ckpt: ck.Checkpoint) -> Engine:
        engine = Engine(self.cfg.instruments, risk=True)
        restore(engine, ckpt.snapshot["engine"])
        if engine.last_seq > ckpt.seq:
            raise ValueError(f"the snapshot applied seq {engine.last_seq}, after its entry {ckpt.entry_id}")
        return engine

    def _adopt(self, engine: Engine) -> None:
        self.engine = engine
        for st in self.states.values():
            st.engine = engine

    async def _replay_merged(self, states: list[SymbolState], target: int) -> int:
        """Apply, in id order and without publishing, every entry of every stream up to `target` (the
        largest committed id), REPLAY_CHUNK per stream and read."""
        end = seq_to_entry(target).encode()
        replayed = 0
        done = {st for st in states if entry_to_seq(st.last_id) >= target}
        while len(done) < len(states):
            streams = []
            for st in states:
                if st not in done:
                    self._rt("replay")
                    after = b"(" + st.last_id
                    entries = cast(
                        list[Entry], await self.r.xrange(st.k_orders, after, end, count=REPLAY_CHUNK)
                    )
                    streams.append((st, entries, len(entries) >= REPLAY_CHUNK))
            for _, _, st, (raw_id, fields), seq in self._merge(streams):
                cmd, _ = decode(fields, self.scales, self.legacy_scales)
                engine = self.engine
                if cmd is not None and seq is not None and seq > engine.last_seq:
                    st.exec_seq += count_execs(engine.apply(cmd, seq, seq >> SEQ_BITS))
                st.last_id = raw_id
                st.applied += 1
                replayed += 1
            for st, entries, cut in streams:  # all of it applied, and nothing more to come
                if not cut and (not entries or st.last_id == entries[-1][0]):
                    done.add(st)
            await self._renew_if_due()
        return replayed

    def _merge(self, streams: list[Read]) -> list[Merged]:
        """The entries of several streams in id order, up to the last one that is sure (_bound).
        Ties cannot happen with the venue clock; stream order breaks them."""
        bound = _bound(streams)
        runs = []
        for st, entries, _ in streams:
            order, run, prev = self.order[st], [], 0
            for entry in entries[: _included(entries, bound)]:
                seq = _entry_seq(entry[0])
                prev = prev if seq is None else seq  # an id that is no seq keeps its stream's place
                run.append((prev, order, st, entry, seq))
            runs.append(run)
        if len(runs) == 1:
            return runs[0]
        return list(heapq.merge(*runs, key=lambda m: (m[0], m[1])))

    # Live -------------------------------------------------------------------------------------
    def _reads(self, states: list[SymbolState], ids: list[bytes], block: bool = True) -> list[bytes]:
        """A blocking XREAD of one entry as the doorbell, then the read that counts, without BLOCK
        (without `block`, only the latter).

        A blocked XREAD over several streams is answered with the one stream whose append woke it, and
        one append call gives a whole batch its ids across streams (shared.stream.APPEND_SCRIPT): that
        answer would be no prefix of the venue clock's ids. The second XREAD runs right after the
        first returns, in the same round trip, and sees every stream at one instant: whole batches."""
        streams = [st.k_orders.encode() for st in states]
        read = pack(b"XREAD", b"COUNT", b"%d" % self.cfg.batch, b"STREAMS", *streams, *ids)
        if not block:
            return [read]
        doorbell = pack(
            b"XREAD", b"COUNT", b"1", b"BLOCK", b"%d" % self.cfg.block_ms, b"STREAMS", *streams, *ids
        )
        return [doorbell, read]

    def _positions(self, streams: list[tuple[bytes, list[Entry]]]) -> list[bytes]:
        """Past the read's bound (_merge) nothing is applied: those entries are read again."""
        read = self._read_streams(streams)
        bound = _bound(read)
        last = {st.k_orders.encode(): st.last_id for st in self.states.values()}
        for st, entries, _ in read:
            n = _included(entries, bound)
            if n:
                last[st.k_orders.encode()] = entries[n - 1][0]
        return list(last.values())

    def _read_streams(self, streams: list[tuple[bytes, list[Entry]]]) -> list[Read]:
        """A read's streams for _merge: (state, entries, whether the reply was cut at the batch size)."""
        batch = self.cfg.batch
        return [(self.by_stream[k], e, len(e) >= batch) for k, e in streams if e]

    def _apply_read(self, streams: list[tuple[bytes, list[Entry]]], read_ns: int) -> list[bytes]:
        merged = self._merge(self._read_streams(streams))
        return [
            self._process_merged(merged[i : i + COMMIT_ENTRIES], read_ns)
            for i in range(0, len(merged), COMMIT_ENTRIES)
        ]

    def _append(self, st: SymbolState, entry: bytes) -> bytes:
        """Under the venue clock's ids (shared.stream.APPEND_SCRIPT), as the gateways append."""
        return pack(b"EVALSHA", APPEND_SHA, b"2", keys.id_clock().encode(), st.k_orders.encode(), b"2", entry)

    def _process_merged(self, chunk: list[Merged], read_ns: int) -> bytes:
        """Apply merged entries in order, render each symbol's part, and return the one commit."""
        engine = self.engine
        last = engine.last_seq
        items: list[Item] = []
        rows: list[tuple[SymbolState, bytes, int, int]] = []  # state, entry id, item index (-1), recv
        for _, _, st, (raw_id, fields), seq in chunk:
            cmd, recv_ns = decode(fields, self.scales, self.legacy_scales)
            if type(cmd) is Tick:
                st.tick_pending = False
            if cmd is None or seq is None or seq <= last:
                log.warning("%s: skipping entry %r: not a command", st.symbol, raw_id)
                rows.append((st, raw_id, -1, 0))
                continue
            last = seq
            rows.append((st, raw_id, len(items), recv_ns))
            items.append((cmd, seq, seq >> SEQ_BITS))
        durations: list[float] = []
        results = apply_batch(engine.apply, items, durations)

        now_ns = time.time_ns()
        # One block per symbol, unless an account's asset changed on two symbols in this chunk: its
        # balance lines travel on both symbols' channels, so the blocks then follow the commands'
        # order (a block per run of one symbol) and the lines reach the account in the order made.
        split = _crosses_symbols(rows, results)
        blocks: list[_Block] = []
        by_state: dict[SymbolState, _Block] = {}
        balances: dict[str, dict[str, tuple[int, int]]] = {}  # the chunk's last state of each
        records = readmodel.Records()
        for st, raw_id, index, recv_ns in rows:
            block = (blocks[-1] if blocks and blocks[-1].st is st else None) if split else by_state.get(st)
            if block is None:
                block = by_state[st] = _Block(st)
                blocks.append(block)
            if index >= 0:
                events, ts = results[index], items[index][2]
                render(events, st.inst, ts, block.rendered, recv_ns, now_ns, self.scales)
                records.add(events, st.inst, ts)
                block.pairs.append([raw_id.decode(), split_balances(events, balances)])
            else:
                block.pairs.append([raw_id.decode(), []])
            st.last_id = raw_id
            st.applied += 1
            st.exec_seq = block.rendered.exec_seq
            block.last_id, block.applied = raw_id, st.applied

        keys_: list[bytes] = []
        args: list[bytes] = [b"%d" % len(blocks)]
        for block in blocks:
            st, rendered = block.st, block.rendered
            keys_ += st.commit_keys
            args += commit_block(st, block.pairs, rendered, block.last_id, block.applied, now_ns)
            st.m_batch.observe(len(block.pairs))
            st.m_applied.inc(len(block.pairs))
            metrics.PUBLISHED.labels("md").inc(len(rendered.md))
            metrics.PUBLISHED.labels("trades").inc(len(rendered.trades))
            metrics.PUBLISHED.labels("exec").inc(len(rendered.execs))
            if rendered.trades:
                st.m_trades.inc(len(rendered.trades))
        for account, assets in balances.items():
            keys_.append(keys.balances(account).encode())
            args += _balances_hash(assets)
        args += records.records()
        first = blocks[0].st
        first.m_command.observe_many(durations)
        read_ms = read_ns // 1_000_000
        first.m_wait.observe_many([(read_ms - ts) * 1e-3 for _, _, ts in items])
        first.m_o2p.observe_many([(now_ns - r) * 1e-9 for _, _, _, r in rows if r])
        return pack(b"EVALSHA", self.sha["commit_many"], b"%d" % len(keys_), *keys_, *args)

    # Checkpoints ------------------------------------------------------------------------------
    def _maybe_checkpoint(self) -> None:
        task = self._ckpt_task
        if task is not None:
            if not task.done():
                return
            self._ckpt_task = None
            task.result()
        if self._due():
            self._ckpt_task = asyncio.create_task(self._venue_checkpoint(self._capture_venue()))

    def _due(self) -> bool:
        """One checkpoint covers every stream: due by what was applied since, or by its age."""
        pending = self._applied() - self.ckpt_applied
        due = (
            pending >= self.cfg.checkpoint_every
            or time.monotonic() - self.ckpt_mono >= self.cfg.checkpoint_seconds
        )
        return bool(pending) and due

    async def _shutdown_checkpoints(self) -> None:
        if self._ckpt_task is not None:
            await self._ckpt_task
            self._ckpt_task = None
        if self._applied() != self.ckpt_applied:
            await self._venue_checkpoint(self._capture_venue())

    def _capture_venue(self) -> ck.Checkpoint:
        """The whole engine and every stream's position, now (callers: everything applied is committed)."""
        states = list(self.states.values())
        self.ckpt_applied, self.ckpt_mono = self._applied(), time.monotonic()
        position = max(entry_to_seq(st.last_id) for st in states)
        streams = {st.symbol: [st.last_id.decode(), st.applied, st.exec_seq] for st in states}
        snap = {"engine": snapshot(self.engine), "streams": streams}
        return ck.Checkpoint(GROUP, seq_to_entry(position), self.ckpt_applied, snap, time.time_ns())

    async def _venue_checkpoint(self, ckpt: ck.Checkpoint) -> None:
        first = next(iter(self.states.values()))  # one matcher holds every symbol's lease at once
        await self._write_checkpoint(ckpt, first, self.k_checkpoint, list(self.states.values()))
