"""Kraken's v2 book checksum, checked against an implementation written here from Kraken's docs
(string walking and binascii, sharing no code with services.feeds.checksum), over books rebuilt
from random command flows: the engine's own book, the feed's BookView, and the wire."""

from __future__ import annotations

import binascii
import random

import pytest

from services.feeds.checksum import level_part
from services.feeds.fanout import text_frame_ending
from services.feeds.views import Applied, BookView
from shared.wsserver import text_frame
from tests.feeds.test_views import INST, Flow

Levels = list[list[str]]


def kraken_checksum(asks: Levels, bids: Levels) -> int:
    """The top 10 asks (lowest first) then the top 10 bids (highest first); for each level its price
    then its quantity, '.' removed, then leading '0's removed; CRC32 as an unsigned 32-bit int."""
    text = ""
    for price, qty in [*asks[:10], *bids[:10]]:
        for field in (price, qty):
            digits = "".join(ch for ch in field if ch != ".")
            start = 0
            while start < len(digits) and digits[start] == "0":
                start += 1
            text += digits[start:]
    return binascii.crc32(text.encode("ascii")) & 0xFFFFFFFF


def test_level_parts_follow_kraken_examples() -> None:
    # The worked examples of Kraken's v1 and v2 checksum guides.
    assert level_part("0.05000", "0.00000304") == b"5000304"
    assert level_part("45285.2", "0.00100000") == b"452852100000"


def test_empty_and_one_sided_books() -> None:
    view = BookView(INST)
    assert view.apply_snapshot({"seq": 1, "bids": [], "asks": []})
    assert view.checksum() == kraken_checksum([], []) == 0
    assert view.apply_snapshot({"seq": 2, "bids": [["100.00", "0.50000"]], "asks": []})
    assert view.checksum() == kraken_checksum([], [["100.00", "0.50000"]])


@pytest.mark.parametrize("seed", [11, 12, 13, 14])
def test_every_update_checksums_the_engine_book(seed: int) -> None:
    """After each l2_update the view's checksum is Kraken's over the engine's real book (not the
    view's own levels): more than 10 levels, inserts and removals inside and below the top 10."""
    flow = Flow(seed, 4000)
    flow.updates(300)
    view = BookView(INST)
    view.apply_snapshot(flow.snapshot())
    snap = view.snapshot()
    assert snap["checksum"] == kraken_checksum(snap["asks"], snap["bids"])
    deep = 0
    for _ in range(1500):
        for msg in flow.updates(1):
            assert view.apply_update(msg) is Applied.OK
            bids, asks = flow.depth(10)
            assert view.checksum() == kraken_checksum(asks, bids), f"seq {msg['seq']}"
            deep += len(view.bids.keys) > 10 and len(view.asks.keys) > 10
    assert deep > 100  # the flow kept books deeper than the checksum's 10 levels


@pytest.mark.parametrize("seed", [21, 22, 23])
def test_checksums_asked_now_and_then_and_after_resyncs(seed: int) -> None:
    """The view keeps its top-10 parts only once a checksum was asked for, and starts again from a
    snapshot or an unsync: checksums asked at random moments (long stretches without any, runs of
    consecutive ones), across snapshots and unsyncs, all match Kraken's over the engine's book."""
    rng = random.Random(seed)
    flow = Flow(seed, 6000)
    flow.updates(200)
    view = BookView(INST)
    view.apply_snapshot(flow.snapshot())
    checked = 0
    for _ in range(2500):
        r = rng.random()
        if r < 0.01:
            view.unsync()
            view.apply_snapshot(flow.snapshot())
        elif r < 0.02:
            view.apply_snapshot(flow.snapshot())  # the same book: nothing changes
        for msg in flow.updates(1):
            assert view.apply_update(msg) is Applied.OK
        if rng.random() < 0.3:  # the checksum, or the end of the l2_update line that carries it
            bids, asks = flow.depth(10)
            expected = kraken_checksum(asks, bids)
            if rng.random() < 0.5:
                assert view.checksum() == expected, f"seq {view.seq}"
            else:
                assert view.checksum_end() == b',"checksum":%d}' % expected, f"seq {view.seq}"
            checked += 1
    assert checked > 500


def test_changes_at_the_edge_of_the_top_10() -> None:
    """Inserts and removals right at the tenth and eleventh levels, on books of 9 to 12 levels."""
    rng = random.Random(5)
    view = BookView(INST)
    view.apply_snapshot({"seq": 0, "bids": [], "asks": []})
    book: dict[str, dict[int, str]] = {"buy": {}, "sell": {}}
    view.checksum()
    for seq in range(1, 3001):
        side = rng.choice(("buy", "sell"))
        ticks = rng.randint(1, 13) if side == "sell" else rng.randint(-13, -1)
        price = f"{30000 + ticks / 100:.2f}"
        qty = "0" if rng.random() < 0.4 else f"{rng.randint(1, 999) / 1000:.3f}"
        if qty == "0":
            book[side].pop(ticks, None)
        else:
            book[side][ticks] = qty
        assert view.apply_update({"seq": seq, "changes": [[side, price, qty]]}) is Applied.OK
        asks = [[f"{30000 + t / 100:.2f}", q] for t, q in sorted(book["sell"].items())]
        bids = [[f"{30000 + t / 100:.2f}", q] for t, q in sorted(book["buy"].items(), reverse=True)]
        assert view.checksum() == kraken_checksum(asks, bids), f"seq {seq}"


@pytest.mark.parametrize("size", [10, 74, 75, 65484, 65485, 70000])  # frames of 125, 126, 65535, 65536
def test_the_checksummed_line_is_framed_in_one_step(size: int) -> None:
    """The feed frames an l2_update line with its checksum end in place of the closing brace in one
    step: the same frame as framing the joined line, on both sides of each frame header size."""
    line = b'{"type":"l2_update","pad":"' + b"x" * size + b'"}'
    end = b',"checksum":%d}' % 4294967295
    assert text_frame_ending(line, end) == text_frame(line[:-1] + end)
