"""Checkpoint blobs, keys and files: round trip, corruption and forgery detection, private modes, the
newest usable copy wins (every unusable one is set aside, down to a full replay), atomic writes, pruning."""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import pickle
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from services.matcher import checkpoint as ck
from services.matcher.engine import Engine
from services.matcher.snapshot import restore, snapshot, state_hash
from shared.commands import NewOrder
from shared.ids import entry_to_seq, seq_to_entry
from tests.matcher import BTC, INSTRUMENTS

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))  # another host's data dir
ANY = ck.StreamWindow(0, 1 << 62)  # a stream that holds every entry these tests name
RESTORE = ck.restore_engine(INSTRUMENTS[BTC])


def _engine(orders: int = 5) -> Engine:
    engine = Engine([INSTRUMENTS[BTC]])
    for i in range(1, orders + 1):
        side = "buy" if i % 2 else "sell"
        price = 3_000_000 - i if side == "buy" else 3_000_000 + i
        engine.apply(NewOrder(BTC, f"acct{i % 3}", side, "limit", "gtc", price, 10 * i, f"c{i}"), i, 1)
    return engine


def _ckpt(entry_id: str, symbol: str = BTC, orders: int = 3) -> ck.Checkpoint:
    return ck.Checkpoint(symbol, entry_id, entry_to_seq(entry_id) & 0xFFFF, snapshot(_engine(orders)), 123)


def _blob(entry_id: str, **kw: Any) -> bytes:
    return ck.encode(_ckpt(entry_id, **kw), KEY)


def _load(redis_blob: bytes | None, folder: Path, window: ck.StreamWindow = ANY) -> ck.Checkpoint | None:
    loaded = ck.load_newest(BTC, redis_blob, folder, KEY, restore=RESTORE, window=window)
    return None if loaded is None else loaded[0]


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture()
def open_umask() -> Iterator[None]:
    """Umask 0: the modes seen are the ones the code asks for, not the environment's defaults."""
    old = os.umask(0)
    yield
    os.umask(old)


def test_round_trip_restores_the_same_state() -> None:
    engine = _engine(7)
    blob = ck.encode(ck.Checkpoint(BTC, "1700000000000-4", 42, snapshot(engine), 99, exec_seq=17), KEY)
    assert blob.startswith(ck.MAGIC)
    got = ck.decode(blob, KEY)
    assert (got.symbol, got.entry_id, got.applied, got.created_ns, got.exec_seq) == (
        BTC, "1700000000000-4", 42, 99, 17,
    )  # fmt: skip
    assert got.seq == entry_to_seq("1700000000000-4")
    fresh = Engine([INSTRUMENTS[BTC]])
    restore(fresh, got.snapshot)
    assert state_hash(fresh) == state_hash(engine)


