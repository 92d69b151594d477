"""API keys: stored and held as SHA-256 digests, never as the keys themselves.

The key file is a JSON object whose names are "sha256:<64 lowercase hex>" (the digest of the key's
UTF-8 bytes, what `cme keys add` writes) or, in the older format, the plain key; values are account
names. Plain keys are hashed as the file is loaded and must be at least 22 characters (128 bits of
url-safe base64), so the process never keeps a usable key in memory and a short, guessable key is
refused outright.

Why a plain SHA-256 and not scrypt / PBKDF2: a slow hash protects low-entropy secrets (passwords)
against offline guessing; these keys are 256-bit random (secrets.token_urlsafe(32)), or at least
128-bit, so no number of SHA-256 evaluations finds one, and a fast hash keeps a login cheap for the
gateway.

Why a dict lookup on the digest is safe (instead of hmac.compare_digest against each entry): the
lookup hashes and compares the SHA-256 of the attacker's guess, not the guess. Timing can at best
tell how many leading bits of that digest match a stored digest; the attacker can choose digest bits
only by hashing many guesses, and learning a stored digest, even all of it, does not reveal the key
(a preimage of SHA-256 of a 128-bit random value). The byte-by-byte timing attack on a plain `==`
needs the compared bytes to be the secret's own, which hashing rules out.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import tempfile
from collections.abc import Mapping
from typing import Final

import orjson

from services.gateway import validation

DIGEST_PREFIX: Final = "sha256:"
MIN_KEY_CHARS: Final = 22  # 22 url-safe base64 characters = 132 bits
MAX_KEY_CHARS: Final = 256  # longer presented keys are not hashed, just refused
NEW_KEY_BYTES: Final = 32
_DIGEST_RE: Final = re.compile(r"sha256:[0-9a-f]{64}")


def key_digest(key: str) -> str:
    """The stored form of a key: "sha256:" + hex SHA-256 of its UTF-8 bytes."""
    # surrogatepass: never raises; a key with a lone surrogate hashes to something no stored key has.
    return DIGEST_PREFIX + hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


class KeyStore:
    """Digest -> account. Built from a key file's entries (digests or plain keys)."""

    __slots__ = ("_accounts",)

    def __init__(self, entries: Mapping[str, str]) -> None:
        """entries: "sha256:<hex>" or a plain key (hashed here; at least MIN_KEY_CHARS) -> account."""
        accounts: dict[str, str] = {}
        for name, account in entries.items():
            if type(name) is not str or type(account) is not str:
                raise ValueError("API keys: expected api key (or sha256:<hex> digest) -> account strings")
            if not validation.valid_account(account):
                raise ValueError(
                    f"API keys: invalid account name {account!r} (1 to 64 of A-Z a-z 0-9 _ . @ -, "
                    "not starting with _: those are the venue's)"
                )
            if name.startswith(DIGEST_PREFIX):
                if _DIGEST_RE.fullmatch(name) is None:
                    raise ValueError(f"API keys: malformed digest {name[:20]!r}... (sha256: + 64 hex digits)")
                digest = name
            else:
                if not MIN_KEY_CHARS <= len(name) <= MAX_KEY_CHARS:
                    # Never echo the key itself: the message goes to logs.
                    raise ValueError(
                        f"API keys: a key of account {account!r} has {len(name)} characters; keys need "
                        f"{MIN_KEY_CHARS} to {MAX_KEY_CHARS} (128 bits or more: use `cme keys add`)"
                    )
                digest = key_digest(name)
            if accounts.setdefault(digest, account) != account:
                raise ValueError(f"API keys: one key names two accounts ({accounts[digest]!r}, {account!r})")
        self._accounts = accounts

    def account_for(self, key: object) -> str | None:
        """The account of a presented key, or None."""
        if type(key) is not str or not MIN_KEY_CHARS <= len(key) <= MAX_KEY_CHARS:
            return None
        return self._accounts.get(key_digest(key))


def _read_entries(path: str) -> dict[str, str]:
    with open(path, "rb") as f:
        data = orjson.loads(f.read())
    if type(data) is not dict or not all(type(k) is str and type(v) is str for k, v in data.items()):
        raise ValueError(f"{path}: expected a JSON object of api key (or sha256:<hex>) -> account strings")
    return data


def load_api_keys(path: str) -> KeyStore:
    """An API key file (see the module docstring) as a KeyStore; ValueError if it is unusable."""
    entries = _read_entries(path)
    if not entries:
        raise ValueError(f"{path}: no API keys")
    try:
        return KeyStore(entries)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None


def add_key(path: str, account: str) -> str:
    """Generate a key for `account`, store only its digest in `path` (created or rewritten 0600,
    atomically), and return the key: the only time it is ever visible."""
    if not validation.valid_account(account):
        raise ValueError(f"invalid account name {account!r}")
    entries = _read_entries(path) if os.path.exists(path) else {}
    KeyStore(entries)  # refuse to extend a file that would not load
    key = secrets.token_urlsafe(NEW_KEY_BYTES)
    entries[key_digest(key)] = account
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".apikeys-", dir=directory)  # mkstemp creates it 0600
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(orjson.dumps(entries, option=orjson.OPT_INDENT_2 | orjson.OPT_APPEND_NEWLINE))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return key
