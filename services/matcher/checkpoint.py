"""Matcher checkpoints: the core's snapshot at one stream entry, authenticated so that only a matcher
holding the key can have written it, and framed so that a torn or corrupt copy is caught.

A blob is ``MAGIC + sha256(payload) + hmac_sha256(key, MAGIC + payload) + payload``; the payload is a
pickle of a dict of plain data (symbol, entry_id, applied, exec_seq, snapshot, created_ns). The checksum
tells a torn or flipped copy from one written with another key (or forged), so the log can say which.
The same blob goes to a Redis key and to a file ``{data_dir}/checkpoints/{symbol}/{entry_id}.ckpt``.

The key is 32 random bytes in ``{data_dir}/checkpoint.key`` (mode 0600, created on first use), never
sent to Redis. Matchers that share a Redis must share the key: one on another host with its own data
dir cannot verify the Redis copy and falls back to its own files or to a full replay.

Loading never runs code from the blob: the payload is authenticated first, and the unpickler refuses
every global, which plain dicts, lists, ints and strings never need. `load_newest` restores each
candidate itself, newest first: whatever is wrong with a copy (corrupt, forged, unknown format, a
snapshot that does not restore, another history than the stream's) it is set aside, logged as an
error, and the next older one is tried, down to a full replay. The matcher never sees an unusable one.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import io
import logging
import os
import pickle
import secrets
import stat
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

from services.matcher.engine import Engine
from services.matcher.snapshot import restore
from shared.ids import entry_to_seq, seq_to_entry
from shared.instruments import Instrument

log = logging.getLogger(__name__)

MAGIC = b"CME2"
_RETIRED = {b"CME1": "format CME1 carries no authentication and is no longer loaded"}
_SHA = hashlib.sha256().digest_size
_MAC = _SHA
_HEAD = len(MAGIC) + _SHA + _MAC
SUFFIX = ".ckpt"
SET_ASIDE = ".bad"  # appended to a refused file's name: kept for inspection, never loaded again
_TMP_MARK = ".tmp"
KEY_FILE = "checkpoint.key"
KEY_BYTES = 32
_PRIVATE_DIR = 0o700
_PRIVATE_FILE = 0o600

T = TypeVar("T")


class CorruptCheckpoint(ValueError):
    """A blob that is not a checkpoint of this format, or that fails its checksum or authentication."""


class KeyFileError(ValueError):
    """The checkpoint key file is unusable (too short, or not a regular file)."""


@dataclass(frozen=True)
class Checkpoint:
    symbol: str
    entry_id: str  # the last stream entry the snapshot includes ("0-0": none)
    applied: int  # stream entries applied in total up to entry_id
    snapshot: dict[str, Any]  # services.matcher.snapshot.snapshot(engine)
    created_ns: int = 0
    exec_seq: int = 0  # the symbol's execution report sequence at entry_id

    @property
    def seq(self) -> int:
        return entry_to_seq(self.entry_id)


# Blobs -----------------------------------------------------------------------------------------
def _mac(key: bytes, payload: bytes | memoryview) -> bytes:
    mac = hmac.new(key, MAGIC, hashlib.sha256)
    mac.update(payload)
    return mac.digest()


def encode(ckpt: Checkpoint, key: bytes) -> bytes:
    payload = pickle.dumps(
        {
            "symbol": ckpt.symbol,
            "entry_id": ckpt.entry_id,
            "applied": ckpt.applied,
            "exec_seq": ckpt.exec_seq,
            "snapshot": ckpt.snapshot,
            "created_ns": ckpt.created_ns or time.time_ns(),
        },
        protocol=pickle.HIGHEST_PROTOCOL,
    )
    return MAGIC + hashlib.sha256(payload).digest() + _mac(key, payload) + payload


class _PlainUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"checkpoint refers to {module}.{name}")


def _field(data: Mapping[str, Any], name: str, kind: type[T]) -> T:
    value = data[name]
    if type(value) is not kind:
        raise TypeError(f"{name} is a {type(value).__name__}, not a {kind.__name__}")
    return value


def decode(blob: bytes, key: bytes) -> Checkpoint:
    magic = bytes(blob[: len(MAGIC)])
    if magic != MAGIC:
        raise CorruptCheckpoint(_RETIRED.get(magic, f"not a checkpoint of this format (magic {magic!r})"))
    if len(blob) < _HEAD:
        raise CorruptCheckpoint("too short")
    payload = memoryview(blob)[_HEAD:]
    if hashlib.sha256(payload).digest() != blob[len(MAGIC) : len(MAGIC) + _SHA]:
        raise CorruptCheckpoint("checksum mismatch (torn or corrupt)")
    if not hmac.compare_digest(_mac(key, payload), blob[len(MAGIC) + _SHA : _HEAD]):
        raise CorruptCheckpoint(
            "authentication failed: written with another key (a matcher on another host that does not "
            "share --checkpoint-key-file?) or forged"
        )
    try:
        data = _PlainUnpickler(io.BytesIO(payload)).load()
        if type(data) is not dict:
            raise TypeError(f"payload is a {type(data).__name__}")
        ckpt = Checkpoint(
            symbol=_field(data, "symbol", str),
            entry_id=_field(data, "entry_id", str),
            applied=_field(data, "applied", int),
            snapshot=_field(data, "snapshot", dict),
            created_ns=_field(data, "created_ns", int),
            exec_seq=_field(data, "exec_seq", int),
        )
        ckpt.seq  # noqa: B018  (validates the entry id)
    except (pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError, AttributeError) as exc:
        raise CorruptCheckpoint(f"unreadable payload: {exc!r}") from exc
    return ckpt


# The key ---------------------------------------------------------------------------------------
def default_key_file(data_dir: str | os.PathLike[str]) -> Path:
    return Path(data_dir) / KEY_FILE


def load_key(path: Path) -> bytes:
    """The checkpoint key in `path`, created (32 random bytes, mode 0600) if there is none yet.

    Matchers starting together on one data dir race to create it: each writes its own candidate and
    links it into place, and a loser reads the winner's, so they all end up with the same key."""
    try:
        key = path.read_bytes()
    except FileNotFoundError:
        key = _create_key(path)
    if len(key) < KEY_BYTES:
        raise KeyFileError(f"checkpoint key {path} holds {len(key)} bytes; at least {KEY_BYTES} are needed")
    mode = path.stat().st_mode
    if not stat.S_ISREG(mode):
        raise KeyFileError(f"checkpoint key {path} is not a regular file")
    if mode & 0o077:
        log.warning("checkpoint key %s is accessible to group or others (mode %o): chmod 600 it",
                    path, stat.S_IMODE(mode))  # fmt: skip
    return key


