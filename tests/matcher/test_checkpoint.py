"""Checkpoint blobs and files: round trip, corruption detection, newest-valid selection, atomic writes,
pruning."""

from __future__ import annotations

import hashlib
import os
import pickle
from pathlib import Path

import pytest

from services.matcher import checkpoint as ck
from services.matcher.commands import NewOrder
from services.matcher.engine import Engine
from services.matcher.snapshot import restore, snapshot, state_hash
from shared.ids import entry_to_seq, seq_to_entry
from tests.matcher import BTC, INSTRUMENTS


def _engine(orders: int = 5) -> Engine:
    engine = Engine([INSTRUMENTS[BTC]])
    for i in range(1, orders + 1):
        side = "buy" if i % 2 else "sell"
        price = 3_000_000 - i if side == "buy" else 3_000_000 + i
        engine.apply(NewOrder(BTC, f"acct{i % 3}", side, "limit", "gtc", price, 10 * i, f"c{i}"), i, 1)
    return engine


def _ckpt(entry_id: str, symbol: str = BTC, orders: int = 3) -> ck.Checkpoint:
    return ck.Checkpoint(symbol, entry_id, entry_to_seq(entry_id) & 0xFFFF, snapshot(_engine(orders)), 123)


def test_round_trip_restores_the_same_state() -> None:
    engine = _engine(7)
    blob = ck.encode(ck.Checkpoint(BTC, "1700000000000-4", 42, snapshot(engine), 99))
    assert blob.startswith(ck.MAGIC)
    got = ck.decode(blob)
    assert (got.symbol, got.entry_id, got.applied, got.created_ns) == (BTC, "1700000000000-4", 42, 99)
    assert got.seq == entry_to_seq("1700000000000-4")
    fresh = Engine([INSTRUMENTS[BTC]])
    restore(fresh, got.snapshot)
    assert state_hash(fresh) == state_hash(engine)


@pytest.mark.parametrize("damage", ["flip", "truncate", "magic", "empty"])
def test_corrupt_blobs_are_detected(damage: str) -> None:
    blob = bytearray(ck.encode(_ckpt("5-0")))
    if damage == "flip":
        blob[len(blob) // 2] ^= 0x01
    elif damage == "truncate":
        del blob[-10:]
    elif damage == "magic":
        blob[:4] = b"XXXX"
    else:
        blob.clear()
    with pytest.raises(ck.CorruptCheckpoint):
        ck.decode(bytes(blob))


def test_payload_with_a_global_is_refused_even_with_a_valid_checksum() -> None:
    payload = pickle.dumps(
        {"symbol": BTC, "entry_id": "1-0", "applied": 1, "snapshot": {}, "created_ns": os.getpid}
    )
    blob = ck.MAGIC + hashlib.sha256(payload).digest() + payload
    with pytest.raises(ck.CorruptCheckpoint, match="refers to"):
        ck.decode(blob)


def test_corrupt_file_is_skipped_and_quarantined(tmp_path: Path) -> None:
    folder = ck.directory(tmp_path, BTC)
    ck.write_file(folder, "3-0", ck.encode(_ckpt("3-0")))
    newest = ck.write_file(folder, "7-0", ck.encode(_ckpt("7-0")))
    data = bytearray(newest.read_bytes())
    data[-1] ^= 0xFF
    newest.write_bytes(bytes(data))
    got = ck.load_newest(BTC, None, folder)
    assert got is not None and got.entry_id == "3-0"
    assert [p.name for _, p in ck.list_files(folder)] == ["3-0.ckpt"]
    assert (folder / "7-0.ckpt.corrupt").exists()


def test_newest_valid_wins_across_redis_and_files(tmp_path: Path) -> None:
    folder = ck.directory(tmp_path, BTC)
    for entry_id in ("3-0", "7-0"):
        ck.write_file(folder, entry_id, ck.encode(_ckpt(entry_id)))
    got = ck.load_newest(BTC, ck.encode(_ckpt("5-0")), folder)
    assert got is not None and got.entry_id == "7-0"  # a file newer than the Redis copy
    got = ck.load_newest(BTC, ck.encode(_ckpt("9-0")), folder)
    assert got is not None and got.entry_id == "9-0"  # the Redis copy newer than every file
    got = ck.load_newest(BTC, b"CME1garbage", folder)
    assert got is not None and got.entry_id == "7-0"  # a corrupt Redis copy is skipped
    got = ck.load_newest(BTC, ck.encode(_ckpt("9-0", symbol="ETH-USDT")), folder)
    assert got is not None and got.entry_id == "7-0"  # another symbol's checkpoint is not ours
    assert ck.load_newest(BTC, None, tmp_path / "nowhere") is None


def test_file_named_for_another_entry_is_rejected(tmp_path: Path) -> None:
    folder = ck.directory(tmp_path, BTC)
    ck.write_file(folder, "2-0", ck.encode(_ckpt("2-0")))
    ck.write_file(folder, "8-0", ck.encode(_ckpt("4-0")))  # content and name disagree
    got = ck.load_newest(BTC, None, folder)
    assert got is not None and got.entry_id == "2-0"


def test_interrupted_write_leaves_no_partial_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = ck.directory(tmp_path, BTC)
    old = ck.write_file(folder, "1-0", ck.encode(_ckpt("1-0")))

    def failing_fsync(fd: int) -> None:
        raise OSError("disk gone")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="disk gone"):
        ck.write_file(folder, "2-0", ck.encode(_ckpt("2-0")))
    monkeypatch.undo()
    assert sorted(os.listdir(folder)) == ["1-0.ckpt"]  # neither the new file nor its temporary
    got = ck.load_newest(BTC, None, folder)
    assert got is not None and got.entry_id == "1-0" and old.exists()


def test_leftover_temporary_files_are_ignored_and_pruned(tmp_path: Path) -> None:
    folder = ck.directory(tmp_path, BTC)
    ck.write_file(folder, "1-0", ck.encode(_ckpt("1-0")))
    (folder / ".9-0.ckpt.tmp123").write_bytes(ck.encode(_ckpt("9-0"))[:50])  # a crash mid-write
    got = ck.load_newest(BTC, None, folder)
    assert got is not None and got.entry_id == "1-0"
    ck.prune(folder, 3)
    assert sorted(os.listdir(folder)) == ["1-0.ckpt"]


def test_pruning_keeps_the_newest_k(tmp_path: Path) -> None:
    folder = ck.directory(tmp_path, BTC)
    ids = [seq_to_entry(s) for s in (5, 1 << 20, 3 << 20, (3 << 20) + 1, 10 << 20)]
    for entry_id in reversed(ids):
        ck.write_file(folder, entry_id, ck.encode(_ckpt(entry_id)))
    kept = ck.prune(folder, 2)
    assert [p.name for _, p in kept] == [f"{ids[3]}.ckpt", f"{ids[4]}.ckpt"]
    assert sorted(os.listdir(folder)) == sorted(p.name for _, p in kept)
    assert [s for s, _ in kept] == [entry_to_seq(ids[3]), entry_to_seq(ids[4])]
