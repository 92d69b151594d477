"""The feed's copy of one symbol's order book, rebuilt from the matcher's l2 messages. Pure: no I/O.

A view is either synced (it holds exactly the matcher's book as of `seq`) or unsynced (it holds nothing
it may serve). It becomes synced from an l2_snapshot and stays synced only while l2_update seqs follow
on by exactly one; anything else (a gap, a malformed message, a BBO that disagrees with the levels)
makes it unsynced, and the server then asks the matcher for a fresh snapshot. A wrong book is never
served: at worst the feed goes quiet for a symbol until the snapshot arrives.

Prices are keyed by integer ticks so ordering is exact, and every level keeps the price and quantity
strings exactly as the matcher rendered them, so what we serve is byte for byte what it published.
"""

from __future__ import annotations

import enum
import zlib
from bisect import bisect_left
from decimal import Decimal, InvalidOperation
from typing import Any

from services.feeds.checksum import DEPTH as CHECKSUM_DEPTH
from services.feeds.checksum import digits
from shared.instruments import Instrument, OffGrid

Message = dict[str, Any]
Level = list[str]  # [price, quantity] as rendered by the matcher


class Applied(enum.Enum):
    """What apply_update did with one l2_update."""

    OK = "ok"  # applied: forward it to clients
    DUPLICATE = "duplicate"  # seq at or below ours: already applied, ignore
    GAP = "gap"  # seq skipped (or the message was unusable): the view is now unsynced
    UNSYNCED = "unsynced"  # we are waiting for a snapshot; ignore


class Malformed(ValueError):
    """An l2 message that does not follow the protocol."""


_TICKS_CACHE_MAX = 100_000  # price strings remembered per view; prices near the mid repeat constantly


class _Side:
    """One side: ticks -> [price, qty] strings, plus the ticks in ascending order for exact ordering.

    For the checksum, once one was asked for, it keeps the checksum parts (services.feeds.checksum) of
    its best CHECKSUM_DEPTH levels, best first, in `parts`, edited in place as changes reach those
    levels, and their bytes joined (`joined`, None after such a change). A change deeper in the book
    costs one comparison, and one in the top 10 a part and a list edit; the checksum then needs one join
    of at most 10 strings and a CRC. Until a checksum is asked for (a feed without l2 subscribers)
    `parts` is None and a change pays one `is not None` test."""

    __slots__ = ("descending", "joined", "keys", "levels", "parts", "prices")

    def __init__(self, descending: bool) -> None:
        self.descending = descending  # bids: the best is the highest price
        self.levels: dict[int, Level] = {}
        self.keys: list[int] = []  # ascending; bids read it from the end
        self.parts: list[str] | None = None  # the best levels' checksum parts, best first
        self.joined: bytes | None = None  # "".join(parts), encoded; None while stale
        self.prices: dict[str, str] = {}  # price string -> its digits part (prices repeat constantly)

    def set(self, ticks: int, level: Level) -> None:
        levels, keys, parts = self.levels, self.keys, self.parts
        if ticks in levels:
            levels[ticks] = level
            if parts is None:
                return
            n = len(keys)
            if n > CHECKSUM_DEPTH and (
                ticks < keys[-CHECKSUM_DEPTH] if self.descending else ticks > keys[CHECKSUM_DEPTH - 1]
            ):
                return  # below the top 10: the checksum stays
            i = bisect_left(keys, ticks)
            parts[n - 1 - i if self.descending else i] = self._part(level)
        else:
            i = bisect_left(keys, ticks)
            keys.insert(i, ticks)
            levels[ticks] = level
            if parts is None:
                return
            rank = len(keys) - 1 - i if self.descending else i
            if rank >= CHECKSUM_DEPTH:
                return
            parts.insert(rank, self._part(level))
            if len(parts) > CHECKSUM_DEPTH:
                del parts[CHECKSUM_DEPTH]  # the old tenth is now the eleventh
        self.joined = None

    def remove(self, ticks: int) -> None:
        if self.levels.pop(ticks, None) is None:
            return
        keys = self.keys
        i = bisect_left(keys, ticks)
        del keys[i]
        parts = self.parts
        if parts is None:
            return
        rank = len(keys) - i if self.descending else i
        if rank >= CHECKSUM_DEPTH:
            return
        del parts[rank]
        if len(keys) >= CHECKSUM_DEPTH:  # the old eleventh is the new tenth
            tenth = keys[-CHECKSUM_DEPTH] if self.descending else keys[CHECKSUM_DEPTH - 1]
            parts.append(self._part(self.levels[tenth]))
        self.joined = None

    def _part(self, level: Level) -> str:
        """checksum.level_part as a string, the price's half remembered."""
        price, prices = level[0], self.prices
        head = prices.get(price)
        if head is None:
            if len(prices) >= _TICKS_CACHE_MAX:
                prices.clear()
            head = prices[price] = digits(price)
        return head + level[1].replace(".", "").lstrip("0")

    def clear(self) -> None:
        self.levels.clear()
        self.keys.clear()
        self.parts = self.joined = None

    def top_joined(self) -> bytes:
        """The checksum parts of the best CHECKSUM_DEPTH levels, best first, joined."""
        joined = self.joined
        if joined is None:
            parts = self.parts
            if parts is None:  # the first checksum: from now on the parts are kept as the side changes
                keys, levels, part = self.keys, self.levels, self._part
                picked = keys[: -CHECKSUM_DEPTH - 1 : -1] if self.descending else keys[:CHECKSUM_DEPTH]
                parts = self.parts = [part(levels[ticks]) for ticks in picked]
            joined = self.joined = "".join(parts).encode()
        return joined

    def top(self, n: int | None, descending: bool) -> list[Level]:
        keys = self.keys
        if n is not None and n <= 0:
            return []
        if descending:
            picked = (keys if n is None else keys[-n:])[::-1]
        else:
            picked = keys if n is None else keys[:n]
        levels = self.levels
        return [levels[k] for k in picked]

    def best(self, descending: bool) -> Level | None:
        if not self.keys:
            return None
        return self.levels[self.keys[-1] if descending else self.keys[0]]