def _create_key(path: Path) -> bytes:
    _mkdir_private(path.parent)
    tmp = path.with_name(f".{path.name}{_TMP_MARK}{os.getpid()}")
    tmp.unlink(missing_ok=True)
    key = secrets.token_bytes(KEY_BYTES)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, _PRIVATE_FILE)
        with open(fd, "wb") as f:
            f.write(key)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)  # fails if another process got there first, unlike a rename
        except FileExistsError:
            return path.read_bytes()
        _fsync_dir(path.parent)
        log.info("created checkpoint key %s", path)
        return key
    finally:
        tmp.unlink(missing_ok=True)


# Files -----------------------------------------------------------------------------------------
def directory(data_dir: str | os.PathLike[str], symbol: str) -> Path:
    return Path(data_dir) / "checkpoints" / quote(symbol, safe="")


def _mkdir_private(path: Path) -> None:
    """`mkdir -p` where every directory it creates is 0700 (pathlib's gives the parents the default)."""
    if path.is_dir():
        return
    _mkdir_private(path.parent)
    with contextlib.suppress(FileExistsError):
        path.mkdir(mode=_PRIVATE_DIR)


def _make_private(folder: Path) -> None:
    """A symbol's checkpoint folder and the checkpoints folder above it are the matcher's own: they
    are made 0700 even when an older version created them open to others."""
    for d in (folder.parent, folder):
        with contextlib.suppress(FileNotFoundError):
            if stat.S_IMODE(d.stat().st_mode) != _PRIVATE_DIR:
                d.chmod(_PRIVATE_DIR)


def write_file(folder: Path, entry_id: str, blob: bytes) -> Path:
    """Write atomically and privately (0600 in a 0700 folder): a reader sees the old set of files or the
    new complete one, never a torn file, even across a power cut (data fsynced before the rename, the
    directory after it)."""
    _mkdir_private(folder)
    _make_private(folder)
    final = folder / f"{entry_id}{SUFFIX}"
    tmp = folder / f".{entry_id}{SUFFIX}{_TMP_MARK}{os.getpid()}"
    tmp.unlink(missing_ok=True)  # left by a crashed process that had our pid
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, _PRIVATE_FILE)
        with open(fd, "wb") as f:
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


def read_file(path: Path, key: bytes) -> Checkpoint:
    try:
        blob = path.read_bytes()
    except OSError as exc:
        raise CorruptCheckpoint(f"unreadable file: {exc}") from exc
    return decode(blob, key)


