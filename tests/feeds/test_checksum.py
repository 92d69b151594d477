"""Kraken's v2 book checksum, checked against an implementation written here from Kraken's docs
(string walking and binascii, sharing no code with services.feeds.checksum), over books rebuilt
from random command flows: the engine's own book, the feed's BookView, and the wire."""

from __future__ import annotations

import binascii

import pytest

from services.feeds.checksum import level_part
from services.feeds.views import Applied, BookView
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
