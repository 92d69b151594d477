"""Matcher checkpoints: the core's snapshot at one stream entry, framed so a torn or corrupt copy is caught.

A blob is ``MAGIC + sha256(payload) + payload``; the payload is a pickle of a dict of plain data
(symbol, entry_id, applied, snapshot, created_ns). The same blob goes to a Redis key and to a file
``{data_dir}/checkpoints/{symbol}/{entry_id}.ckpt``; on start the newest copy that verifies wins, so a
lost Redis key, a half-written file or a flipped bit costs only a longer replay, never a wrong state.

Loading never runs code from the blob: the payload is checked against its digest first, and the
unpickler refuses every global, which plain dicts, lists, ints and strings never need.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import pickle
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from shared.ids import entry_to_seq

log = logging.getLogger(__name__)

MAGIC = b"CME1"
_DIGEST = hashlib.sha256().digest_size
SUFFIX = ".ckpt"
_TMP_MARK = ".tmp"


class CorruptCheckpoint(ValueError):
    """A blob that is not a checkpoint, or whose payload does not match its digest."""


@dataclass(frozen=True)
class Checkpoint:
    symbol: str
    entry_id: str  # the last stream entry the snapshot includes ("0-0": none)
    applied: int  # stream entries applied in total up to entry_id
    snapshot: dict[str, Any]  # services.matcher.snapshot.snapshot(engine)
    created_ns: int = 0

    @property
    def seq(self) -> int:
        return entry_to_seq(self.entry_id)


def encode(ckpt: Checkpoint) -> bytes:
    payload = pickle.dumps(
        {
            "symbol": ckpt.symbol,
            "entry_id": ckpt.entry_id,
            "applied": ckpt.applied,
            "snapshot": ckpt.snapshot,
            "created_ns": ckpt.created_ns or time.time_ns(),
        },
        protocol=pickle.HIGHEST_PROTOCOL,
    )
    return MAGIC + hashlib.sha256(payload).digest() + payload


class _PlainUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"checkpoint refers to {module}.{name}")


def decode(blob: bytes) -> Checkpoint:
    head = len(MAGIC) + _DIGEST
    if len(blob) < head or not blob.startswith(MAGIC):
        raise CorruptCheckpoint("not a checkpoint (bad magic or too short)")
    payload = memoryview(blob)[head:]
    if hashlib.sha256(payload).digest() != blob[len(MAGIC) : head]:
        raise CorruptCheckpoint("checksum mismatch")
    try:
        data = _PlainUnpickler(io.BytesIO(payload)).load()
        ckpt = Checkpoint(
            symbol=str(data["symbol"]),
            entry_id=str(data["entry_id"]),
            applied=int(data["applied"]),
            snapshot=dict(data["snapshot"]),
            created_ns=int(data["created_ns"]),
        )
        ckpt.seq  # noqa: B018  (validates the entry id)
    except (pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError, AttributeError) as exc:
        raise CorruptCheckpoint(f"unreadable payload: {exc}") from exc
    return ckpt


# Files -----------------------------------------------------------------------------------------
def directory(data_dir: str | os.PathLike[str], symbol: str) -> Path:
    return Path(data_dir) / "checkpoints" / quote(symbol, safe="")


def write_file(folder: Path, entry_id: str, blob: bytes) -> Path:
    """Write atomically: a reader sees the old set of files or the new complete one, never a torn file,
    even across a power cut (data fsynced before the rename, the directory after it)."""
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"{entry_id}{SUFFIX}"
    tmp = folder / f".{entry_id}{SUFFIX}{_TMP_MARK}{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(blob)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(folder)
    return final


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def list_files(folder: Path) -> list[tuple[int, Path]]:
    """(seq, path) of the checkpoint files in `folder`, oldest first; other names are ignored."""
    found: list[tuple[int, Path]] = []
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return found
    for name in names:
        if name.startswith(".") or not name.endswith(SUFFIX):
            continue
        try:
            found.append((entry_to_seq(name[: -len(SUFFIX)]), folder / name))
        except ValueError:
            continue
    found.sort()
    return found


def prune(folder: Path, keep: int) -> list[tuple[int, Path]]:
    """Delete all but the newest `keep` checkpoint files and leftovers of interrupted writes.

    Returns the kept (seq, path) pairs, oldest first."""
    files = list_files(folder)
    cut = max(0, len(files) - max(1, keep))
    for _, path in files[:cut]:
        path.unlink(missing_ok=True)
    try:
        for name in os.listdir(folder):
            if name.startswith(".") and _TMP_MARK in name:
                (folder / name).unlink(missing_ok=True)
    except FileNotFoundError:
        pass
    return files[cut:]


def read_file(path: Path) -> Checkpoint:
    try:
        blob = path.read_bytes()
    except OSError as exc:
        raise CorruptCheckpoint(f"unreadable file: {exc}") from exc
    return decode(blob)


def load_newest(symbol: str, redis_blob: bytes | None, folder: Path) -> Checkpoint | None:
    """The newest checkpoint of `symbol` that verifies, from the Redis copy and the files; None if none.

    Corrupt copies are skipped with a warning; a corrupt file is renamed to ``*.corrupt`` so it is kept
    for inspection but neither loaded again nor counted among the kept checkpoints."""
    best: Checkpoint | None = None
    if redis_blob is not None:
        try:
            best = _check(decode(redis_blob), symbol)
        except CorruptCheckpoint as exc:
            log.warning("%s: skipping the checkpoint in Redis: %s", symbol, exc)
    for seq, path in reversed(list_files(folder)):
        if best is not None and seq <= best.seq:
            break  # files are newest first: nothing newer remains
        try:
            ckpt = _check(read_file(path), symbol)
            if ckpt.seq != seq:
                raise CorruptCheckpoint(f"file name says {path.stem}, content says {ckpt.entry_id}")
        except CorruptCheckpoint as exc:
            log.warning("%s: skipping checkpoint file %s: %s", symbol, path, exc)
            _quarantine(path)
            continue
        best = ckpt
        break
    return best


def _check(ckpt: Checkpoint, symbol: str) -> Checkpoint:
    if ckpt.symbol != symbol:
        raise CorruptCheckpoint(f"checkpoint is for {ckpt.symbol}, not {symbol}")
    return ckpt


def _quarantine(path: Path) -> None:
    with contextlib.suppress(OSError):
        os.replace(path, path.with_name(path.name + ".corrupt"))