# Loading ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StreamWindow:
    """Where a usable checkpoint of this orders stream may end: at or after the stream's first entry
    (entries before it may be trimmed, so a replay from further back would miss some) and at or before
    its last generated id (a checkpoint beyond it comes from a history this Redis never had: a wiped or
    replaced Redis must not be combined with it)."""

    first: int  # seq of the oldest entry left; the last generated one when the stream is empty
    last: int  # seq of the last generated id (0: no stream)

    @classmethod
    def from_xinfo(cls, info: Mapping[str, Any] | None) -> StreamWindow:
        """From redis-py's XINFO STREAM reply; None when the stream does not exist."""
        if info is None:
            return cls(0, 0)
        last = entry_to_seq(info["last-generated-id"])
        first_entry = info.get("first-entry")
        return cls(entry_to_seq(first_entry[0]) if first_entry else last, last)

    def refusal(self, ckpt: Checkpoint) -> str | None:
        if ckpt.seq > self.last:
            last = seq_to_entry(self.last)
            return (
                f"its entry {ckpt.entry_id} is beyond the orders stream's last id {last}: "
                "it belongs to another history (Redis wiped or replaced?)"
            )
        if ckpt.seq < self.first:
            first = seq_to_entry(self.first)
            return (
                f"its entry {ckpt.entry_id} is before the orders stream's first entry {first}: "
                "a replay from it would miss the entries trimmed since"
            )
        return None


def restore_engine(inst: Instrument) -> Callable[[Checkpoint], Engine]:
    """A `restore` for `load_newest`: a fresh engine for `inst` holding the checkpoint's state."""

    def into_fresh_engine(ckpt: Checkpoint) -> Engine:
        engine = Engine([inst])
        restore(engine, ckpt.snapshot)
        if engine.last_seq > ckpt.seq:
            raise ValueError(f"the snapshot applied seq {engine.last_seq}, after its entry {ckpt.entry_id}")
        return engine

    return into_fresh_engine


def load_newest(
    symbol: str,
    redis_blob: bytes | None,
    folder: Path,
    key: bytes,
    *,
    restore: Callable[[Checkpoint], T],
    window: StreamWindow,
) -> tuple[Checkpoint, T] | None:
    """The newest checkpoint of `symbol` that verifies, fits the stream and restores, from the Redis
    copy and the files, with what `restore` made of it; None if there is none (replay from the start).

    Every refused copy is logged as an error with the reason; a refused file is renamed to ``*.bad``, so
    it is kept for inspection but neither loaded again nor counted among the kept checkpoints; a refused
    Redis copy is ignored (the next checkpoint overwrites it)."""
    _make_private(folder)
    refused = 0
    in_redis: Checkpoint | None = None
    if redis_blob is not None:
        try:
            in_redis = decode(redis_blob, key)
        except CorruptCheckpoint as exc:
            refused += 1
            _refused(symbol, "the checkpoint in Redis", exc, None)
    files = list_files(folder)  # oldest first: popped newest first
    while in_redis is not None or files:
        path: Path | None = None
        try:
            if in_redis is not None and (not files or files[-1][0] <= in_redis.seq):
                ckpt, in_redis = in_redis, None
            else:
                seq, path = files.pop()
                ckpt = read_file(path, key)
                if ckpt.seq != seq:
                    raise CorruptCheckpoint(f"file name says {path.stem}, content says {ckpt.entry_id}")
            if ckpt.symbol != symbol:
                raise CorruptCheckpoint(f"checkpoint is for {ckpt.symbol}, not {symbol}")
            why = window.refusal(ckpt)
            if why is not None:
                raise CorruptCheckpoint(why)
            state = restore(ckpt)
        except Exception as exc:  # whatever the reason, the same way out: set aside, try the next
            refused += 1
            _refused(symbol, f"checkpoint file {path}" if path else "the checkpoint in Redis", exc, path)
            continue
        if refused:
            log.error("%s: %d checkpoint copies refused; resuming from the older %s", symbol, refused,
                      ckpt.entry_id)  # fmt: skip
        return ckpt, state
    if refused:
        log.error("%s: no usable checkpoint (%d refused); replaying the orders stream from its start",
                  symbol, refused)  # fmt: skip
    return None


def _refused(symbol: str, what: str, exc: Exception, path: Path | None) -> None:
    reason = str(exc) if isinstance(exc, CorruptCheckpoint) else f"it does not restore: {exc!r}"
    if path is None:
        log.error("%s: refusing %s: %s; ignoring it", symbol, what, reason)
        return
    aside = path.with_name(path.name + SET_ASIDE)
    try:
        os.replace(path, aside)
    except OSError as err:
        log.error("%s: refusing %s: %s; could not set it aside: %s", symbol, what, reason, err)
    else:
        log.error("%s: refusing %s: %s; set aside as %s", symbol, what, reason, aside.name)