class BookView:
    """One symbol's book as the feed knows it."""

    def __init__(self, inst: Instrument) -> None:
        self.inst = inst
        self.symbol = inst.symbol
        self.synced = False
        self.seq = 0
        self.bids = _Side(descending=True)
        self.asks = _Side(descending=False)
        # The last checksum, valid while both sides keep their joined top (a change there drops it, a
        # new or cleared side has none), and the end of an l2_update line that carries it.
        self._checksum = 0
        self._end = b""
        # Set whenever what a depth subscriber would see may have changed; the server's depth timer
        # clears it after sending, which is what conflates many updates into one depth message.
        self.changed = False
        self._ticks: dict[str, int] = {}

    # Input --------------------------------------------------------------------------------------
    def apply_snapshot(self, msg: Message) -> bool:
        """Adopt a matcher snapshot. True if clients must get a fresh snapshot (the book they were
        shown is not this one); False if we were already synced at this seq with the same levels.

        Any seq is accepted, also one below ours: the matcher publishes every update with seq <= the
        snapshot's before it, in order, so a lower seq means the matcher itself went back (restart
        from an older checkpoint, reset) and its word is the truth.
        """
        seq = msg.get("seq")
        bids, asks = msg.get("bids"), msg.get("asks")
        if type(seq) is not int or seq < 0 or not isinstance(bids, list) or not isinstance(asks, list):
            raise Malformed("l2_snapshot needs an integer seq and bids/asks lists")
        new_bids, new_asks = _Side(descending=True), _Side(descending=False)
        for rows, side in ((bids, new_bids), (asks, new_asks)):
            for row in rows:
                price, qty = self._level(row)
                if not _is_zero(qty):
                    side.set(self.ticks(price), [price, qty])
        if self.synced and seq == self.seq and _same(new_bids, self.bids) and _same(new_asks, self.asks):
            return False
        self.bids, self.asks = new_bids, new_asks
        self.seq = seq
        self.synced = True
        self.changed = True
        return True

    def apply_update(self, msg: Message) -> Applied:
        """Apply one l2_update if it is the next in sequence. On GAP the view is unsynced."""
        if not self.synced:
            return Applied.UNSYNCED
        seq = msg.get("seq")
        if type(seq) is not int:
            self.unsync()
            return Applied.GAP
        if seq <= self.seq:
            return Applied.DUPLICATE
        if seq != self.seq + 1:
            self.unsync()
            return Applied.GAP
        try:
            self._apply_changes(msg.get("changes"))
            self._check_bbo(msg.get("bbo"))
        except Malformed:
            # Half-applied or inconsistent: we cannot tell what the book is any more.
            self.unsync()
            return Applied.GAP
        self.seq = seq
        self.changed = True
        return Applied.OK

    def unsync(self) -> None:
        """Forget the book: it can no longer be trusted (gap, lost connection...)."""
        self.synced = False
        self.bids.clear()
        self.asks.clear()

    # Output -------------------------------------------------------------------------------------
    def snapshot(self) -> Message:
        """The full book as an l2_snapshot: the updates with seq > self.seq continue from it."""
        return {
            "type": "l2_snapshot",
            "symbol": self.symbol,
            "seq": self.seq,
            "bids": self.bids.top(None, descending=True),
            "asks": self.asks.top(None, descending=False),
            "checksum": self.checksum(),
        }

    def checksum(self) -> int:
        """Kraken's v2 book checksum of the book as it is now (services.feeds.checksum)."""
        if self.asks.joined is None or self.bids.joined is None:
            self._checksum_again()
        return self._checksum

    def checksum_end(self) -> bytes:
        """b',"checksum":N}' for the book as it is now: what ends an l2_update line in place of its
        closing brace. Formatted once per checksum, not once per line: most lines leave it as it is."""
        if self.asks.joined is None or self.bids.joined is None:
            self._checksum_again()
        return self._end

    def _checksum_again(self) -> None:
        # One CRC over both sides' bytes: zlib.crc32 costs more per call than per byte at these sizes.
        checksum = self._checksum = zlib.crc32(self.asks.top_joined() + self.bids.top_joined())
        self._end = b',"checksum":%d}' % checksum

    def depth(self, n: int) -> Message:
        """The top n levels per side and the BBO: one conflated depth-channel message."""
        return {
            "type": "depth",
            "symbol": self.symbol,
            "seq": self.seq,
            "bids": self.bids.top(n, descending=True),
            "asks": self.asks.top(n, descending=False),
            "bbo": self.bbo(),
        }

    def bbo(self) -> dict[str, Level | None]:
        return {"bid": self.bids.best(descending=True), "ask": self.asks.best(descending=False)}

    # Helpers ------------------------------------------------------------------------------------
    def ticks(self, price: str) -> int:
        """Integer ticks of a price string (validated against the instrument's grid, cached)."""
        cached = self._ticks.get(price)
        if cached is None:
            try:
                cached = self.inst.price_to_ticks(price)
            except OffGrid as exc:
                raise Malformed(f"bad price {price!r}: {exc}") from exc
            if len(self._ticks) >= _TICKS_CACHE_MAX:
                self._ticks.clear()
            self._ticks[price] = cached
        return cached

    @staticmethod
    def _level(row: Any) -> tuple[str, str]:
        if not isinstance(row, list) or len(row) != 2 or type(row[0]) is not str or type(row[1]) is not str:
            raise Malformed("a level is [price, quantity] as strings")
        return row[0], row[1]

    def _apply_changes(self, changes: Any) -> None:
        if not isinstance(changes, list):
            raise Malformed("l2_update needs a changes list")
        for change in changes:
            if not isinstance(change, list) or len(change) != 3:
                raise Malformed("a change is [side, price, total]")
            side_name, price, qty = change
            if side_name == "buy":
                side = self.bids
            elif side_name == "sell":
                side = self.asks
            else:
                raise Malformed(f"bad side {side_name!r}")
            if type(price) is not str or type(qty) is not str:
                raise Malformed("price and total are strings")
            ticks = self.ticks(price)
            if _is_zero(qty):
                side.remove(ticks)
            else:
                side.set(ticks, [price, qty])

    def _check_bbo(self, bbo: Any) -> None:
        """The matcher sends its BBO with every update: a free end-to-end check of our levels."""
        if bbo is None:
            return  # optional for us; the matcher always sends it
        if not isinstance(bbo, dict):
            raise Malformed("bbo is an object")
        for key, side, descending in (("bid", self.bids, True), ("ask", self.asks, False)):
            theirs = bbo.get(key)
            ours = side.best(descending)
            if theirs == ours:
                continue  # the usual case: the matcher renders a level's strings one way only
            if theirs is None or ours is None:
                if theirs is not ours:
                    raise Malformed(f"bbo {key} disagrees with the levels")
                continue
            price, qty = self._level(theirs)
            if self.ticks(price) != self.ticks(ours[0]) or not _same_qty(qty, ours[1]):
                raise Malformed(f"bbo {key} disagrees with the levels")


def _is_zero(qty: str) -> bool:
    """Numeric test: "0", "0.00000" and "0E-5" all remove a level."""
    if qty[:1] in _NONZERO_LEAD:
        return False  # the usual rendering of a live level, without building a Decimal
    try:
        d = Decimal(qty)
    except InvalidOperation as exc:
        raise Malformed(f"bad quantity {qty!r}") from exc
    if not d.is_finite() or d < 0:
        raise Malformed(f"bad quantity {qty!r}")
    return d == 0


_NONZERO_LEAD = frozenset("123456789")


def _same_qty(a: str, b: str) -> bool:
    if a == b:
        return True
    try:
        return Decimal(a) == Decimal(b)
    except InvalidOperation as exc:
        raise Malformed(f"bad quantity {a!r}") from exc


def _same(a: _Side, b: _Side) -> bool:
    if a.keys != b.keys:
        return False
    return all(_same_qty(a.levels[k][1], b.levels[k][1]) for k in a.keys)
