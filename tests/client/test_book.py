"""L2Book: snapshot plus updates, and every way an update can fail to fit."""

from __future__ import annotations

from typing import Any

import pytest
from cme_client import L2Book, ProtocolError, SequenceGap

SNAP: dict[str, Any] = {
    "type": "l2_snapshot", "symbol": "BTC-USDT", "seq": 5,
    "bids": [["100.50", "2.00000"], ["100.00", "1.00000"]], "asks": [["101.00", "0.50000"]],
}  # fmt: skip


def update(
    seq: int, changes: list[list[str]], bid: list[str] | None, ask: list[str] | None
) -> dict[str, Any]:
    return {"type": "l2_update", "symbol": "BTC-USDT", "seq": seq, "changes": changes,
            "bbo": {"bid": bid, "ask": ask}}  # fmt: skip


def test_snapshot_then_updates_keep_the_wire_strings_best_first() -> None:
    book = L2Book(SNAP)
    assert book.synced and book.seq == 5
    assert book.apply(update(6, [["sell", "101.00", "0.00000"], ["sell", "102.10", "3.00000"]],
                             ["100.50", "2.00000"], ["102.10", "3.00000"]))  # fmt: skip
    assert book.apply(update(7, [["buy", "100.75", "1.50000"]], ["100.75", "1.50000"], ["102.10", "3.00000"]))
    assert book.levels() == (
        [["100.75", "1.50000"], ["100.50", "2.00000"], ["100.00", "1.00000"]],
        [["102.10", "3.00000"]],
    )
    assert book.levels(1) == ([["100.75", "1.50000"]], [["102.10", "3.00000"]])
    assert book.bbo() == {"bid": ["100.75", "1.50000"], "ask": ["102.10", "3.00000"]}
    assert book.seq == 7


def test_other_symbols_and_other_messages_are_ignored() -> None:
    book = L2Book(SNAP)
    assert not book.apply({**update(9, [], None, None), "symbol": "ETH-USDT"})
    assert not book.apply({"type": "trade", "symbol": "BTC-USDT"})
    assert book.seq == 5


def test_a_seq_gap_raises_and_the_book_waits_for_a_snapshot() -> None:
    book = L2Book(SNAP)
    with pytest.raises(SequenceGap):
        book.apply(update(7, [], ["100.50", "2.00000"], ["101.00", "0.50000"]))
    assert not book.synced
    with pytest.raises(SequenceGap):  # even the update that would have followed on
        book.apply(update(6, [], ["100.50", "2.00000"], ["101.00", "0.50000"]))
    book.apply({**SNAP, "seq": 9})
    assert book.synced and book.seq == 9


def test_a_book_made_from_a_symbol_waits_for_its_first_snapshot() -> None:
    book = L2Book("BTC-USDT")
    assert not book.synced and book.seq is None
    with pytest.raises(SequenceGap):
        book.apply(update(1, [], None, None))
    with pytest.raises(ProtocolError):
        book.reset({**SNAP, "symbol": "ETH-USDT"})


def test_removing_a_missing_level_or_a_wrong_bbo_is_a_protocol_error() -> None:
    book = L2Book(SNAP)
    with pytest.raises(ProtocolError, match="not in the book"):
        book.apply(update(6, [["sell", "105.00", "0.00000"]], ["100.50", "2.00000"], ["101.00", "0.50000"]))
    assert not book.synced
    book = L2Book(SNAP)
    with pytest.raises(ProtocolError, match="bbo"):
        book.apply(update(6, [["buy", "100.60", "1.00000"]], ["100.50", "2.00000"], ["101.00", "0.50000"]))
    assert not book.synced


def test_the_book_checksum_is_krakens_and_a_wrong_one_unsyncs_the_book() -> None:
    import zlib

    # Asks then bids, each price then quantity without the point and leading zeros.
    expected = zlib.crc32(b"10100" + b"50000" + b"10050" + b"200000" + b"10000" + b"100000")
    book = L2Book({**SNAP, "checksum": expected})
    assert book.synced and book.checksum() == expected
    after = update(6, [["buy", "100.00", "0.00000"]], ["100.50", "2.00000"], ["101.00", "0.50000"])
    good = zlib.crc32(b"10100" + b"50000" + b"10050" + b"200000")
    assert book.apply({**after, "checksum": good})
    with pytest.raises(ProtocolError, match="checksum"):
        book.apply({**update(7, [["buy", "99.00", "1.00000"]], ["100.50", "2.00000"], ["101.00", "0.50000"]),
                    "checksum": good})  # fmt: skip
    assert not book.synced, "the caller resubscribes"