@pytest.mark.parametrize("damage", ["flip", "truncate", "magic", "empty"])
def test_corrupt_blobs_are_detected(damage: str) -> None:
    blob = bytearray(_blob("5-0"))
    if damage == "flip":
        blob[len(blob) // 2] ^= 0x01
    elif damage == "truncate":
        del blob[-10:]
    elif damage == "magic":
        blob[:4] = b"XXXX"
    else:
        blob.clear()
    with pytest.raises(ck.CorruptCheckpoint):
        ck.decode(bytes(blob), KEY)


def _framed(payload: bytes, mac: bytes, magic: bytes = ck.MAGIC) -> bytes:
    return magic + hashlib.sha256(payload).digest() + mac + payload


def _payload(**overrides: Any) -> bytes:
    fields = {"symbol": BTC, "entry_id": "1-0", "applied": 1, "exec_seq": 0,
              "snapshot": snapshot(_engine(2)), "created_ns": 5}  # fmt: skip
    return pickle.dumps({**fields, **overrides})


@pytest.mark.parametrize("mac", ["none", "zeros", "other key"])
def test_a_forged_blob_with_a_fresh_checksum_is_refused(mac: str) -> None:
    payload = _payload()
    if mac == "none":  # the old framing: a checksum only
        forged = ck.MAGIC + hashlib.sha256(payload).digest() + payload
    elif mac == "zeros":
        forged = _framed(payload, bytes(32))
    else:
        forged = _framed(payload, hmac.new(OTHER_KEY, ck.MAGIC + payload, hashlib.sha256).digest())
    # Without a MAC slot the checksum lands on the wrong bytes; with one, the MAC does not verify.
    with pytest.raises(ck.CorruptCheckpoint, match=r"checksum mismatch|authentication failed"):
        ck.decode(forged, KEY)
    assert ck.decode(_framed(payload, hmac.new(KEY, ck.MAGIC + payload, hashlib.sha256).digest()), KEY)


def test_the_unauthenticated_old_format_is_refused() -> None:
    payload = _payload()
    with pytest.raises(ck.CorruptCheckpoint, match="CME1 carries no authentication"):
        ck.decode(b"CME1" + hashlib.sha256(payload).digest() + payload, KEY)


def test_a_blob_written_with_another_key_is_refused() -> None:
    with pytest.raises(ck.CorruptCheckpoint, match="another key"):
        ck.decode(ck.encode(_ckpt("5-0"), OTHER_KEY), KEY)


@pytest.mark.parametrize(
    "payload",
    [
        _payload(created_ns=os.getpid),  # a global: never unpickled, even authenticated
        _payload(applied="1"),
        pickle.dumps(["not", "a", "dict"]),
        pickle.dumps({"symbol": BTC}),
    ],
)
def test_authenticated_but_malformed_payloads_are_refused(payload: bytes) -> None:
    blob = _framed(payload, hmac.new(KEY, ck.MAGIC + payload, hashlib.sha256).digest())
    with pytest.raises(ck.CorruptCheckpoint, match="unreadable payload"):
        ck.decode(blob, KEY)


# The key ---------------------------------------------------------------------------------------
def test_the_key_is_created_once_privately(tmp_path: Path, open_umask: None) -> None:
    path = ck.default_key_file(tmp_path / "var")
    key = ck.load_key(path)
    assert len(key) == ck.KEY_BYTES and path.read_bytes() == key
    assert _mode(path) == 0o600 and _mode(path.parent) == 0o700
    assert ck.load_key(path) == key  # kept, not replaced
    assert os.listdir(path.parent) == [ck.KEY_FILE]  # no temporary left behind


def test_a_key_created_meanwhile_by_another_matcher_wins(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / ck.KEY_FILE
    theirs = os.urandom(32)
    real_link = os.link

    def link_after_the_other(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        Path(dst).write_bytes(theirs)  # the other matcher linked its key first
        real_link(src, dst)

    monkeypatch.setattr(os, "link", link_after_the_other)
    assert ck.load_key(path) == theirs
    assert os.listdir(tmp_path) == [ck.KEY_FILE]


def test_a_short_key_is_refused_and_an_exposed_one_is_reported(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / ck.KEY_FILE
    path.write_bytes(b"x" * 31)
    with pytest.raises(ck.KeyFileError, match="at least 32"):
        ck.load_key(path)
    path.write_bytes(b"x" * 64)
    path.chmod(0o644)
    assert ck.load_key(path) == b"x" * 64
    assert "accessible to group or others" in caplog.text


# Files -----------------------------------------------------------------------------------------
def test_files_and_folders_are_private(tmp_path: Path, open_umask: None) -> None:
    folder = ck.directory(tmp_path / "var", BTC)
    path = ck.write_file(folder, "3-0", _blob("3-0"))
    assert _mode(path) == 0o600
    assert _mode(folder) == 0o700 and _mode(folder.parent) == 0o700 and _mode(tmp_path / "var") == 0o700
    folder.chmod(0o755)  # as an older version left them
    folder.parent.chmod(0o755)
    assert _load(None, folder) is not None
    assert _mode(folder) == 0o700 and _mode(folder.parent) == 0o700


def test_corrupt_file_is_skipped_and_set_aside(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    folder = ck.directory(tmp_path, BTC)
    ck.write_file(folder, "3-0", _blob("3-0"))
    newest = ck.write_file(folder, "7-0", _blob("7-0"))
    data = bytearray(newest.read_bytes())
    data[-1] ^= 0xFF
    newest.write_bytes(bytes(data))
    got = _load(None, folder)
    assert got is not None and got.entry_id == "3-0"
    assert [p.name for _, p in ck.list_files(folder)] == ["3-0.ckpt"]
    assert (folder / "7-0.ckpt.bad").exists()
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert any("7-0.ckpt" in r.getMessage() and "checksum mismatch" in r.getMessage() for r in errors)


def test_newest_valid_wins_across_redis_and_files(tmp_path: Path) -> None:
    folder = ck.directory(tmp_path, BTC)
    for entry_id in ("3-0", "7-0"):
        ck.write_file(folder, entry_id, _blob(entry_id))
    got = _load(_blob("5-0"), folder)
    assert got is not None and got.entry_id == "7-0"  # a file newer than the Redis copy
    got = _load(_blob("9-0"), folder)
    assert got is not None and got.entry_id == "9-0"  # the Redis copy newer than every file
    got = _load(b"CME2garbage", folder)
    assert got is not None and got.entry_id == "7-0"  # a corrupt Redis copy is skipped
    got = _load(_blob("9-0", symbol="ETH-USDT"), folder)
    assert got is not None and got.entry_id == "7-0"  # another symbol's checkpoint is not ours
    assert _load(None, tmp_path / "nowhere") is None


def test_the_redis_copy_written_with_another_key_falls_back_to_the_file(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = ck.directory(tmp_path, BTC)
    ck.write_file(folder, "3-0", _blob("3-0"))
    got = _load(ck.encode(_ckpt("9-0"), OTHER_KEY), folder)  # newer, but from a host with its own key
    assert got is not None and got.entry_id == "3-0"
    assert "refusing the checkpoint in Redis: authentication failed" in caplog.text


def test_file_named_for_another_entry_is_rejected(tmp_path: Path) -> None:
    folder = ck.directory(tmp_path, BTC)
    ck.write_file(folder, "2-0", _blob("2-0"))
    ck.write_file(folder, "8-0", _blob("4-0"))  # content and name disagree
    got = _load(None, folder)
    assert got is not None and got.entry_id == "2-0"


# Restoring -------------------------------------------------------------------------------------
def _unusable(kind: str) -> Callable[[dict[str, Any]], None]:
    def damage(snap: dict[str, Any]) -> None:
        book = snap["books"][BTC]
        if kind == "version":  # a valid checksum and key, a format this build does not know
            snap["version"] = 99
        elif kind == "missing":
            del snap["books"][BTC]["bids"]
        elif kind == "crossed":
            book["asks"][0][0] = book["bids"][0][0]
        elif kind == "duplicate":
            book["bids"][0][1].append(list(book["bids"][0][1][0]))
        elif kind == "beyond":  # applied commands after the entry the checkpoint claims to end at
            snap["last_seq"] = 1 << 40
        elif kind == "type":
            book["bids"][0][1][0][3] = "10"

    return damage


@pytest.mark.parametrize("kind", ["version", "missing", "crossed", "duplicate", "beyond", "type"])
def test_a_checkpoint_that_does_not_restore_is_set_aside(
    tmp_path: Path, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    folder = ck.directory(tmp_path, BTC)
    ck.write_file(folder, "3-0", _blob("3-0", orders=4))
    bad = _ckpt("7-0", orders=4)
    _unusable(kind)(bad.snapshot)
    ck.write_file(folder, "7-0", ck.encode(bad, KEY))
    loaded = ck.load_newest(BTC, ck.encode(bad, KEY), folder, KEY, restore=RESTORE, window=ANY)
    assert loaded is not None
    ckpt, engine = loaded
    assert ckpt.entry_id == "3-0" and state_hash(engine) == state_hash(_engine(4))
    assert [p.name for _, p in ck.list_files(folder)] == ["3-0.ckpt"]
    assert (folder / "7-0.ckpt.bad").exists()
    refusals = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert sum("does not restore" in m for m in refusals) == 2  # the Redis copy and the file
    assert any("resuming from the older 3-0" in m for m in refusals)


def test_whatever_restore_raises_the_next_older_one_is_tried(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = ck.directory(tmp_path, BTC)
    for entry_id in ("3-0", "7-0"):
        ck.write_file(folder, entry_id, _blob(entry_id))

    def failing(ckpt: ck.Checkpoint) -> str:
        raise RuntimeError(f"cannot use {ckpt.entry_id}")

    assert ck.load_newest(BTC, _blob("9-0"), folder, KEY, restore=failing, window=ANY) is None
    assert ck.list_files(folder) == []
    assert sorted(os.listdir(folder)) == ["3-0.ckpt.bad", "7-0.ckpt.bad"]
    assert "no usable checkpoint (3 refused); replaying the orders stream from its start" in caplog.text


# The stream's window ---------------------------------------------------------------------------
def test_window_from_xinfo() -> None:
    assert ck.StreamWindow.from_xinfo(None) == ck.StreamWindow(0, 0)
    info = {"last-generated-id": b"9-3", "first-entry": (b"2-0", {b"d": b""}), "length": 5}
    assert ck.StreamWindow.from_xinfo(info) == ck.StreamWindow(entry_to_seq("2-0"), entry_to_seq("9-3"))
    empty = {"last-generated-id": b"9-3", "first-entry": None, "length": 0}
    assert ck.StreamWindow.from_xinfo(empty) == ck.StreamWindow(entry_to_seq("9-3"), entry_to_seq("9-3"))


def test_a_checkpoint_ahead_of_the_stream_is_refused(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = ck.directory(tmp_path, BTC)
    for entry_id in ("3-0", "7-0"):
        ck.write_file(folder, entry_id, _blob(entry_id))
    window = ck.StreamWindow(entry_to_seq("1-0"), entry_to_seq("5-0"))  # a Redis with less history
    got = _load(_blob("9-0"), folder, window)
    assert got is not None and got.entry_id == "3-0"
    assert (folder / "7-0.ckpt.bad").exists()
    assert "beyond the orders stream's last id 5-0" in caplog.text
    assert _load(None, folder, ck.StreamWindow.from_xinfo(None)) is None  # no stream at all: wiped
    assert (folder / "3-0.ckpt.bad").exists()


def test_a_checkpoint_behind_the_stream_start_is_refused(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A wiped Redis that took new orders first: its stream starts after every old checkpoint."""
    folder = ck.directory(tmp_path, BTC)
    ck.write_file(folder, "3-0", _blob("3-0"))
    assert _load(None, folder, ck.StreamWindow(entry_to_seq("4-0"), entry_to_seq("6-0"))) is None
    assert "before the orders stream's first entry 4-0" in caplog.text
    ck.write_file(folder, "4-0", _blob("4-0"))
    got = _load(None, folder, ck.StreamWindow(entry_to_seq("4-0"), entry_to_seq("6-0")))
    assert got is not None and got.entry_id == "4-0"  # the trim keeps the oldest kept checkpoint's entry


# Writing and pruning ---------------------------------------------------------------------------
def test_interrupted_write_leaves_no_partial_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = ck.directory(tmp_path, BTC)
    old = ck.write_file(folder, "1-0", _blob("1-0"))

    def failing_fsync(fd: int) -> None:
        raise OSError("disk gone")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="disk gone"):
        ck.write_file(folder, "2-0", _blob("2-0"))
    monkeypatch.undo()
    assert sorted(os.listdir(folder)) == ["1-0.ckpt"]  # neither the new file nor its temporary
    got = _load(None, folder)
    assert got is not None and got.entry_id == "1-0" and old.exists()


def test_leftover_temporary_files_are_ignored_and_pruned(tmp_path: Path) -> None:
    folder = ck.directory(tmp_path, BTC)
    ck.write_file(folder, "1-0", _blob("1-0"))
    (folder / ".9-0.ckpt.tmp123").write_bytes(_blob("9-0")[:50])  # a crash mid-write
    got = _load(None, folder)
    assert got is not None and got.entry_id == "1-0"
    ck.prune(folder, 3)
    assert sorted(os.listdir(folder)) == ["1-0.ckpt"]


def test_pruning_keeps_the_newest_k(tmp_path: Path) -> None:
    folder = ck.directory(tmp_path, BTC)
    ids = [seq_to_entry(s) for s in (5, 1 << 20, 3 << 20, (3 << 20) + 1, 10 << 20)]
    for entry_id in reversed(ids):
        ck.write_file(folder, entry_id, _blob(entry_id))
    kept = ck.prune(folder, 2)
    assert [p.name for _, p in kept] == [f"{ids[3]}.ckpt", f"{ids[4]}.ckpt"]
    assert sorted(os.listdir(folder)) == sorted(p.name for _, p in kept)
    assert [s for s, _ in kept] == [entry_to_seq(ids[3]), entry_to_seq(ids[4])]
